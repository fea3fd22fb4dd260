"""ControlNet vid2vid on a QVD-quantized MODEL, in-process in ComfyUI (0.3.75, 0.33): video frames -> VAE Encode ->
KSampler at denoise 0.6 with a ControlNet (core ``ControlNetApplyAdvanced``, the frames as hint) on the synthetic
SD1.5 checkpoint, calibrated with the ControlNet on (QVD Calibrate -> QVD Quantize Model, every layer). Measured: the
quantized output's error against FP with and without the ControlNet, the ControlNet's effect on the quantized model
against its effect on FP, and the ControlNet's share of a sampling step (FP and W8A8), timed with forward hooks.
Prints one JSON line.

    python controlnet_probe.py CHECKPOINT PACK_DIR   (cwd = ComfyUI's directory, on PYTHONPATH)
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from lowvram_probe import load_pack
from synthetic_models import sd15_controlnet_state_dict

FRAMES, SIZE, DENOISE = 4, 64, 0.6


def main(checkpoint: str, pack_dir: str) -> dict:
    torch.set_num_threads(2)
    from comfy.cli_args import args
    args.cpu = True
    import comfy.controlnet
    import comfy.sd
    import nodes

    qvd = load_pack(Path(pack_dir))
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(checkpoint)[:3]
    control = comfy.controlnet.load_controlnet_state_dict(sd15_controlnet_state_dict())
    positive = nodes.CLIPTextEncode().encode(clip, "a red fox running")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    gen = torch.Generator().manual_seed(5)
    # "video" frames: a smooth pattern drifting frame to frame, as [B, H, W, 3] images in [0, 1]
    yy, xx = torch.meshgrid(torch.linspace(0, 6, SIZE), torch.linspace(0, 6, SIZE), indexing="ij")
    frames = torch.stack([torch.stack([(torch.sin(xx + 0.3 * f + c) * torch.cos(yy - 0.2 * f) + 1) / 2
                                       for c in range(3)], -1) for f in range(FRAMES)])
    frames = (frames + 0.02 * torch.rand(frames.shape, generator=gen)).clamp(0, 1)
    latent = nodes.VAEEncode().encode(vae, frames)[0]
    pos_cn, neg_cn = nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control, frames, 1.0, 0.0,
                                                                      1.0)[:2]
    calibration = qvd["QVDCalibrate"]().calibrate(model, pos_cn, neg_cn, latent, 0, 2, 5.0, "euler", "normal",
                                                  1)["result"][0]
    quantized = qvd["QVDQuantizeModel"]().quantize(model, calibration, 8, 8, True, True, "", "int8")["result"][0]

    times = {"control": 0.0, "unet": 0.0}

    def timed(module, key):
        start = {}
        return [module.register_forward_pre_hook(lambda *_: start.update(t=time.perf_counter())),
                module.register_forward_hook(lambda *_: times.__setitem__(key, times[key] + time.perf_counter()
                                                                              - start["t"]))]

    def sample(m, pos, neg) -> torch.Tensor:
        return nodes.common_ksampler(m, 11, 3, 5.0, "euler", "normal", pos, neg, latent, denoise=DENOISE)[0]["samples"]

    def share(m) -> float:
        times.update(control=0.0, unet=0.0)
        hooks = timed(control.control_model, "control") + timed(m.model.diffusion_model, "unet")
        try:
            sample(m, pos_cn, neg_cn)
        finally:
            for h in hooks:
                h.remove()
        return times["control"] / (times["control"] + times["unet"])

    out = {k: sample(m, *c) for k, (m, c) in {"fp": (model, (positive, negative)), "fp_cn": (model, (pos_cn, neg_cn)),
                                               "q": (quantized, (positive, negative)),
                                               "q_cn": (quantized, (pos_cn, neg_cn))}.items()}
    err = lambda a, b: float((a - b).norm() / b.norm())
    fp_effect, q_effect = out["fp_cn"] - out["fp"], out["q_cn"] - out["q"]
    sample(quantized, pos_cn, neg_cn)  # warm: compute routes decided, caches made
    return {"error_without": err(out["q"], out["fp"]), "error_with": err(out["q_cn"], out["fp_cn"]),
            "effect_size": float(fp_effect.norm() / out["fp"].norm()),
            "effect_cosine": float((q_effect * fp_effect).sum() / (q_effect.norm() * fp_effect.norm())),
            "effect_norm_ratio": float(q_effect.norm() / fp_effect.norm()),
            "finite": bool(all(torch.isfinite(t).all() for t in out.values())),
            "control_share_fp": share(model), "control_share_q": share(quantized),
            "quantized_layers": len(sys.modules["qvd_pack_probe.nodes.patching"].attached_result(quantized).modules)}


if __name__ == "__main__":
    print("QVD_PROBE " + json.dumps(main(*sys.argv[1:3])), flush=True)
