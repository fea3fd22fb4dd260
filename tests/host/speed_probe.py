"""Sampling time of the full-precision MODEL against its QVD-quantized MODEL, in-process in ComfyUI (0.3.75, 0.33),
as an artist's graph runs them: the synthetic SD1.5 checkpoint (with AnimateDiff-Evolved: its motion model applied by
ADE's nodes), QVD Calibrate at a small size, QVD Quantize Model whole (``COMPUTE``), then KSampler runs alternated FP,
QVD, FP, QVD... with one seed. Prints one JSON line: the seconds of each run, the output error, what ``auto`` chose.

    python speed_probe.py CHECKPOINT PACK_DIR COMPUTE SIZE FRAMES STEPS RUNS [ADE_DIR MOTION_FILE]
    python speed_probe.py wan WAN_MODEL PACK_DIR COMPUTE SIZE FRAMES STEPS RUNS
    (cwd = ComfyUI's directory, on PYTHONPATH)

``wan``: a Wan 2.1 diffusion model (Load Diffusion Model's load; random 4096-wide text embeddings for the
conditioning), a video latent of ``FRAMES`` video frames ((FRAMES - 1) / 4 + 1 latent frames), ``SIZE`` px.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from comfy_host import TINY
from lowvram_probe import load_pack, wan_calibrated
from size_probe import _load_ade, _with_motion


def main(checkpoint: str, pack_dir: str, compute: str, size: int, frames: int, steps: int, runs: int,
         ade_dir: str | None = None, motion_file: str | None = None) -> dict:
    from comfy.cli_args import args
    args.cpu = True
    import comfy.sd
    import nodes

    qvd = load_pack(Path(pack_dir))
    kernels = sys.modules["qvd_pack_probe.qvd.kernels"]
    model, clip, _ = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=False)[:3]
    if ade_dir:
        model = _with_motion(_load_ade(ade_dir, motion_file), motion_file, model)
    positive = nodes.CLIPTextEncode().encode(clip, "a red fox running")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    small = nodes.EmptyLatentImage().generate(64, 64, min(frames, 4))[0]
    calibration = qvd["QVDCalibrate"]().calibrate(model, positive, negative, small, 0, 1, 5.0, "euler", "normal",
                                                  1, timestep_coverage=TINY["timestep_coverage"])["result"][0]
    quantized, report = qvd["QVDQuantizeModel"]().quantize(model, calibration, 8, 8, True, True, "",
                                                           compute)["result"]
    latent = nodes.EmptyLatentImage().generate(size, size, frames)[0]
    return alternated(model, quantized, report, positive, negative, latent, steps, runs, "normal", kernels)


def wan_main(model_path: str, pack_dir: str, compute: str, size: int, frames: int, steps: int, runs: int) -> dict:
    from comfy.cli_args import args
    args.cpu = True

    qvd, model, positive, negative, calibration = wan_calibrated(model_path, pack_dir, frames, steps=1)
    kernels = sys.modules["qvd_pack_probe.qvd.kernels"]
    quantized, report = qvd["QVDQuantizeModel"]().quantize(model, calibration, 8, 8, True, True, "",
                                                           compute)["result"]
    latent = {"samples": torch.zeros(1, 16, (frames - 1) // 4 + 1, size // 8, size // 8)}
    return alternated(model, quantized, report, positive, negative, latent, steps, runs, "simple", kernels)


def alternated(model, quantized, report: str, positive, negative, latent: dict, steps: int, runs: int,
               scheduler: str, kernels) -> dict:
    """KSampler (seed 42, euler, CFG 5) on the FP and the quantized MODEL, alternated ``runs`` times: seconds of each
    run, the output error, what ``auto`` chose."""
    import nodes

    def sample(m):
        t0 = time.perf_counter()
        out = nodes.common_ksampler(m, 42, steps, 5.0, "euler", scheduler, positive, negative, latent)[0]["samples"]
        return time.perf_counter() - t0, out

    seconds = {"fp": [], "qvd": []}
    outs = {}
    for _ in range(runs):
        for label, m in (("fp", model), ("qvd", quantized)):
            t, outs[label] = sample(m)
            seconds[label].append(t)
    made = list(kernels.decisions().values())
    return {"seconds": seconds, "report": report, "threads": torch.get_num_threads(),
            "rel_err": float((outs["qvd"] - outs["fp"]).norm() / outs["fp"].norm()),
            "routes": {"int8": sum(d.route == "int8" for d in made), "weight-only": sum(d.route != "int8" for d in made),
                       "summary": kernels.describe_decisions(made) if made else "no per-shape timing",
                       "skips_int8": kernels.auto_skips_int8(torch.device("cpu"))}}


if __name__ == "__main__":
    a = sys.argv[1:]
    if a[0] == "wan":
        result = wan_main(a[1], a[2], a[3], *map(int, a[4:8]))
    else:
        result = main(a[0], a[1], a[2], *map(int, a[3:7]), *a[7:])
    print("QVD_PROBE " + json.dumps(result))
