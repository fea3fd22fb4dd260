"""``make demo``: calibrate, quantize W8A8 with QVD, render FP vs W8A8 clips and write a report.

    python -m qvd_demo.demo --out out/demo

Uses the shipped TinyVDM (an AnimateDiff-architecture UNetMotionModel trained on procedural videos,
``assets/tiny_vdm.safetensors``); falls back to the seeded untrained model if the weights are absent.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench._common import machine
from qvd import QVDConfig, save_quantized
from qvd.modules import HiDiTQLinear, QConv2d, QLinear, set_mode

from . import evaluate, quality, tinyvdm

CALIB_CLASSES = ("red square", "green circle", "blue triangle")
DEMO_CLASSES = ("red circle", "blue square", "green triangle")
STEPS, GUIDANCE = 10, 2.0  # DDIM steps and CFG scale: the shipped model's best measured (docs/tinyvdm.md)


def weight_bytes(unet: torch.nn.Module) -> dict:
    """Bytes of the quantized layers' weights: fp16 original vs int8 codes + fp32 scales."""
    int8 = fp16 = 0
    for m in unet.modules():
        if isinstance(m, (QLinear, QConv2d, HiDiTQLinear)):
            fp16 += 2 * m.weight.numel()
            int8 += m.weight.numel() + 4 * m.weight_scale.numel()
    return {"fp16": fp16, "int8": int8, "ratio": fp16 / max(int8, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--guidance", type=float, default=GUIDANCE, help="classifier-free guidance scale")
    ap.add_argument("--calib-clips", type=int, default=len(CALIB_CLASSES), help="calibration clips (1-3)")
    ap.add_argument("--weights", default=None, help="TinyVDM checkpoint (default: the shipped one)")
    ap.add_argument("--quality-seeds", type=int, default=12,
                    help="clips per model for fidelity and the quality statistic (seed i draws class i %% 12; >= 12); "
                         "docs/tinyvdm.md's figures use 48")
    ap.add_argument("--w8a8-mode", choices=("auto", "int", "fake"), default="auto",
                    help="W8A8 clips on the integer kernels or their float simulation (the same codes and scales, "
                         "float rounding apart); auto: whichever measured faster on this CPU")
    args = ap.parse_args(argv)
    if args.quality_seeds < tinyvdm.NULL_CLASS:
        ap.error(f"--quality-seeds must be >= {tinyvdm.NULL_CLASS} (one clip of every class), got {args.quality_seeds}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t_start = time.perf_counter()

    try:
        model = tinyvdm.load_trained(args.weights)
        source = str(args.weights or tinyvdm.DEFAULT_WEIGHTS)
    except FileNotFoundError as e:
        print(f"[demo] {e}\n[demo] using the seeded untrained model instead")
        model, source = tinyvdm.build_model(0), "untrained (seed 0)"
    cfg = QVDConfig()

    t0 = time.perf_counter()
    calibration = evaluate.calibrate(model, cfg, CALIB_CLASSES[: max(1, args.calib_clips)], steps=args.steps,
                                      guidance=args.guidance)
    t_calib = time.perf_counter() - t0
    t0 = time.perf_counter()
    qmodel, result = evaluate.quantized_copy(model, calibration, cfg)
    t_quant = time.perf_counter() - t0
    qfile = out / "tiny_vdm.qvd.safetensors"
    if qfile.exists():
        qfile.unlink()  # the demo's own output from a previous run
    save_quantized(qfile, result)

    times = evaluate.step_times(model, qmodel)
    t_fp, t_int, t_fake = times["fp32"], times["int"], times["fake"]
    mode = args.w8a8_mode if args.w8a8_mode != "auto" else evaluate.auto_mode(times)
    set_mode(qmodel, mode)

    conds = [i % tinyvdm.NULL_CLASS for i in range(args.quality_seeds)]  # seed i draws class i % 12
    t0 = time.perf_counter()
    res = evaluate.evaluate(model, qmodel, n=len(conds), steps=args.steps, guidance=args.guidance, conds=conds)
    t_eval = time.perf_counter() - t0
    fp_clips, q_clips = res["clips"]["fp"], res.pop("clips")["quant"]
    clips = []
    for cls in DEMO_CLASSES:  # seeds 0..11 hold one clip of every class
        i = conds.index(tinyvdm.class_id(cls))
        gif = tinyvdm.write_gif(out / f"{cls.replace(' ', '_')}_seed{i}_fp_vs_w8a8.gif", [fp_clips[i], q_clips[i]],
                                labels=("FP", "W8A8 (QVD)"))
        clips.append({"class": cls, "seed": i, "psnr_db": evaluate.psnr(q_clips[i], fp_clips[i]), "gif": gif.name})
    grid = tinyvdm.write_gif(out / "all_classes_fp_vs_w8a8.gif",
                             [v for i in range(tinyvdm.NULL_CLASS) for v in (fp_clips[i], q_clips[i])], scale=5,
                             per_row=8, labels=("FP", "W8A8") * 4)
    check = {name: quality.check(res[key], res["quality_data"]) for name, key in
             (("fp", "quality_fp"), ("w8a8", "quality_quant"))}

    temporal = [r for r in result.report if r["kind"] == "temporal"]
    n = len(conds)
    t_total = time.perf_counter() - t_start
    report = {
        "model": source, "steps": args.steps, "guidance": args.guidance, "frames": tinyvdm.FRAMES,
        "size": tinyvdm.SIZE,
        "config": cfg.to_dict(), "calibration_seconds": t_calib, "quantize_seconds": t_quant,
        "sampling_seconds": t_eval, "total_seconds": t_total, "machine": machine(), "clips": clips,
        "fidelity": {"clips": n, "psnr_db": res["psnr_db"], "ssim": res["ssim"],
                     "temporal_error": res["temporal_error"]},
        "quality": {"fp": res["quality_fp"], "w8a8": res["quality_quant"], "data": res["quality_data"]},
        "quality_check": {k: {name: {"value": v, "limit": lim, "passed": ok} for name, (v, lim, ok) in c.items()}
                          for k, c in check.items()},
        "weight_bytes": weight_bytes(qmodel.unet),
        "cpu_step_seconds": {"fp32": t_fp, "w8a8": t_int, "speedup": t_fp / t_int, "w8a8_fake": t_fake,
                             "threads": torch.get_num_threads()},
        "w8a8_clips_mode": mode,
        "temporal_tdscore_min": min((r["tdscore"] for r in temporal), default=None),
        "layers": len(result.modules), "quantized_file": qfile.name, "gif_all_classes": grid.name,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    wb = report["weight_bytes"]
    verdict = lambda c: "meets every threshold" if all(ok for _, _, ok in c.values()) else \
        "misses " + ", ".join(k for k, (_, _, ok) in c.items() if not ok)
    lines = [
        "# QVD demo report", "",
        f"Model: {source}; {tinyvdm.FRAMES} frames of {tinyvdm.SIZE}x{tinyvdm.SIZE}, DDIM {args.steps} steps, "
        f"CFG {args.guidance:g}.",
        f"Calibration {t_calib:.1f} s, quantization {t_quant:.1f} s ({len(result.modules)} modules replaced), "
        f"sampling {2 * n} clips {t_eval:.0f} s; the demo {t_total:.0f} s in all.", f"Machine: {report['machine']}.", "",
        f"## Fidelity of W8A8 to FP ({n} clips, seeds 0..{n - 1}, class = seed % {tinyvdm.NULL_CLASS})", "",
        f"PSNR {res['psnr_db']:.2f} dB, SSIM {res['ssim']:.4f}, temporal error {res['temporal_error']:.4f}.", "",
        "| clip | PSNR W8A8 vs FP (dB) | GIF (left FP, right W8A8) |", "|---|---|---|",
        *[f"| {c['class']} (seed {c['seed']}) | {c['psnr_db']:.2f} | {c['gif']} |" for c in clips], "",
        f"Every class, seeds 0..{tinyvdm.NULL_CLASS - 1} (FP, W8A8 pairs): {grid.name}", "",
        "## What the clips show (`qvd_demo.quality`)", "",
        *quality.table({"FP": res["quality_fp"], "W8A8": res["quality_quant"]}, res["quality_data"]), "",
        f"FP {verdict(check['fp'])}; W8A8 {verdict(check['w8a8'])}.", "",
        "## Size and speed", "",
        f"Quantized layers' weights: fp16 {wb['fp16']:,} B -> int8 + scales {wb['int8']:,} B ({wb['ratio']:.2f}x smaller).",
        f"CPU time per UNet step (batch 2 x {tinyvdm.FRAMES} frames, {torch.get_num_threads()} threads, median of 5): "
        f"fp32 {t_fp * 1e3:.1f} ms, W8A8 {t_int * 1e3:.1f} ms ({t_fp / t_int:.2f}x).",
        f"Lowest TDScore of the HiDi-TQ temporal layers: {report['temporal_tdscore_min']:.4f}.", "",
        "W8A8 clips: " + ("the integer kernels." if mode == "int" else
                          f"the float simulation of the same quantized model (`set_mode(model, \"fake\")`: the same "
                          f"int8 codes and scales, float arithmetic; it differs from the kernels by rounding), as "
                          f"this CPU's integer route took {t_int * 1e3:.0f} ms a step against the simulation's "
                          f"{t_fake * 1e3:.0f} ms." + (" (--w8a8-mode fake)" if args.w8a8_mode == "fake" else "")),
        "" if n >= 48 else f"The figures of docs/tinyvdm.md are on 48 clips per model: `python -m qvd_demo.demo "
                           f"--quality-seeds 48` (about {4 * t_eval / 60:.0f} min of sampling here).",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
