"""HTDQ: the HiDi-TQ temporal-feature quantizer and the TDScore-based composite metric K.

Temporal features ``u_t`` (inputs of the time-embedding / time-projection layers, one vector per sampling
step, identical for every frame) are skewed: SiLU-bounded below with a long positive tail.

HiDi-TQ with ``b`` bits (our variant of the notes' ``c * M * 2^(-k / tau)``, see docs/method.md): an exact zero
and, on each side, ``n`` magnitudes on a relaxed log (companding) curve
``m_j = c * M * (2^(j / tau) - 1) / (2^(n / tau) - 1)``, ``j = 1 .. n``.
For small tau the top levels are the notes' ``c*M*2^(-k/tau)`` (tau = 1: powers of two, dense near zero);
large tau relaxes to uniform spacing, so the family contains the uniform quantizer and, unlike the pure
log form, leaves no gap between 0 and the smallest level. The ``2^b - 2`` non-zero codes are shared
between the negative side (range ``M-``) and the positive side (``M+``) by a searched fraction, since
SiLU features have a tiny negative range. Encoding picks the nearest level; decoding is a look-up table
(``qvd.kernels.hiditq_encode`` / ``hiditq_decode``).

TDScore over the steps t_1..t_T (sampling order), window w:
``D_i(f) = mean_{0<|j-i|<=w} (1 - cos(f_i, f_j))``,  ``TDScore = 1 - mean_i |D_i(f_hat) - D_i(f)| / D_i(f)``.
``K = ||f - f_hat||^2 / ||f||^2 + lambda * (1 - TDScore)``; (c, tau) minimise K over a grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .kernels import hiditq_decode, hiditq_encode
from .quantizers import activation_qparams, fake_quant

CLIP_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
TAU_GRID = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 1e4)
NEG_SHARE_GRID = (0.5, 0.25, 0.125, 0.0625)


def _magnitudes(top: float, n: int, tau: float) -> torch.Tensor:
    j = torch.arange(1, n + 1, dtype=torch.float64)
    return top * torch.expm1(j / tau * 0.6931471805599453) / torch.expm1(torch.tensor(n / tau * 0.6931471805599453, dtype=torch.float64))


def hiditq_levels(neg_max: float, pos_max: float, bits: int, clip: float, tau: float,
                  neg_share: float = 0.5) -> torch.Tensor:
    """Sorted decode table: negative magnitudes, 0, positive magnitudes (at most ``2^b - 1`` entries;
    levels that coincide in fp32, e.g. powers of two below its range, are merged)."""
    codes = 2 ** bits - 2
    n_neg = int(round(codes * neg_share)) if neg_max > 0 else 0
    n_neg = min(max(n_neg, 1 if neg_max > 0 else 0), codes - 1)
    neg = _magnitudes(clip * neg_max, n_neg, tau) if n_neg else torch.zeros(0, dtype=torch.float64)
    pos = _magnitudes(clip * pos_max, codes - n_neg, tau)
    return torch.cat([-neg.flip(0), torch.zeros(1, dtype=torch.float64), pos]).float().unique()


def hiditq_quantize(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize ``x`` onto ``levels``."""
    return hiditq_decode(hiditq_encode(x, levels), levels).to(x.dtype)


def _nearest(x: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """``hiditq_quantize`` for the grid search: numpy, single-threaded, fast on small arrays."""
    return levels[np.searchsorted((levels[1:] + levels[:-1]) * 0.5, x, side="left")]


def discriminability(f: torch.Tensor, window: int = 1) -> torch.Tensor:
    """``D_i`` for features ``f [T, C]`` in sampling order."""
    t = f.shape[0]
    cos = F.cosine_similarity(f[:, None, :].double(), f[None, :, :].double(), dim=-1, eps=1e-12)
    i = torch.arange(t)
    near = ((i[:, None] - i[None, :]).abs() <= window) & (i[:, None] != i[None, :])
    return ((1 - cos) * near).sum(1) / near.sum(1).clamp_min(1)


def tdscore(f: torch.Tensor, f_hat: torch.Tensor, window: int = 1, d: torch.Tensor | None = None) -> float:
    """Temporal discriminability kept by ``f_hat`` relative to ``f`` (1 = fully kept); ``d``: ``f``'s own
    ``discriminability`` when already known."""
    if f.shape[0] < 2:
        return 1.0
    d = discriminability(f, window) if d is None else d
    d_hat = discriminability(f_hat, window)
    return float(1 - ((d_hat - d).abs() / d.clamp_min(1e-12)).mean())


def k_metric(f: torch.Tensor, f_hat: torch.Tensor, lam: float = 1.0, window: int = 1,
             d: torch.Tensor | None = None) -> tuple[float, float, float]:
    """(K, relative L2 error, TDScore); ``d`` as in ``tdscore``."""
    l2 = float((f - f_hat).double().pow(2).sum() / f.double().pow(2).sum().clamp_min(1e-30))
    td = tdscore(f, f_hat, window, d)
    return l2 + lam * (1 - td), l2, td


@dataclass
class HiDiTQFit:
    levels: torch.Tensor
    clip: float
    tau: float
    neg_share: float
    k: float
    l2: float
    tdscore: float


def search_hiditq(f: torch.Tensor, bits: int = 8, lam: float = 1.0, window: int = 1,
                  clips=CLIP_GRID, taus=TAU_GRID, neg_shares=NEG_SHARE_GRID) -> HiDiTQFit:
    """Grid-search (clip, tau, negative share) minimising K on temporal features ``f [T, C]``."""
    f = f.float()
    neg_max, pos_max = float((-f.min()).clamp_min(0)), float(f.max().clamp_min(1e-12))
    shares = sorted(set(neg_shares) | {round(neg_max / (neg_max + pos_max), 4)})
    best, fn, d = None, f.numpy(), discriminability(f, window)
    for c in clips:
        for tau in taus:
            for share in shares:
                levels = hiditq_levels(neg_max, pos_max, bits, c, tau, share)
                k, l2, td = k_metric(f, torch.from_numpy(_nearest(fn, levels.numpy())), lam, window, d)
                if best is None or k < best.k:
                    best = HiDiTQFit(levels, c, tau, share, k, l2, td)
    return best


def uniform_baseline(f: torch.Tensor, bits: int = 8, lam: float = 1.0, window: int = 1,
                     method: str = "mse") -> tuple[float, float, float]:
    """K, L2, TDScore of the static uniform (per-tensor affine) quantizer on the same features."""
    f = f.float()
    scale, zp = activation_qparams(f, bits, method, float(f.min()), float(f.max()))
    return k_metric(f, fake_quant(f, scale, zp, bits), lam, window)
