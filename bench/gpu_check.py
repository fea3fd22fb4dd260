"""The one-command GPU check (``make gpu-check``): are QVD's kernels right and fast on this GPU?

1. Correctness of every kernel on CUDA against ``qvd.kernels.reference`` (plain torch) at SD1.5 + motion-module
   shapes, Wan 2.1 1.3B / 14B block shapes at a 480p clip's 32,760 tokens (``bench.layers.wan_shapes``) and odd
   ones: fp16 and bf16 activations, SCRI shift / scale, a non-zero zero point, strides 1 and 2,
   padding; quantize codes must be equal, outputs within the dtype's rounding. Any kernel that fell back to the
   torch route is a failure.
2. Per layer: W8A8 (fp16 in / out, the variant the dispatcher keeps) against cuBLAS fp16 / bf16, ``torch._int_mm``
   on ready int8 operands, the activation-quantize pass alone (its share of the separate pair), the separate
   quantize + GEMM pair, the fused kernel (quantization in the A-tile load), which of the two is faster, and the
   weight-only route (codes dequantized into fp16 per call, cuBLAS fp16: what ``compute auto`` weighs the integer
   kernels against). HiDi-TQ's time-embedding GEMM with its fp32 codes made per call and kept.
3. Whole UNet step: a diffusers ``UNetMotionModel`` with SD1.5 + mm_sd_v15_v2 shapes (random seeded weights),
   512x512, 16 frames, CFG (batch 2), W8A8 from ``quantize_model`` on a real calibration, against fp16 and
   bf16 (torchao int8 dynamic when installed); the first W8A8 step's compile + tune seconds; peak VRAM.

Writes ``<out>/gpu-check.md`` and ``<out>/gpu-check.json``; exits 1 when a correctness check fails.
``--smoke`` runs the same code on the CPU, the Triton kernels under the interpreter, at tiny shapes (CI's
end-to-end test of this script; its times are not speeds).

    python -m bench.gpu_check [--out docs] [--smoke]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:  # before triton is imported anywhere
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import qvd.kernels as K  # noqa: E402
from bench._common import machine, median_ms, table  # noqa: E402
from qvd.kernels import reference as ref  # noqa: E402

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative L2 error of the output vs the reference


def cases(smoke: bool) -> list[tuple[str, str, tuple]]:
    """(name, kind, args) as ``bench.layers.shapes``, plus odd sizes; tiny ones for the smoke run."""
    if smoke:
        return [("linear odd", "linear", (37, 80, 48)), ("conv3x3 odd", "conv", (2, 24, 7, 40, 3, 1)),
                ("conv3x3 s2", "conv", (1, 16, 9, 32, 3, 2)), ("conv1x1", "conv", (2, 32, 5, 24, 1, 1))]
    from bench.layers import WAN_TOKENS, shapes, wan_shapes
    return shapes(64, 32) + wan_shapes(WAN_TOKENS["480p"]) + [("linear odd 37x200->96", "linear", (37, 200, 96)),
                             ("linear 1 token 1280->1280", "linear", (1, 1280, 1280)),
                             ("conv3x3 odd 72->96 @13", "conv", (2, 72, 13, 96, 3, 1)),
                             ("conv3x3 s2 odd 72->96 @13", "conv", (2, 72, 13, 96, 3, 2))]


def _layer(kind, args, device, g):
    if kind == "linear":
        m, k, n = args
        w_q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        x = torch.randn(m, k, generator=g) * 2
        c = k
    else:
        b, c, s, n, ks, _ = args
        w_q = torch.randint(-127, 128, (n, c, ks, ks), generator=g, dtype=torch.int8)
        x = torch.randn(b, c, s, s, generator=g) * 2
    w_scale = torch.rand(n, generator=g) * 1e-3 + 1e-4
    bias = torch.randn(n, generator=g)
    shift, inv = torch.randn(c, generator=g) * 0.3, torch.rand(c, generator=g) + 0.5
    return [t.to(device) for t in (x, w_q, w_scale, bias, shift, inv)]


def check_correctness(device, smoke: bool) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for name, kind, args in cases(smoke):
        x, w_q, w_scale, bias, shift, inv = _layer(kind, args, device, g)
        weight = K.PackedWeight(w_q, w_scale)
        scale, zp = torch.tensor(0.05, device=device), 3
        for dtype in (torch.float16, torch.bfloat16):
            xd = x.to(dtype)
            if kind == "linear":
                got = K.linear_w8a8(xd, weight, bias, scale, zp, -128, 127, shift, inv)
                want = ref.linear_w8a8(xd, w_q, w_scale, bias, scale, zp, -128, 127, shift, inv)
                codes_ok = torch.equal(K.quantize_activation(xd, scale, zp, -128, 127, shift, inv),
                                       ref.quantize_activation(xd, scale, zp, -128, 127, shift, inv))
            else:
                stride, pad = args[5], args[4] // 2
                got = K.conv2d_w8a8(xd, weight, bias, scale, zp, -128, 127, shift, inv, stride, pad)
                want = ref.conv2d_w8a8(xd, w_q, w_scale, bias, scale, zp, -128, 127, shift, inv, stride, pad)
                codes_ok = torch.equal(K.quantize_activation(xd, scale, zp, -128, 127, shift, inv, channel_dim=1),
                                       ref.quantize_activation(xd, scale, zp, -128, 127, shift, inv, channel_dim=1))
            err = ((got.double() - want.double()).norm() / want.double().norm()).item()
            ok = codes_ok and err <= TOL[dtype] and got.dtype == dtype and got.shape == want.shape
            rows.append(dict(case=name, dtype=str(dtype).split(".")[-1], rel_err=err, codes_equal=codes_ok, ok=ok))
    levels = torch.sort(torch.randn(33, generator=g)).values.to(device)
    xt = torch.randn(64, 1280, generator=g).to(device)
    codes = K.hiditq_encode(xt, levels)
    ok = torch.equal(codes, ref.hiditq_encode(xt, levels)) and torch.equal(K.hiditq_decode(codes, levels),
                                                                           ref.hiditq_decode(codes, levels))
    rows.append(dict(case="HiDi-TQ encode / decode 64x1280, 33 levels", dtype="float32", rel_err=0.0,
                     codes_equal=ok, ok=ok))
    if K._OFF:  # a kernel failed its self-check or raised: the check did not test Triton for it
        for key in sorted(map(str, K._OFF)):
            rows.append(dict(case=f"Triton switched off: {key}", dtype="", rel_err=float("nan"), codes_equal=False,
                             ok=False))
    return rows


def time_layers(device, smoke: bool, samples: int) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(1)
    for name, kind, args in cases(smoke):
        x, w_q, w_scale, bias, _, _ = _layer(kind, args, device, g)
        weight, x16 = K.PackedWeight(w_q, w_scale), x.half()
        w_f = (w_q.float() * w_scale.view(-1, *[1] * (w_q.dim() - 1)))
        row = dict(layer=name)
        if kind == "linear":
            ours = lambda: K.linear_w8a8(x16, weight, bias, 0.05, 0, -128, 127)  # noqa: E731
            for dt, label in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
                xw, ww, bw = x.to(dt), w_f.to(dt), bias.to(dt)
                row[label] = median_ms(lambda: F.linear(xw, ww, bw), device, samples)
            q = K.quantize_activation(x, 0.05, 0, -128, 127)
            row["int_mm"] = median_ms(lambda: K.int_mm(q, weight.mat.t()), device, samples)
        else:
            stride, pad = args[5], args[4] // 2
            ours = lambda: K.conv2d_w8a8(x16, weight, bias, 0.05, 0, -128, 127, stride=stride, padding=pad)  # noqa
            for dt, label in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
                xw = x.to(dt).contiguous(memory_format=torch.channels_last)
                ww, bw = w_f.to(dt).contiguous(memory_format=torch.channels_last), bias.to(dt)
                row[label] = median_ms(lambda: F.conv2d(xw, ww, bw, stride, pad), device, samples)
            row["int_mm"] = None
        row["w8a8"] = median_ms(ours, device, samples)
        tk = K._triton() if device.type in K._TRITON_DEVICES else None
        x2 = x16.reshape(-1, x16.shape[-1]) if kind == "linear" else x16
        row["quantize"] = median_ms((lambda: tk.quantize(x2, 0.05, 0, -128, 127)) if tk else
                                    (lambda: K.quantize_activation(x2, 0.05, 0, -128, 127, channel_dim=-1 if kind ==
                                                                   "linear" else 1)), device, samples)
        row["separate"] = row["fused"] = None
        if tk:
            if kind == "linear":
                sep = lambda: tk.linear(tk.quantize(x2, 0.05, 0, -128, 127), weight.mat, weight.scale,  # noqa
                                        bias, 0.05, torch.float16)
                fus = lambda: tk.linear_fused(x2, weight.mat, weight.scale, bias, 0.05, 0, -128, 127)  # noqa: E731
            else:
                ks, codes = args[4], K.pad_codes(args[1], 0.05, 0, -128, 127, device=device)
                sep = lambda: tk.conv2d(tk.quantize(x16, 0.05, 0, -128, 127), codes, weight.mat, ks, ks,  # noqa
                                        weight.scale, bias, 0.05, stride, pad, torch.float16)
                fus = lambda: tk.conv2d_fused(x16, weight.mat, ks, ks, weight.scale, bias, 0.05, 0, -128, 127,  # noqa
                                              None, None, stride, pad)
            row["separate"], row["fused"] = median_ms(sep, device, samples), median_ms(fus, device, samples)
        wo = (lambda: F.linear(x16, K.dequantize(w_q, w_scale, None, torch.float16), bias.half())) if kind == "linear" \
            else (lambda: F.conv2d(x16, K.dequantize(w_q, w_scale, None, torch.float16), bias.half(), stride, pad))
        row["weight_only"] = median_ms(wo, device, samples)
        rows.append(row)
    return rows


def time_hiditq(device, smoke: bool, samples: int) -> dict:
    """A time-embedding layer (1280 -> 1280, 32 rows: 16 frames x CFG): HiDi-TQ with its fp32 codes made per call
    (what a GPU layer does) and kept (what a CPU layer does)."""
    from qvd.modules import HiDiTQLinear
    g = torch.Generator().manual_seed(3)
    n = 64 if smoke else 1280
    w_q = torch.randint(-127, 128, (n, n), generator=g, dtype=torch.int8).to(device)
    scale, bias = (torch.rand(n, generator=g) * 0.01).to(device), torch.randn(n, generator=g).to(device)
    levels = torch.sort(torch.randn(64, generator=g)).values.to(device)
    x = torch.randn(32, n, generator=g).to(device)
    kept = w_q.float()
    return dict(layer=f"HiDi-TQ {n}x{n}, 32 rows",
                per_call=median_ms(lambda: HiDiTQLinear.compute(x, levels, w_q.float(), scale, bias), device, samples),
                kept=median_ms(lambda: HiDiTQLinear.compute(x, levels, kept, scale, bias), device, samples),
                kept_mib=kept.numel() * 4 / 2**20)


def unet_step(device, smoke: bool, samples: int) -> dict:
    from qvd import Calibrator, QVDConfig, quantize_model
    from qvd.kernels import triton_kernels as tk
    if smoke:
        from tests.unet_fixtures import build_unet
        unet, frames, latent, ctx_dim = build_unet(), 2, 8, 32
    else:
        from bench.quantize_time import build_unet
        unet, frames, latent, ctx_dim = build_unet(), 16, 64, 768
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, frames, latent, latent, generator=g).to(device)
    ctx = torch.randn(2, 77, ctx_dim, generator=g).repeat_interleave(frames, 0).to(device)
    out = dict(size=f"latent {latent}x{latent}, {frames} frames, CFG batch 2", variants={})

    def step(name, model, dtype):
        xd, cd, t = x.to(dtype), ctx.to(dtype), torch.tensor(500, device=device)
        fwd = lambda: model(xd, t, encoder_hidden_states=cd)  # noqa: E731
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.no_grad():
            fwd()
        first_s = time.perf_counter() - t0
        # the smoke run times its one forward (interpreted kernels are slow); a GPU run takes the median
        ms = first_s * 1e3 if smoke else median_ms(fwd, device, samples, min_sample_s=0)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None  # weights included
        out["variants"][name] = dict(ms=ms, peak_gib=peak, first_step_s=first_s)
        print(f"  {name}: {ms:.1f} ms, peak {peak if peak is None else round(peak, 2)} GiB", flush=True)

    half = copy.deepcopy(unet).to(device, torch.float16)  # the fp32 original stays on the CPU
    step("fp16", half, torch.float16)
    del half
    bf = copy.deepcopy(unet).to(device, torch.bfloat16)
    step("bf16", bf, torch.bfloat16)
    del bf
    q = copy.deepcopy(unet).to(device, torch.float16)
    cfg = QVDConfig()
    t0 = time.perf_counter()
    with torch.no_grad(), Calibrator(q, cfg) as cal:
        for t in (900, 500, 100):
            q(x.half(), torch.tensor(t, device=device), encoder_hidden_states=ctx.half())
    res = quantize_model(q, cal.result(), cfg, apply=True)
    out["calibrate_quantize_s"] = time.perf_counter() - t0
    out["w8a8_layers"] = sum(1 for m in res.modules.values() if getattr(m, "qvd_quantized", False))
    tune0 = tk.first_runs.total_s
    step("W8A8 (QVD, rest fp16)", q, torch.float16)
    out["compile_tune_s"] = tk.first_runs.total_s - tune0
    del q
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        ao = copy.deepcopy(unet).to(device, torch.float16)
        quantize_(ao, Int8DynamicActivationInt8WeightConfig())
        step("torchao int8dq (Linear only, rest fp16)", ao, torch.float16)
    except ImportError:
        out["variants"]["torchao int8dq"] = "not installed"
    return out


def _ms(v) -> str:
    return "" if v is None else f"{v:.3f}"


def report(res: dict) -> str:
    c = res["correctness"]
    lines = [f"# GPU check\n\nmachine: {res['machine']}  \nwritten by `python -m bench.gpu_check"
             f"{' --smoke' if res['smoke'] else ''}` in {res['seconds']:.0f} s"
             + (" (**smoke run: CPU, Triton interpreter, tiny shapes; times are not speeds**)" if res["smoke"] else ""),
             f"\n## Correctness vs `qvd/kernels/reference.py`: {sum(r['ok'] for r in c)} / {len(c)} pass\n",
             table(["case", "dtype", "rel. L2 err", "codes equal", "ok"],
                   [[r["case"], r["dtype"], f"{r['rel_err']:.2e}", r["codes_equal"], "yes" if r["ok"] else "**NO**"]
                    for r in c]),
             "\n## Per layer (ms, median; W8A8 with fp16 in / out)\n",
             "W8A8: the dispatched call (the variant it keeps per shape class); quantize pass: its share of the "
             "separate pair; fused: quantization in the GEMM's A-tile load.\n",
             table(["layer", "fp16", "bf16", "_int_mm (int8 operands)", "W8A8", "quantize pass (share of pair)",
                    "separate pair", "fused", "faster", "weight-only (per call)", "W8A8 vs fp16", "W8A8 vs bf16"],
                   [[r["layer"], f"{r['fp16']:.3f}", f"{r['bf16']:.3f}",
                     "" if r["int_mm"] is None else f"{r['int_mm']:.3f}", f"{r['w8a8']:.3f}",
                     f"{r['quantize']:.3f}" + (f" ({r['quantize'] / r['separate']:.0%})" if r["separate"] else ""),
                     _ms(r["separate"]), _ms(r["fused"]),
                     "" if r["fused"] is None else ("fused" if r["fused"] < r["separate"] else "separate"),
                     f"{r['weight_only']:.3f}", f"{r['fp16'] / r['w8a8']:.2f}x", f"{r['bf16'] / r['w8a8']:.2f}x"]
                    for r in res["layers"]])]
    h = res["hiditq"]
    lines.append(f"\n{h['layer']}: fp32 codes made per call {h['per_call']:.3f} ms, kept {h['kept']:.3f} ms "
                 f"({h['kept_mib']:.1f} MiB kept).")
    u = res["unet"]
    v = {k: x for k, x in u["variants"].items() if isinstance(x, dict)}
    lines += [f"\n## Whole UNet step ({u['size']}; {u['w8a8_layers']} W8A8 layers)\n",
              table(["variant", "ms", "vs fp16", "vs bf16", "peak VRAM GiB", "first step s"],
                    [[k, f"{x['ms']:.1f}", f"{v['fp16']['ms'] / x['ms']:.2f}x", f"{v['bf16']['ms'] / x['ms']:.2f}x",
                      "" if x["peak_gib"] is None else f"{x['peak_gib']:.2f}", f"{x['first_step_s']:.1f}"]
                     for k, x in v.items()]),
              f"\nCalibrate + quantize: {u['calibrate_quantize_s']:.1f} s; first W8A8 step's Triton compile + tune: "
              f"{u['compile_tune_s']:.1f} s (kept in Triton's cache dir for later processes)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs"))
    p.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny shapes")
    p.add_argument("--samples", type=int, default=5)
    a = p.parse_args(argv)
    if a.smoke != SMOKE:
        raise SystemExit("--smoke must be given on the command line (it sets TRITON_INTERPRET before import)")
    if a.smoke:
        K._TRITON_DEVICES = ("cpu",)  # the interpreted Triton kernels take the CPU tensors
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("gpu-check needs a CUDA GPU (or --smoke for the CPU dry run)")
    else:
        device = torch.device("cuda")
    if not K.triton_available():
        raise SystemExit("Triton is not importable here: install it (pip install triton) to check the GPU kernels")
    t0 = time.time()
    res = dict(machine=machine(), smoke=a.smoke)
    print("correctness ...", flush=True)
    res["correctness"] = check_correctness(device, a.smoke)
    print("per-layer times ...", flush=True)
    res["layers"] = time_layers(device, a.smoke, 1 if a.smoke else a.samples)
    res["hiditq"] = time_hiditq(device, a.smoke, 1 if a.smoke else a.samples)
    print("whole UNet step ...", flush=True)
    res["unet"] = unet_step(device, a.smoke, 1 if a.smoke else a.samples)
    res["seconds"] = time.time() - t0
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpu-check.json").write_text(json.dumps(res, indent=1, default=str))
    (a.out / "gpu-check.md").write_text(report(res))
    print(report(res))
    failed = [r["case"] for r in res["correctness"] if not r["ok"]]
    if failed:
        print(f"FAILED: {failed}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
