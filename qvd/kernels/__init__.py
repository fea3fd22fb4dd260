"""The one dispatch point for QVD's integer kernels.

``linear_w8a8`` / ``conv2d_w8a8`` quantize a float input with a static scale (and optional SCRI
per-channel affine), run an int8 x int8 -> int32 GEMM / convolution and apply the fused
``acc * act_scale * w_scale + bias`` epilogue. Semantics are defined by ``reference.py``.

Routes: CPU -> ``torch._int_mm`` (linear; conv via NHWC int8 im2col + ``_int_mm``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference
from .reference import hiditq_decode, hiditq_encode, quantize_activation

__all__ = ["linear_w8a8", "conv2d_w8a8", "quantize_activation", "hiditq_encode", "hiditq_decode",
           "int_mm", "reference"]


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 [M, K] x int8 [K, N] -> int32 [M, N]."""
    if a.device.type == "cuda" and (a.shape[0] <= 16 or a.shape[1] % 8 or b.shape[1] % 8):
        # cuBLAS int8 GEMM needs M > 16 and K, N multiples of 8: pad with zeros (exact).
        m, k = a.shape
        n = b.shape[1]
        mp, kp, np_ = max(17, m), -(-k // 8) * 8, -(-n // 8) * 8
        a = F.pad(a, (0, kp - k, 0, mp - m))
        b = F.pad(b, (0, np_ - n, 0, kp - k))
        return torch._int_mm(a, b)[:m, :n]
    return torch._int_mm(a, b)


def _epilogue(acc: torch.Tensor, act_scale, w_scale: torch.Tensor, bias: torch.Tensor | None,
              out_dtype: torch.dtype) -> torch.Tensor:
    y = acc.float().mul_(w_scale * act_scale)
    if bias is not None:
        y.add_(bias)
    return y.to(out_dtype)


def linear_w8a8(x, w_q, w_scale, bias, act_scale, zero_point, qmin, qmax, shift=None, inv_smooth=None,
                w_q_t: torch.Tensor | None = None):
    """W8A8 linear on ``x [..., K]``; ``w_q_t`` is an optional cached ``w_q.t()`` ([K, N])."""
    lead = x.shape[:-1]
    q = quantize_activation(x.reshape(-1, x.shape[-1]), act_scale, zero_point, qmin, qmax, shift, inv_smooth)
    acc = int_mm(q, w_q.t() if w_q_t is None else w_q_t)
    return _epilogue(acc, act_scale, w_scale, bias, x.dtype).reshape(*lead, w_q.shape[0])


def conv2d_w8a8(x, w_q, w_scale, bias, act_scale, zero_point, qmin, qmax, shift=None, inv_smooth=None,
                stride: int = 1, padding: int = 0, w_mat: torch.Tensor | None = None):
    """W8A8 conv2d on NCHW ``x``; ``w_mat`` is an optional cached [kh*kw*C, N] weight matrix."""
    n, c, h, w = x.shape
    cout, _, kh, kw = w_q.shape
    xh = x.permute(0, 2, 3, 1)  # NHWC view: channels are contiguous in the GEMM's K dimension
    if padding:
        xh = F.pad(xh, (0, 0, padding, padding, padding, padding))
    q = quantize_activation(xh, act_scale, zero_point, qmin, qmax, shift, inv_smooth).contiguous()
    hp, wp = h + 2 * padding, w + 2 * padding
    oh, ow = (hp - kh) // stride + 1, (wp - kw) // stride + 1
    if kh == 1 and kw == 1:
        cols = q[:, ::stride, ::stride, :].reshape(-1, c)
    else:
        sn, sh, sw, sc = q.stride()
        cols = q.as_strided((n, oh, ow, kh, kw, c), (sn, sh * stride, sw * stride, sh, sw, sc))
        cols = cols.reshape(n * oh * ow, kh * kw * c)
    if w_mat is None:
        w_mat = w_q.permute(2, 3, 1, 0).reshape(kh * kw * c, cout)
    acc = int_mm(cols, w_mat)
    y = _epilogue(acc, act_scale, w_scale, bias, x.dtype)
    return y.view(n, oh, ow, cout).permute(0, 3, 1, 2)
