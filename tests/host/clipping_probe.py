"""How much of their inputs the quantized layers clip, per sampling run, inside and outside what the calibration saw
(in-process in ComfyUI 0.3.75 / 0.33): the synthetic SD1.5, calibrated on one prompt with euler 4 steps at 64 px,
with QVD Calibrate's default timestep coverage and without it (``timestep_coverage`` 0); then sampled as
calibrated, with another prompt, with 20 steps, with DPM++ 2M / Karras at 20 steps and at 96 px. Per calibration and
run: the worst and the median layer's clipped share (``result.last_clipping``), the log lines QVD wrote about it and
the output's error against FP. Prints one JSON line.

    python clipping_probe.py CHECKPOINT PACK_DIR   (cwd = ComfyUI's directory, on PYTHONPATH)
"""
from __future__ import annotations

import json
import logging
import statistics
import sys
from pathlib import Path

import torch

from lowvram_probe import load_pack


def main(checkpoint: str, pack_dir: str) -> dict:
    torch.set_num_threads(2)
    from comfy.cli_args import args
    args.cpu = True
    import comfy.sd
    import nodes

    qvd = load_pack(Path(pack_dir))
    patching = sys.modules["qvd_pack_probe.nodes.patching"]
    model, clip, _ = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=False)[:3]
    encode = lambda text: nodes.CLIPTextEncode().encode(clip, text)[0]  # noqa: E731
    negative = encode("")
    lines = []
    handler = logging.Handler()
    handler.emit = lambda r: lines.append(r.getMessage()) if "clipped more than" in r.getMessage() else None
    logging.getLogger().addHandler(handler)
    calibrate = dict(prompt="a red fox running through snow", steps=4, size=64, sampler="euler", scheduler="normal")
    latent = lambda size: nodes.EmptyLatentImage().generate(size, size, 2)[0]  # noqa: E731
    runs = {"as calibrated": calibrate, "another prompt": {**calibrate, "prompt": "an astronaut, oil painting"},
            "20 steps": {**calibrate, "steps": 20},
            "dpmpp_2m karras 20 steps": {**calibrate, "steps": 20, "sampler": "dpmpp_2m", "scheduler": "karras"},
            "96 px": {**calibrate, "size": 96}}
    sample = lambda m, run: nodes.common_ksampler(  # noqa: E731
        m, 3, run["steps"], 5.0, run["sampler"], run["scheduler"], encode(run["prompt"]), negative,
        latent(run["size"]))[0]["samples"]
    fp = {name: sample(model, run) for name, run in runs.items()}
    out = {}
    for coverage in ("default", 0):
        node = qvd["QVDCalibrate"]()
        kw = {} if coverage == "default" else {"timestep_coverage": coverage}
        calibration = node.calibrate(model, encode(calibrate["prompt"]), negative, latent(64), 3, calibrate["steps"],
                                     5.0, calibrate["sampler"], calibrate["scheduler"], 1, **kw)["result"][0]
        quantized = qvd["QVDQuantizeModel"]().quantize(model, calibration, 8, 8, True, True, "", "int8")["result"][0]
        result = patching.attached_result(quantized)
        out[f"coverage {coverage}"] = runs_out = {"timesteps": len(calibration.timesteps),
                                                  "added": len(calibration.coverage)}
        for name, run in runs.items():
            lines.clear()
            q = sample(quantized, run)
            shares = sorted(result.last_clipping.values())
            runs_out[name] = {"worst": shares[-1], "median": statistics.median(shares), "layers": len(shares),
                              "over_1pct": sum(s > 0.01 for s in shares), "logged": list(lines),
                              "error": float((q - fp[name]).norm() / fp[name].norm())}
    return out


if __name__ == "__main__":
    print("QVD_PROBE " + json.dumps(main(*sys.argv[1:3])), flush=True)
