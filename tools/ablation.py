"""QVD ablation on the shipped TinyVDM: which parts of QVD gain, at W8A8, W6A6 and W4A8.

    .venv/bin/python -m tools.ablation                       # writes docs/results.md and docs/img/results_*.png
    .venv/bin/python -m tools.ablation --n 1 --steps 2 --configs fp,qvd-w8a8 --sensitivity none \
        --no-error-budget --out /tmp/abl
    .venv/bin/python -m tools.ablation --generalisation   # only the section "Calibrated once, sampled otherwise"

One run, fixed seeds: calibrate once (classes and seeds other than the evaluation ones), then for every
configuration quantize a deep copy of the FP model and compare N evaluation clips with FP's. Every row keeps
the first and last convolutions in float (QVDConfig.keep_ends_float) but the two "first / last W8A8" rows; the
per-token dynamic row is a peer (activation scales computed per token at run time, simulated in float).
The sensitivity section quantizes one layer group at a time (naive and QVD, W8A8) to show where the
remaining error lives; the error budget (tools/error_budget.py) what halving naive min-max's error would take.
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qvd import QVDConfig  # noqa: E402
from qvd.config import matches  # noqa: E402
from qvd.htdq import k_metric, search_hiditq  # noqa: E402
from qvd.identity import find_layers, install  # noqa: E402
from qvd.kernels import cpu as cpu_kernels  # noqa: E402
from qvd.quantizers import act_qrange, activation_qparams, dequantize_weight, fake_quant, quantize_weight  # noqa: E402,E501
from qvd.scri import ScriTransform  # noqa: E402
from qvd_demo import demo  # noqa: E402
from qvd_demo import evaluate as E  # noqa: E402
from qvd_demo import tinyvdm as T  # noqa: E402
from tools import error_budget  # noqa: E402
from tools.error_budget import channel_spread, mse_ratio, quantized_only  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Calibration: one clip each of red square, green circle, blue triangle, yellow square (every colour and
# shape); evaluation cycles through the other eight classes.
CALIB_CLASSES = (0, 5, 10, 3)
EVAL_CLASSES = tuple(c for c in range(T.NULL_CLASS) if c not in CALIB_CLASSES)
METHODS = (  # key, label, QVDConfig fields
    ("naive", "naive min-max", dict(act_range="minmax", htdq=False, scri=False)),
    ("mse", "MSE range", dict(htdq=False, scri=False)),
    ("htdq", "MSE range + HTDQ", dict(scri=False)),
    ("scri", "MSE range + SCRI", dict(htdq=False)),
    ("qvd", "QVD (HTDQ + SCRI)", dict()),
)
BITS = (("w8a8", 8, 8), ("w6a6", 6, 6), ("w4a8", 4, 8))
PEER = ("dynamic", "per-token dynamic (peer)")
CONFIGS = {"fp": ("FP", None)}  # key -> (label, QVDConfig | ("dynamic", w_bits, a_bits) | None for FP)
for _b, _w, _a in BITS:
    CONFIGS.update({f"{m}-{_b}": (label, QVDConfig(w_bits=_w, a_bits=_a, **kw)) for m, label, kw in METHODS})
    CONFIGS[f"{PEER[0]}-{_b}"] = (PEER[1], (PEER[0], _w, _a))
FIRST_LAST_W8A8 = (("naive", "naive min-max, first / last W8A8"), ("qvd", "QVD, first / last W8A8"))
# TinyVDM's first / last and temporal layers, as calibration finds them (tests/test_unet_motion.py checks it on the
# same diffusers UNet): named here for the baselines and groups that run without a calibration.
ENDS = ("conv_in", "conv_out")
TEMPORAL = ("time_embedding.*", "time_emb_proj")
_KW = {m: kw for m, _, kw in METHODS}
CONFIGS.update({f"{m}-w8a8-all": (label, QVDConfig(keep_ends_float=False, **_KW[m])) for m, label in FIRST_LAST_W8A8})
# Sensitivity: layer groups quantized alone at W8A8 (the rest in float), by kind and by UNet block.
GROUPS = (
    ("conv1", "ResNet conv1", ("*resnets.*.conv1",)),
    ("conv2", "ResNet conv2", ("*resnets.*.conv2",)),
    ("shortcut", "ResNet 1x1 shortcut", ("*resnets.*.conv_shortcut",)),
    ("temporal", "temporal (time embedding, time_emb_proj)", TEMPORAL),
    ("motion", "motion modules", ("*motion_modules.*",)),
    ("attn1", "spatial self-attention", ("*attentions.*.attn1.*",)),
    ("attn2", "spatial cross-attention", ("*attentions.*.attn2.*",)),
    ("ff", "spatial feed-forward", ("*attentions.*.ff.*",)),
    ("proj", "spatial proj_in / proj_out", ("*attentions.*.proj_in", "*attentions.*.proj_out")),
    ("samplers", "down / up samplers", ("*samplers.*",)),
    ("down.0", "block down_blocks.0", ("*down_blocks.0.*",)),
    ("down.1", "block down_blocks.1", ("*down_blocks.1.*",)),
    ("mid", "block mid_block", ("*mid_block.*",)),
    ("up.0", "block up_blocks.0", ("*up_blocks.0.*",)),
    ("up.1", "block up_blocks.1 (last)", ("*up_blocks.1.*",)),
)
GROUP_KEYS = tuple(k for k, _, _ in GROUPS)
SENSITIVITY_METHODS = ("naive", "qvd")
PLOT_BITS = 6  # quantization levels drawn in the histogram (8-bit grids are too dense to read)


class DynamicPerToken(nn.Module):
    """Peer baseline (torchao-style int8 dynamic quantization, simulated in float): int8 per-output-channel
    weights; activations quantized symmetrically per token (Linear: per row; Conv2d: per pixel over channels)
    with a scale computed at run time from that token's abs-max."""

    def __init__(self, layer: nn.Module, w_bits: int, a_bits: int):
        super().__init__()
        codes, scale = quantize_weight(layer.weight, w_bits)
        self.register_buffer("weight", codes)
        self.register_buffer("weight_scale", scale)
        self.bias = layer.bias
        self.conv = None if isinstance(layer, nn.Linear) else (layer.stride, layer.padding)
        self.qmax = 2 ** (a_bits - 1) - 1

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # diffusers passes ``input`` by name
        x = input
        s = x.abs().amax(-1 if self.conv is None else 1, keepdim=True).clamp_min(1e-8) / self.qmax
        xq = (x / s).round().clamp(-self.qmax, self.qmax) * s
        w = dequantize_weight(self.weight, self.weight_scale)
        if self.conv is None:
            return F.linear(xq, w, self.bias)
        return F.conv2d(xq, w, self.bias, *self.conv)


