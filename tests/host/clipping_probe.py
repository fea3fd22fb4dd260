"""How much of their inputs the quantized layers clip, per sampling run, inside and outside what the calibration saw
(in-process in ComfyUI 0.3.75 / 0.33): the synthetic SD1.5, calibrated on one prompt with euler 4 steps at 64 px;
then sampled as calibrated, with another prompt, with 20 steps and at 96 px. Per run: the worst and the median
layer's clipped share (``result.last_clipping``), the log lines QVD wrote about it and the output's error against FP.
Prints one JSON line.

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
    calibrate = dict(prompt="a red fox running through snow", steps=4, size=64)
    latent = lambda size: nodes.EmptyLatentImage().generate(size, size, 2)[0]  # noqa: E731
    calibration = qvd["QVDCalibrate"]().calibrate(model, encode(calibrate["prompt"]), negative, latent(64), 3,
                                                  calibrate["steps"], 5.0, "euler", "normal", 1)["result"][0]
    quantized = qvd["QVDQuantizeModel"]().quantize(model, calibration, 8, 8, True, True, "", "int8")["result"][0]
    result = patching.attached_result(quantized)
    runs = {"as calibrated": calibrate, "another prompt": {**calibrate, "prompt": "an astronaut, oil painting"},
            "20 steps": {**calibrate, "steps": 20}, "96 px": {**calibrate, "size": 96}}
    out = {}
    for name, run in runs.items():
        lines.clear()
        sample = lambda m: nodes.common_ksampler(  # noqa: E731
            m, 3, run["steps"], 5.0, "euler", "normal", encode(run["prompt"]), negative,
            latent(run["size"]))[0]["samples"]
        q = sample(quantized)
        shares = sorted(result.last_clipping.values())
        logged = list(lines)
        fp = sample(model)
        out[name] = {"worst": shares[-1], "median": statistics.median(shares), "layers": len(shares),
                     "over_1pct": sum(s > 0.01 for s in shares), "logged": logged,
                     "error": float((q - fp).norm() / fp.norm())}
    return out


if __name__ == "__main__":
    print("QVD_PROBE " + json.dumps(main(*sys.argv[1:3])), flush=True)
