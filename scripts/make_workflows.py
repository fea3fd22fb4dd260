"""Write the example workflows: UI format (what users drag into ComfyUI) in workflows/ and the API format
twin (for POST /prompt) in workflows/api/, both from one graph spec per workflow.

    .venv/bin/python scripts/make_workflows.py

tests/host/test_host_browser.py loads each UI file in the ComfyUI frontend and checks the prompt the frontend
makes of it against its API twin.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from qvd.calibrate import COVERAGE_POINTS  # noqa: E402

# Sockets and widgets of the node types used (widget order as ComfyUI's /object_info lists them;
# "control_after_generate" is the frontend's extra widget after a seed).
NODE_TYPES = {
    "CheckpointLoaderSimple": ([], ["ckpt_name"], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "CLIPTextEncode": ([("clip", "CLIP")], ["text"], [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": ([], ["width", "height", "batch_size"], [("LATENT", "LATENT")]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")],
                 ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
                 [("LATENT", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [], [("IMAGE", "IMAGE")]),
    "SaveAnimatedWEBP": ([("images", "IMAGE")], ["filename_prefix", "fps", "lossless", "quality", "method"], []),
    "QVDCalibrate": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                      ("latent_image", "LATENT")],
                     ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler",
                      "calibration_seeds", "save_name", "timestep_coverage"], [("calibration", "QVD_CALIBRATION")]),
    "QVDQuantizeModel": ([("model", "MODEL"), ("calibration", "QVD_CALIBRATION")],
                         ["weight_bits", "activation_bits", "htdq", "scri", "skip", "compute"],
                         [("model", "MODEL"), ("report", "STRING")]),
    "QVDSaveQuantized": ([("model", "MODEL")], ["filename"], []),
    "QVDLoadQuantized": ([("model", "MODEL")], ["qvd_name", "compute"], [("model", "MODEL"), ("report", "STRING")]),
    "QVDQuantizeControlNet": ([("control_net", "CONTROL_NET"), ("calibration", "QVD_CALIBRATION")],
                              ["weight_bits", "activation_bits", "htdq", "scri", "skip", "compute"],
                              [("control_net", "CONTROL_NET"), ("report", "STRING")]),
    "QVDSaveQuantizedControlNet": ([("control_net", "CONTROL_NET")], ["filename"], []),
    "LoadVideo": ([], ["file", "upload"], [("VIDEO", "VIDEO")]),
    "GetVideoComponents": ([("video", "VIDEO")], [], [("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT")]),
    "VAEEncode": ([("pixels", "IMAGE"), ("vae", "VAE")], [], [("LATENT", "LATENT")]),
    "ControlNetLoader": ([], ["control_net_name"], [("CONTROL_NET", "CONTROL_NET")]),
    "ControlNetApplyAdvanced": ([("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                 ("control_net", "CONTROL_NET"), ("image", "IMAGE"), ("vae", "VAE")],
                                ["strength", "start_percent", "end_percent"],
                                [("positive", "CONDITIONING"), ("negative", "CONDITIONING")]),
    "UNETLoader": ([], ["unet_name", "weight_dtype"], [("MODEL", "MODEL")]),
    "CLIPLoader": ([], ["clip_name", "type", "device"], [("CLIP", "CLIP")]),
    "VAELoader": ([], ["vae_name"], [("VAE", "VAE")]),
    "ModelSamplingSD3": ([("model", "MODEL")], ["shift"], [("MODEL", "MODEL")]),
    "EmptyHunyuanLatentVideo": ([], ["width", "height", "length", "batch_size"], [("LATENT", "LATENT")]),
    "KSamplerAdvanced": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                          ("latent_image", "LATENT")],
                         ["add_noise", "noise_seed", "control_after_generate", "steps", "cfg", "sampler_name",
                          "scheduler", "start_at_step", "end_at_step", "return_with_leftover_noise"],
                         [("LATENT", "LATENT")]),
    "LoadImage": ([], ["image", "upload"], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "CLIPVisionLoader": ([], ["clip_name"], [("CLIP_VISION", "CLIP_VISION")]),
    "CLIPVisionEncode": ([("clip_vision", "CLIP_VISION"), ("image", "IMAGE")], ["crop"],
                         [("CLIP_VISION_OUTPUT", "CLIP_VISION_OUTPUT")]),
    "WanImageToVideo": ([("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("vae", "VAE"),
                         ("clip_vision_output", "CLIP_VISION_OUTPUT"), ("start_image", "IMAGE")],
                        ["width", "height", "length", "batch_size"],
                        [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")]),
    "Wan22ImageToVideoLatent": ([("vae", "VAE"), ("start_image", "IMAGE")], ["width", "height", "length", "batch_size"],
                                [("LATENT", "LATENT")]),
    "ADE_LoadAnimateDiffModel": ([("ad_settings", "AD_SETTINGS")], ["model_name"],
                                 [("MOTION_MODEL", "MOTION_MODEL_ADE")]),
    "ADE_ApplyAnimateDiffModelSimple": ([("motion_model", "MOTION_MODEL_ADE"), ("motion_lora", "MOTION_LORA"),
                                         ("scale_multival", "MULTIVAL"), ("effect_multival", "MULTIVAL"),
                                         ("ad_keyframes", "AD_KEYFRAMES"), ("per_block", "PER_BLOCK")], [],
                                        [("M_MODELS", "M_MODELS")]),
    "ADE_UseEvolvedSampling": ([("model", "MODEL"), ("m_models", "M_MODELS"), ("context_options", "CONTEXT_OPTIONS"),
                                ("sample_settings", "SAMPLE_SETTINGS")], ["beta_schedule"], [("MODEL", "MODEL")]),
}

POSITIVE = "a red fox running through fresh snow, forest, cinematic"
NEGATIVE = "blurry, low quality, watermark"
SAMPLING = {"steps": 20, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal"}


def _base(model_ref, frames=16):
    """Checkpoint, prompts and latent; node 1 is the checkpoint loader."""
    return {
        1: ("CheckpointLoaderSimple", {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}),
        2: ("CLIPTextEncode", {"clip": (1, 1), "text": POSITIVE}),
        3: ("CLIPTextEncode", {"clip": (1, 1), "text": NEGATIVE}),
        4: ("EmptyLatentImage", {"width": 512, "height": 512, "batch_size": frames}),
        20: ("KSampler", {"model": model_ref, "positive": (2, 0), "negative": (3, 0), "latent_image": (4, 0),
                          "seed": 42, "control_after_generate": "fixed", **SAMPLING, "denoise": 1.0}),
        21: ("VAEDecode", {"samples": (20, 0), "vae": (1, 2)}),
        22: ("SaveAnimatedWEBP", {"images": (21, 0), "filename_prefix": "qvd/txt2vid", "fps": 8.0,
                                  "lossless": False, "quality": 90, "method": "default"}),
    }


def _sdxl(model_ref):
    """SDXL base at 1024 px with the AnimateDiff-SDXL motion model (ADE autoselects its linear beta schedule)."""
    base = _base(model_ref)
    base[1] = ("CheckpointLoaderSimple", {"ckpt_name": "sd_xl_base_1.0.safetensors"})
    base[4] = ("EmptyLatentImage", {"width": 1024, "height": 1024, "batch_size": 16})
    base[22] = ("SaveAnimatedWEBP", {**base[22][1], "filename_prefix": "qvd/sdxl_txt2vid"})
    return base


WAN_SAMPLING = {"steps": 30, "cfg": 6.0, "sampler_name": "uni_pc", "scheduler": "simple"}  # Wan's own defaults


def _wan21():
    """Wan 2.1 T2V 1.3B in ComfyUI's native nodes (Load Diffusion Model, umt5-xxl, shift 8 as the model card),
    33 frames at 832 x 480, calibrated and quantized in the graph."""
    return {
        1: ("UNETLoader", {"unet_name": "wan2.1_t2v_1.3B_fp16.safetensors", "weight_dtype": "default"}),
        5: ("CLIPLoader", {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan",
                           "device": "default"}),
        2: ("CLIPTextEncode", {"clip": (5, 0), "text": POSITIVE}),
        3: ("CLIPTextEncode", {"clip": (5, 0), "text": NEGATIVE}),
        6: ("ModelSamplingSD3", {"model": (1, 0), "shift": 8.0}),
        4: ("EmptyHunyuanLatentVideo", {"width": 832, "height": 480, "length": 33, "batch_size": 1}),
        10: ("QVDCalibrate", {"model": (6, 0), "positive": (2, 0), "negative": (3, 0), "latent_image": (4, 0),
                              "seed": 0, "control_after_generate": "fixed", **WAN_SAMPLING, "calibration_seeds": 2,
                              "save_name": "", "timestep_coverage": COVERAGE_POINTS}),
        11: ("QVDQuantizeModel", {"model": (6, 0), "calibration": (10, 0), "weight_bits": 8, "activation_bits": 8,
                                  "htdq": True, "scri": True, "skip": "", "compute": "auto"}),
        12: ("QVDSaveQuantized", {"model": (11, 0), "filename": "qvd_w8a8_wan21_t2v"}),
        20: ("KSampler", {"model": (11, 0), "positive": (2, 0), "negative": (3, 0), "latent_image": (4, 0),
                          "seed": 42, "control_after_generate": "fixed", **WAN_SAMPLING, "denoise": 1.0}),
        7: ("VAELoader", {"vae_name": "wan_2.1_vae.safetensors"}),
        21: ("VAEDecode", {"samples": (20, 0), "vae": (7, 0)}),
        22: ("SaveAnimatedWEBP", {"images": (21, 0), "filename_prefix": "qvd/wan21_t2v", "fps": 16.0,
                                  "lossless": False, "quality": 90, "method": "default"}),
    }


WAN22_SAMPLING = {"steps": 20, "cfg": 3.5, "sampler_name": "euler", "scheduler": "simple"}


def _wan22_a14b():
    """Wan 2.2 T2V A14B: the high-noise expert samples steps 0-10 (leftover noise returned), the low-noise expert
    10-20, each calibrated (over the whole schedule) and quantized in the graph, both saved."""
    spec = _wan21()
    for nid in (12, 20):
        del spec[nid]
    spec[1] = ("UNETLoader", {"unet_name": "wan2.2_t2v_high_noise_14B_fp16.safetensors", "weight_dtype": "default"})
    spec[41] = ("UNETLoader", {"unet_name": "wan2.2_t2v_low_noise_14B_fp16.safetensors", "weight_dtype": "default"})
    spec[46] = ("ModelSamplingSD3", {"model": (41, 0), "shift": 8.0})
    spec[4] = ("EmptyHunyuanLatentVideo", {"width": 832, "height": 480, "length": 81, "batch_size": 1})
    for cal, quant, save, model, name in ((10, 11, 12, 6, "high"), (50, 51, 52, 46, "low")):
        spec[cal] = ("QVDCalibrate", {**spec[10][1], "model": (model, 0), **WAN22_SAMPLING})
        spec[quant] = ("QVDQuantizeModel", {**spec[11][1], "model": (model, 0), "calibration": (cal, 0)})
        spec[save] = ("QVDSaveQuantized", {"model": (quant, 0), "filename": f"qvd_w8a8_wan22_t2v_{name}_noise"})
    run = {"positive": (2, 0), "negative": (3, 0), **{k: WAN22_SAMPLING[k] for k in ("steps", "cfg", "sampler_name",
                                                                                       "scheduler")}}
    spec[60] = ("KSamplerAdvanced", {"model": (11, 0), **run, "latent_image": (4, 0), "add_noise": "enable",
                                     "noise_seed": 42, "control_after_generate": "fixed", "start_at_step": 0,
                                     "end_at_step": 10, "return_with_leftover_noise": "enable"})
    spec[61] = ("KSamplerAdvanced", {"model": (51, 0), **run, "latent_image": (60, 0), "add_noise": "disable",
                                     "noise_seed": 0, "control_after_generate": "fixed", "start_at_step": 10,
                                     "end_at_step": 10000, "return_with_leftover_noise": "disable"})
    spec[21] = ("VAEDecode", {"samples": (61, 0), "vae": (7, 0)})
    spec[22] = ("SaveAnimatedWEBP", {**spec[22][1], "filename_prefix": "qvd/wan22_t2v"})
    return spec


def _wan21_i2v():
    """Wan 2.1 I2V 14B 480p: the start image through the Wan VAE (WanImageToVideo) and CLIP vision (clip_vision_h),
    33 frames at 832 x 480, calibrated on that image's conditioning and quantized in the graph."""
    spec = _wan21()
    spec[1] = ("UNETLoader", {"unet_name": "wan2.1_i2v_480p_14B_fp16.safetensors", "weight_dtype": "default"})
    del spec[4]
    spec[30] = ("LoadImage", {"image": "start_image.png", "upload": "image"})
    spec[31] = ("CLIPVisionLoader", {"clip_name": "clip_vision_h.safetensors"})
    spec[32] = ("CLIPVisionEncode", {"clip_vision": (31, 0), "image": (30, 0), "crop": "none"})
    spec[33] = ("WanImageToVideo", {"positive": (2, 0), "negative": (3, 0), "vae": (7, 0),
                                    "clip_vision_output": (32, 0), "start_image": (30, 0), "width": 832, "height": 480,
                                    "length": 33, "batch_size": 1})
    conditioned = {"positive": (33, 0), "negative": (33, 1), "latent_image": (33, 2)}
    spec[10] = ("QVDCalibrate", {**spec[10][1], **conditioned})
    spec[12] = ("QVDSaveQuantized", {"model": (11, 0), "filename": "qvd_w8a8_wan21_i2v"})
    spec[20] = ("KSampler", {**spec[20][1], **conditioned})
    spec[22] = ("SaveAnimatedWEBP", {**spec[22][1], "filename_prefix": "qvd/wan21_i2v"})
    return spec