def dynamic_copy(model: nn.Module, w_bits: int, a_bits: int) -> nn.Module:
    """A deep copy with every Linear / Conv2d but the first and last layers (``ENDS``) replaced by DynamicPerToken."""
    q = copy.deepcopy(model)
    install(q, {name: DynamicPerToken(m, w_bits, a_bits) for name, m in q.named_modules()
                if isinstance(m, (nn.Linear, nn.Conv2d)) and not matches(name, ENDS)})
    return q


def run(n: int = 8, steps: int = demo.STEPS, configs=tuple(CONFIGS), out_md: Path = ROOT / "docs" / "results.md",
        img_dir: Path = ROOT / "docs" / "img", guidance: float = demo.GUIDANCE, groups=(), budget: bool = False,
        log=print, mode: str = "auto") -> dict:
    """Run the ablation (and the sensitivity of ``groups``, keys of GROUPS; the error budget of
    ``tools.error_budget`` if ``budget``), write the markdown and the two plots; returns {config key: metrics}
    (with ``"sensitivity": {group key: {method: PSNR}}`` and ``"budget"`` if run, and ``"mode"``).

    ``mode``: the quantized copies run the integer kernels ("int") or their float simulation ("fake"); "auto"
    times both on the QVD W8A8 copy and takes the faster (``evaluate.auto_mode``)."""
    unknown = [k for k in configs if k not in CONFIGS] + [g for g in groups if g not in GROUP_KEYS]
    if unknown:
        raise ValueError(f"unknown configs / groups {unknown}: choose from {list(CONFIGS)} / {list(GROUP_KEYS)}")
    if n < 1 or steps < 1:
        raise ValueError(f"n and steps must be >= 1, got n={n}, steps={steps}")
    t0 = time.time()
    fp = T.load_trained()
    conds = [EVAL_CLASSES[i % len(EVAL_CLASSES)] for i in range(n)]
    cal = E.calibrate(fp, QVDConfig(), CALIB_CLASSES, steps=steps, guidance=guidance)
    reference = E.sample_clips(fp, conds, steps, guidance)
    fp_bytes = E.weight_bytes(T.load_trained().half())
    probe, probe_result = E.quantized_copy(fp, cal, CONFIGS["qvd-w8a8"][1])
    times = E.step_times(fp, probe)
    mode = E.auto_mode(times) if mode == "auto" else mode
    log(f"W8A8 layers run {mode!r}: one CFG step fp32 {times['fp32'] * 1e3:.0f} ms, integer kernels "
        f"{times['int'] * 1e3:.0f} ms, float simulation {times['fake'] * 1e3:.0f} ms")
    rows = {}
    for key in configs:
        label, cfg = CONFIGS[key]
        if cfg is None:
            q, report = fp, []
        elif isinstance(cfg, tuple):
            q, report = dynamic_copy(fp, cfg[1], cfg[2]), []
        else:
            q, result = E.quantized_copy(fp, cal, cfg, mode)
            report = result.report
        res = E.evaluate(fp, q, n=n, steps=steps, guidance=guidance, conds=conds, reference=reference)
        td = [r["tdscore"] for r in report if r.get("tdscore") is not None]
        rows[key] = {"label": label, "psnr_db": res["psnr_db"], "psnr_clips": res["psnr_clips"], "ssim": res["ssim"],
                     "temporal_error": res["temporal_error"], "min_tdscore": min(td) if td else None,
                     "quality": res["quality_quant"], "quality_data": res["quality_data"],
                     "weight_bytes": fp_bytes if cfg is None else E.weight_bytes(q)}
        r = rows[key]
        log(f"{key:11s} PSNR {r['psnr_db']:6.2f} dB  SSIM {r['ssim']:.4f}  temporal {r['temporal_error']:.4f}  "
            f"min TDScore {_fmt(r['min_tdscore'], '.4f')}  recognised {r['quality']['recognised']:.0%}  "
            f"speed {r['quality']['speed']:.2f}  bytes {r['weight_bytes']}  ({time.time() - t0:.0f} s)")
    sens = {}
    for g in groups:
        sens[g] = sensitivity(fp, cal, g, conds, reference, steps, guidance, mode)
        log(f"only {g:9s} " + "  ".join(f"{m} {v['psnr_db']:6.2f} dB" for m, v in sens[g].items())
            + f"  ({time.time() - t0:.0f} s)")
    bud = None
    if budget:
        bud = error_budget.error_budget(fp, cal, conds, reference, steps, guidance,
                                        {m: CONFIGS[f"{m}-w8a8"][1] for m in ("naive", "qvd")}, log=log,
                                        mode=mode)
    img_dir.mkdir(parents=True, exist_ok=True)
    hist = plot_temporal_histogram(cal, img_dir / "results_temporal_hist.png")
    cover = plot_scri_coverage(cal, probe_result.report, img_dir / "results_scri_coverage.png")
    out_md.parent.mkdir(parents=True, exist_ok=True)
    kept = _section(out_md.read_text()) if out_md.is_file() else ""  # the generalisation section, run on its own
    out_md.write_text(render_markdown(rows, hist, cover, sens, bud, n=n, steps=steps, guidance=guidance,
                                      conds=conds, img_rel=_rel(img_dir, out_md.parent), seconds=time.time() - t0,
                                      mode=mode, times=times) + kept)
    log(f"wrote {out_md}, {img_dir / 'results_temporal_hist.png'}, {img_dir / 'results_scri_coverage.png'}")
    extra = ({"sensitivity": sens} if sens else {}) | ({"budget": bud} if bud else {})
    return dict(rows, mode=mode, **extra)


