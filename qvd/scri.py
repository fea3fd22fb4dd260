"""SCRI: Scattered Channel Range Integration, as one transform type.

For the input ``X`` of a Linear / conv layer with calibrated per-channel extremes ``m_j, M_j``:
centre ``z_j = (M_j + m_j) / 2``, half range ``r_j = (M_j - m_j) / 2``, common half range ``R = max_j r_j``,
scale ``s_j = max((r_j / R) ** alpha, 1 / max_gain)`` (alpha in [0, 1]: 0 = centring only, 1 = every
channel spans R; the gain cap keeps channels that were narrow in calibration from clipping on new prompts).
The layer sees ``x'_j = (x_j - z_j) / s_j`` and compensates exactly with ``W'[:, j] = W[:, j] * s_j`` and
``b' = b + W z``, so ``W x + b = W' x' + b'`` before rounding. ``x'`` is produced either by the preceding
LayerNorm / GroupNorm (affine folded: ``gamma' = gamma / s``, ``beta' = (beta - z) / s``) or by the fused
activation-quantize kernel. For a padded conv the real-domain zero padding is kept (pad, then transform),
which makes the compensation exact at the borders too.

``ScriTransform`` holds ``(z, s)`` and every fold; quantized layers and files store ``z`` and ``1 / s``
(``scri_shift``, ``scri_inv_scale``: the kernels multiply).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn


def _real(w: torch.Tensor) -> torch.Tensor:
    """``w`` in at least fp32 (fp64 stays fp64)."""
    return w.to(torch.promote_types(w.dtype, torch.float32))


def _per_input(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-input-channel vector shaped to broadcast against a weight ``[N, C, *kernel]`` or rows ``[R, C]``."""
    return v.to(like.device, like.dtype).view(1, -1, *([1] * (like.dim() - 2)))


def _per_channel(w: torch.Tensor) -> torch.Tensor:
    """A weight ``[N, C, *kernel]`` summed over its kernel taps, ``[N, C]`` (rows ``[N, C]`` as they are)."""
    return _real(w) if w.dim() == 2 else _real(w).flatten(2).sum(2)


def _plus(b: torch.Tensor | None, wz: torch.Tensor) -> torch.Tensor:
    return wz if b is None else b.to(wz) + wz


