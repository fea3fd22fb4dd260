"""Shared helpers for the benchmarks: timing (medians), machine facts, W8A8 layer construction, tables."""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import qvd.kernels as K


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def median_ms(fn, device: torch.device, samples: int = 5, min_sample_s: float = 0.2) -> float:
    """Median over ``samples`` of the mean time of a batch of calls lasting >= ``min_sample_s``.

    Batching calls makes each sample long enough for a coarse or time-sliced clock (shared CPUs).
    """
    fn()
    sync(device)
    reps = 1
    if min_sample_s > 0:
        t0 = time.perf_counter()
        fn()
        sync(device)
        reps = max(1, int(min_sample_s / max(time.perf_counter() - t0, 1e-6)))
    out = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        out.append((time.perf_counter() - t0) / reps)
    return statistics.median(out) * 1e3


def machine() -> str:
    """One line naming the machine, torch, threads, allocator setting and current load."""
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0)
    else:
        try:
            lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
            dev = next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Model name"))
        except (OSError, subprocess.CalledProcessError, StopIteration):
            dev = platform.processor() or "unknown CPU"
        dev += f", {os.cpu_count()} cores"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{dev}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
            f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}; load {load:.2f}")


def quantize_weight(w: torch.Tensor):
    """Symmetric per-output-channel int8 weight codes and scales."""
    flat = w.detach().flatten(1).float()
    scale = flat.abs().amax(1).clamp_min(1e-8) / 127.0
    q = torch.round(flat / scale[:, None]).clamp_(-127, 127).to(torch.int8).view_as(w)
    return q, scale


class W8A8(torch.nn.Module):
    """A Linear / Conv2d on ``qvd.kernels`` with a static per-tensor activation scale (zero point 0).

    Used by the benchmarks when the qvd core (``qvd.quantize_model``) is not available.
    """

    def __init__(self, layer: torch.nn.Module, act_absmax: float):
        super().__init__()
        self.conv = isinstance(layer, torch.nn.Conv2d)
        q, s = quantize_weight(layer.weight)
        self.register_buffer("w_q", q.contiguous(memory_format=torch.channels_last) if self.conv else q)
        self.register_buffer("w_scale", s)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float())
        self.act_scale = max(act_absmax, 1e-8) / 127.0
        self._packed = None
        if self.conv:
            self.stride, self.padding = layer.stride[0], layer.padding[0]

    def _apply(self, fn, recurse=True):
        self._packed = None  # moved or cast: pack again (channels-last codes make it a view, not a copy)
        return super()._apply(fn, recurse)

    def forward(self, input):  # named as nn.Linear's: diffusers passes it by name
        x = input
        if self._packed is None:
            self._packed = K.PackedWeight(self.w_q, self.w_scale)
        if self.conv:
            return K.conv2d_w8a8(x, self._packed, self.bias, self.act_scale, 0, -128, 127,
                                 stride=self.stride, padding=self.padding)
        return K.linear_w8a8(x, self._packed, self.bias, self.act_scale, 0, -128, 127)


def table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def size_options(p, runs: int) -> None:
    """The options every whole-UNet bench takes: --device, --latent, --batch, --runs, --threads (GPU-sized
    defaults when CUDA is visible)."""
    cuda = torch.cuda.is_available()
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--latent", type=int, default=64 if cuda else 16)
    p.add_argument("--batch", type=int, default=32 if cuda else 16)
    p.add_argument("--runs", type=int, default=runs)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")


def apply_threads(a) -> None:
    if a.threads:
        torch.set_num_threads(a.threads)


HOST_TESTS = Path(__file__).resolve().parent.parent / "tests" / "host"


def host_parser(description: str) -> argparse.ArgumentParser:
    """Options of the benches that run in a ComfyUI process: --comfyui (the managed 0.3.75 by default; another tree
    is only read) and --ade (AnimateDiff-Evolved: adds the motion model)."""
    repo = HOST_TESTS.parent.parent
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--comfyui", type=Path, default=Path(os.environ.get("COMFYUI_PATH", repo / ".cache" / "comfyui")))
    p.add_argument("--ade", type=Path, default=os.environ.get("ADE_PATH"),
                   help="ComfyUI-AnimateDiff-Evolved checkout: adds the motion model")
    return p


def host_probe(args, script: str, *probe_args, extra_files=lambda checkpoint: (), model=None) -> dict:
    """Run ``tests/host/<script> CHECKPOINT REPO PROBE_ARGS... [extra files] [ADE MOTION]`` in a ComfyUI process on
    the seeded synthetic checkpoints the host tests build (``args`` from ``host_parser``). ``model``: the kind of a
    synthetic Wan model (``synthetic_models.py``), run as ``<script> wan MODEL REPO PROBE_ARGS...``."""
    if not (args.comfyui / "main.py").is_file():
        raise SystemExit(f"no ComfyUI at {args.comfyui}: run `make host`, or pass --comfyui")
    os.environ["COMFYUI_PATH"] = str(args.comfyui)  # read by comfy_host at import
    sys.path.insert(0, str(HOST_TESTS))
    from comfy_host import CKPT_NAME, MOTION_NAME, REPO, build_model, run_probe, synth_name

    if model is not None:
        return run_probe(script, "wan", build_model(model, synth_name(model)), REPO, *probe_args, timeout=7200)
    checkpoint = build_model("sd15", CKPT_NAME)
    ade = (args.ade, build_model("motion", MOTION_NAME)) if args.ade else ()
    return run_probe(script, checkpoint, REPO, *probe_args, *extra_files(checkpoint), *ade, timeout=7200)
