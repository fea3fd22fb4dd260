"""CPU routes pinned one at a time, against the float layer: the exact integer routes (oneDNN int8 ops, NHWC im2col /
plain ``torch._int_mm``, integer codes through fp32 GEMMs split along K), each with quantize and epilogue, and the
weight-only route (its float weight kept, as on the CPU, or dequantized per call, as elsewhere), on SD1.5 shapes at
latent 16x16, batch 16. ``auto`` (the default) picks the fastest integer route per shape and then the faster of it
and weight-only; without exact oneDNN int8 (no VNNI) it takes weight-only (``qvd.kernels``). Prints a markdown
table; ratios are against fp32 in the same run.

    python -m bench.routes [--threads N]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import qvd.kernels as K
from bench._common import W8A8, machine, median_ms, table
from bench.layers import build
from qvd.kernels import cpu

CASES = [("conv3x3 320->320 @16x16", "conv", (16, 320, 16, 320, 3, 1)),
         ("conv3x3 320->320 s2 @16x16", "conv", (16, 320, 16, 320, 3, 2)),
         ("conv3x3 640->640 @8x8", "conv", (16, 640, 8, 640, 3, 1)),
         ("conv3x3 1280->1280 @4x4", "conv", (16, 1280, 4, 1280, 3, 1)),
         ("conv3x3 2560->1280 @4x4", "conv", (16, 2560, 4, 1280, 3, 1)),
         ("conv3x3 1280->1280 @2x2", "conv", (16, 1280, 2, 1280, 3, 1)),
         ("linear 4096x320->320", "linear", (4096, 320, 320)),
         ("linear 4096x320->2560", "linear", (4096, 320, 2560)),
         ("linear 4096x1280->320", "linear", (4096, 1280, 320)),
         ("linear 256x1280->1280", "linear", (256, 1280, 1280)),
         ("linear 16x1280->1280", "linear", (16, 1280, 1280))]
INT_ROUTES = ("onednn", "int_mm", "float")


def weight_only(ours: W8A8, per_call: bool):
    """The weight-only route as a QLinear / QConv2d runs it: the float weight kept (the CPU) or dequantized per
    call (other devices)."""
    deq = lambda: K.dequantize(ours.w_q, ours.w_scale, None, torch.float32)  # noqa: E731
    kept = deq()
    if ours.conv:
        return lambda x: F.conv2d(x.contiguous(), deq() if per_call else kept, ours.bias, ours.stride, ours.padding)
    return lambda x: F.linear(x, deq() if per_call else kept, ours.bias)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device("cpu")
    exact = cpu._onednn_ok()
    print(f"machine: {machine()}; oneDNN int8 {'exact' if exact else 'inexact or missing: not used'}\n")
    rows = []
    saved = cpu.ROUTE
    try:
        with torch.no_grad():
            for name, kind, args in CASES:
                layer, x = build(kind, args, dev)
                ours = W8A8(layer, x.abs().max().item())
                fp = median_ms(lambda: layer(x), dev)
                times = {}
                for route in INT_ROUTES if exact else INT_ROUTES[1:]:
                    cpu.ROUTE = route
                    times[route] = median_ms(lambda: ours(x), dev)
                for label, per_call in (("weight-only", False), ("per call", True)):
                    wo = weight_only(ours, per_call)
                    times[label] = median_ms(lambda: wo(x), dev)
                best_int = min(times[r] for r in INT_ROUTES if r in times)
                auto = min(best_int, times["weight-only"]) if exact else times["weight-only"]
                rows.append([name, f"{fp:.2f}"] + [f"{times[r]:.2f}" if r in times else "-" for r in INT_ROUTES]
                            + [f"{times['weight-only']:.2f}", f"{times['per call']:.2f}", f"{fp / best_int:.2f}x",
                               f"{fp / auto:.2f}x"])
                print(f"  {name}: fp32 {fp:.2f} ms, " + ", ".join(f"{r} {t:.2f}" for r, t in times.items()), flush=True)
    finally:
        cpu.ROUTE = saved
    print()
    print(table(["layer", "fp32 ms", "oneDNN int8 ms", "im2col / _int_mm ms", "int codes in fp32 GEMMs ms",
                 "weight-only ms (kept)", "weight-only ms (per call)", "best int8 vs fp32", "auto vs fp32"], rows))


if __name__ == "__main__":
    main()
