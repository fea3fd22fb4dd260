"""Session fixtures of the core tests (helpers in unet_fixtures.py)."""
import copy
import importlib.util
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qvd import Calibrator, QVDConfig
from qvd.kernels import cpu
from unet_fixtures import TIMESTEPS, Inputs, build_unet

ROOT = Path(__file__).resolve().parents[1]
ENV_SWITCHES = ("QVD_INT8", "QVD_CPU_ROUTE")


@pytest.fixture(autouse=True)
def _global_state_restored():
    """Tests (and the tools' main() they call in-process) may set torch's thread count, switch autograd off, pin the
    CPU route or set QVD's environment switches: each test starts with the session's, so a float result computed in
    one test equals its recomputation in another (matmul reductions split by thread) and no test depends on the
    order the suite runs in. The global RNGs (torch, numpy, random) are seeded per test: a test drawing from them
    sees the same numbers alone, in its file or in the whole suite."""
    n, grad, route = torch.get_num_threads(), torch.is_grad_enabled(), cpu.ROUTE
    env = {k: os.environ.get(k) for k in ENV_SWITCHES}
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    yield
    torch.set_num_threads(n)
    torch.set_grad_enabled(grad)
    cpu.ROUTE = route
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def unet():
    return build_unet(0)


@pytest.fixture(scope="session")
def inputs():
    return Inputs(0)


@pytest.fixture(scope="session")
def calibration(unet, inputs):
    with Calibrator(unet, QVDConfig()) as cal:
        for t in TIMESTEPS:
            inputs.run(unet, t)
    return cal.result()


@pytest.fixture(scope="session")
def quantized(unet, calibration):
    """(quantized copy of the UNet, QuantizeResult) with the default QVD config."""
    from qvd import quantize_model
    q = copy.deepcopy(unet)
    return q, quantize_model(q, calibration, QVDConfig())


@pytest.fixture(scope="module")
def pack():
    """The repository root imported as ComfyUI imports a custom-node folder (a package)."""
    spec = importlib.util.spec_from_file_location("comfyui_qvd_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        for name in [n for n in sys.modules if n == spec.name or n.startswith(spec.name + ".")]:
            del sys.modules[name]
