"""What a loaded file's checks cost, on the SD1.5 UNet (diffusers, random seeded weights, nothing downloaded):
``load_quantized`` (the container, the schema, everything recomputed from the model, the bounds) against the model's
own forward, and the followed first call that proves the file's SCRI folds (``verify.FoldWiring``) against a first call
of the same load not followed (both build the layers' first-call caches). Variants alternate; medians printed.

    python -m bench.load_check [--latent 8] [--batch 2] [--runs 3]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench._common import machine, table
from bench.unet_step import build_unet, inputs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latent", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args(argv)
    from qvd import Calibrator, QVDConfig, load_quantized, quantize_model, save_quantized

    torch.manual_seed(0)
    unet = build_unet()
    device = torch.device("cpu")
    x, t, ctx = inputs(a.latent, a.batch, device)
    with torch.no_grad():
        with Calibrator(unet, QVDConfig()) as cal:
            for step in (900, 500, 100):
                unet(x, torch.tensor(step), encoder_hidden_states=ctx)
        result = quantize_model(unet, cal.result(), QVDConfig(), apply=False)
    times = {"load_quantized": [], "forward (float model)": [], "first call, followed": [],
             "first call, not followed": []}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        path = Path(tmp) / "sd15.safetensors"
        save_quantized(path, result)
        for _ in range(a.runs):
            for followed in (True, False):
                model = copy.deepcopy(unet)
                start = time.perf_counter()
                res = load_quantized(path, model)
                times["load_quantized"].append(time.perf_counter() - start)
                if not followed:
                    res.wiring.pending.clear()
                start = time.perf_counter()
                model(x, t, encoder_hidden_states=ctx)
                times[f"first call, {'followed' if followed else 'not followed'}"].append(time.perf_counter() - start)
                assert not res.wiring, "a followed first call left folds unproven"
            start = time.perf_counter()
            unet(x, t, encoder_hidden_states=ctx)
            times["forward (float model)"].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["first call, not followed"]
    print(machine())
    print(f"SD1.5 UNet, latent {a.latent}, batch {a.batch}, {a.runs} runs; file {path.name}: "
          f"{len(result.modules)} modules, {sum(1 for m in result.modules.values() if getattr(m, 'qvd_scri_norm', 0))} "
          f"folded norms")
    print(table(["step", "median s", "x first call not followed"],
                [[k, f"{v:.3f}", f"{v / base:.2f}"] for k, v in med.items()]))


if __name__ == "__main__":
    main()
