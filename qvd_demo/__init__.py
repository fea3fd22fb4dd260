"""The demo around the method package: TinyVDM (a small AnimateDiff-architecture video model with its procedural
data), fidelity evaluation of a quantized copy against FP, and ``make demo`` (``python -m qvd_demo.demo``)."""
