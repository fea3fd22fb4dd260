"""ControlNet vid2vid on a QVD-quantized MODEL, in-process in ComfyUI (0.3.75, 0.33): video frames -> VAE Encode ->
KSampler at denoise 0.6 with a ControlNet (core ``ControlNetApplyAdvanced``, the frames as hint) on the synthetic
SD1.5 checkpoint, calibrated with the ControlNet on (QVD Calibrate -> QVD Quantize Model, every layer; QVD Quantize
ControlNet from the same calibration). Measured: the quantized output's error against FP with and without the
ControlNet, with the ControlNet full precision and quantized; the ControlNet's effect on the quantized model against
its effect on FP; the ControlNet's share of a sampling step (FP, W8A8 UNet, W8A8 UNet + ControlNet), timed with
forward hooks; the bytes the quantized ControlNet's patcher tells; its file round trip (QVD Save / Load Quantized
ControlNet, in a temporary models/qvd) and the refusals (a UNet file, a damaged file, a ControlNet the calibration
never saw). Prints one JSON line.

    python controlnet_probe.py CHECKPOINT PACK_DIR   (cwd = ComfyUI's directory, on PYTHONPATH)
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from comfy_host import TINY
from lowvram_probe import load_pack
from synthetic_models import sd15_controlnet_state_dict

FRAMES, SIZE, DENOISE = 4, 64, 0.6


def main(checkpoint: str, pack_dir: str, files: str) -> dict:
    """``files``: an empty folder serving as models/qvd for this process (the ComfyUI tree is only read)."""
    torch.set_num_threads(2)
    from comfy.cli_args import args
    args.cpu = True
    import comfy.controlnet
    import comfy.sd
    import nodes

    import folder_paths

    qvd = load_pack(Path(pack_dir))
    folder_paths.folder_names_and_paths["qvd"] = ([files], {".safetensors"})
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
                                                  1, timestep_coverage=TINY["timestep_coverage"])["result"][0]
    quantized = qvd["QVDQuantizeModel"]().quantize(model, calibration, 8, 8, True, True, "", "int8")["result"][0]
    q_control, cn_report = qvd["QVDQuantizeControlNet"]().quantize(control, calibration, 8, 8, True, True, "",
                                                                   "int8")["result"]
    apply = lambda cn: nodes.ControlNetApplyAdvanced().apply_controlnet(  # noqa: E731
        positive, negative, cn, frames, 1.0, 0.0, 1.0)[:2]
    pos_qcn, neg_qcn = apply(q_control)

    times = {"control": 0.0, "unet": 0.0}

    def timed(module, key):
        start = {}
        return [module.register_forward_pre_hook(lambda *_: start.update(t=time.perf_counter())),
                module.register_forward_hook(lambda *_: times.__setitem__(key, times[key] + time.perf_counter()
                                                                              - start["t"]))]

    def sample(m, pos, neg) -> torch.Tensor:
        return nodes.common_ksampler(m, 11, 3, 5.0, "euler", "normal", pos, neg, latent, denoise=DENOISE)[0]["samples"]

    def share(m, cn, conds) -> float:
        times.update(control=0.0, unet=0.0)
        hooks = timed(cn.control_model, "control") + timed(m.model.diffusion_model, "unet")
        try:
            sample(m, *conds)
        finally:
            for h in hooks:
                h.remove()
        return times["control"] / (times["control"] + times["unet"])

    out = {k: sample(m, *c) for k, (m, c) in {"fp": (model, (positive, negative)), "fp_cn": (model, (pos_cn, neg_cn)),
                                               "q": (quantized, (positive, negative)),
                                               "q_cn": (quantized, (pos_cn, neg_cn)),
                                               "q_qcn": (quantized, (pos_qcn, neg_qcn))}.items()}
    err = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    cos = lambda a, b: float((a * b).sum() / (a.norm() * b.norm()))  # noqa: E731
    fp_effect, q_effect, qq_effect = out["fp_cn"] - out["fp"], out["q_cn"] - out["q"], out["q_qcn"] - out["q"]
    sample(quantized, pos_cn, neg_cn)  # warm: compute routes decided, caches made
    sample(quantized, pos_qcn, neg_qcn)
    facts = {"error_without": err(out["q"], out["fp"]), "error_with": err(out["q_cn"], out["fp_cn"]),
             "error_with_quantized_cn": err(out["q_qcn"], out["fp_cn"]),
             "effect_size": float(fp_effect.norm() / out["fp"].norm()),
             "effect_cosine": cos(q_effect, fp_effect), "effect_norm_ratio": float(q_effect.norm() / fp_effect.norm()),
             "quantized_cn_effect_cosine": cos(qq_effect, fp_effect),
             "quantized_cn_effect_norm_ratio": float(qq_effect.norm() / fp_effect.norm()),
             "finite": bool(all(torch.isfinite(t).all() for t in out.values())),
             "control_share_fp": share(model, control, (pos_cn, neg_cn)),
             "control_share_q": share(quantized, control, (pos_cn, neg_cn)),
             "control_share_q_qcn": share(quantized, q_control, (pos_qcn, neg_qcn)),
             "int8_skipped_by_auto": sys.modules["qvd_pack_probe.qvd.kernels"].auto_skips_int8(torch.device("cpu")),
             "quantized_layers": len(sys.modules["qvd_pack_probe.nodes.patching"].attached_result(quantized).modules),
             "cn_report": cn_report,
             "cn_told_mib": q_control.control_model_wrapped.model_size() / 2**20,
             "cn_float_told_mib": control.control_model_wrapped.model_size() / 2**20,
             "original_cn_unchanged": bool(torch.equal(sample(model, pos_cn, neg_cn), out["fp_cn"]))}
    return {**facts, **files_round_trip(qvd, nodes, quantized, control, q_control, apply, sample, out["q_qcn"], model,
                                        positive, negative, latent)}


def files_round_trip(qvd, nodes, quantized, control, q_control, apply, sample, want, model, positive, negative,
                     latent) -> dict:
    """Save the quantized ControlNet, load it onto the float one, sample; the refusals, as their messages."""
    from qvd_pack_probe.qvd import QVDError

    qvd["QVDSaveQuantizedControlNet"]().save(q_control, "cn")
    qvd["QVDSaveQuantized"]().save(quantized, "unet")
    loaded = qvd["QVDLoadQuantizedControlNet"]().load(control, "cn.safetensors", "int8")["result"][0]
    facts = {"file_round_trip_equal": bool(torch.equal(sample(quantized, *apply(loaded)), want))}

    def refused(fn) -> str:
        try:
            fn()
        except QVDError as e:
            return str(e)
        return "NOT REFUSED"

    import folder_paths
    path = folder_paths.get_full_path("qvd", "cn.safetensors")
    raw = bytearray(Path(path).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    Path(path).with_name("damaged.safetensors").write_bytes(bytes(raw))
    load = qvd["QVDLoadQuantizedControlNet"]().load
    facts["refused_unet_file"] = refused(lambda: load(control, "unet.safetensors", "int8"))
    facts["refused_damaged_file"] = refused(lambda: load(control, "damaged.safetensors", "int8"))
    facts["refused_quantized_twice"] = refused(lambda: load(q_control, "cn.safetensors", "int8"))
    bare = qvd["QVDCalibrate"]().calibrate(model, positive, negative, latent, 0, 1, 5.0, "euler", "normal",
                                           1, timestep_coverage=TINY["timestep_coverage"])["result"][0]
    facts["refused_uncalibrated_cn"] = refused(
        lambda: qvd["QVDQuantizeControlNet"]().quantize(control, bare, 8, 8, True, True, "", "int8"))
    return facts


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="qvd-probe-", ignore_cleanup_errors=True) as folder:
        print("QVD_PROBE " + json.dumps(main(*sys.argv[1:3], folder)), flush=True)
