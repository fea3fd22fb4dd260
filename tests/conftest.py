"""Session fixtures of the core tests (helpers in unet_fixtures.py)."""
import copy

import pytest
import torch

from qvd import Calibrator, QVDConfig
from unet_fixtures import TIMESTEPS, Inputs, build_unet


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Tests (and the tools' main() they call in-process) may set torch's thread count: each test starts at the
    session's, so a float result computed in one test equals its recomputation in another (matmul reductions
    split by thread)."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


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
