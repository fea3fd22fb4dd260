"""SCRI: Scattered Channel Range Integration.

For the input ``X`` of a Linear / conv layer with calibrated per-channel extremes ``m_j, M_j``:
centre ``z_j = (M_j + m_j) / 2``, half range ``r_j = (M_j - m_j) / 2``, common half range ``R = max_j r_j``,
scale ``s_j = max((r_j / R) ** alpha, 1 / max_gain)`` (alpha in [0, 1]: 0 = centring only, 1 = every
channel spans R; the gain cap keeps channels that were narrow in calibration from clipping on new prompts).
The layer sees ``x'_j = (x_j - z_j) / s_j`` and compensates exactly with ``W'[:, j] = W[:, j] * s_j`` and
``b' = b + W z``, so ``W x + b = W' x' + b'`` before rounding. ``x'`` is produced either by the preceding
LayerNorm / GroupNorm (affine folded: ``gamma' = gamma / s``, ``beta' = (beta - z) / s``) or by the fused
activation-quantize kernel. For a padded conv the real-domain zero padding is kept (pad, then transform),
which makes the compensation exact at the borders too.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def scri_params(ch_min: torch.Tensor, ch_max: torch.Tensor, alpha: float,
                max_gain: float = float("inf")) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel shift ``z`` and scale ``s`` (both [C], fp32); ``1 / s`` (a channel's gain) is capped at
    ``max_gain`` so that a channel that was narrow during calibration keeps head-room for other inputs."""
    z = (ch_max + ch_min) * 0.5
    r = ((ch_max - ch_min) * 0.5).clamp_min(0)
    big = r.max().clamp_min(1e-12)
    s = (r / big).clamp_min(1e-4).pow(alpha).clamp_min(1.0 / max_gain)
    return z.float(), s.float()


def fold_into_weight(w: torch.Tensor, b: torch.Tensor | None, z: torch.Tensor, s: torch.Tensor):
    """``(W', b')`` with ``W'[:, j] = W[:, j] * s_j`` and ``b' = b + W z`` for ``w [N, C, *kernel]``."""
    view = (1, -1) + (1,) * (w.dim() - 2)
    w = w.float()
    w_new = w * s.view(view)
    wz = (w * z.view(view)).flatten(1).sum(1)
    b_new = wz if b is None else b.float() + wz
    return w_new, b_new


def fold_into_norm(norm: nn.Module, z: torch.Tensor, s: torch.Tensor) -> nn.Module:
    """A copy of an affine LayerNorm / GroupNorm whose output is already ``(y - z) / s``."""
    return folded_norm(norm, norm.weight.float() / s, (norm.bias.float() - z) / s)


def folded_norm(norm: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """A copy of ``norm`` with the folded affine ``weight`` / ``bias``, marked ``qvd_scri_norm`` (a host must not
    patch its affine as the original's)."""
    new = copy.deepcopy(norm)
    with torch.no_grad():
        new.weight.copy_(weight)
        new.bias.copy_(bias)
    new.qvd_scri_norm = True
    return new


def foldable_norm(norm: nn.Module) -> bool:
    """Norms whose per-channel affine can absorb the SCRI input transform."""
    if isinstance(norm, nn.LayerNorm):
        return norm.elementwise_affine and norm.bias is not None and norm.weight.dim() == 1
    if isinstance(norm, nn.GroupNorm):
        return norm.affine
    return False
