"""Where QVD's W8A8 error on a Wan model comes from, by layer group, in-process in ComfyUI (0.3.75, 0.33): one QVD
Calibrate of the Wan diffusion model (Load Diffusion Model's load, a text conditioning of umt5's shape with channels
of unequal ranges, as ``fixture_nodes`` gives), then, from that calibration, QVD's quantization with one method
changed per variant (HTDQ on the time path or not, SCRI on the modulated inputs or not, ...) and each layer group
quantized alone (the rest float). Every MODEL samples the calibrated prompt and one never calibrated, ``SEEDS`` seeds
each, on the W8A8 integer kernels; prints one JSON line: each variant's relative error of the final latent vs FP.

    python wan_groups_probe.py wan WAN_MODEL PACK_DIR STEPS SIZE FRAMES SEEDS   (cwd = ComfyUI, on PYTHONPATH)
"""
from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path

import torch

from lowvram_probe import load_pack

# Wan's layer groups (ComfyUI's WanModel names). The modulated inputs are norm(x) * (1 + scale) + shift of the adaLN
# modulation: self-attention q / k / v and ffn.0.
GROUPS = {
    "time path (time_embedding MLP, time_projection)": ("*time_embedding.*", "*time_projection.*"),
    "text embedding": ("*text_embedding.*",),
    "self-attention q / k / v (modulated input)": ("*self_attn.q", "*self_attn.k", "*self_attn.v"),
    "self-attention o": ("*self_attn.o",),
    "cross-attention q": ("*cross_attn.q",),
    "cross-attention k / v (text path)": ("*cross_attn.k", "*cross_attn.v"),
    "cross-attention o": ("*cross_attn.o",),
    "ffn.0 (modulated input)": ("*ffn.0",),
    "ffn.2": ("*ffn.2",),
}
MODULATED = GROUPS["self-attention q / k / v (modulated input)"] + GROUPS["ffn.0 (modulated input)"]
EVERY = tuple(p for patterns in GROUPS.values() for p in patterns)
# (label, QVDConfig changes) of the method variants, all from the same calibration.
VARIANTS = (
    ("QVD (HTDQ on the time path, SCRI where its search lowers the error)", {}),
    ("time path on uniform int8 instead of HiDi-TQ (htdq off)", {"htdq": False}),
    ("time path kept float", {"skip": GROUPS["time path (time_embedding MLP, time_projection)"]}),
    ("no SCRI anywhere", {"scri": False}),
    ("no SCRI on the modulated inputs", {"scri_skip": MODULATED}),
    ("SCRI on the modulated inputs only", {"scri_skip": tuple(p for p in EVERY if p not in MODULATED)}),
    ("no SCRI on cross-attention o (its input mixes the prompt's values)", {"scri_skip": GROUPS["cross-attention o"]}),
    ("cross-attention o kept float", {"skip": GROUPS["cross-attention o"]}),
)
PROMPTS = ("a red fox running through fresh snow", "a lighthouse in a storm at night, waves")


@functools.cache
def _text_node():
    return load_pack(Path(__file__).with_name("fixture_nodes"), "qvd_fixture_nodes")["QVDTestTextEmbedding"]()


def text(prompt: str) -> list:
    """A CONDITIONING of umt5's shape as the host tests' ``QVDTestTextEmbedding`` gives it (one encoder's channel
    ranges, the values seeded by the text)."""
    return _text_node().encode(prompt, 24, 4096)[0]


def main(model_path: str, pack_dir: str, steps: int, size: int, frames: int, seeds: int) -> dict:
    torch.set_num_threads(2)
    from comfy.cli_args import args
    args.cpu = True
    import comfy.sample
    import comfy.sd
    import comfy_extras.nodes_model_advanced as advanced

    nodes = load_pack(Path(pack_dir))
    patching = sys.modules["qvd_pack_probe.nodes.patching"]
    core = sys.modules["qvd_pack_probe.qvd"]
    model = advanced.ModelSamplingSD3().patch(comfy.sd.load_diffusion_model(model_path), 8.0)[0]
    negative = text("blurry, low quality")
    latent = torch.zeros(1, 16, (frames - 1) // 4 + 1, size // 8, size // 8)
    sampling = (steps, 6.0, "uni_pc", "simple")
    calibration = nodes["QVDCalibrate"]().calibrate(model, text(PROMPTS[0]), negative, {"samples": latent}, 0,
                                                    *sampling, 1)["result"][0]

    def sample(m, prompt: str, seed: int) -> torch.Tensor:
        noise = comfy.sample.prepare_noise(latent, seed)
        return comfy.sample.sample(m, noise, *sampling, text(prompt), negative, latent, seed=seed,
                                   disable_pbar=True).float()

    runs = [(p, 42 + s) for p in PROMPTS for s in range(seeds)]
    fp = {run: sample(model, *run) for run in runs}

    def errors(changes: dict) -> dict:
        default = core.QVDConfig()  # scri_skip adds to the default's list
        config = dataclasses.replace(default, **{k: default.scri_skip + v if k == "scri_skip" else v
                                                 for k, v in changes.items()})
        heads = {h: h for h in {n.partition(".")[0] for n in calibration.layers}}
        quantized, result = patching.quantize(model, lambda tree, _dtype: core.quantize_model(
            tree, calibration.subset(heads), config, apply=False), "int8")
        rel = [float((sample(quantized, *run) - fp[run]).norm() / fp[run].norm()) for run in runs]
        w8a8 = sum(1 for r in result.report if "skipped" not in r and r.get("handler") != "float")
        return {"calibrated": rel[:seeds], "other_prompt": rel[seeds:], "w8a8_layers": w8a8}

    out = {"variants": {label: errors(changes) for label, changes in VARIANTS}, "alone": {}}
    for group, patterns in GROUPS.items():
        out["alone"][group] = errors({"skip": tuple(p for p in EVERY if p not in patterns)})
    out["settings"] = {"steps": steps, "size": size, "frames": frames, "seeds": seeds, "sampler": "uni_pc simple",
                       "cfg": 6.0, "shift": 8.0, "calibrated_on": PROMPTS[0], "other": PROMPTS[1]}
    return out


if __name__ == "__main__":
    if sys.argv[1] != "wan":
        raise SystemExit(__doc__)
    with torch.inference_mode():  # as ComfyUI runs a prompt
        result = main(sys.argv[2], sys.argv[3], *map(int, sys.argv[4:8]))
    print("QVD_PROBE " + json.dumps(result))
