"""How long QVD Quantize Model's core takes: ``quantize_model`` on SD1.5 + mm_sd_v15_v2 shapes.

A diffusers ``UNetMotionModel`` with SD1.5's UNet config and AnimateDiff v2 motion modules (random seeded weights,
nothing downloaded) is calibrated like QVD Calibrate's defaults would see a short clip (``--latent`` 16 = 128 px,
``--frames`` 8, ``--steps`` 4, cond + uncond), then quantized with the default ``QVDConfig``. Prints the
calibration time, the quantize time with its plan / build split and the number of layers per decision.

    python -m bench.quantize_time [--latent 16] [--frames 8] [--steps 4] [--threads N]
        [--save-calibration F | --calibration F] [--save F]   (files to compare codes across versions)
"""
from __future__ import annotations

import argparse
import collections
import time

import torch

from bench._common import machine
from qvd import Calibrator, QVDConfig, load_calibration, save_calibration, save_quantized
from qvd.quantize import build, plan

SD15_MOTION = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                   num_attention_heads=8, motion_max_seq_length=32, motion_num_attention_heads=8,
                   use_motion_mid_block=True)


def build_unet(seed: int = 0):
    from diffusers import UNetMotionModel
    torch.manual_seed(seed)
    return UNetMotionModel(**SD15_MOTION).eval()


@torch.no_grad()
def calibrate(unet, cfg: QVDConfig, latent: int, frames: int, steps: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(2, 77, 768, generator=g).repeat_interleave(frames, 0)  # cond, uncond; one per frame
    with Calibrator(unet, cfg) as cal:
        for t in torch.linspace(999, 1, steps).round().tolist():
            x = torch.randn(2, 4, frames, latent, latent, generator=g)
            unet(x, torch.tensor(t), encoder_hidden_states=ctx)
    return cal.result()


def timed_quantize(unet, cal, cfg: QVDConfig):
    """``quantize_model``'s two steps, timed: (result, plan seconds, build seconds, layers per handler)."""
    t0 = time.perf_counter()
    decisions = plan(unet, cal, cfg)
    t1 = time.perf_counter()
    result = build(unet, decisions)
    t2 = time.perf_counter()
    return result, t1 - t0, t2 - t1, collections.Counter(d.handler for d in decisions.decisions)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--calibration", help="read this calibration file instead of calibrating")
    p.add_argument("--save-calibration", help="write the calibration here")
    p.add_argument("--save", help="write the quantized file here")
    p.add_argument("--search-channels", type=int, default=QVDConfig().search_channels,
                   help="QVDConfig.search_channels (0: the alpha search measures every output channel)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = QVDConfig(search_channels=a.search_channels)
    print(f"machine: {machine()}")
    unet = build_unet()
    t0 = time.perf_counter()
    if a.calibration:
        cal = load_calibration(a.calibration)
        how = f"read {a.calibration}"
    else:
        cal = calibrate(unet, cfg, a.latent, a.frames, a.steps)
        how = f"{a.steps} steps, latent {a.latent}, {a.frames} frames, cond + uncond"
    t_cal = time.perf_counter() - t0
    if a.save_calibration:
        save_calibration(a.save_calibration, cal)
    result, t_plan, t_build, kinds = timed_quantize(unet, cal, cfg)
    if a.save:
        save_quantized(a.save, result)
    print(f"SD1.5 UNet + mm_sd_v15_v2 motion modules: {len(cal.layers)} calibrated layers; calibration ({how}): "
          f"{t_cal:.1f} s")
    print(f"quantize_model (search_channels {cfg.search_channels}): {t_plan + t_build:.1f} s (plan {t_plan:.1f} s, "
          f"build {t_build:.1f} s); " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))


if __name__ == "__main__":
    main()
