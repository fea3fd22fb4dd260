"""Is the quantized MODEL faster than full precision in the real host? ComfyUI (the managed 0.3.75 by default,
``--comfyui`` for another tree, only read) with AnimateDiff-Evolved (``--ade``), the seeded synthetic SD1.5 checkpoint
and mm_sd_v15_v2 the host tests build, 128 px, 8 frames, 2 steps by default: KSampler runs of the FP MODEL and of the
QVD Quantize Model output (``--compute``, default auto) alternated in one process (``tests/host/speed_probe.py``).
Prints a markdown table; the ratio is FP seconds / QVD seconds of the runs after the first of each (the first QVD run
also pays ``auto``'s per-shape timing and is shown apart).

    python -m bench.host_speed [--comfyui PATH] [--ade PATH] [--compute auto|int8|weight-only] [--runs 3]
    python -m bench.host_speed --model wan [--size 256 --frames 9]   # Wan 2.1 1.3B's block width, 2 blocks
"""
from __future__ import annotations

import os
import statistics
from pathlib import Path

from bench._common import host_parser, host_probe, machine

# limits the libraries obey (set before the process starts), e.g. to run as an AVX2-only CPU would on a newer one
ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")


def cpu_flags() -> str:
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown ISA"
    have = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    limits = [f"{k}={os.environ[k]}" for k in ISA_LIMITS if os.environ.get(k)]
    return ("+".join(have) or "no AVX2") + (f", limited by {' '.join(limits)}" if limits else "")


def table(f: dict, args) -> str:
    fp, q = f["seconds"]["fp"], f["seconds"]["qvd"]
    warm_fp, warm_q = statistics.median(fp[1:] or fp), statistics.median(q[1:] or q)
    rows = ["| run | FP s | QVD s | FP / QVD |", "|---|---:|---:|---:|"]
    rows += [f"| {i + 1} | {a:.1f} | {b:.1f} | {a / b:.2f} |" for i, (a, b) in enumerate(zip(fp, q))]
    return "\n".join(rows + [
        "",
        f"Ratio FP / QVD (median of runs 2..{len(fp)}): **{warm_fp / warm_q:.2f}** (>= 1: QVD is faster); first run "
        f"{fp[0] / q[0]:.2f}. Graph: {getattr(args, 'model', 'sd15')}, {args.size} px, {args.frames} frames, "
        f"{args.steps} steps, {'with' if args.ade else 'without'} a motion model; compute {args.compute}; "
        f"torch threads {f['threads']}; "
        f"CPU ISA {cpu_flags()}.",
        f"Routes: {f['routes']['summary']}" + (f" ({f['routes']['skips_int8']})" if f["routes"]["skips_int8"] else "")
        + f". Output latent vs FP: relative error {f['rel_err']:.3f}.",
        "QVD Quantize Model's report: " + next((ln for ln in f["report"].splitlines() if ln.startswith("compute:")), ""),
    ])


def main(argv=None) -> None:
    p = host_parser(__doc__.split("\n\n")[0])
    p.add_argument("--compute", default="auto", choices=("auto", "int8", "weight-only"))
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--model", choices=("sd15", "wan"), default="sd15",
                   help="wan: the synthetic Wan 2.1 model at 1.3B's block width (2 blocks), --ade ignored")
    args = p.parse_args(argv)
    print(f"machine: {machine()}\n")
    sizes = (args.compute, args.size, args.frames, args.steps, args.runs)
    if args.model == "wan":
        args.ade = None
        result = host_probe(args, "speed_probe.py", *sizes, model="wan21_1_3b_width")
    else:
        result = host_probe(args, "speed_probe.py", *sizes)
    print(table(result, args))


if __name__ == "__main__":
    main()
