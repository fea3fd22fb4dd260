"""HTDQ: HiDi-TQ levels, TDScore, and the claim that HiDi-TQ beats a uniform quantizer by K on skewed
temporal features."""
import math

import pytest
import torch
import torch.nn.functional as F

from qvd.htdq import hiditq_levels, hiditq_quantize, search_hiditq, tdscore, uniform_baseline


def silu_temporal_features(steps: int = 25, seed: int = 0) -> torch.Tensor:
    """SiLU(time MLP(sinusoidal(t))): the shape of a UNet's time-projection input, one row per step."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(999, 0, steps)
    freqs = torch.exp(-math.log(10000) * torch.arange(64) / 64)
    emb = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], 1)
    h = F.silu(emb @ (torch.randn(128, 256, generator=g) * 0.3))
    return F.silu(h @ (torch.randn(256, 320, generator=g) * 0.2))


def test_levels_shape_and_relaxation():
    lv = hiditq_levels(0.28, 18.0, 8, 1.0, 1.0, 0.0625)
    assert lv.numel() <= 255 and torch.all(lv[1:] > lv[:-1]) and (lv == 0).sum() == 1
    assert hiditq_levels(0.28, 18.0, 8, 1.0, 16.0, 0.0625).numel() == 255
    assert math.isclose(float(lv.max()), 18.0, rel_tol=1e-6) and math.isclose(float(lv.min()), -0.28, rel_tol=1e-6)
    pos = hiditq_levels(1.0, 1.0, 8, 1.0, 1.0)[128:]
    assert math.isclose(float(pos[-2] / pos[-1]), 0.5, rel_tol=1e-6)  # tau = 1: powers of two at the top
    uni = hiditq_levels(1.0, 1.0, 8, 1.0, 1e4)[128:]
    steps = uni[1:] - uni[:-1]
    assert float(steps.max() / steps.min()) < 1.01  # large tau relaxes to uniform spacing


def test_quantize_picks_nearest_level():
    lv = hiditq_levels(1.0, 2.0, 6, 1.0, 4.0)
    x = torch.randn(1000)
    xq = hiditq_quantize(x, lv)
    nearest = lv[(x[:, None] - lv[None]).abs().argmin(1)]
    assert torch.allclose(xq, nearest)


def test_tdscore_measures_kept_discriminability():
    f = silu_temporal_features()
    assert tdscore(f, f) == pytest.approx(1.0)
    collapsed = f.mean(0, keepdim=True).expand_as(f)  # every step quantized to the same vector
    assert tdscore(f, collapsed) < 0.05
    assert tdscore(f, f + 1e-4 * torch.randn_like(f)) > 0.99


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_hiditq_beats_uniform_on_silu_features(bits):
    f = silu_temporal_features()
    assert float(f.min()) > -0.2785 and float(f.max()) > 20 * float(-f.min())  # skewed: SiLU floor, long tail
    fit = search_hiditq(f, bits)
    k_uniform, _, _ = uniform_baseline(f, bits)
    assert fit.k < 0.9 * k_uniform, (fit, k_uniform)
