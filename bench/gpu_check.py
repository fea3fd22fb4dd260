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

4. Residency: the device memory a quantized layer holds streamed, as a device copy (QVD under ComfyUI's dynamic
   VRAM) and after ComfyUI's classic load / unload, freed to 0; the three give bit-identical outputs; with two GPUs
   the same layer on the second one.
5. ComfyUI's dynamic-VRAM loader on this GPU, with ``--comfyui PATH`` (or ``COMFYUI_PATH``; a ComfyUI >= 0.33 with
   comfy-aimdo): ``tests/host/dynamic_probe.py --device cuda``, the graphs of ``tests/host/test_host_dynamic.py``.

Writes ``<out>/gpu-check.md`` and ``<out>/gpu-check.json``; exits 1 when a correctness or residency check fails.
``--smoke`` runs the same code on the CPU, the Triton kernels under the interpreter, at tiny shapes (CI's
end-to-end test of this script; its times are not speeds; no ComfyUI section).

    python -m bench.gpu_check [--out docs] [--smoke] [--comfyui PATH]
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

ROOT = Path(__file__).resolve().parents[1]

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


def residency(device, smoke: bool) -> dict:
    """Where quantized layers' memory goes as ComfyUI loads and frees them (``qvd.modules`` device rules): per layer
    kind, the device memory a streamed call, a device copy (``make_resident``, what QVD keeps under ComfyUI 0.33's
    dynamic VRAM) and ComfyUI's classic ``.to(device)`` / ``.to(offload)`` hold before and after they are freed, and
    whether the three routes give bit-identical outputs. With two GPUs, a layer on the second one against the first."""
    from qvd import QConv2d, QLinear, set_compute
    from qvd.modules import make_resident, release

    g = torch.Generator().manual_seed(4)
    c, n, s = (24, 32, 6) if smoke else (640, 1280, 32)
    kw = lambda: dict(weight_scale=torch.rand(n, generator=g) * 1e-3 + 1e-4, bias=torch.randn(n, generator=g),  # noqa
                      act_scale=0.03, zero_point=3, w_bits=8, a_bits=8, scri_shift=torch.randn(c, generator=g) * 0.3,
                      scri_inv_scale=torch.rand(c, generator=g) + 0.5)
    layers = {"linear": (QLinear(c, n, weight_q=torch.randint(-127, 128, (n, c), generator=g, dtype=torch.int8), **kw()),
                         torch.randn(2 * s * s, c, generator=g)),
              "conv3x3": (QConv2d(c, n, (3, 3), 1, 1, weight_q=torch.randint(-127, 128, (n, c, 3, 3), generator=g,
                                                                              dtype=torch.int8), **kw()),
                          torch.randn(2, c, s, s, generator=g))}
    cuda = device.type == "cuda"
    mem = (lambda: torch.cuda.memory_allocated(device)) if cuda else (lambda: 0)
    rows = []
    for name, (layer, x) in layers.items():
        set_compute(layer, "int8")
        if cuda:
            layer.weight.data = layer.weight.data.pin_memory()
        xd = x.to(device).half() if cuda else x
        stored = sum(p.numel() * p.element_size() for p in layer.parameters())
        with torch.no_grad():
            m0 = mem()
            streamed = layer(xd).float().cpu()
            make_resident(layer, device)
            m1 = mem()
            resident = layer(xd).float().cpu()
            release(layer)
            m2 = mem()
            layer.to(device)
            classic = layer(xd).float().cpu()
            layer.to("cpu")
            m3 = mem()
        rows.append(dict(layer=name, stored_mib=stored / 2**20, resident_mib=(m1 - m0) / 2**20,
                         after_release_mib=(m2 - m0) / 2**20, after_classic_unload_mib=(m3 - m0) / 2**20,
                         identical=bool(torch.equal(streamed, resident) and torch.equal(streamed, classic))))
    out = {"rows": rows}
    if cuda and torch.cuda.device_count() > 1:
        layer, x = layers["linear"]
        with torch.no_grad():
            ys = [layer.to(f"cuda:{i}")(x.to(f"cuda:{i}").half()).float().cpu() for i in (0, 1)]
        layer.to("cpu")
        out["second_gpu_identical"] = bool(torch.equal(*ys))
    return out


