"""Quantized layers that replace ``nn.Linear`` / ``nn.Conv2d``.

``QLinear`` / ``QConv2d`` (W8A8): int8 weights with per-output-channel fp32 scales, a static activation
quantizer (scale, zero point) and optional SCRI input shift / scale. ``mode = "int"`` (default) runs the
integer kernels from ``qvd.kernels``; ``mode = "fake"`` simulates the same rounding in floating point.
``HiDiTQLinear``: the time-projection layers; HiDi-TQ look-up-table activations, int8 weights.
All tensors are ``nn.Parameter(requires_grad=False)`` so hosts that move / offload parameters see them.
``forward`` takes ``input`` like ``nn.Linear`` / ``nn.Conv2d`` (callers such as diffusers pass it by name).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .quantizers import act_qrange, dequantize_weight


def _param(t: torch.Tensor | None):
    return None if t is None else nn.Parameter(t, requires_grad=False)


class _QuantizedBase(nn.Module):
    """Shared state of W8A8 layers (see module docstring)."""

    qvd_quantized = True

    def __init__(self, weight_q, weight_scale, bias, act_scale, act_zero_point, w_bits, a_bits,
                 scri_shift=None, scri_inv_scale=None):
        super().__init__()
        self.weight = _param(weight_q.to(torch.int8))
        self.weight_scale = _param(weight_scale.float())
        self.bias = _param(None if bias is None else bias.float())
        self.act_scale = _param(torch.tensor(float(act_scale)))
        self.scri_shift = _param(None if scri_shift is None else scri_shift.float())
        self.scri_inv_scale = _param(None if scri_inv_scale is None else scri_inv_scale.float())
        self.act_zero_point = int(act_zero_point)
        self.w_bits, self.a_bits = int(w_bits), int(a_bits)
        self.qmin, self.qmax = act_qrange(self.a_bits)
        self.mode = "int"
        self._cache = {}

    def effective_bias(self) -> torch.Tensor:
        """Bias with the zero-point correction ``- s_x * s_w * zp * sum_k W_q`` folded in (cached)."""
        key = ("bias", self.weight.device, self.weight._version, self.act_scale._version,
               None if self.bias is None else self.bias._version)
        if key not in self._cache:
            rowsum = self.weight.flatten(1).sum(1, dtype=torch.int32).float()
            corr = self.act_scale.float() * self.weight_scale * (self.act_zero_point * rowsum)
            b = -corr if self.bias is None else self.bias - corr
            self._cache = {k: v for k, v in self._cache.items() if k[0] != "bias"}
            self._cache[key] = b.detach()
        return self._cache[key]

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 weight acting on the SCRI-transformed input."""
        return dequantize_weight(self.weight, self.weight_scale)

    def _fake_input(self, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
        q = kernels.reference.quantize_activation(x, self.act_scale, self.act_zero_point, self.qmin, self.qmax,
                                                  self.scri_shift, self.scri_inv_scale, channel_dim)
        return (q.float() - self.act_zero_point) * self.act_scale.float()

    def extra_repr(self) -> str:
        return (f"w_bits={self.w_bits}, a_bits={self.a_bits}, scri={self.scri_shift is not None}, "
                f"mode={self.mode}")


class QLinear(_QuantizedBase):
    def __init__(self, in_features: int, out_features: int, **kw):
        super().__init__(**kw)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = input
        if self.mode == "fake":
            y = F.linear(self._fake_input(x, -1), self.dequantized_weight(), self.bias)
            return y.to(x.dtype)
        return kernels.linear_w8a8(x, self.weight, self.weight_scale, self.effective_bias(), self.act_scale,
                                   self.act_zero_point, self.qmin, self.qmax, self.scri_shift,
                                   self.scri_inv_scale)


class QConv2d(_QuantizedBase):
    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride: int, padding: int, **kw):
        super().__init__(**kw)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = tuple(kernel_size), int(stride), int(padding)

    def _weight_matrix(self) -> torch.Tensor:
        """Weight as the [kh*kw*C, N] int8 matrix of the NHWC im2col GEMM (cached)."""
        key = ("wmat", self.weight.device, self.weight._version)
        if key not in self._cache:
            n, c, kh, kw = self.weight.shape
            self._cache = {k: v for k, v in self._cache.items() if k[0] != "wmat"}
            self._cache[key] = self.weight.detach().permute(2, 3, 1, 0).reshape(kh * kw * c, n).contiguous()
        return self._cache[key]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = input
        if self.mode == "fake":
            xp = F.pad(x, (self.padding,) * 4) if self.padding else x
            y = F.conv2d(self._fake_input(xp, 1), self.dequantized_weight(), self.bias, self.stride)
            return y.to(x.dtype)
        return kernels.conv2d_w8a8(x, self.weight, self.weight_scale, self.effective_bias(), self.act_scale,
                                   self.act_zero_point, self.qmin, self.qmax, self.scri_shift,
                                   self.scri_inv_scale, self.stride, self.padding, w_mat=self._weight_matrix())


class HiDiTQLinear(nn.Module):
    """Time-projection Linear: HiDi-TQ activation codes (look-up table) x int8 per-channel weights."""

    qvd_quantized = True

    def __init__(self, in_features: int, out_features: int, weight_q, weight_scale, bias, levels, w_bits):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _param(weight_q.to(torch.int8))
        self.weight_scale = _param(weight_scale.float())
        self.bias = _param(None if bias is None else bias.float())
        self.levels = _param(levels.float())
        self.w_bits = int(w_bits)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = input
        codes = kernels.hiditq_encode(x, self.levels)
        xq = kernels.hiditq_decode(codes, self.levels)
        y = (xq @ self.weight.t().float()) * self.weight_scale
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"w_bits={self.w_bits}, levels={self.levels.numel()}"


def set_mode(tree: nn.Module, mode: str) -> None:
    """Run every W8A8 layer under ``tree`` with real integer kernels ("int") or fake-quant ("fake").

    ``HiDiTQLinear`` has one path: its look-up-table decode is already exact."""
    if mode not in ("int", "fake"):
        raise ValueError(f"mode={mode!r}: use 'int' or 'fake'")
    for m in tree.modules():
        if isinstance(m, (QLinear, QConv2d)):
            m.mode = mode
