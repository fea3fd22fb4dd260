"""QVD: post-training quantization for video diffusion models (plain torch, no ComfyUI import).

    with Calibrator(unet, cfg) as cal:       # hooks every Linear / Conv2d
        run_sampler(unet)                     # the user's own prompts, frames, steps
    result = quantize_model(unet, cal.result(), cfg)   # = build(unet, plan(unet, calibration, cfg))
    save_quantized("model.qvd.safetensors", result)

Where things are, bottom to top (a module imports only from the rows above it; tests/test_layers.py):
errors.py, config.py; identity.py (which layers, what must match, installing), safefile.py (the verified
container), kernels/ (reference, CPU and Triton int8 kernels), timesteps.py (timestep buckets and the clock
that picks one); quantizers.py (uniform weight / activation
quantizers); scri.py (the SCRI transform and its folds), htdq.py (HiDi-TQ + TDScore); calibrate.py (statistics);
delta.py (a host's weight patches beside the int8 kernels); modules.py (QLinear / QConv2d / HiDiTQLinear);
quantize.py (plan, then build); verify.py (a quantized file checked against the model); io.py (the file
formats).
"""
from .calibrate import Calibration, Calibrator
from .config import QVDConfig
from .errors import (CalibrationError, CalibrationFileError, ModelMismatchError, NonFiniteActivationError,
                     QuantizedFileError, QVDError)
from .io import load_calibration, load_quantized, save_calibration, save_quantized
from .modules import HiDiTQLinear, QConv2d, QLinear, set_compute, set_mode
from .quantize import QuantizeResult, quantize_model

__all__ = ["Calibration", "Calibrator", "QVDConfig", "QVDError", "CalibrationError", "CalibrationFileError",
           "ModelMismatchError", "NonFiniteActivationError", "QuantizedFileError", "load_calibration", "load_quantized",
           "save_calibration", "save_quantized", "HiDiTQLinear",
           "QConv2d", "QLinear", "set_compute", "set_mode", "QuantizeResult", "quantize_model"]
