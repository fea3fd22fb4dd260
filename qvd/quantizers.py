"""Uniform quantizers: per-output-channel symmetric weights and static per-tensor activations.

Weights: ``s_w[n] = clip[n] * max|W[n, :]| / (2^(b-1) - 1)``, ``W_q = clamp(round(W / s_w), -qmax, qmax)``
(conv weights flattened to rows ``[n, c*kh*kw]``); ``clip`` is 1 (min-max) or searched per channel (MSE).
Activations: asymmetric ``q = clamp(round(x / s) + zp, -2^(b-1), 2^(b-1) - 1)`` with one static (s, zp)
per tensor, the range found by min-max, percentiles or an MSE search over calibration values.
"""
from __future__ import annotations

import torch

MSE_SMALLEST_CLIP = 0.3  # the MSE searches' smallest clip of the min-max range
RANGE_FLOOR = 1e-8  # the narrowest range an activation quantizer covers (a constant input's)
_MSE_GRID = torch.linspace(MSE_SMALLEST_CLIP, 1.0, 36)
_MAX_SEARCH_VALUES = 1 << 15


def weight_qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def act_qrange(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def quantize_weight(w: torch.Tensor, bits: int, clip: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric quantization of ``w [N, ...]`` -> (int8 codes, fp32 scale [N])."""
    grid = w.detach().float().reshape(w.shape[0], -1).clone()
    scale = round_to_grid_(grid, bits, clip)
    return grid.to(torch.int8).reshape(w.shape), scale


def round_to_grid_(w2: torch.Tensor, bits: int, clip: str = "minmax") -> torch.Tensor:
    """Replace fp32 ``w2 [N, D]`` in place by its integer codes (as floats); returns the per-row scale [N].

    In place because fresh tensors of a layer's weight size cost more to allocate than to compute."""
    qmax = weight_qmax(bits)
    amax = torch.maximum(-w2.amin(1), w2.amax(1)).clamp_min(1e-12)  # max |w| per row, without a new tensor
    if clip == "mse":
        best_err = torch.full_like(amax, float("inf"))
        best = amax.clone()
        for c in _MSE_GRID.tolist():
            s = (amax * c / qmax)[:, None]
            err = ((w2 / s).round().clamp(-qmax, qmax) * s - w2).pow(2).sum(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, amax * c, best)
        amax = best
    scale = amax / qmax
    w2.div_(scale[:, None]).round_().clamp_(-qmax, qmax)
    return scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q s`` in fp32 (int8 codes promote in the multiply: one pass, exact)."""
    return q * scale.float().view(-1, *([1] * (q.dim() - 1)))


def affine_params(lo: float, hi: float, bits: int) -> tuple[float, int]:
    """Scale and zero point mapping ``[lo, hi]`` (which must contain 0) onto the int code range."""
    qmin, qmax = act_qrange(bits)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, RANGE_FLOOR) / (qmax - qmin)
    zp = int(round(qmin - lo / scale))
    return scale, max(qmin, min(qmax, zp))


def fake_quant(x: torch.Tensor, scale: float, zero_point: int, bits: int) -> torch.Tensor:
    """Quantize-dequantize with a static affine quantizer (float in, float out)."""
    qmin, qmax = act_qrange(bits)
    return (x / scale).round_().add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)


def activation_qparams(values: torch.Tensor, bits: int, method: str, lo: float, hi: float,
                       percentile: float = 99.99) -> tuple[float, int]:
    """Static (scale, zero point) for one tensor: ``affine_params`` of ``activation_range``."""
    return affine_params(*activation_range(values, bits, method, lo, hi, percentile), bits)


def activation_range(values: torch.Tensor, bits: int, method: str, lo: float, hi: float,
                     percentile: float = 99.99) -> tuple[float, float]:
    """The range one static quantizer covers.

    ``lo`` / ``hi`` are the exact calibration extremes; ``values`` a representative sample used by the
    percentile and MSE searches (the MSE search shrinks ``[lo, hi]`` by a common factor).
    """
    if method == "minmax" or values.numel() == 0:
        return lo, hi
    v = values.detach().float().flatten()
    if v.numel() > _MAX_SEARCH_VALUES:
        idx = torch.randint(0, v.numel(), (_MAX_SEARCH_VALUES,), generator=torch.Generator().manual_seed(0))
        v = v[idx]
    if method == "percentile":
        q = torch.quantile(v.double(), torch.tensor([1 - percentile / 100, percentile / 100], dtype=torch.float64))
        return float(q[0]), float(q[1])
    clips = _MSE_GRID.tolist()
    cands = [affine_params(lo * c, hi * c, bits) for c in clips]
    scale = torch.tensor([c[0] for c in cands])[:, None]
    zp = torch.tensor([float(c[1]) for c in cands])[:, None]
    qmin, qmax = act_qrange(bits)
    err = (((v[None] / scale).round_().add_(zp).clamp_(qmin, qmax).sub_(zp).mul_(scale) - v[None]) ** 2).mean(1)
    c = clips[int(err.argmin())]
    return lo * c, hi * c
