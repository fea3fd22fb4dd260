"""Evaluate a quantized video diffusion model against its FP reference on TinyVDM clips.

Fidelity to FP (PSNR, per-frame gaussian SSIM, temporal error of frame differences), weight bytes, and the
sample-quality statistic of :mod:`qvd_demo.quality` (shape and colour recognised, background, speed, size
stability) for both models and for procedural data of the same classes.
"""
from __future__ import annotations

import copy
import math
import statistics
import time

import torch

from qvd.calibrate import COVERAGE_POINTS, Calibration, Calibrator, coverage_timesteps
from qvd.config import QVDConfig
from qvd.modules import set_mode
from qvd.quantize import QuantizeResult, quantize_model

from . import quality as Q
from . import tinyvdm as T


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """PSNR in dB of two clips in [-1, 1] (inf when identical)."""
    if a.shape != b.shape:
        raise ValueError(f"clips differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = (a.float() - b.float()).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def _gauss(size: int = 7, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean per-frame SSIM (gaussian window 7, sigma 1.5) of clips [F, 3, H, W]."""
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"clips must be [F, 3, H, W] of one shape, got {tuple(a.shape)} vs {tuple(b.shape)}")
    c = a.shape[1]
    w = _gauss().repeat(c, 1, 1, 1)
    conv = lambda x: torch.nn.functional.conv2d(x, w, groups=c)
    a, b = a.float(), b.float()
    mu_a, mu_b = conv(a), conv(b)
    var_a = conv(a * a) - mu_a ** 2
    var_b = conv(b * b) - mu_b ** 2
    cov = conv(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean().item()


def temporal_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """RMS difference of the frame differences x[t+1] - x[t] of two clips."""
    return ((a[1:] - a[:-1]) - (b[1:] - b[:-1])).float().square().mean().sqrt().item()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers as stored (fp16 model -> 2 B/weight; int8 + scales for quantized)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def sample_clips(model, conds, steps: int = 20, guidance: float = 3.0, embed=None, seed0: int = 0,
                 sampler: str = "ddim") -> list:
    """One clip per class id in ``conds``, clip ``i`` from seed ``seed0 + i``."""
    conds = list(conds)
    return list(T.sample_many(model, conds, range(seed0, seed0 + len(conds)), steps, guidance, embed=embed,
                              sampler=sampler))


def calibrate(model, config: QVDConfig, classes, steps: int = 20, guidance: float = 3.0,
              seed0: int = 1000, coverage: int = COVERAGE_POINTS) -> Calibration:
    """Calibrate ``model`` on one sampled clip per class id in ``classes`` (seeds ``seed0 + i``), then, for timestep
    coverage, one call at each of ``coverage_timesteps(seen, 0, 999, coverage)`` on those clips noised to it."""
    clips = []
    with Calibrator(model, config) as cal:
        for i, c in enumerate(classes):
            clips.append(T.sample(model, c, seed=seed0 + i, steps=steps, guidance=guidance))
        sampled = set(cal.timesteps)
        for i, t in enumerate(coverage_timesteps(sampled, 0, T.SCHEDULER_CONFIG["num_train_timesteps"] - 1, coverage)):
            T.noised_call(model, clips[i % len(clips)], classes[i % len(classes)], t, seed0 + 500 + i)
    calibration = cal.result()
    calibration.coverage = sorted(set(calibration.timesteps) - sampled, reverse=True)  # as nodes/patching.py
    calibration.settings = {"sampler": "ddim", "steps": steps, "cfg": guidance, "classes": len(classes)}
    return calibration


def quantized_copy(model, calibration: Calibration, config: QVDConfig,
                   mode: str = "int") -> tuple[torch.nn.Module, QuantizeResult]:
    """A deep copy of ``model`` quantized with ``config``, and its QuantizeResult (``model`` is untouched).

    ``mode``: its W8A8 layers run the integer kernels ("int") or their float simulation ("fake")."""
    q = copy.deepcopy(model)
    result = quantize_model(q, calibration, config, apply=True)
    set_mode(q, mode)
    return q, result


def time_step(unet, x, t, ctx, repeats: int = 5) -> float:
    """Median seconds of one UNet forward (the sampler's CFG batch), after one warm-up call."""
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=ctx)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            unet(x, t, encoder_hidden_states=ctx)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_times(model, qmodel) -> dict:
    """Seconds of one CFG UNet step of TinyVDM (batch 2) in fp32, W8A8 on the integer kernels and W8A8 in
    their float simulation; ``qmodel`` is left in "int" mode."""
    ctx = model.encode(torch.tensor([0, T.NULL_CLASS]))
    x = torch.randn(2, 3, T.FRAMES, T.SIZE, T.SIZE, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)
    out = {"fp32": time_step(model.unet, x, t, ctx)}
    for mode in ("fake", "int"):
        set_mode(qmodel, mode)
        out[mode] = time_step(qmodel.unet, x, t, ctx)
    return out


def auto_mode(times: dict) -> str:
    """The faster of the integer kernels ("int") and their float simulation ("fake"): the same W8A8 codes and scales,
    they differ by float rounding only; on a tie "int"."""
    return "int" if times["int"] <= times["fake"] else "fake"


def evaluate(fp_model, q_model, n: int = 4, steps: int = 20, guidance: float = 3.0, embed=None,
             seed0: int = 0, conds=None, reference=None, sampler: str = "ddim") -> dict:
    """Sample ``n`` clips from fixed seeds with both models; fidelity of quant to FP and quality of each.

    ``conds``: the ``n`` class ids (default ``i % NULL_CLASS``). ``reference``: the FP clips already sampled
    with ``sample_clips(fp_model, conds, steps, guidance, embed, seed0)`` (saves resampling FP per config).
    ``psnr_db`` is the mean of the per-clip PSNRs in ``psnr_clips`` (paired by seed across configurations).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    conds = [i % T.NULL_CLASS for i in range(n)] if conds is None else list(conds)
    if len(conds) != n:
        raise ValueError(f"conds has {len(conds)} class ids for n={n} clips: give one per clip")
    fp = sample_clips(fp_model, conds, steps, guidance, embed, seed0, sampler) if reference is None else list(reference)
    if len(fp) != n:
        raise ValueError(f"reference has {len(fp)} clips for n={n}: sample it with the same conds")
    qt = sample_clips(q_model, conds, steps, guidance, embed or fp_model, seed0, sampler)
    mean = lambda f: sum(f(a, b) for a, b in zip(fp, qt)) / n
    per_clip = [psnr(a, b) for a, b in zip(fp, qt)]
    return {
        "psnr_db": sum(per_clip) / n, "psnr_clips": per_clip, "ssim": mean(ssim),
        "temporal_error": mean(temporal_error),
        "quality_fp": Q.quality(fp, conds), "quality_quant": Q.quality(qt, conds),
        "quality_data": Q.data_quality(conds, seed0),
        "clips": {"fp": fp, "quant": qt},
    }
