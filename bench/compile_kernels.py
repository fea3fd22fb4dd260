"""Compile every Triton kernel at every tile its autotuner may pick, for sm_80 / 86 / 89 / 90, without a GPU.

GEMM kernels: ``linear`` / ``conv3x3`` / ``conv1x1`` on int8 codes, and their ``_fused`` variants that quantize the
float input (fp16; bf16 at one tile) in the A-tile load.

``triton.compile`` lowers to PTX and runs the wheel's ptxas on this machine. For each (kernel, tile, arch) it
records the compile seconds (a fresh Triton cache: nothing reused), registers, spilled bytes, shared memory
against the arch's per-block limit, and whether the GEMMs use int8 tensor-core instructions (``mma.sync ...
s32.s8.s8.s32``; ``wgmma ... s32.s8.s8`` on sm_90 for tiles of 64 rows or more). The tiles of each arch are those of the shape
classes ``shape_class`` can choose there.

    python -m bench.compile_kernels [--arch 80 86 89 90] [--jobs 2]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

ARCHS = (80, 86, 89, 90)
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes of shared memory one block may use
MMA = {"sm80": re.compile(r"mma\.sync\.aligned\.m16n8k32\.row\.col(\.satfinite)?\.s32\.s8\.s8\.s32"),
       "sm90": re.compile(r"wgmma\.mma_async\.sync\.aligned\.m\d+n\d+k32\.s32\.s8\.s8")}
_PTR = {"int8": "*i8", "fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32", "u8": "*u8"}
GEMMS = ("linear", "conv3x3", "conv1x1", "linear_fused", "conv3x3_fused", "conv1x1_fused")


def _classes(arch: int) -> list[str]:
    from qvd.kernels import triton_kernels as tk
    return sorted({tk.shape_class(m, n, arch) for m in (1, 64, 4096) for n in (64, 4096)})


def jobs(archs=ARCHS) -> list[dict]:
    """Every (kernel, tile, arch) to compile: GEMMs at each reachable tile (fp16 output; bf16 at one tile),
    the elementwise kernels at their one block size."""
    from qvd.kernels import triton_kernels as tk
    out = []
    for arch in archs:
        for kernel in GEMMS:
            tiles = {str(c): c for cls in _classes(arch) for c in tk.classes_of(kernel)[cls]}
            for i, cfg in enumerate(tiles.values()):
                out.append(dict(kernel=kernel, arch=arch, tile=dict(cfg.kwargs), warps=cfg.num_warps,
                                stages=cfg.num_stages, out="fp16"))
                if i == 0:
                    out.append({**out[-1], "out": "bf16"})
        for kernel in ("quantize", "hiditq_encode", "hiditq_decode"):
            out.append(dict(kernel=kernel, arch=arch, tile={}, warps=4, stages=3, out="fp16"))
    return out


def _source(job: dict):
    from triton.compiler import ASTSource

    from qvd.kernels import triton_kernels as tk
    kind, out = job["kernel"], _PTR[job["out"]]
    if kind in GEMMS:
        fused = kind.endswith("_fused")
        fn = tk._linear_kernel if kind.startswith("linear") else tk._conv_kernel
        sig = {a: "i32" for a in fn.arg_names}
        # the fused variant reads the float input (in the output's dtype) and quantizes it with SCRI
        sig.update(x_ptr=out if fused else "*i8", pad_ptr="*i8", b_ptr="*i8", out_ptr=out, wscale_ptr="*fp32",
                   bias_ptr="*fp32", scale_ptr="*fp32", scale_val="fp32", shift_ptr="*fp32", inv_scale_ptr="*fp32")
        const = dict(HAS_BIAS=True, SCALE_PTR=True, FUSED=fused, HAS_SHIFT=fused, HAS_SMOOTH=fused, **job["tile"])
        if not fused:  # arguments the launcher passes as None are constexpr None to the JIT
            const.update(shift_ptr=None, inv_scale_ptr=None)
        elif kind.startswith("conv"):
            const.update(pad_ptr=None)
        if kind.startswith("conv"):
            const.update(KH=3, KW=3) if kind.startswith("conv3x3") else const.update(KH=1, KW=1)
            # unit strides as the JIT specialises them: the codes' channels (NHWC), a float input's width (NCHW)
            const.update(s_xw=1) if fused else const.update(s_xc=1)
        else:
            const.update(s_on=1, s_xk=1)  # a contiguous input's K stride, a contiguous output
    elif kind == "quantize":
        fn = tk._quant_kernel
        sig = {a: "i32" for a in fn.arg_names}
        sig.update(x_ptr=out, out_ptr="*i8", shift_ptr="*fp32", inv_scale_ptr="*fp32", scale_ptr="*fp32",
                   scale_val="fp32")
        const = dict(HAS_SHIFT=True, HAS_SMOOTH=True, SCALE_PTR=True, BP=tk.GPU_Q_BLOCK[0], BC=tk.GPU_Q_BLOCK[1])
    elif kind == "hiditq_encode":
        fn = tk._encode_kernel
        sig = dict(x_ptr=out, mid_ptr="*fp32", out_ptr="*u8", numel="i32", n_mid="i32")
        const = dict(STEPS=8, BLOCK=tk.GPU_LUT_BLOCK)
    else:
        fn = tk._decode_kernel
        sig = dict(codes_ptr="*u8", levels_ptr="*fp32", out_ptr="*fp32", numel="i32")
        const = dict(BLOCK=tk.GPU_LUT_BLOCK)
    sig = {a: sig[a] for a in fn.arg_names if a not in const} | {a: "constexpr" for a in const}
    # what the JIT sees at run time: 16-byte aligned torch allocations, channel counts / row strides that are
    # multiples of 16 (SD1.5 and motion-module layers)
    div16 = {a for a, t in sig.items() if t.startswith("*")} | {"K", "N", "C", "s_bn", "s_om", "s_xm", "s_xn", "s_xc",
                                                              "s_xh", "s_xw"}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in div16 if a in sig and a not in const}
    return ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)


def compile_one(job: dict) -> dict:
    """Compile one job in a fresh Triton cache; the result carries the measurements."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        knobs.nvidia.dump_ptxas_log = True
        log = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(log):
            k = triton.compile(_source(job), target=GPUTarget("cuda", job["arch"], 32),
                               options={"num_warps": job["warps"], "num_stages": job["stages"]})
        seconds = time.perf_counter() - t0
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    ptx = k.asm["ptx"]
    gemm = job["kernel"] in GEMMS
    # sm_90 runs tiles with BM >= 64 on wgmma, smaller ones on mma.sync
    return {**job, "seconds": round(seconds, 2), "registers": int(regs.group(1)) if regs else None,
            "spill_bytes": int(spill.group(1)) + int(spill.group(2)) if spill else 0,
            "shared": k.metadata.shared, "shared_limit": SHARED_LIMIT[job["arch"]],
            "int8_mma": any(p.search(ptx) for p in MMA.values()) if gemm else None, "cubin_kb": round(len(k.asm["cubin"]) / 1024)}


