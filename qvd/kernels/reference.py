"""Plain-torch reference implementations of every QVD kernel.

These define the semantics; each fast route (CPU `torch._int_mm`, Triton) is tested against them.
Integer accumulation is done in float64, which is exact for int8 x int8 sums of up to 2**37 terms.

Conventions shared by all kernels
- Activation quantization (static, per tensor, optional SCRI per-channel affine):
  ``q = clamp(round((x - shift) * inv_scale / act_scale) + zero_point, qmin, qmax)``
  with ``round`` = round-half-to-even (``torch.round``), ``shift`` / ``inv_scale`` per input channel
  (``None`` = 0 / 1). Codes are stored as int8.
- ``bias`` passed to the GEMM / conv kernels is the *effective* bias: the layer's bias plus the SCRI
  correction ``W z`` minus the zero-point correction ``act_scale * w_scale * zero_point * sum_k w_q``,
  so the epilogue is a single ``acc * (act_scale * w_scale[n]) + bias[n]``.
- Convolutions pad in the real domain (zeros) *before* quantization: a padded pixel is the code of
  0.0 in every channel. Kernels that pad int8 data must use those per-channel codes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def quantize_activation(x: torch.Tensor, act_scale, zero_point: int, qmin: int, qmax: int,
                        shift: torch.Tensor | None = None, inv_scale: torch.Tensor | None = None,
                        channel_dim: int = -1) -> torch.Tensor:
    """Static activation quantization to int8 codes (see module docstring)."""
    x = x.float()
    if shift is not None or inv_scale is not None:
        view = [1] * x.dim()
        view[channel_dim] = -1
        if shift is not None:
            x = x - shift.float().view(view)
        if inv_scale is not None:
            x = x * inv_scale.float().view(view)
    q = torch.round(x / act_scale) + zero_point
    return q.clamp_(qmin, qmax).to(torch.int8)


def int8_linear(x_q: torch.Tensor, w_q: torch.Tensor, act_scale, w_scale: torch.Tensor,
                bias: torch.Tensor | None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(x_q @ w_q.T) * act_scale * w_scale + bias`` for x_q [M, K] int8, w_q [N, K] int8."""
    acc = x_q.double() @ w_q.double().t()
    y = acc * (float(act_scale) * w_scale.double())
    if bias is not None:
        y = y + bias.double()
    return y.to(out_dtype)


def int8_conv2d(x_q: torch.Tensor, w_q: torch.Tensor, act_scale, w_scale: torch.Tensor,
                bias: torch.Tensor | None, stride: int = 1,
                out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Integer conv of already padded int8 NCHW codes with int8 [N, C, kh, kw] weights, no padding."""
    acc = F.conv2d(x_q.double(), w_q.double(), None, stride)
    y = acc * (float(act_scale) * w_scale.double().view(1, -1, 1, 1))
    if bias is not None:
        y = y + bias.double().view(1, -1, 1, 1)
    return y.to(out_dtype)


def linear_w8a8(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                act_scale, zero_point: int, qmin: int, qmax: int,
                shift: torch.Tensor | None = None, inv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize ``x [..., K]`` and run the integer linear; output in ``x.dtype``."""
    lead = x.shape[:-1]
    q = quantize_activation(x.reshape(-1, x.shape[-1]), act_scale, zero_point, qmin, qmax, shift, inv_scale)
    y = int8_linear(q, w_q, act_scale, w_scale, bias, x.dtype)
    return y.reshape(*lead, w_q.shape[0])


def conv2d_w8a8(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                act_scale, zero_point: int, qmin: int, qmax: int,
                shift: torch.Tensor | None = None, inv_scale: torch.Tensor | None = None,
                stride: int = 1, padding: int = 0) -> torch.Tensor:
    """Pad NCHW ``x`` with zeros, quantize per the conventions, integer conv; output in ``x.dtype``."""
    if padding:
        x = F.pad(x, (padding,) * 4)
    q = quantize_activation(x, act_scale, zero_point, qmin, qmax, shift, inv_scale, channel_dim=1)
    return int8_conv2d(q, w_q, act_scale, w_scale, bias, stride, x.dtype)


def hiditq_encode(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index (uint8) of the nearest of the sorted ``levels`` (ties go to the lower level)."""
    mid = (levels[1:] + levels[:-1]) * 0.5
    # bucketize on a flat tensor: ~70x faster than on a 2-D one on the CPU
    return torch.bucketize(x.float().reshape(-1), mid.float()).view(x.shape).to(torch.uint8)


def hiditq_decode(codes: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Look-up-table decode of HiDi-TQ codes."""
    return levels[codes.long()]
