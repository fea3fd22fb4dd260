"""The one dispatch point for QVD's integer kernels.

``linear_w8a8`` / ``conv2d_w8a8`` quantize a float input with a static scale (and optional SCRI
per-channel affine), run an int8 x int8 -> int32 GEMM / convolution and apply the fused
``acc * act_scale * w_scale + bias`` epilogue. Semantics are defined by ``reference.py``.

Routes: CUDA tensors -> Triton (``triton_kernels.py``: fused quantize, GEMM / implicit-GEMM conv with
the epilogue in-kernel); if Triton is missing or fails, one log line and the torch route
(``cpu.py``: cuBLAS ``_int_mm``). CPU -> ``cpu.py`` (oneDNN int8 ops, else ``torch._int_mm``).
"""
from __future__ import annotations

import logging

import torch

from . import cpu, reference
from .cpu import int_mm

__all__ = ["linear_w8a8", "conv2d_w8a8", "quantize_activation", "hiditq_encode", "hiditq_decode",
           "int_mm", "reference", "triton_available"]

log = logging.getLogger("qvd")
_TRITON = None  # the triton_kernels module, False once unavailable / failed


def _triton():
    global _TRITON
    if _TRITON is None:
        try:
            from . import triton_kernels
            _TRITON = triton_kernels
        except Exception as e:  # ImportError, or a triton install that cannot initialise
            _disable_triton(e)
    return _TRITON


def _disable_triton(err: Exception):
    global _TRITON
    _TRITON = False
    log.warning("qvd: Triton kernels unavailable (%s: %s); using the torch int8 route", type(err).__name__, err)


def triton_available() -> bool:
    """True when CUDA tensors will run on the Triton kernels."""
    return bool(_triton())


def _on_triton(t: torch.Tensor, fn, *args, **kwargs):
    """Run a Triton kernel for CUDA tensors; None means 'use the torch route'."""
    if t.device.type != "cuda" or not _triton():
        return None
    try:
        return fn(_TRITON, *args, **kwargs)
    except Exception as e:  # compile / launch failure on this GPU: fall back for good
        _disable_triton(e)
        return None


def _check(x, w_q, dims: int, kind: str):
    if x.dim() < 1 or (dims and x.dim() != dims):
        raise ValueError(f"{kind}: input must be {dims}-D, got shape {tuple(x.shape)}")
    if w_q.dtype != torch.int8:
        raise TypeError(f"{kind}: weights must be int8 codes, got {w_q.dtype}; quantize the layer first")
    if x.device != w_q.device:
        raise ValueError(f"{kind}: input on {x.device} but weights on {w_q.device}; move the module to the input's device")
    k = x.shape[1] if dims == 4 else x.shape[-1]
    if k != w_q.shape[1]:
        raise ValueError(f"{kind}: input has {k} channels, weights expect {w_q.shape[1]}")


def quantize_activation(x, act_scale, zero_point, qmin, qmax, shift=None, inv_scale=None, channel_dim=-1):
    """Static activation quantization to int8 codes (reference semantics, fewer passes)."""
    xm = x.movedim(channel_dim, -1)
    out = torch.empty(xm.shape, dtype=torch.int8, device=x.device)
    return cpu.quantize_into(out, xm, act_scale, zero_point, qmin, qmax, shift, inv_scale).movedim(-1, channel_dim)


def linear_w8a8(x, w_q, w_scale, bias, act_scale, zero_point, qmin, qmax, shift=None, inv_scale=None,
                w_q_t: torch.Tensor | None = None):
    """W8A8 linear on ``x [..., K]``; ``w_q_t`` is an optional cached ``w_q.t()`` ([K, N])."""
    _check(x, w_q, 0, "linear_w8a8")

    def run(tk):
        lead = x.shape[:-1]
        q = tk.quantize(x.reshape(-1, x.shape[-1]), act_scale, zero_point, qmin, qmax, shift, inv_scale)
        y = tk.linear(q, w_q.t() if w_q_t is None else w_q_t, w_scale, bias, act_scale, x.dtype)
        return y.reshape(*lead, w_q.shape[0])

    y = _on_triton(x, run)
    if y is None:
        y = cpu.linear_w8a8(x, w_q, w_scale, bias, act_scale, zero_point, qmin, qmax, shift, inv_scale, w_q_t)
    return y


def conv2d_w8a8(x, w_q, w_scale, bias, act_scale, zero_point, qmin, qmax, shift=None, inv_scale=None,
                stride: int = 1, padding: int = 0, w_mat: torch.Tensor | None = None):
    """W8A8 conv2d on NCHW ``x``; ``w_mat`` is an optional cached [kh*kw*C, N] weight matrix.

    The output is NCHW-shaped and stored channels-last (the layout the next int8 conv reads fastest).
    """
    _check(x, w_q, 4, "conv2d_w8a8")
    cout, c, kh, kw = w_q.shape

    def run(tk):
        q = tk.quantize(x, act_scale, zero_point, qmin, qmax, shift, inv_scale)
        pad = cpu.quantize_into(torch.empty(c, dtype=torch.int8, device=x.device), torch.zeros(c, device=x.device),
                                act_scale, zero_point, qmin, qmax, shift, inv_scale)
        wm = cpu._im2col_weight(w_q) if w_mat is None else w_mat
        return tk.conv2d(q, pad, wm, kh, kw, w_scale, bias, act_scale, stride, padding, x.dtype)

    y = _on_triton(x, run)
    if y is None:
        y = cpu.conv2d_w8a8(x, w_q, w_scale, bias, act_scale, zero_point, qmin, qmax, shift, inv_scale,
                            stride, padding, w_mat)
    return y


def hiditq_encode(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """uint8 index of the nearest of the sorted ``levels`` (ties go to the lower level)."""
    if not 1 <= levels.numel() <= 256:
        raise ValueError(f"hiditq_encode: uint8 codes need 1..256 levels, got {levels.numel()}")
    y = _on_triton(x, lambda tk: tk.hiditq_encode(x, levels))
    return reference.hiditq_encode(x, levels) if y is None else y


def hiditq_decode(codes: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Look-up-table decode of HiDi-TQ codes."""
    y = _on_triton(codes, lambda tk: tk.hiditq_decode(codes, levels))
    return reference.hiditq_decode(codes, levels) if y is None else y