def _wan22_ti2v_5b():
    """Wan 2.2 TI2V-5B image-to-video: the start image through the Wan 2.2 VAE into the first latent frame
    (Wan22ImageToVideoLatent; its noise mask gives that frame timestep 0), 121 frames at 1280 x 704."""
    spec = _wan21()
    spec[1] = ("UNETLoader", {"unet_name": "wan2.2_ti2v_5B_fp16.safetensors", "weight_dtype": "default"})
    spec[7] = ("VAELoader", {"vae_name": "wan2.2_vae.safetensors"})
    spec[30] = ("LoadImage", {"image": "start_image.png", "upload": "image"})
    spec[4] = ("Wan22ImageToVideoLatent", {"vae": (7, 0), "start_image": (30, 0), "width": 1280, "height": 704,
                                           "length": 121, "batch_size": 1})
    sampling = {"cfg": 5.0}
    spec[10] = ("QVDCalibrate", {**spec[10][1], **sampling})
    spec[12] = ("QVDSaveQuantized", {"model": (11, 0), "filename": "qvd_w8a8_wan22_ti2v_5b"})
    spec[20] = ("KSampler", {**spec[20][1], **sampling})
    spec[22] = ("SaveAnimatedWEBP", {**spec[22][1], "filename_prefix": "qvd/wan22_ti2v", "fps": 24.0})
    return spec


