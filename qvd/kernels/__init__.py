"""The one dispatch point for QVD's integer kernels.

``linear_w8a8`` / ``conv2d_w8a8`` quantize a float input with a static scale (and optional SCRI
per-channel affine), run an int8 x int8 -> int32 GEMM / convolution and apply the fused
``acc * act_scale * w_scale + bias`` epilogue. Semantics are defined by ``reference.py``.

Weights travel as a ``PackedWeight``: the int8 codes in the one layout every route reads (K-major
``[N, K]``, ``k = (tap, channel)`` for convs), built once by the layer and kept as its state.

Routes: CUDA tensors -> Triton (``triton_kernels.py``: fused quantize, GEMM / implicit-GEMM conv with
the epilogue in-kernel). If Triton is missing: one log line and the torch route for everything; if a kernel
fails for one shape: one log line and the torch route for that (kernel, shape) only (``cpu.py``: cuBLAS
``_int_mm``). CUDA out-of-memory and interrupts propagate. CPU -> ``cpu.py`` (oneDNN int8 ops, else
``torch._int_mm``).
"""
from __future__ import annotations

import logging

import torch

from . import cpu, reference
from .cpu import int_mm

__all__ = ["PackedWeight", "linear_w8a8", "conv2d_w8a8", "quantize_activation", "hiditq_encode",
           "hiditq_decode", "int_mm", "reference", "triton_available"]

log = logging.getLogger("qvd")
_TRITON = None  # the triton_kernels module, False once unavailable
_FAILED: set[tuple] = set()  # (kernel, shape) keys whose Triton launch failed: torch route from then on
_TRITON_DEVICES = ("cuda",)  # tensors on these devices go to Triton


class PackedWeight:
    """int8 weight codes ``[N, K]`` K-major (a conv's ``[N, C, KH, KW]`` in channels-last order, ``k = (kh * KW
    + kw) * C + c``), fp32 per-output-channel scales, and route-specific packings made on first use (oneDNN)."""

    def __init__(self, w_q: torch.Tensor, w_scale: torch.Tensor):
        if w_q.dtype != torch.int8:
            raise TypeError(f"weights must be int8 codes, got {w_q.dtype}; quantize the layer first")
        if w_q.dim() not in (2, 4):
            raise ValueError(f"weights must be [N, K] or [N, C, KH, KW], got shape {tuple(w_q.shape)}")
        self.shape = tuple(w_q.shape)
        w = w_q.detach()
        self.mat = (w.permute(0, 2, 3, 1) if w.dim() == 4 else w).reshape(self.shape[0], -1).contiguous()
        self.scale = w_scale.detach().to(w.device, torch.float32).contiguous()
        self.packed: dict = {}  # route-specific copies, e.g. oneDNN's, keyed by the route

    def __getstate__(self):  # copies and pickles leave the route-specific packings behind (rebuilt on use)
        return {**self.__dict__, "packed": {}}

    @property
    def device(self) -> torch.device:
        return self.mat.device

    @property
    def channels(self) -> int:
        return self.shape[1]

    def conv_view(self) -> torch.Tensor:
        """The conv weight ``[N, C, KH, KW]`` as a channels-last view of ``mat`` (no copy)."""
        n, c, kh, kw = self.shape
        return self.mat.view(n, kh, kw, c).permute(0, 3, 1, 2)


def _triton():
    global _TRITON
    if _TRITON is None:
        try:
            from . import triton_kernels
            _TRITON = triton_kernels
        except Exception as e:  # ImportError, or a triton install that cannot initialise
            _TRITON = False
            log.warning("qvd: Triton kernels unavailable (%s: %s); using the torch int8 route",
                        type(e).__name__, e)
    return _TRITON


def triton_available() -> bool:
    """True when CUDA tensors will run on the Triton kernels."""
    return bool(_triton())


def _on_triton(t: torch.Tensor, key: tuple, fn):
    """Run a Triton kernel for CUDA tensors; None means 'use the torch route' (for this key from now on if
    the kernel failed: a compile error on this GPU, an unsupported shape)."""
    if t.device.type not in _TRITON_DEVICES or key in _FAILED or not _triton():
        return None
    try:
        return fn(_TRITON)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:
        _FAILED.add(key)
        log.warning("qvd: Triton %s failed for %s (%s: %s); this shape uses the torch int8 route from now on",
                    key[0], key[1:], type(e).__name__, e)
        return None


