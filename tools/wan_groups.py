"""Where QVD's W8A8 error on a Wan model comes from, by layer group, in ComfyUI (``tests/host/wan_groups_probe.py``):
the method variants (HTDQ on the time path or not, SCRI on the modulated inputs or not) and each layer group quantized
alone, every one from the same calibration, on the seeded synthetic Wan 2.1 the host tests build (toy width, random
weights: the figures say where error enters this graph, not what a trained Wan shows). Prints markdown; ``--out``
also writes it (docs/wan_groups.md).

    python -m tools.wan_groups [--comfyui PATH] [--steps 8 --size 64 --frames 9 --seeds 3] [--out FILE]
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import host_parser, host_probe, machine  # noqa: E402


def _cell(values: list[float]) -> str:
    mean = statistics.fmean(values)
    spread = f" +- {statistics.stdev(values) * 100:.2f}" if len(values) > 1 else ""
    return f"{mean * 100:.2f}{spread}"


def _against_qvd(variants: dict) -> list[str]:
    (qvd_label, qvd), *others = variants.items()
    lines = []
    for label, v in others:
        a, b = v["calibrated"], qvd["calibrated"]
        diff = statistics.fmean(a) - statistics.fmean(b)
        spread = sum(statistics.stdev(x) if len(x) > 1 else 0.0 for x in (a, b))
        verdict = ("one seed: no spread to compare with" if len(a) < 2 else "within the seed spread"
                   if abs(diff) <= spread else "worse" if diff > 0 else "better")
        lines.append(f"- {label}: {diff * 100:+.2f} pp ({verdict})")
    return lines


def render(f: dict, model: str, host: str) -> str:
    s = f["settings"]
    rows = [f"Measured by `python -m tools.wan_groups` ({model}; {host}). Each MODEL samples the calibrated prompt and "
            f"one never calibrated, {s['seeds']} seeds each ({s['sampler']}, {s['steps']} steps, CFG {s['cfg']}, "
            f"shift {s['shift']}, {s['size']} px, {s['frames']} frames), on the W8A8 integer kernels; the cells are "
            "the final latent's relative error against FP in % (mean +- standard deviation over the seeds). One "
            "QVD Calibrate (default timestep coverage) serves every row.", "",
            "### Method variants", "",
            "| variant | W8A8 layers | calibrated prompt % | other prompt % |", "|---|---:|---:|---:|"]
    rows += [f"| {k} | {v['w8a8_layers']} | {_cell(v['calibrated'])} | {_cell(v['other_prompt'])} |"
             for k, v in f["variants"].items()]
    rows += ["", "Against QVD, calibrated prompt (a difference within the two rows' summed standard deviations is "
             "called within the seed spread):", ""] + _against_qvd(f["variants"])
    rows += ["", "### Each group quantized alone (the rest float)", "",
             "| group | W8A8 layers | calibrated prompt % | other prompt % |", "|---|---:|---:|---:|"]
    rows += [f"| {k} | {v['w8a8_layers']} | {_cell(v['calibrated'])} | {_cell(v['other_prompt'])} |"
             for k, v in f["alone"].items()]
    return "\n".join(rows) + "\n"


def main(argv=None) -> None:
    p = host_parser(__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", type=Path, help="also write the markdown here")
    args = p.parse_args(argv)
    args.ade = None
    sizes = (args.steps, args.size, args.frames, args.seeds)
    result = host_probe(args, "wan_groups_probe.py", *sizes, model="wan21")
    text = render(result, "the synthetic Wan 2.1 T2V, dim 256, 2 blocks, seeded", machine())
    print(text)
    if args.out:
        args.out.write_text("# Wan: where the W8A8 error comes from, by layer group\n\n" + text)


if __name__ == "__main__":
    main()
