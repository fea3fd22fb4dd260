"""IPAdapter (ComfyUI_IPAdapter_plus, its IPAdapter Embeds node) on a QVD-quantized MODEL, in-process in ComfyUI
(0.3.75, 0.33): the synthetic SD1.5 checkpoint, a seeded SD1.5 IPAdapter (``synthetic_models.sd15_ipadapter``) fed image
embeddings directly (no CLIP vision model), txt2vid frames as a batch. IPAdapter patches cross-attention with its own
key / value projections of the image tokens (an ``attn2`` replace patch reading QVD's to_q / to_k / to_v outputs).
Two graphs: IPAdapter before QVD (calibrated and quantized with it applied) and after (QVD Quantize Model on the plain
MODEL, IPAdapter applied to the quantized one). Measured: each output's error against FP with IPAdapter,
IPAdapter's effect on the quantized model against its effect on FP, and which runs logged that the calibration never
saw the sampled graph's attention patches. Prints one JSON line.

    python ipadapter_probe.py CHECKPOINT PACK_DIR IPADAPTER_DIR   (cwd = ComfyUI's directory, on PYTHONPATH)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from comfy_host import TINY
from lowvram_probe import load_pack
from synthetic_models import sd15_ipadapter


def main(checkpoint: str, pack_dir: str, ipadapter_dir: str) -> dict:
    torch.set_num_threads(2)
    from comfy.cli_args import args
    args.cpu = True
    import comfy.sd
    import nodes

    qvd = load_pack(Path(pack_dir))
    embeds_node = load_pack(Path(ipadapter_dir), "ipadapter_plus_probe")["IPAdapterEmbeds"]()
    model, clip, _ = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=False)[:3]
    positive = nodes.CLIPTextEncode().encode(clip, "a red fox running")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = nodes.EmptyLatentImage().generate(64, 64, 4)[0]
    adapter = sd15_ipadapter()
    image_embed = torch.randn(1, 1024, generator=torch.Generator().manual_seed(7))

    def with_ipadapter(m):
        return embeds_node.apply_ipadapter(m, adapter, image_embed, 1.0, "linear", 0.0, 1.0,
                                           neg_embed=torch.zeros_like(image_embed), embeds_scaling="V only")[0]

    def calibrated(m):
        return qvd["QVDCalibrate"]().calibrate(m, positive, negative, latent, 11, 3, 5.0, "euler", "normal",
                                               1, timestep_coverage=TINY["timestep_coverage"])["result"][0]

    def quantized(m, calibration):
        return qvd["QVDQuantizeModel"]().quantize(m, calibration, 8, 8, True, True, "", "int8")["result"][0]

    def sample(m) -> torch.Tensor:
        return nodes.common_ksampler(m, 11, 3, 5.0, "euler", "normal", positive, negative, latent)[0]["samples"]

    import logging

    warned = []
    handler = logging.Handler()
    handler.emit = lambda record: warned.append(record.getMessage()) if "never saw" in record.getMessage() else None
    logging.getLogger().addHandler(handler)

    def said(run):
        warned.clear()
        out = run()
        return out, len(warned)

    fp_ipa = with_ipadapter(model)
    out = {"fp": sample(model), "fp_ipa": sample(fp_ipa)}
    q_plain = quantized(model, calibrated(model))
    out["q"], warned_plain = said(lambda: sample(q_plain))
    out["q_ipa_after"], warned_after = said(lambda: sample(with_ipadapter(q_plain)))
    q_before = quantized(fp_ipa, calibrated(fp_ipa))
    out["q_ipa_before"], warned_before = said(lambda: sample(q_before))
    err = lambda a, b: float((out[a] - out[b]).norm() / out[b].norm())  # noqa: E731
    fp_effect = out["fp_ipa"] - out["fp"]
    cos = lambda e: float((e * fp_effect).sum() / (e.norm() * fp_effect.norm()))  # noqa: E731
    return {"error_plain": err("q", "fp"), "error_before": err("q_ipa_before", "fp_ipa"),
            "error_after": err("q_ipa_after", "fp_ipa"), "effect_size": float(fp_effect.norm() / out["fp"].norm()),
            "effect_cosine_after": cos(out["q_ipa_after"] - out["q"]),
            "effect_cosine_before": cos(out["q_ipa_before"] - out["q"]),
            "finite": bool(all(torch.isfinite(t).all() for t in out.values())),
            "warnings": {"plain": warned_plain, "after": warned_after, "before": warned_before},
            "patched": sorted(str(k) for k in fp_ipa.model_options["transformer_options"]["patches_replace"]["attn2"])}


if __name__ == "__main__":
    print("QVD_PROBE " + json.dumps(main(*sys.argv[1:4])), flush=True)
