"""QVD: post-training quantization for video diffusion models (plain torch, no ComfyUI import).

    with Calibrator(unet, cfg) as cal:       # hooks every Linear / Conv2d
        run_sampler(unet)                     # the user's own prompts, frames, steps
    result = quantize_model(unet, cal.result(), cfg)
    save_quantized("model.qvd.safetensors", unet_fp, result)

Where things are: quantizers.py (uniform weight / activation quantizers), htdq.py (HiDi-TQ + TDScore),
scri.py (channel range integration), calibrate.py, modules.py (QLinear / QConv2d / HiDiTQLinear),
delta.py (a host's weight patches, e.g. a LoRA, beside the int8 kernels),
quantize.py (the entry point), io.py (the file formats) on safefile.py (the verified container),
kernels/ (reference + CPU + Triton kernels).
"""
from .calibrate import Calibration, Calibrator
from .config import QVDConfig
from .errors import (CalibrationError, CalibrationFileError, ModelMismatchError, NonFiniteActivationError,
                     QuantizedFileError, QVDError)
from .io import load_calibration, load_quantized, save_calibration, save_quantized
from .modules import HiDiTQLinear, QConv2d, QLinear, set_mode
from .quantize import QuantizeResult, quantize_model

__all__ = ["Calibration", "Calibrator", "QVDConfig", "QVDError", "CalibrationError", "CalibrationFileError",
           "ModelMismatchError", "NonFiniteActivationError", "QuantizedFileError", "load_calibration", "load_quantized",
           "save_calibration", "save_quantized", "HiDiTQLinear",
           "QConv2d", "QLinear", "set_mode", "QuantizeResult", "quantize_model"]