# Calibrated once (DDIM 10, CFG 2, three classes), then sampled otherwise: name -> (classes, DDIM / DPM-Solver++,
# steps). The calibration classes are sampled from other seeds than calibration's.
GENERAL_CLASSES = CALIB_CLASSES[:3]
GENERAL_SETTINGS = {
    "(a) as calibrated: DDIM 10": (GENERAL_CLASSES, "ddim", 10),
    "(b) DDIM 25": (GENERAL_CLASSES, "ddim", 25),
    "(b) DDIM 50": (GENERAL_CLASSES, "ddim", 50),
    "(c) DPM-Solver++ 10": (GENERAL_CLASSES, "dpmpp", 10),
    "(c) DPM-Solver++ 25": (GENERAL_CLASSES, "dpmpp", 25),
    "(d) other classes: DDIM 10": (EVAL_CLASSES, "ddim", 10),
}
# (QVD Calibrate's timestep_coverage, QVDConfig.timestep_buckets): coverage 0 = the sampled timesteps only
GENERAL_VARIANTS = ((0, 1), (10, 1), (20, 1), (20, 2), (20, 4))
SECTION = "<!-- generalisation: python -m tools.ablation --generalisation -->"


def generalisation(n: int = 6, guidance: float = demo.GUIDANCE, log=print, mode: str = "int",
                   settings=tuple(GENERAL_SETTINGS), variants=GENERAL_VARIANTS) -> dict:
    """QVD W8A8 from one calibration (DDIM 10, CFG ``guidance``, GENERAL_CLASSES) per timestep coverage, quantized
    with each ``(coverage, timestep buckets)`` of ``variants``, sampled in each of GENERAL_SETTINGS (``n`` clips, seeds
    0..n-1): {setting: {variant: metrics}}, plus the timesteps each calibration held under ``"timesteps"`` (by
    coverage)."""
    fp = T.load_trained()
    out, held, cals = {}, {}, {}
    for cov in sorted({c for c, _ in variants}):
        cals[cov] = E.calibrate(fp, QVDConfig(), GENERAL_CLASSES, steps=10, guidance=guidance, coverage=cov)
        held[cov] = {"timesteps": len(cals[cov].timesteps), "added": len(cals[cov].coverage)}
    models = {(cov, b): E.quantized_copy(fp, cals[cov], QVDConfig(timestep_buckets=b), mode)[0]
              for cov, b in variants}
    for name in settings:
        classes, sampler, steps = GENERAL_SETTINGS[name]
        conds = [classes[i % len(classes)] for i in range(n)]
        reference = E.sample_clips(fp, conds, steps, guidance, sampler=sampler)
        out[name] = {}
        for (cov, b), q in models.items():
            res = E.evaluate(fp, q, n=n, steps=steps, guidance=guidance, conds=conds, reference=reference,
                             sampler=sampler)
            out[name][(cov, b)] = {"psnr_db": res["psnr_db"], "psnr_clips": res["psnr_clips"],
                                   "recognised": res["quality_quant"]["recognised"],
                                   "recognised_fp": res["quality_fp"]["recognised"]}
            log(f"{name:30s} coverage {cov:2d}, {b} bucket(s): PSNR {res['psnr_db']:6.2f} dB, recognised "
                f"{res['quality_quant']['recognised']:.0%} (FP {res['quality_fp']['recognised']:.0%})")
    return dict(out, timesteps=held)


