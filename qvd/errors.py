"""Errors raised by QVD. Each message names the problem and how to fix it."""


class QVDError(ValueError):
    """Base class of every QVD error."""


class CalibrationError(QVDError):
    """Calibration data is missing, empty or does not cover the layers to quantize."""


class NonFiniteActivationError(CalibrationError):
    """A layer saw NaN / Inf activations while calibrating."""


class ModelMismatchError(QVDError):
    """A calibration or quantized file was made from a different model."""


class QuantizedFileError(QVDError):
    """A quantized file is missing, truncated, corrupt, malformed or of another format version."""


class CalibrationFileError(CalibrationError):
    """A calibration file is missing, truncated, corrupt, malformed or of another format version."""
