"""What a LoRA on the quantized UNet costs: a rank-R side branch beside every attention / feed-forward W8A8 Linear.

The SD1.5-shaped UNet of ``bench.unet_step``, quantized by ``qvd.quantize_model`` (the modules users get);
then every attention (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) and feed-forward (``ff.net.0.proj``,
``ff.net.2``) layer gets a seeded rank-R ``WeightDelta`` in fp16 (what ComfyUI's glue builds from an fp16 LoRA
file), and then a dense fp16 delta instead (what DoRA / OFT / a LoKr with a 4-d factor get). Prints the step time
without and with each (fp32 and bf16 activations, alternated, one process) and the branch's bytes against the
LoRA's own.

    python -m bench.lora_branch [--rank 32] [--latent 16] [--batch 16] [--runs 5] [--threads N] [--dtype both]
"""
from __future__ import annotations

import argparse
import copy
import re

import torch

from bench._common import apply_threads, machine, median_ms, size_options, table
from bench.unet_step import build_unet, inputs, quantize_core
from qvd.delta import WeightDelta
from qvd.modules import QLinear

TARGETS = re.compile(r"\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))$")


def lora_layers(unet) -> dict[str, QLinear]:
    return {n: m for n, m in unet.named_modules() if isinstance(m, QLinear) and TARGETS.search(n)}


def attach(layers: dict[str, QLinear], rank: int | None, seed: int = 0) -> tuple[int, int]:
    """A seeded fp16 delta on every layer: rank ``rank`` (None: dense, what DoRA / OFT / a 4-d LoKr get); returns
    (bytes the branches hold, bytes of the LoRA itself: up + down in fp16)."""
    gen = torch.Generator().manual_seed(seed)
    held = lora = 0
    for m in layers.values():
        dev = m.weight.device
        if rank is None:
            m.set_delta(WeightDelta(dense=(torch.randn(m.weight.shape, generator=gen) * 1e-4).half().to(dev)))
        else:
            down = (torch.randn(rank, m.in_features, generator=gen) * 0.01).half()
            up = (torch.randn(m.out_features, rank, generator=gen) * 0.01).half()
            m.set_delta(WeightDelta(down=down.to(dev), up=up.to(dev)))
            lora += (down.numel() + up.numel()) * 2
        held += m.delta.nbytes()
    return held, lora


def run(device, latent: int, batch: int, runs: int, rank: int, dtypes=(torch.float32, torch.bfloat16)) -> list[list]:
    print(f"machine: {machine()}")
    print(f"UNet: SD1.5 config, random seeded weights, W8A8 by qvd.quantize_model; latent {latent}x{latent}, "
          f"batch {batch}; median of {runs} forwards; rank-{rank} LoRA branch on every attention / FF Linear\n")
    rows = []
    with torch.no_grad():
        base = build_unet().to(device)
        for dtype in dtypes:
            unet = copy.deepcopy(base).to(dtype)
            quantize_core(unet, latent, batch, device, dtype)
            layers = lora_layers(unet)
            x, t, ctx = inputs(latent, batch, device, dtype)
            step = lambda: unet(x, t, encoder_hidden_states=ctx)
            times = {"none": [], "low rank": [], "dense": []}
            held = {}
            for _ in range(2):  # alternate, so drift of the machine hits every variant alike
                for m in layers.values():
                    m.set_delta(None)
                times["none"].append(median_ms(step, device, samples=runs, min_sample_s=0))
                held["low rank"] = attach(layers, rank)
                times["low rank"].append(median_ms(step, device, samples=runs, min_sample_s=0))
                held["dense"] = attach(layers, None)
                times["dense"].append(median_ms(step, device, samples=runs, min_sample_s=0))
            name = str(dtype).removeprefix("torch.")
            plain = min(times["none"])
            rows.append([f"W8A8 (rest {name})", "none", len(layers), f"{plain:.0f}", "", ""])
            for kind in ("low rank", "dense"):
                ms = min(times[kind])
                branch, lora = held[kind]
                what = f"rank {rank}" if kind == "low rank" else "dense fp16"
                mib = f"{branch / 2**20:.1f}" + (f" (LoRA {lora / 2**20:.1f})" if lora else "")
                rows.append([f"W8A8 (rest {name})", what, len(layers), f"{ms:.0f}", f"{100 * (ms / plain - 1):+.1f} %",
                             mib])
            print(f"  {name}: " + ", ".join(f"{k} {min(v):.0f} ms" for k, v in times.items()), flush=True)
            del unet
    print()
    print(table(["UNet step", "branch", "layers", "median ms", "cost vs none", "branch MiB"], rows))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size_options(p, runs=5)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "both"], default="both", help="activation dtype(s)")
    a = p.parse_args()
    apply_threads(a)
    dtypes = (torch.float32, torch.bfloat16) if a.dtype == "both" else (getattr(torch, a.dtype),)
    run(torch.device(a.device), a.latent, a.batch, a.runs, a.rank, dtypes)


if __name__ == "__main__":
    main()
