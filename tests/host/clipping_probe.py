"""How much of their inputs the quantized layers clip, per sampling run, inside and outside what the calibration saw
(in-process in ComfyUI 0.3.75 / 0.33): the synthetic SD1.5, calibrated on one prompt with euler 4 steps at 64 px,
with QVD Calibrate's default timestep coverage and without it (``timestep_coverage`` 0); then sampled as
calibrated, with another prompt, with 20 steps, with DPM++ 2M / Karras at 20 steps and at 96 px. Per calibration and
run: the worst and the median layer's clipped share (``result.last_clipping``), the log lines QVD wrote about it and
the output's error against FP. With the default coverage also 4 timestep buckets (``QVDConfig.timestep_buckets``, made
with the Python API on the MODEL's tree, saved with QVD Save Quantized and loaded with QVD Load Quantized): the same
runs, which buckets the layers ran in, and the file against the in-process model; and the 1-bucket file rewritten
in format 2 (files saved before buckets), loaded with QVD Load Quantized. Prints one JSON line.

    python clipping_probe.py CHECKPOINT PACK_DIR   (cwd = ComfyUI's directory, on PYTHONPATH)
"""
from __future__ import annotations

import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from lowvram_probe import load_pack


def main(checkpoint: str, pack_dir: str, files: str) -> dict:
    """``files``: an empty folder serving as models/qvd for this process (the ComfyUI tree is only read)."""
    torch.set_num_threads(2)
    from comfy.cli_args import args
    args.cpu = True
    import comfy.sd
    import nodes

    import folder_paths

    qvd = load_pack(Path(pack_dir))
    patching = sys.modules["qvd_pack_probe.nodes.patching"]
    folder_paths.folder_names_and_paths["qvd"] = ([files], {".safetensors"})
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
        if coverage == "default":
            out["buckets"] = _buckets(qvd, patching, model, calibration, quantized, runs, sample, fp)
    return out


def _buckets(qvd, patching, model, calibration, one, runs, sample, fp) -> dict:
    """4 timestep buckets against one scale (``one``, QVD Quantize Model's), through files as users share them."""
    from qvd_pack_probe.qvd import QVDConfig, quantize_model, safefile
    from qvd_pack_probe.qvd.io import KEY
    from qvd_pack_probe.qvd.timesteps import bucket_of

    config = QVDConfig(timestep_buckets=4)
    made = patching.quantize(model, lambda tree, _dtype: quantize_model(tree, calibration, config, apply=False),
                             "int8")[0]
    qvd["QVDSaveQuantized"]().save(made, "buckets")
    loaded, report = qvd["QVDLoadQuantized"]().load(model, "buckets.safetensors", "int8")["result"]
    result = patching.attached_result(loaded)
    layer = next(m for m in result.modules.values() if hasattr(m, "act_scale"))
    seen = []
    hook = layer.register_forward_pre_hook(lambda *_: seen.append((result.clock.timestep, result.clock.index)))
    facts = {"edges": result.clock.edges, "report_line": next((x for x in report.splitlines() if "per W8A8" in x), "")}
    try:
        for name, run in runs.items():
            seen.clear()
            q = sample(loaded, run)
            facts[name] = {"error": float((q - fp[name]).norm() / fp[name].norm()),
                           "buckets_run": sorted({b for _, b in seen}),
                           "bucket_of_timestep": all(b == bucket_of(t, result.clock.edges) for t, b in seen)}
    finally:
        hook.remove()
    facts["file_equals_in_process"] = bool(torch.equal(sample(loaded, runs["20 steps"]), sample(made, runs["20 steps"])))
    # the 1-bucket model saved, then rewritten as a format 2 file (scalar scales, integer zero points, no edges)
    qvd["QVDSaveQuantized"]().save(one, "one")
    import folder_paths
    path = Path(folder_paths.get_full_path("qvd", "one.safetensors"))
    tensors, meta = safefile.read(str(path), KEY, Exception, "QVD quantized model")
    meta = {**meta, "format_version": 2}
    del meta["timestep_edges"], meta["config"]["timestep_buckets"]
    for name, info in meta["layers"].items():
        if "zero_point" in info:
            info["zero_point"] = info["zero_point"][0]
            tensors[f"{name}.act_scale"] = tensors[f"{name}.act_scale"].reshape(())
    safefile.write(str(path.with_name("format2.safetensors")), tensors, KEY, meta)
    old = qvd["QVDLoadQuantized"]().load(model, "format2.safetensors", "int8")["result"][0]
    facts["format2_equals_one_bucket"] = bool(torch.equal(sample(old, runs["as calibrated"]),
                                                          sample(one, runs["as calibrated"])))
    return facts



if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="qvd-probe-", ignore_cleanup_errors=True) as folder:
        print("QVD_PROBE " + json.dumps(main(*sys.argv[1:3], folder)), flush=True)