@dataclass(frozen=True)
class ScriTransform:
    """``x' = (x - shift) / scale`` per input channel (``shift`` = z, ``scale`` = s, both fp32 [C])."""
    shift: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def from_range(cls, ch_min: torch.Tensor, ch_max: torch.Tensor, alpha: float,
                   max_gain: float = float("inf")) -> "ScriTransform":
        """The transform for calibrated extremes (see module docstring); a channel's gain ``1 / s`` is capped
        at ``max_gain`` so a channel that was narrow during calibration keeps head-room for other inputs."""
        ch_min, ch_max = ch_min.float(), ch_max.float()
        z = (ch_max + ch_min) * 0.5
        r = ((ch_max - ch_min) * 0.5).clamp_min(0)
        big = r.max().clamp_min(1e-12)
        s = (r / big).clamp_min(1e-4).pow(alpha).clamp_min(1.0 / max_gain)
        return cls(z, s)

    @classmethod
    def stored(cls, shift: torch.Tensor | None, inv_scale: torch.Tensor | None) -> "ScriTransform | None":
        """The transform a quantized layer or file stores as ``(z, 1 / s)``; None without SCRI."""
        return None if shift is None else cls(shift.float(), 1.0 / inv_scale.float())

    @property
    def inv_scale(self) -> torch.Tensor:
        return 1.0 / self.scale

    def columns(self, channel: torch.Tensor) -> "ScriTransform":
        """The transform per column of im2col rows, whose column ``k`` reads input channel ``channel[k]``."""
        return ScriTransform(self.shift[channel], self.scale[channel])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - z) / s`` for rows ``[R, C]`` (channels last) or a vector ``[C]``."""
        return (x - self.shift.to(x.device)) / self.scale.to(x.device)

    def unapply(self, x: torch.Tensor) -> torch.Tensor:
        """``x s + z``: a transformed value back in the input domain."""
        return x * self.scale.to(x.device) + self.shift.to(x.device)

    def fold_weight(self, w: torch.Tensor) -> torch.Tensor:
        """``W' = W s``: the weight that reads the transformed input."""
        w = _real(w)
        return w * _per_input(self.scale, w)

    def unfold_weight(self, w: torch.Tensor) -> torch.Tensor:
        """``W = W' / s``: back to the layer's own input domain."""
        w = _real(w)
        return w / _per_input(self.scale, w)

    def fold_bias(self, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """``b + W z`` for the weight ``w`` in the layer's own input domain."""
        w = _per_channel(w)
        return _plus(b, w @ self.shift.to(w))

    def folded_bias(self, w_folded: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """``b + W z`` from the folded weight ``W' = W s`` (what a quantized layer stores): ``b + W' (z / s)``."""
        w = _per_channel(w_folded)
        return _plus(b, w @ (self.shift / self.scale).to(w))

    def fold_norm(self, norm: nn.Module) -> nn.Module:
        """A copy of an affine LayerNorm / GroupNorm whose output is already ``(y - z) / s``."""
        z, s = self.shift.to(norm.weight.device), self.scale.to(norm.weight.device)
        return folded_norm(norm, norm.weight.float() / s, (norm.bias.float() - z) / s, self)


_NORM_SETTINGS = {nn.LayerNorm: ("normalized_shape", "eps", "elementwise_affine"),
                  nn.GroupNorm: ("num_groups", "num_channels", "eps", "affine")}


def folded_norm(norm: nn.Module, weight: torch.Tensor, bias: torch.Tensor, scri: ScriTransform) -> nn.Module:
    """A new module of ``norm``'s class and settings with the folded affine ``weight`` / ``bias`` (in ``norm``'s dtype
    and device; its output is ``scri.apply`` of the original's), marked ``qvd_scri_norm`` (a host must not patch its
    affine as the original's). Nothing else of ``norm``'s instance is carried over (no hooks, no state a host's loader
    attached to it). It keeps ``qvd_scri`` and weak references to its outputs (``folded_source``), so a host hook
    handed one can read it in the original's domain, and a loaded file's wiring can be proven (``verify.FoldWiring``)."""
    base = nn.GroupNorm if isinstance(norm, nn.GroupNorm) else nn.LayerNorm
    new = type(norm).__new__(type(norm))
    nn.Module.__init__(new)
    for name in _NORM_SETTINGS[base]:
        setattr(new, name, getattr(norm, name))
    new.train(norm.training)
    new.weight = nn.Parameter(weight.detach().to(norm.weight).clone(), requires_grad=False)
    new.bias = nn.Parameter(bias.detach().to(norm.bias).clone(), requires_grad=False)
    new.qvd_scri_norm = True
    new.qvd_scri = scri
    new.qvd_outputs = weakref.WeakValueDictionary()  # id -> the tensors standing for its output (``stand_for``)
    new.register_forward_hook(_remember_output)
    return new


def _remember_output(module: nn.Module, _inputs, output) -> None:
    if torch.is_tensor(output):
        stand_for(module, output)


def stand_for(norm: nn.Module, t: torch.Tensor) -> None:
    """Record that ``t`` stands for an output of the folded ``norm`` (its own output, or a value a host patch gave
    back in its place, folded again)."""
    norm.qvd_outputs[id(t)] = t


def folded_source(t: torch.Tensor, norms) -> nn.Module | None:
    """The folded norm among ``norms`` whose output ``t`` stands for (None: none of them)."""
    for norm in norms:
        outputs = getattr(norm, "qvd_outputs", None)
        if outputs is not None and outputs.get(id(t)) is t:
            return norm
    return None


def foldable_norm(norm: nn.Module) -> bool:
    """Norms whose per-channel affine can absorb the SCRI input transform."""
    if isinstance(norm, nn.LayerNorm):
        return norm.elementwise_affine and norm.bias is not None and norm.weight.dim() == 1
    if isinstance(norm, nn.GroupNorm):
        return norm.affine
    return False