def problems(r: dict) -> list[str]:
    """What is wrong with one compile result (empty when it is fine)."""
    out = []
    if r["spill_bytes"]:
        out.append(f"{r['spill_bytes']} bytes of register spills")
    if r["shared"] > r["shared_limit"]:
        out.append(f"shared memory {r['shared']} B > sm_{r['arch']}'s {r['shared_limit']} B")
    if r["int8_mma"] is False:
        out.append("no int8 tensor-core instruction in the PTX")
    return out


def run(archs=ARCHS, workers: int = 2) -> list[dict]:
    todo = jobs(archs)
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(compile_one, todo))


def tile_name(r: dict) -> str:
    t = r["tile"]
    return f"{t['BM']}x{t['BN']}x{t['BK']} w{r['warps']} s{r['stages']}" if t else "-"


def table(results: list[dict]) -> str:
    from bench._common import table as md
    rows = [[r["kernel"], f"sm_{r['arch']}", tile_name(r), r["out"], f"{r['seconds']:.1f}", r["registers"],
             r["spill_bytes"], f"{r['shared'] / 1024:.0f} / {r['shared_limit'] / 1024:.0f}",
             "" if r["int8_mma"] is None else ("yes" if r["int8_mma"] else "NO"), r["cubin_kb"]] for r in results]
    return md(["kernel", "arch", "tile", "out", "compile s", "regs", "spill B", "shared KiB (used / limit)",
               "int8 MMA", "cubin KiB"], rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    p.add_argument("--jobs", type=int, default=2)
    a = p.parse_args()
    t0 = time.perf_counter()
    results = run(a.arch, a.jobs)
    print(table(results))
    bad = [(r, problems(r)) for r in results if problems(r)]
    print(f"\n{len(results)} compiles in {time.perf_counter() - t0:.0f} s; {len(bad)} with problems")
    for r, why in bad:
        print(f"  {r['kernel']} sm_{r['arch']} {tile_name(r)}: {'; '.join(why)}")
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