def _ade(model_ref, motion_model="mm_sd_v15_v2.ckpt"):
    return {
        5: ("ADE_LoadAnimateDiffModel", {"model_name": motion_model}),
        6: ("ADE_ApplyAnimateDiffModelSimple", {"motion_model": (5, 0)}),
        7: ("ADE_UseEvolvedSampling", {"model": model_ref, "m_models": (6, 0), "beta_schedule": "autoselect"}),
    }


def _calibrate_quantize(model_ref, filename="qvd_w8a8"):
    return {
        10: ("QVDCalibrate", {"model": model_ref, "positive": (2, 0), "negative": (3, 0), "latent_image": (4, 0),
                              "seed": 0, "control_after_generate": "fixed", **SAMPLING, "calibration_seeds": 2,
                              "save_name": "", "timestep_coverage": COVERAGE_POINTS}),
        11: ("QVDQuantizeModel", {"model": model_ref, "calibration": (10, 0), "weight_bits": 8,
                                  "activation_bits": 8, "htdq": True, "scri": True, "skip": "", "compute": "auto"}),
        12: ("QVDSaveQuantized", {"model": (11, 0), "filename": filename}),
    }


def _controlnet_vid2vid():
    """Video frames -> VAE Encode -> KSampler at denoise 0.6 with a ControlNet (the frames as its hint: a tile
    ControlNet); calibrated with the ControlNet applied, UNet, motion model and ControlNet quantized."""
    cn = {"strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}
    bits = {"weight_bits": 8, "activation_bits": 8, "htdq": True, "scri": True, "skip": "", "compute": "auto"}
    base = _base((11, 0))
    del base[4]
    base[20] = ("KSampler", {**base[20][1], "positive": (36, 0), "negative": (36, 1), "latent_image": (32, 0),
                             "denoise": 0.6})
    base[22] = ("SaveAnimatedWEBP", {**base[22][1], "filename_prefix": "qvd/vid2vid"})
    return {
        **base, **_ade((1, 0)),
        30: ("LoadVideo", {"file": "input_clip.mp4", "upload": "image"}),
        31: ("GetVideoComponents", {"video": (30, 0)}),
        32: ("VAEEncode", {"pixels": (31, 0), "vae": (1, 2)}),
        33: ("ControlNetLoader", {"control_net_name": "control_v11f1e_sd15_tile.pth"}),
        34: ("ControlNetApplyAdvanced", {"positive": (2, 0), "negative": (3, 0), "control_net": (33, 0),
                                         "image": (31, 0), **cn}),
        10: ("QVDCalibrate", {"model": (7, 0), "positive": (34, 0), "negative": (34, 1), "latent_image": (32, 0),
                              "seed": 0, "control_after_generate": "fixed", **SAMPLING, "calibration_seeds": 2,
                              "save_name": "", "timestep_coverage": COVERAGE_POINTS}),
        11: ("QVDQuantizeModel", {"model": (7, 0), "calibration": (10, 0), **bits}),
        12: ("QVDSaveQuantized", {"model": (11, 0), "filename": "qvd_w8a8_vid2vid"}),
        35: ("QVDQuantizeControlNet", {"control_net": (33, 0), "calibration": (10, 0), **bits}),
        36: ("ControlNetApplyAdvanced", {"positive": (2, 0), "negative": (3, 0), "control_net": (35, 0),
                                         "image": (31, 0), **cn}),
        37: ("QVDSaveQuantizedControlNet", {"control_net": (35, 0), "filename": "qvd_controlnet_tile"}),
    }


WORKFLOWS = {
    # (a) AnimateDiff-Evolved txt2vid, calibrated and quantized in the graph.
    "qvd_ade_txt2vid_calibrate_quantize": {**_base((11, 0)), **_ade((1, 0)), **_calibrate_quantize((7, 0))},
    # (b) the same with a saved QVD file.
    "qvd_ade_txt2vid_load_quantized": {
        **_base((13, 0)), **_ade((1, 0)),
        13: ("QVDLoadQuantized", {"model": (7, 0), "qvd_name": "qvd_w8a8.safetensors", "compute": "auto"})},
    # (c) core nodes only (no AnimateDiff): the frames are a plain image batch.
    "qvd_core_txt2vid_calibrate_quantize": {**_base((11, 0), frames=8), **_calibrate_quantize((1, 0))},
    # (d) AnimateDiff-Evolved ControlNet vid2vid: UNet, motion model and ControlNet quantized from one calibration.
    "qvd_ade_controlnet_vid2vid": _controlnet_vid2vid(),
    # (e) SDXL + AnimateDiff-SDXL (HotShotXL: choose its motion model in node 5), calibrated and quantized.
    "qvd_ade_sdxl_txt2vid_calibrate_quantize": {**_sdxl((11, 0)), **_ade((1, 0), "mm_sdxl_v10_beta.ckpt"),
                                                **_calibrate_quantize((7, 0), "qvd_w8a8_sdxl")},
    # (f) Wan 2.1 T2V (a DiT: layer roles found by calibration), native nodes, calibrated and quantized.
    "qvd_wan21_t2v_calibrate_quantize": _wan21(),
    # (g) Wan 2.2 T2V A14B: its two experts, each calibrated and quantized, in two KSamplerAdvanced.
    "qvd_wan22_t2v_a14b_calibrate_quantize": _wan22_a14b(),
    # (h) Wan 2.1 I2V: a start image through WanImageToVideo (Wan VAE + CLIP vision), calibrated and quantized.
    "qvd_wan21_i2v_calibrate_quantize": _wan21_i2v(),
    # (i) Wan 2.2 TI2V-5B from a start image (per-frame timesteps), calibrated and quantized.
    "qvd_wan22_ti2v_5b_calibrate_quantize": _wan22_ti2v_5b(),
}
FRONTEND_ONLY = ("control_after_generate", "upload")  # widgets the frontend keeps out of the API prompt


def to_api(spec: dict) -> dict:
    """API format: {id: {class_type, inputs}} with links as [source id, output slot]."""
    api = {}
    for nid, (ctype, values) in sorted(spec.items()):
        inputs = {k: [str(v[0]), v[1]] if isinstance(v, tuple) else v
                  for k, v in values.items() if k not in FRONTEND_ONLY}
        api[str(nid)] = {"class_type": ctype, "inputs": inputs}
    return api


def to_ui(spec: dict) -> dict:
    """UI (litegraph) format: nodes with sockets and widgets_values, links, laid out by graph depth."""
    links, nodes, depth = [], [], {}

    def node_depth(nid):
        if nid not in depth:
            srcs = [v[0] for v in spec[nid][1].values() if isinstance(v, tuple)]
            depth[nid] = 1 + max((node_depth(s) for s in srcs), default=-1)
        return depth[nid]

    out_links: dict[tuple, list] = {}
    for nid, (ctype, values) in sorted(spec.items()):
        for slot, (name, typ) in enumerate(NODE_TYPES[ctype][0]):
            if name in values:
                src, src_slot = values[name]
                link_id = len(links) + 1
                links.append([link_id, src, src_slot, nid, slot, NODE_TYPES[spec[src][0]][2][src_slot][1]])
                out_links.setdefault((src, src_slot), []).append(link_id)
    rows: dict[int, int] = {}
    link_of = {(l[3], l[4]): l[0] for l in links}
    for nid, (ctype, values) in sorted(spec.items()):
        sockets, widgets, outputs = NODE_TYPES[ctype]
        col = node_depth(nid)
        row = rows.get(col, 0)
        rows[col] = row + 1
        nodes.append({
            "id": nid, "type": ctype, "pos": [40 + 360 * col, 40 + 260 * row], "size": [320, 200], "flags": {},
            "order": 0, "mode": 0,
            "inputs": [{"name": n, "type": t, "link": link_of.get((nid, i))} for i, (n, t) in enumerate(sockets)],
            "outputs": [{"name": n, "type": t, "links": out_links.get((nid, i), []), "slot_index": i}
                        for i, (n, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": ctype},
            "widgets_values": [values[w] for w in widgets],
        })
    order = sorted(spec, key=node_depth)
    for n in nodes:
        n["order"] = order.index(n["id"])
    return {"last_node_id": max(spec), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def main() -> None:
    (ROOT / "workflows" / "api").mkdir(parents=True, exist_ok=True)
    for name, spec in WORKFLOWS.items():
        (ROOT / "workflows" / f"{name}.json").write_text(json.dumps(to_ui(spec), indent=1) + "\n")
        (ROOT / "workflows" / "api" / f"{name}.json").write_text(json.dumps(to_api(spec), indent=1) + "\n")


if __name__ == "__main__":
    main()
