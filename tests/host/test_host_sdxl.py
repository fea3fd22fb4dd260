"""SDXL AnimateDiff graphs (issue 28): an SDXL-family checkpoint with the AnimateDiff-SDXL and the HotShotXL motion
model in AnimateDiff-Evolved, through workflow (e) (QVD Calibrate -> QVD Quantize Model -> KSampler) and QVD Load
Quantized; and the same graph without ADE (the frames a plain batch), which runs where ADE is not checked out.

The checkpoint is SDXL's UNet at Segmind Vega's depth (``synthetic_models.SDXL_VEGA_UNET_CONFIG``: Linear proj_in /
proj_out, context 2048, the label embedding; 1 / 2 transformer blocks per level where SDXL has 2 / 10), which
ComfyUI loads as an SDXL model and ADE accepts as one. The motion models need ADE, as ``test_host_ade.py``.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch
from safetensors import safe_open

from comfy_host import (SYNTH_VERSION, ComfyServer, ade_path, build_model, load_api, make_base_dir, read_latent,
                        tiny, with_latent_output, without)

pytestmark = [pytest.mark.slow, pytest.mark.full]

SDXL_NAME = f"qvd_synth_sdxl_vega_{SYNTH_VERSION}.safetensors"
MOTION = {"none": (None, None),
          "AnimateDiff-SDXL": ("motion_sdxl", f"qvd_synth_mm_sdxl_v10_beta_{SYNTH_VERSION}.safetensors"),
          "HotShotXL": ("motion_hotshotxl", f"qvd_synth_hotshotxl_{SYNTH_VERSION}.safetensors")}
# 64 px (8 x 8 latent), 8 frames, 2 steps. Quantized: every motion module, the time and label embeddings and the
# UNet's 640-wide level (input blocks 4-5, output blocks 3-5: SDXL's Linear proj_in / proj_out, its 2048-wide
# cross-attention); the other levels stay float (skip list), as the SD1.5 tests keep most of theirs. Measured on
# this synthetic model: with the 320-wide level's convolutions quantized too the output is 21 % from FP (each
# layer ~1 % as here; its random full-resolution ResBlocks amplify them), with them float 8 % / 4 %.
SIZES = {"width": 64, "height": 64, "batch_size": 8, "steps": 2, "calibration_seeds": 1,
         "skip": "input_blocks.[0-3].*, input_blocks.[6-8].*, middle_block.*, output_blocks.[0-2].*, "
                 "output_blocks.[6-8].*"}


@pytest.fixture(scope="module")
def sdxl_server(tmp_path_factory, sd15_checkpoint):
    ade = ade_path()
    checkpoint = build_model("sdxl", SDXL_NAME)
    base = make_base_dir(tmp_path_factory.mktemp("comfy_sdxl"), checkpoint, None, ade)
    for kind, name in MOTION.values():
        if ade is not None and kind is not None:
            (base / "models" / "animatediff_models" / name).symlink_to(build_model(kind, name))
    server = ComfyServer(base, ("--cache-none",))
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("motion", sorted(MOTION))
def test_sdxl_motion_model_calibrated_quantized_and_loaded(sdxl_server, motion):
    """Workflow (e) with ``motion`` (``none``: its ADE nodes removed): ADE autoselects the motion model's beta
    schedule; the quantized output stays within the synthetic model's usual error of FP, the file holds SDXL's
    Linear proj_in and 2048-wide cross-attention in int8, the report shows the motion modules quantized and the
    conditioning path found, and the saved file loads (QVD Load Quantized) to the same latent."""
    if motion != "none" and ade_path() is None:
        pytest.skip("ComfyUI-AnimateDiff-Evolved not found: set ADE_PATH or check it out under "
                    ".cache/ComfyUI-AnimateDiff-Evolved")
    prefix = f"sdxl_{MOTION[motion][0] or 'core'}"
    wf = tiny(load_api("qvd_ade_sdxl_txt2vid_calibrate_quantize"), model_name=MOTION[motion][1], **SIZES)
    if motion == "none":
        wf = without(wf, "5", "6", "7")
        for nid in ("10", "11"):
            wf[nid]["inputs"]["model"] = ["1", 0]
    wf["1"]["inputs"]["ckpt_name"] = SDXL_NAME
    wf["12"]["inputs"]["filename"] = prefix
    wf["10"]["inputs"]["seed"] = wf["20"]["inputs"]["seed"]
    fp_prompt = with_latent_output(without(copy.deepcopy(wf), "10", "11", "12"), "20", f"{prefix}_fp")
    fp_prompt["20"]["inputs"]["model"] = wf["11"]["inputs"]["model"]
    fp = read_latent(sdxl_server, sdxl_server.run(fp_prompt), f"save_{prefix}_fp")
    entry = sdxl_server.run(with_latent_output(wf, "20", f"{prefix}_q"))
    q = read_latent(sdxl_server, entry, f"save_{prefix}_q")
    report = entry["outputs"]["11"]["text"][0]

    loaded = without(copy.deepcopy(wf), "10", "11", "12")
    loaded["13"] = {"class_type": "QVDLoadQuantized",
                    "inputs": {"model": wf["11"]["inputs"]["model"], "qvd_name": f"{prefix}.safetensors",
                               "compute": "auto"}}
    loaded["20"]["inputs"]["model"] = ["13", 0]
    entry = sdxl_server.run(with_latent_output(loaded, "20", f"{prefix}_loaded"))
    assert torch.equal(read_latent(sdxl_server, entry, f"save_{prefix}_loaded"), q)

    if motion != "none":
        schedule = "linear (HotshotXL/default)" if motion == "HotShotXL" else "linear (AnimateDiff-SDXL)"
        assert f"'{schedule}' beta_schedule" in sdxl_server.log(), sdxl_server.log()[-3000:]
    counts = {tree: int(n) for tree, n in re.findall(r"^(unet|motion) linear: (\d+) x W8A8", report, re.M)}
    with safe_open(str(sdxl_server.base / "models" / "qvd" / f"{prefix}.safetensors"), "pt") as f:
        proj = [k for k in f.keys() if re.search(r"transformer_blocks|proj_in|proj_out", k) and k.endswith(".weight")
                and "motion" not in k and f.get_slice(k).get_dtype() == "I8" and len(f.get_slice(k).get_shape()) == 2]
    rel = float((q - fp).norm() / fp.norm())
    print(f"\nSDXL + {motion}: W8A8 vs FP {rel:.4f}; {counts}")
    assert torch.isfinite(q).all() and 0 < rel < 0.2, rel
    assert counts.get("unet", 0) > 0 and (motion == "none") == ("motion" not in counts), report
    assert any(k.endswith("proj_in.weight") for k in proj) and any("attn2.to_k" in k for k in proj), proj
    assert "conditioning path" in report, report  # the 2048-wide cross-attention keys / values, by observation
