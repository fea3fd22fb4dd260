"""Session fixtures of the core tests (helpers in unet_fixtures.py)."""
import copy

import pytest

from qvd import Calibrator, QVDConfig
from unet_fixtures import TIMESTEPS, Inputs, build_unet


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