def _table(res: dict, variants: list, axis) -> list[str]:
    """One table: PSNR (recognised) per variant and each one's paired difference from the first."""
    head = ["setting (FP recognised)"] + [f"{axis(v)}: PSNR dB (recognised)" for v in variants] + [
        f"{axis(v)} - {axis(variants[0])}, dB (+- s.e.)" for v in variants[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in res.items():
        if name == "timesteps":
            continue
        cells = [f"{name} (FP {row[variants[0]]['recognised_fp']:.0%})"] + [
            f"{row[v]['psnr_db']:.2f} ({row[v]['recognised']:.0%})" for v in variants]
        for v in variants[1:]:
            d = [a - b for a, b in zip(row[v]["psnr_clips"], row[variants[0]]["psnr_clips"])]
            se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else None
            cells.append(f"{statistics.fmean(d):+.2f} ({_fmt(se, '.2f')})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_generalisation(res: dict, *, n: int, seconds: float) -> str:
    variants = list(next(v for k, v in res.items() if k != "timesteps"))
    by_coverage = sorted(v for v in variants if v[1] == 1)
    top = max(c for c, _ in variants)
    by_buckets = sorted(v for v in variants if v[0] == top)
    default = QVDConfig().timestep_buckets
    lines = [SECTION, "", "## Calibrated once, sampled otherwise (timestep coverage and buckets)", "",
             f"Generated by `python -m tools.ablation --generalisation` ({seconds / 60:.1f} min): QVD W8A8 from one "
             f"calibration, DDIM 10 steps, CFG {demo.GUIDANCE:g}, classes "
             f"{', '.join(T.CLASSES[c] for c in GENERAL_CLASSES)}, with QVD Calibrate's `timestep_coverage` "
             "points (0: the sampled timesteps only; each point the sampler did not come near adds one model call "
             "on a calibration clip noised to it). Calibrations held "
             + "; ".join(f"coverage {c}: {v['timesteps']} timesteps ({v['added']} added)"
                         for c, v in res["timesteps"].items())
             + f". Each setting: {n} clips, PSNR against FP sampled the same way, paired by seed."]
    if len(by_coverage) > 1:
        lines += ["", "### Timestep coverage (one static scale per layer)", ""]
        lines += _table(res, by_coverage, lambda v: f"coverage {v[0]}")
    if len(by_buckets) > 1:
        lines += ["", f"### Timestep buckets (coverage {top}; the default is {default})", "",
                  "Each W8A8 layer gets one static (scale, zero point) per interval of the calibrated timesteps "
                  "(`QVDConfig.timestep_buckets`), the one of the current "
                  "timestep chosen at run time; 1 bucket is one scale per layer.", ""]
        lines += _table(res, by_buckets, lambda v: f"{v[1]} bucket{'s' if v[1] > 1 else ''}")
        lines += ["", _bucket_findings(res, by_buckets)]
    return "\n".join(lines) + "\n"


def _bucket_findings(res: dict, variants: list) -> str:
    """Per bucket count: in how many settings it gains / loses against one bucket (``_verdict``), and its range."""
    rows = {name: {f"{c},{b}": r for (c, b), r in row.items()} for name, row in res.items() if name != "timesteps"}
    base = "%d,%d" % variants[0]
    parts = []
    for v in variants[1:]:
        diffs = [_paired(row, "%d,%d" % v, base) for row in rows.values()]
        verdicts = [_verdict(m, se) for m, se in diffs]
        parts.append(f"{v[1]} buckets gain in {verdicts.count('gains')} of {len(diffs)} settings and lose in "
                     f"{verdicts.count('loses')} ({min(m for m, _ in diffs):+.2f} to {max(m for m, _ in diffs):+.2f} dB)")
    return ("Against one scale per layer: " + "; ".join(parts) + ". A change counts when it exceeds 0.1 dB and twice "
            "its standard error. Narrower per-bucket ranges fit the calibrated timesteps, and clip at the timesteps "
            "between them that another step count or sampler runs, where one scale over the whole schedule does not; "
            f"the default stays at {QVDConfig().timestep_buckets} (`QVDConfig.timestep_buckets`).")


def _section(text: str) -> str:
    """The generalisation section of a results.md (from its marker to the end), or ""."""
    i = text.find(SECTION)
    return "\n" + text[i:] if i >= 0 else ""


def sensitivity(fp, cal, group: str, conds, reference, steps: int, guidance: float, mode: str = "int") -> dict:
    """W8A8 naive min-max and QVD with only ``group``'s layers quantized (the rest float, first / last
    convolutions too): {method: {"psnr_db", "layers"}}."""
    patterns = next(p for k, _, p in GROUPS if k == group)
    inside = [nm for nm in find_layers(fp, QVDConfig())
              if matches(nm, patterns) and not matches(nm, ENDS)]
    if not inside:
        raise ValueError(f"group {group!r} ({patterns}) matches no quantized layer of this model")
    spread = torch.tensor([channel_spread(cal.layers[nm]) for nm in inside if nm in cal.layers]).median()
    out = {}
    for m in SENSITIVITY_METHODS:
        q = quantized_only(fp, cal, QVDConfig(**_KW[m]), inside, mode)
        res = E.evaluate(fp, q, n=len(conds), steps=steps, guidance=guidance, conds=conds, reference=reference)
        out[m] = {"psnr_db": res["psnr_db"], "layers": len(inside), "channel_spread": float(spread)}
    return out


def _rel(path: Path, start: Path) -> str:
    try:
        return str(path.resolve().relative_to(start.resolve()))
    except ValueError:
        return str(path.resolve())


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _mse(psnr_db: float) -> float:
    """Mean squared error relative to the data range squared, from a PSNR."""
    return 10 ** (-psnr_db / 10)


# ------------------------------------------------------------------------------------------ markdown
def render_markdown(rows: dict, hist: dict, cover: dict, sens: dict, budget: dict | None, *, n: int,
                    steps: int, guidance: float, conds, img_rel: str, seconds: float, mode: str = "int",
                    times: dict | None = None) -> str:
    caps = ", ".join(T.CLASSES[c] for c in conds)
    calib = ", ".join(T.CLASSES[c] for c in CALIB_CLASSES)
    lines = [
        "# QVD ablation on TinyVDM",
        "",
        f"Generated by `python -m tools.ablation` (fixed seeds, {torch.get_num_threads()} CPU thread(s), "
        + (f"CPU kernel route `{cpu_kernels.ROUTE}`" if mode == "int" else
           "W8A8 layers in their float simulation (`set_mode(model, \"fake\")`: the same int8 codes and scales, "
           "float arithmetic" + (f"; this CPU's integer route took {times['int'] * 1e3:.0f} ms a CFG step against "
                                 f"the simulation's {times['fake'] * 1e3:.0f} ms" if times else "") + ")")
        + f", {seconds / 60:.1f} min). Model: the shipped TinyVDM "
        "(`assets/tiny_vdm.safetensors`, AnimateDiff "
        f"UNetMotionModel architecture, 8 frames of 24x24). Sampler: DDIM, {steps} steps, CFG {guidance:g} "
        + ("(`make demo`'s). " if (steps, guidance) == (demo.STEPS, demo.GUIDANCE) else
           f"(`make demo` samples DDIM {demo.STEPS}, CFG {demo.GUIDANCE:g}). ")
        + f"Calibration: one clip each of {calib} (seeds 1000+). Evaluation: {n} clip(s) ({caps}; seeds 0..{n - 1}); "
        "every configuration quantizes a deep copy of the FP model from the same calibration.",
        "",
        "Columns: PSNR / SSIM / temporal error (RMS of the difference of frame differences) of the quantized "
        "model's clips against FP's from the same seeds, mean over clips; MSE = 10^(-PSNR/10) relative to "
        "FP's data range squared; min TDScore over the temporal (`time_emb_proj`, `time_embedding.*`) layers "
        "on the calibration features (HiDi-TQ where HTDQ is on, otherwise the uniform activation quantizer "
        "the layer runs, through its SCRI shift / scale where SCRI is on); "
        "recognised (fraction of clips whose every frame matches the class's shape and colour against the "
        "procedural renderer's templates), background (mean distance from black away from the shape, 0..1) "
        "and speed (centroid px/frame) are the quality statistic of `qvd_demo.quality`; weight bytes as "
        "stored (FP: fp16).",
        "",
    ]
    header = ("| configuration | PSNR vs FP (dB) | MSE vs FP | SSIM | temporal error | min TDScore | recognised "
              "| background | speed | weight bytes |")
    sep = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"

    def row(key):
        r = rows[key]
        psnr = "inf" if math.isinf(r["psnr_db"]) else f"{r['psnr_db']:.2f}"
        mse = "0" if math.isinf(r["psnr_db"]) else f"{_mse(r['psnr_db']):.2e}"
        return (f"| {r['label']} | {psnr} | {mse} | {r['ssim']:.4f} | {r['temporal_error']:.4f} "
                f"| {_fmt(r['min_tdscore'], '.4f')} | {r['quality']['recognised']:.0%} "
                f"| {r['quality']['background']:.3f} | {r['quality']['speed']:.2f} | {r['weight_bytes']:,} |")

    for b, w, a in BITS:
        keys = [f"{m}-{b}" for m in [m for m, _, _ in METHODS] + [PEER[0]] if f"{m}-{b}" in rows]
        if not keys:
            continue
        lines += [f"## W{w}A{a}", "", header, sep]
        lines += [row(k) for k in (["fp"] if "fp" in rows else []) + keys]
        lines.append("")
    both = [k for m, _ in FIRST_LAST_W8A8 for k in (f"{m}-w8a8", f"{m}-w8a8-all") if k in rows]
    if any(k.endswith("-all") for k in both):
        lines += ["## First and last convolutions (W8A8)", "",
                  "The rows above keep `conv_in` / `conv_out` in float (`QVDConfig.keep_ends_float`, the default); "
                  "these quantize them at W8A8 too.", "", header, sep] + [row(k) for k in both] + [""]
    if "fp" in rows:
        d = rows["fp"]["quality_data"]
        lines += [f"Procedural data for the same classes: recognised {d['recognised']:.0%}, background "
                  f"{d['background']:.3f}, speed {d['speed']:.2f} px/frame (`qvd_demo.quality`: recognised = the "
                  "class's shape and colour matched in every frame).", ""]
    lines += ["## What gains on this model", ""] + _findings(rows) + [""]
    if sens:
        lines += ["## Where the remaining error lives (W8A8)", ""] + _sensitivity_table(sens) + [""]
    if budget:
        db = lambda k: rows[k]["psnr_db"] if k in rows else None
        lines += ["## What halving naive min-max's error would take (W8A8)", ""]
        lines += error_budget.render(budget, db("naive-w8a8"), db("qvd-w8a8")) + [""]
    lines += ["## The issue's targets (QVD, W8A8)", ""] + _targets(rows, sens, budget) + [""]
    lines += [
        "## Figures", "",
        f"![temporal features]({img_rel}/results_temporal_hist.png)", "",
        f"**Temporal features** of `{hist['layer']}` (FP calibration input, all {hist['timesteps']} timesteps x "
        f"{hist['channels']} channels; log counts) with the {PLOT_BITS}-bit uniform levels (MSE range) and the "
        f"{PLOT_BITS}-bit HiDi-TQ levels (tau {hist['tau']:g}, clip {hist['clip']:g}). At {PLOT_BITS} bit: "
        f"uniform K {hist['uniform'][0]:.4f} (L2 {hist['uniform'][1]:.2e}, TDScore {hist['uniform'][2]:.4f}), "
        f"HiDi-TQ K {hist['hiditq'][0]:.4f} (L2 {hist['hiditq'][1]:.2e}, TDScore {hist['hiditq'][2]:.4f}).", "",
        f"![SCRI coverage]({img_rel}/results_scri_coverage.png)", "",
        f"**SCRI channel coverage** of `{cover['layer']}` (alpha {cover['alpha']:g}, chosen by QVD W8A8): the "
        "number of 8-bit levels (per-tensor min-max step) spanning each input channel's calibration range, "
        f"channels sorted. Median channel: {cover['median_before']:.1f} levels before, {cover['median_after']:.1f} "
        f"after; narrowest: {cover['min_before']:.2f} before, {cover['min_after']:.2f} after.", "",
    ]
    return "\n".join(lines)


def _paired(rows: dict, key: str, base: str) -> tuple[float, float | None]:
    """Mean and standard error (None for one clip) of the per-clip PSNR difference ``key - base`` (clips
    paired by seed)."""
    d = [a - b for a, b in zip(rows[key]["psnr_clips"], rows[base]["psnr_clips"])]
    return statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else None


def _verdict(mean: float, se: float | None) -> str:
    """A change counts when it exceeds 0.1 dB and twice its standard error."""
    bar = 0.1 if se is None else max(0.1, 2 * se)
    return "gains" if mean > bar else "loses" if mean < -bar else "is within the clip-to-clip spread"


def _findings(rows: dict) -> list[str]:
    """One line per bit width: each part's paired PSNR change against the MSE-range baseline, and its verdict."""
    out = []
    for b, w, a in BITS:
        base = rows.get(f"mse-{b}")
        if base is None:
            continue
        parts = []
        for m, label in (("naive", "min-max instead of MSE ranges"), ("htdq", "HTDQ"), ("scri", "SCRI"),
                         ("qvd", "HTDQ + SCRI"), (PEER[0], "per-token dynamic activations (peer)")):
            if f"{m}-{b}" not in rows:
                continue
            d, se = _paired(rows, f"{m}-{b}", f"mse-{b}")
            parts.append(f"{label} {_verdict(d, se)} ({d:+.2f} ± {_fmt(se, '.2f')} dB)")
        if parts:
            out.append(f"- W{w}A{a}, against MSE-range ({base['psnr_db']:.2f} dB): " + "; ".join(parts) + ".")
    if not out:
        return ["- The MSE-range baseline was not run: no comparison."]
    summary = []
    for m, label in (("htdq", "HTDQ"), ("scri", "SCRI"), ("qvd", "QVD (HTDQ + SCRI)")):
        verdicts = {f"W{w}A{a}": _verdict(*_paired(rows, f"{m}-{b}", f"mse-{b}"))
                    for b, w, a in BITS if f"{m}-{b}" in rows and f"mse-{b}" in rows}
        gain = [k for k, v in verdicts.items() if v == "gains"]
        rest = [k for k, v in verdicts.items() if v != "gains"]
        if gain:
            summary.append(f"{label} gains over MSE ranges at {', '.join(gain)}"
                           + (f" and not at {', '.join(rest)}" if rest else "") + ".")
        elif verdicts:
            summary.append(f"{label} shows no significant gain over MSE ranges at any bit width run.")
    peer = [f"W{w}A{a} {rows[f'{PEER[0]}-{b}']['psnr_db'] - rows[f'qvd-{b}']['psnr_db']:+.2f} dB" for b, w, a in BITS
            if f"{PEER[0]}-{b}" in rows and f"qvd-{b}" in rows]
    if peer:
        summary.append("The per-token dynamic peer against QVD: " + ", ".join(peer) + "; it computes a scale per "
                       "token at run time (a reduction over every activation before each GEMM), where QVD's "
                       "scales are static and fused into the quantize kernel.")
    return out + ["", "In short: " + " ".join(summary) + " Each change is the mean over the clips of the per-clip "
                  "PSNR difference (same seeds) ± its standard error; a part gains when the mean exceeds 0.1 dB "
                  "and twice the standard error. Sampling amplifies tiny float differences (tenths of a dB "
                  "between CPU kernel routes), so smaller changes are not read as effects."]


def _sensitivity_table(sens: dict) -> list[str]:
    """The sensitivity table and what it says: which group holds the largest remaining QVD error."""
    ratio = lambda v: mse_ratio(v["qvd"]["psnr_db"], v["naive"]["psnr_db"])
    labels = {k: label for k, label, _ in GROUPS}
    lines = ["Each row quantizes only one group of layers at W8A8 (everything else, the first / last convolutions "
             "included, in float), with naive min-max and with QVD, from the same calibration, on the same clips. "
             "The groups are layer kinds, then UNet blocks; the errors of groups do not add up exactly (sampling "
             "is not linear in the error). Channel spread: a layer's largest over median input-channel "
             "half-range in calibration, median over the group's layers (how scattered the channels are, i.e. what "
             "SCRI can integrate).", "",
             "| group | layers | channel spread | naive min-max (dB) | QVD (dB) | QVD / naive MSE |",
             "|---|---:|---:|---:|---:|---:|"]
    for k, v in sens.items():
        lines.append(f"| {labels[k]} | {v['qvd']['layers']} | {v['qvd']['channel_spread']:.1f} "
                     f"| {v['naive']['psnr_db']:.2f} | {v['qvd']['psnr_db']:.2f} | {ratio(v):.2f}x |")
    worst = min(sens, key=lambda k: sens[k]["qvd"]["psnr_db"])
    met = [k for k in sens if ratio(sens[k]) <= 0.5]
    rs = [ratio(v) for v in sens.values()]
    lines += ["", f"The largest remaining QVD error comes from {labels[worst]} ({sens[worst]['qvd']['psnr_db']:.2f} dB "
              f"alone, {ratio(sens[worst]):.2f}x naive's). QVD's error is at most 0.5x naive's in {len(met)} of "
              f"{len(sens)} groups (ratios {min(rs):.2f}x to {max(rs):.2f}x)."]
    return lines


def _targets(rows: dict, sens: dict | None = None, budget: dict | None = None) -> list[str]:
    q = rows.get("qvd-w8a8")
    if q is None:
        return ["- QVD W8A8 was not run: targets not evaluated."]
    yes = lambda ok: "**met**" if ok else "**not met**"
    out = [f"- PSNR vs FP >= 35 dB: {q['psnr_db']:.2f} dB, {yes(q['psnr_db'] >= 35)}."]
    for key, label, bound in (("naive-w8a8", "naive min-max", 0.5), ("mse-w8a8", "MSE-range", 0.7),
                              ("naive-w8a8-all", "naive min-max with first / last W8A8", 0.5)):
        ref = rows.get(key)
        if ref is not None:
            ratio = mse_ratio(q["psnr_db"], ref["psnr_db"])
            out.append(f"- MSE <= {bound}x {label}'s: {ratio:.2f}x ({q['psnr_db']:.2f} vs {ref['psnr_db']:.2f} dB), "
                       f"{yes(ratio <= bound)}.")
    dyn, naive = rows.get(f"{PEER[0]}-w8a8"), rows.get("naive-w8a8")
    if dyn is not None and naive is not None:
        out.append(f"- For scale: the per-token dynamic peer (run-time scales) reaches "
                   f"{mse_ratio(dyn['psnr_db'], naive['psnr_db']):.2f}x naive min-max's error.")
    if sens:
        out.append("- Per layer group (only that group quantized), QVD's error against naive's is in "
                   "\"Where the remaining error lives\" above.")
    if budget:
        out.append("- Why static ranges stop short of 0.5x naive's error: \"What halving naive min-max's error "
                   "would take\" above.")
    return out


# ------------------------------------------------------------------------------------------ plots (Pillow)
W, H, LEFT, RIGHT, TOP, BOTTOM = 900, 480, 80, 20, 50, 70


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType
        return ImageFont.load_default()


class _Axes:
    """A plot box mapping data (x linear, y linear or log10) to pixels."""

    def __init__(self, img, box, xlim, ylim, ylog=False):
        self.d, self.box, self.xlim, self.ylog = ImageDraw.Draw(img), box, xlim, ylog
        self.ylim = tuple(math.log10(v) for v in ylim) if ylog else ylim
        self.d.rectangle(box, outline="black")

    def x(self, v):
        x0, _, x1, _ = self.box
        return x0 + (v - self.xlim[0]) / (self.xlim[1] - self.xlim[0]) * (x1 - x0)

    def y(self, v):
        _, y0, _, y1 = self.box
        v = math.log10(max(v, 10 ** self.ylim[0])) if self.ylog else v
        return y1 - (v - self.ylim[0]) / (self.ylim[1] - self.ylim[0]) * (y1 - y0)

    def ticks(self, xs, ys, font):
        x0, y0, x1, y1 = self.box
        for v in xs:
            self.d.line([(self.x(v), y1), (self.x(v), y1 + 5)], fill="black")
            self.d.text((self.x(v), y1 + 7), f"{v:g}", fill="black", font=font, anchor="ma")
        for v in ys:
            self.d.line([(x0 - 5, self.y(v)), (x0, self.y(v))], fill="black")
            self.d.text((x0 - 8, self.y(v)), f"{v:g}", fill="black", font=font, anchor="rm")


def _temporal_layer(cal) -> str:
    names = [n for n, s in cal.layers.items() if s.temporal and s.temporal_vectors and n.endswith("time_emb_proj")]
    if not names:
        raise ValueError("the calibration holds no per-timestep time_emb_proj features to plot")
    return names[0]


def plot_temporal_histogram(cal, path: Path) -> dict:
    """Histogram of one time_emb_proj input over all timesteps, with uniform and HiDi-TQ levels marked."""
    name = _temporal_layer(cal)
    f = cal.temporal_features(name).float()
    lo, hi = float(f.min()), float(f.max())
    scale, zp = activation_qparams(f, PLOT_BITS, "mse", lo, hi)
    qmin, qmax = act_qrange(PLOT_BITS)
    uniform = [(q - zp) * scale for q in range(qmin, qmax + 1)]
    fit = search_hiditq(f, PLOT_BITS)
    counts, edges = torch.histogram(f.flatten(), bins=90, range=(lo, hi))
    img = Image.new("RGB", (W, H + 60), "white")
    ax = _Axes(img, (LEFT, TOP, W - RIGHT, H - BOTTOM), (lo, hi), (0.8, float(counts.max()) * 1.5), ylog=True)
    for c, e0, e1 in zip(counts.tolist(), edges[:-1].tolist(), edges[1:].tolist()):
        if c > 0:
            ax.d.rectangle([ax.x(e0), ax.y(c), ax.x(e1), ax.y(0.8)], fill=(120, 150, 200))
    font, small = _font(15), _font(12)
    _, _, x1, y1 = ax.box
    for i, (levels, colour, label) in enumerate(((uniform, (200, 60, 40), f"uniform {PLOT_BITS}-bit (MSE range)"),
                                                 (fit.levels.tolist(), (30, 140, 60), f"HiDi-TQ {PLOT_BITS}-bit"))):
        yb = H - BOTTOM + 28 + 22 * i
        for v in levels:
            if lo - 1e-6 <= v <= hi + 1e-6:
                ax.d.line([(ax.x(v), yb), (ax.x(v), yb + 14)], fill=colour, width=1)
        ax.d.text((LEFT - 8, yb + 7), label.split()[0], fill=colour, font=small, anchor="rm")
    step = 10 ** math.floor(math.log10(max(hi - lo, 1e-12)))
    step = step / 5 if (hi - lo) / step < 4 else step
    xs = [v * step for v in range(math.ceil(lo / step), math.floor(hi / step) + 1)]
    ys = [10 ** k for k in range(0, int(math.log10(float(counts.max()))) + 1)]
    ax.ticks(xs, ys, small)
    ax.d.text((W // 2, 12), f"{name} input over {f.shape[0]} timesteps (FP), count (log) vs value", fill="black",
              font=font, anchor="ma")
    ax.d.text((W // 2, H + 45), f"ticks: red = uniform {PLOT_BITS}-bit levels, green = HiDi-TQ {PLOT_BITS}-bit "
              f"levels (tau {fit.tau:g}, clip {fit.clip:g})", fill="black", font=small, anchor="ma")
    img.save(path)
    return {"layer": name, "timesteps": int(f.shape[0]), "channels": int(f.shape[1]), "tau": fit.tau,
            "clip": fit.clip, "hiditq": (fit.k, fit.l2, fit.tdscore),
            "uniform": k_metric(f, fake_quant(f, scale, zp, PLOT_BITS))}


def plot_scri_coverage(cal, report: list[dict], path: Path, bits: int = 8) -> dict:
    """Levels spanning each channel's range before / after SCRI, for the layer where SCRI evens ranges most."""
    cfg = QVDConfig()
    best = None
    for r in report:
        if not r.get("scri_alpha") or r["name"] not in cal.layers:
            continue
        st = cal.layers[r["name"]]
        before, after = _coverage(st.ch_min, st.ch_max, None, cfg, bits), _coverage(
            st.ch_min, st.ch_max, r["scri_alpha"], cfg, bits)
        gain = float(after.median() / before.median().clamp_min(1e-12))
        if best is None or gain > best[0]:
            best = (gain, r["name"], r["scri_alpha"], before, after)
    if best is None:
        raise ValueError("no layer has SCRI with alpha > 0 in the report: nothing to plot")
    _, name, alpha, before, after = best
    before, after = before.sort(descending=True).values, after.sort(descending=True).values
    img = Image.new("RGB", (W, H), "white")
    top = 2 ** bits
    ax = _Axes(img, (LEFT, TOP, W - RIGHT, H - BOTTOM), (0, len(before)), (0.1, top * 1.5), ylog=True)
    font, small = _font(15), _font(12)
    for vals, colour in ((before, (200, 60, 40)), (after, (30, 140, 60))):
        pts = [(ax.x(i + 0.5), ax.y(float(v))) for i, v in enumerate(vals)]
        ax.d.line(pts, fill=colour, width=2)
    step = max(1, len(before) // 8)
    ax.ticks(list(range(0, len(before) + 1, step)), [0.1, 1, 10, 100, top], small)
    ax.d.text((W // 2, 12), f"{name}: {bits}-bit levels spanning each channel's range (log), channels sorted",
              fill="black", font=font, anchor="ma")
    ax.d.text((W // 2, H - 25), f"red: before SCRI   green: after SCRI (alpha {alpha:g}, max gain "
              f"{cfg.scri_max_gain:g})   x: channel rank", fill="black", font=small, anchor="ma")
    img.save(path)
    return {"layer": name, "alpha": alpha, "median_before": float(before.median()),
            "median_after": float(after.median()), "min_before": float(before.min()), "min_after": float(after.min())}


def _coverage(ch_min, ch_max, alpha, cfg: QVDConfig, bits: int) -> torch.Tensor:
    """Per-channel range width / per-tensor min-max step, after SCRI with ``alpha`` (None: without)."""
    lo, hi = ch_min.float(), ch_max.float()
    if alpha is not None:
        scri = ScriTransform.from_range(lo, hi, alpha, cfg.scri_max_gain)
        lo, hi = scri.apply(lo), scri.apply(hi)
    step = (hi.max().clamp_min(0) - lo.min().clamp_max(0)) / (2 ** bits - 1)
    return (hi - lo) / step.clamp_min(1e-12)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="evaluation clips")
    ap.add_argument("--steps", type=int, default=demo.STEPS, help="DDIM steps (calibration and evaluation)")
    ap.add_argument("--guidance", type=float, default=demo.GUIDANCE, help="CFG scale (calibration and evaluation)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {list(CONFIGS)}")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (results.md + img/); default: docs/results.md and docs/img/")
    ap.add_argument("--sensitivity", default="all",
                    help="layer groups quantized alone at W8A8 (naive and QVD): 'all', 'none' or comma-separated "
                         f"from {list(GROUP_KEYS)}")
    ap.add_argument("--error-budget", action=argparse.BooleanOptionalAction, default=True,
                    help="measure where QVD's W8A8 error comes from (tools/error_budget.py; 10 more evaluations)")
    ap.add_argument("--generalisation", action="store_true",
                    help="only the section 'Calibrated once, sampled otherwise' (replaced in results.md)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cpu-route", choices=cpu_kernels.ROUTES, default="int_mm",
                    help="CPU kernel route; 'auto' times oneDNN against _int_mm per shape, and the two differ in "
                         "float rounding that sampling amplifies (tenths of a dB between runs): pinned by default")
    ap.add_argument("--w8a8-mode", choices=("auto", "int", "fake"), default="auto",
                    help="quantized copies on the integer kernels or their float simulation; auto: int unless it "
                         "is over 2x slower than the simulation on this CPU (CPUs without VNNI)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out_md, img_dir = (ROOT / "docs" / "results.md", ROOT / "docs" / "img") if args.out is None else (
        args.out / "results.md", args.out / "img")
    route, cpu_kernels.ROUTE = cpu_kernels.ROUTE, args.cpu_route
    if args.generalisation:
        try:
            t0 = time.time()
            res = generalisation(n=args.n, guidance=args.guidance, mode="fake" if args.w8a8_mode == "fake" else "int")
            text = out_md.read_text() if out_md.is_file() else ""
            i = text.find(SECTION)
            body = (text[:i].rstrip("\n") if i >= 0 else text.rstrip("\n"))
            out_md.parent.mkdir(parents=True, exist_ok=True)
            out_md.write_text((body + "\n\n" if body else "") + render_generalisation(res, n=args.n,
                                                                                      seconds=time.time() - t0))
            print(f"wrote {out_md}")
            return res
        finally:
            cpu_kernels.ROUTE = route
    try:
        groups = {"all": GROUP_KEYS, "none": ()}.get(
            args.sensitivity, [g.strip() for g in args.sensitivity.split(",") if g.strip()])
        return run(args.n, args.steps, [k.strip() for k in args.configs.split(",") if k.strip()], out_md, img_dir,
                   guidance=args.guidance, groups=groups, budget=args.error_budget, mode=args.w8a8_mode)
    finally:
        cpu_kernels.ROUTE = route


if __name__ == "__main__":
    main()