def comfyui_scenarios(comfyui: Path | None) -> dict:
    """The pack's graphs under ComfyUI's own dynamic-VRAM loader on this GPU (``tests/host/dynamic_probe.py --device
    cuda``: Calibrate -> Quantize -> KSampler, FP and quantized in turn, two quantized MODELs, a quantized ControlNet,
    ComfyUI's partial unload and eviction, a model larger than the memory given), in the ComfyUI at ``comfyui`` (with
    comfy-aimdo installed), on the synthetic SD1.5 checkpoint built there by that ComfyUI's code."""
    import subprocess

    if comfyui is None or not (comfyui / "main.py").is_file():
        return {"skipped": "no ComfyUI given (--comfyui PATH or COMFYUI_PATH, a ComfyUI >= 0.33 with comfy-aimdo)"}
    host = ROOT / "tests" / "host"
    env = dict(os.environ, PYTHONPATH=f"{comfyui}{os.pathsep}{host}", PYTHONDONTWRITEBYTECODE="1")
    checkpoint = ROOT / ".cache" / "gpu-check" / "qvd_synth_sd15.safetensors"
    if not checkpoint.is_file():
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(host / "synthetic_models.py"), "sd15", str(checkpoint)], cwd=comfyui,
                       env=env, check=True, timeout=1800)
    run = subprocess.run([sys.executable, str(host / "dynamic_probe.py"), str(checkpoint), str(ROOT), "--device",
                          "cuda"], cwd=comfyui, env=env, capture_output=True, text=True, timeout=3600)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("QVD_PROBE")]
    if not lines:
        return {"failed": (run.stdout[-2000:] + run.stderr[-4000:]).strip()}
    facts = json.loads(lines[-1].split(" ", 1)[1])
    facts["completed"] = run.returncode == 0 and lines[-1].startswith("QVD_PROBE ")
    return facts


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
    r = res["residency"]
    lines += ["\n## Residency (MiB of device memory over the layer's; `torch.cuda.memory_allocated`)\n",
              "streamed: stored tensors on the CPU (pinned), copied per call; resident: `make_resident` (QVD under "
              "ComfyUI's dynamic VRAM); classic: ComfyUI's `.to(device)` then `.to(offload)`.\n",
              table(["layer", "stored", "resident copy", "after release", "after classic unload",
                     "streamed = resident = classic"],
                    [[x["layer"], f"{x['stored_mib']:.2f}", f"{x['resident_mib']:.2f}", f"{x['after_release_mib']:.2f}",
                      f"{x['after_classic_unload_mib']:.2f}", "yes" if x["identical"] else "**NO**"]
                     for x in r["rows"]])]
    c = res.get("comfyui", {})
    lines.append("\n## ComfyUI's dynamic-VRAM loader on this GPU (`tests/host/dynamic_probe.py --device cuda`)\n")
    if "checks" in c:
        lines.append(table(["step", "FP changed", "ControlNet changed", "QVD changed", "outputs differ"],
                           [[x["step"], len(x["fp_changed"]), len(x["controlnet_changed"]), len(x["qvd_changed"]),
                             ", ".join(x["outputs_differ"]) or "none"] for x in c["checks"]]))
        st = c.get("streaming", {})
        lines.append(f"\nA model larger than the memory given ({st.get('budget', 0) / 2**20:.0f} MiB for "
                     f"{st.get('quantized_bytes', 0) / 2**20:.0f} MiB of quantized layers): {st.get('resident_layers')} of "
                     f"{st.get('layers')} layers kept on the GPU, {st.get('allocated_loaded', 0) / 2**20:.0f} MiB "
                     f"allocated; after detach {st.get('allocated_after_detach', 0) / 2**20:.1f} MiB. "
                     f"{'Completed.' if c.get('completed') else '**Did not complete.**'}")
    else:
        lines.append(c.get("skipped") or f"**Failed:**\n```\n{c.get('failed')}\n```")
    if "second_gpu_identical" in r:
        lines.append(f"\nThe same layer on cuda:1 and cuda:0: {'identical' if r['second_gpu_identical'] else '**differs**'}.")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs"))
    p.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny shapes")
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--comfyui", type=Path, default=os.environ.get("COMFYUI_PATH") or None,
                   help="a ComfyUI >= 0.33 (with comfy-aimdo) to run the dynamic-VRAM scenarios in")
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
    print("residency ...", flush=True)
    res["residency"] = residency(device, a.smoke)
    if not a.smoke:
        print("ComfyUI dynamic-VRAM scenarios ...", flush=True)
        res["comfyui"] = comfyui_scenarios(a.comfyui)
    res["seconds"] = time.time() - t0
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpu-check.json").write_text(json.dumps(res, indent=1, default=str))
    (a.out / "gpu-check.md").write_text(report(res))
    print(report(res))
    failed = [r["case"] for r in res["correctness"] if not r["ok"]]
    failed += [f"residency {r['layer']}" for r in res["residency"]["rows"]
               if not r["identical"] or r["after_release_mib"] > 0.01 or r["after_classic_unload_mib"] > 0.01]
    failed += ["second GPU"] if res["residency"].get("second_gpu_identical") is False else []
    c = res.get("comfyui", {})
    failed += ["ComfyUI scenarios"] if "failed" in c or (
        "checks" in c and (not c["completed"] or any(x["fp_changed"] or x["controlnet_changed"] or x["qvd_changed"]
                                                      or x["outputs_differ"] for x in c["checks"]))) else []
    if failed:
        print(f"FAILED: {failed}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