def _check(x, weight: PackedWeight, conv: bool, kind: str):
    if not isinstance(weight, PackedWeight):
        raise TypeError(f"{kind}: weights must be a qvd.kernels.PackedWeight, got {type(weight).__name__}")
    if conv != (len(weight.shape) == 4):
        raise ValueError(f"{kind}: got {'conv' if len(weight.shape) == 4 else 'linear'} weights {weight.shape}")
    if conv and x.dim() != 4:
        raise ValueError(f"{kind}: input must be 4-D, got shape {tuple(x.shape)}")
    if x.dim() < 1:
        raise ValueError(f"{kind}: input must have a channel dimension, got a scalar")
    if x.device != weight.device:
        raise ValueError(f"{kind}: input on {x.device} but weights on {weight.device}; move the module to the "
                         f"input's device")
    k = x.shape[1] if conv else x.shape[-1]
    if k != weight.channels:
        raise ValueError(f"{kind}: input has {k} channels, weights expect {weight.channels}")


def quantize_activation(x, act_scale, zero_point, qmin, qmax, shift=None, inv_scale=None, channel_dim=-1):
    """Static activation quantization to int8 codes (reference semantics, fewer passes)."""
    xm = x.movedim(channel_dim, -1)
    out = torch.empty(xm.shape, dtype=torch.int8, device=x.device)
    return cpu.quantize_into(out, xm, act_scale, zero_point, qmin, qmax, shift, inv_scale).movedim(-1, channel_dim)


def linear_w8a8(x, weight: PackedWeight, bias, act_scale, zero_point, qmin, qmax, shift=None, inv_scale=None):
    """W8A8 linear on ``x [..., K]``."""
    _check(x, weight, False, "linear_w8a8")
    lead = x.shape[:-1]

    def run(tk):
        q = tk.quantize(x.reshape(-1, x.shape[-1]), act_scale, zero_point, qmin, qmax, shift, inv_scale)
        y = tk.linear(q, weight.mat, weight.scale, bias, act_scale, x.dtype)
        return y.reshape(*lead, weight.shape[0])

    y = _on_triton(x, ("linear", x.numel() // x.shape[-1], weight.shape, x.dtype), run)
    if y is None:
        y = cpu.linear_w8a8(x, weight, bias, act_scale, zero_point, qmin, qmax, shift, inv_scale)
    return y


def conv2d_w8a8(x, weight: PackedWeight, bias, act_scale, zero_point, qmin, qmax, shift=None, inv_scale=None,
                stride: int = 1, padding: int = 0):
    """W8A8 conv2d on NCHW ``x``. The output is NCHW-shaped and stored channels-last (the layout the next
    int8 conv reads fastest)."""
    _check(x, weight, True, "conv2d_w8a8")
    _, c, kh, kw = weight.shape

    def run(tk):
        q = tk.quantize(x, act_scale, zero_point, qmin, qmax, shift, inv_scale)
        pad = cpu.quantize_into(torch.empty(c, dtype=torch.int8, device=x.device), torch.zeros(c, device=x.device),
                                act_scale, zero_point, qmin, qmax, shift, inv_scale)
        return tk.conv2d(q, pad, weight.mat, kh, kw, weight.scale, bias, act_scale, stride, padding, x.dtype)

    y = _on_triton(x, ("conv2d", tuple(x.shape), weight.shape, stride, padding, x.dtype), run)
    if y is None:
        y = cpu.conv2d_w8a8(x, weight, bias, act_scale, zero_point, qmin, qmax, shift, inv_scale, stride, padding)
    return y


def hiditq_encode(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """uint8 index of the nearest of the sorted ``levels`` (ties go to the lower level)."""
    if not 1 <= levels.numel() <= 256:
        raise ValueError(f"hiditq_encode: uint8 codes need 1..256 levels, got {levels.numel()}")
    y = _on_triton(x, ("hiditq_encode", levels.numel()), lambda tk: tk.hiditq_encode(x, levels))
    return reference.hiditq_encode(x, levels) if y is None else y


def hiditq_decode(codes: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Look-up-table decode of HiDi-TQ codes."""
    y = _on_triton(codes, ("hiditq_decode", levels.numel()), lambda tk: tk.hiditq_decode(codes, levels))
    return reference.hiditq_decode(codes, levels) if y is None else y
