"""CPU routes pinned one at a time: oneDNN int8 ops vs NHWC im2col / plain ``torch._int_mm`` (both with
quantize and epilogue, through ``qvd.kernels``), on SD1.5 shapes at latent 16x16, batch 16. The
default route (``QVD_CPU_ROUTE=auto``) makes this choice per shape at run time. Prints a markdown table.

    python -m bench.routes [--threads N]
"""
from __future__ import annotations

import argparse

import torch

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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device("cpu")
    print(f"machine: {machine()}\n")
    rows = []
    saved = cpu.ROUTE
    try:
        with torch.no_grad():
            for name, kind, args in CASES:
                layer, x = build(kind, args, dev)
                ours = W8A8(layer, x.abs().max().item())
                times = []
                for route in ("onednn", "int_mm"):
                    cpu.ROUTE = route
                    times.append(median_ms(lambda: ours(x), dev))
                rows.append([name, f"{times[0]:.2f}", f"{times[1]:.2f}", f"{times[1] / times[0]:.2f}x"])
                print(f"  {name}: oneDNN {times[0]:.2f} ms, im2col/_int_mm {times[1]:.2f} ms", flush=True)
    finally:
        cpu.ROUTE = saved
    print()
    print(table(["layer (quantize + int8 op + epilogue)", "oneDNN ms", "NHWC im2col / _int_mm ms", "oneDNN speed-up"],
                rows))


if __name__ == "__main__":
    main()
