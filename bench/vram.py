"""VRAM as ComfyUI's planner sees it: the bytes a MODEL tells (``model_size()``) and the bytes it holds, full precision
against QVD W8A8, for the synthetic SD1.5 UNet and (with AnimateDiff-Evolved) mm_sd_v15_v2, with a UNet LoRA and a
motion LoRA.

Runs ``tests/host/size_probe.py`` in a ComfyUI process (the managed 0.3.75 host by default, ``--comfyui`` for another
tree, which is only read) on the seeded synthetic checkpoints the host tests build, and prints a markdown table.

    python -m bench.vram [--comfyui PATH] [--ade PATH]
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from bench._common import host_parser, host_probe


def _lora(checkpoint, folder: str) -> tuple:
    from synthetic_models import write_lora

    lora = Path(folder) / "lora.safetensors"
    write_lora(checkpoint, lora)
    return (lora,)


def table(f: dict) -> str:
    mib = lambda b: f"{b / 2**20:,.0f} MiB"
    q, lora = f["quantized"], f["lora_load"]
    rows = ["| model | FP: told = held | QVD W8A8: told | QVD: held | held, QVD / FP |", "|---|---:|---:|---:|---:|",
            f"| SD1.5 UNet (the MODEL's BaseModel) | {mib(f['float_told'])} | {mib(q['told'])} | {mib(q['held'])} | "
            f"{q['held'] / f['float_told']:.3f} |"]
    rows += [f"| mm_sd_v15_v2 motion model | {mib(m['float_told'])} | {mib(m['told'])} | {mib(m['held'])} | "
             f"{m['held'] / m['float_told']:.3f} |" for m in f["motion"]]
    loaded, offloaded = q["partial"]
    return "\n".join(rows + [
        "",
        f"Partial (low-VRAM) load of the QVD UNet: {mib(loaded)} loaded + {mib(offloaded)} offloaded = "
        f"{mib(loaded + offloaded)} counted (held: {mib(q['held'])}).",
        f"A rank-4 UNet LoRA on {lora['patched_layers']} quantized layers (file {lora['lora_file_bytes'] / 2**20:.2f} "
        f"MiB): side branches hold {lora['delta_bytes'] / 2**20:.2f} MiB beside the int8 kernels (not in the size "
        f"told); its whole load {lora['seconds']['lora'] * 1e3:.1f} ms vs {lora['seconds']['plain'] * 1e3:.1f} ms "
        f"without it, {sum(lora['float_work_calls'].values())} float merges of quantized weights.",
    ] + _motion_lora_line(f.get("motion_lora")))


def _motion_lora_line(m: dict | None) -> list[str]:
    if not m:
        return []
    q = [x for x in m["layers"] if x["quantized"]]
    low = [x for x in q if x["delta"] and not x["dense"]]
    return [f"A rank-8 motion LoRA through ADE's loader (file {m['lora_file_bytes'] / 2**20:.2f} MiB, fp16) on {len(q)} "
            f"quantized motion layers: {len(low)} low-rank branches holding "
            f"{sum(x['delta_bytes'] for x in q) / 2**20:.2f} MiB (as dense deltas: "
            f"{sum(x['dense_bytes'] for x in q) / 2**20:.0f} MiB), worst cosine against FP's dW x "
            f"{min(x['cos'] for x in q):.6f}."]


def main(argv=None) -> None:
    args = host_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        print(table(host_probe(args, "size_probe.py", extra_files=lambda checkpoint: _lora(checkpoint, tmp))))


if __name__ == "__main__":
    main()
