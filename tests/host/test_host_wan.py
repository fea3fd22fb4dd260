"""Wan 2.1 T2V (issue 31) in ComfyUI's native nodes, through workflow (f): Load Diffusion Model -> ModelSamplingSD3 ->
QVD Calibrate -> QVD Quantize Model -> KSampler, then QVD Load Quantized of the saved file, on a server with
ComfyUI's default cache running several graphs.

The model is ComfyUI's own ``WanModel`` at toy width and depth (``synthetic_models.WAN_CONFIG``). The text encoder
(umt5-xxl, 11 GB at any file size) is replaced by the test-only ``QVDTestTextEmbedding`` (``fixture_nodes``), which
gives the CONDITIONING shape umt5 gives. The layer roles must be found by calibration: no Wan name is in QVD's
config, so the report's ``head.head`` in float, the time path on HiDi-TQ and the text path without prompt-specific
SCRI all come from what the calls showed.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from synthetic_models import WAN_CONFIG
from comfy_host import (COMFYUI_PATH, SYNTH_VERSION, ComfyServer, build_model, load_api, make_base_dir, read_latent,
                        tiny, with_latent_output, without)

pytestmark = [pytest.mark.slow]

WAN_NAME = f"qvd_synth_wan21_t2v_{SYNTH_VERSION}.safetensors"
WAN_LOW_NAME = f"qvd_synth_wan21_t2v_low_{SYNTH_VERSION}.safetensors"  # the other expert of a Wan 2.2 A14B-style pair
WAN_I2V_NAME = f"qvd_synth_wan21_i2v_{SYNTH_VERSION}.safetensors"
WAN_TI2V_NAME = f"qvd_synth_wan22_ti2v_5b_{SYNTH_VERSION}.safetensors"
WAN21_VAE_NAME = f"qvd_synth_wan21_vae_{SYNTH_VERSION}.safetensors"
WAN22_VAE_NAME = f"qvd_synth_wan22_vae_{SYNTH_VERSION}.safetensors"
FIXTURE_NODES = Path(__file__).with_name("fixture_nodes")
# 64 x 64 px, 9 frames (3 latent frames of 8 x 8: 48 tokens), 4 steps; the whole model quantized (no skip list).
SIZES = {"width": 64, "height": 64, "length": 9, "batch_size": 1, "steps": 4, "skip": ""}
# Measured on this synthetic model: see the test's print; bound 10 %.
BOUND = 0.10
# The quality graphs run the W8A8 integer kernels: on many CPUs ``auto`` picks weight-only for toy-width layers
# (measured: 0.8 % from FP where int8 gives 3.2 % on a 2-core AVX2 EPYC), which would not measure W8A8.
COMPUTE = "int8"


@pytest.fixture(scope="module")
def wan_server(tmp_path_factory):
    if not (COMFYUI_PATH / "main.py").is_file():
        pytest.skip(f"ComfyUI not found at {COMFYUI_PATH}: run `make host` (or set COMFYUI_PATH)")
    if not (COMFYUI_PATH / "comfy" / "ldm" / "wan" / "model.py").is_file():
        pytest.skip("this ComfyUI has no Wan support")
    base = make_base_dir(tmp_path_factory.mktemp("comfy_wan"), None)
    (base / "models" / "diffusion_models" / WAN_NAME).symlink_to(build_model("wan21", WAN_NAME))
    (base / "models" / "diffusion_models" / WAN_LOW_NAME).symlink_to(build_model("wan21_low", WAN_LOW_NAME))
    (base / "custom_nodes" / "qvd_test_fixtures").symlink_to(FIXTURE_NODES, target_is_directory=True)
    server = ComfyServer(base)  # ComfyUI's default cache
    try:
        yield server
    finally:
        server.stop()


def wan_graph(prefix: str, prompt: str = "a red fox running through fresh snow",
              workflow: str = "qvd_wan21_t2v_calibrate_quantize", unet: str = WAN_NAME, sizes: dict = SIZES,
              drop: tuple = ("7",)) -> dict:
    """A Wan workflow at test size: the synthetic model, the fixture text embedding for CLIPLoader + CLIPTextEncode,
    the latent saved instead of decoded (node ids ``drop`` also removed: the T2V graph's VAE), compute ``COMPUTE``."""
    wf = without(tiny(load_api(workflow), **sizes), "5", "21", "22", *drop)
    wf["1"]["inputs"]["unet_name"] = unet
    for nid, text in (("2", prompt), ("3", "blurry, low quality")):
        wf[nid] = {"class_type": "QVDTestTextEmbedding", "inputs": {"text": text, "tokens": 24, "width": 4096}}
    wf["12"]["inputs"]["filename"], wf["11"]["inputs"]["compute"] = prefix, COMPUTE
    return wf


def fp_and_quantized(server, wf: dict, tag: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(FP latent, quantized latent, QVD Quantize Model's report) of ``wf`` (FP: the same graph on the FP MODEL)."""
    fp = read_latent(server, server.run(fp_graph(wf, f"{tag}_fp")), f"save_{tag}_fp")
    entry = server.run(with_latent_output(wf, "20", f"{tag}_q"))
    return fp, read_latent(server, entry, f"save_{tag}_q"), entry["outputs"]["11"]["text"][0]


def fp_graph(wf: dict, prefix: str) -> dict:
    fp = with_latent_output(without(copy.deepcopy(wf), "10", "11", "12"), "20", prefix)
    fp["20"]["inputs"]["model"] = ["6", 0]
    return fp


def test_wan21_t2v_calibrated_quantized_saved_and_loaded(wan_server):
    wf = wan_graph("wan21")
    fp, q, report = fp_and_quantized(wan_server, wf, "wan")
    rel = float((q - fp).norm() / fp.norm())
    print(f"\nWan 2.1 T2V: W8A8 vs FP {rel:.4f}\n{report}")
    assert q.shape == (1, 16, 3, 8, 8) and torch.isfinite(q).all() and 0 < rel < BOUND, rel

    # Roles, each found by calibration (no Wan name in the config).
    assert "last layers (giving the model's output, from the calibrated call graph): diffusion_model.head.head " \
           "(float)" in report, report
    assert re.search(r"first layers \(reading the model's input.*diffusion_model\.patch_embedding \(not a Linear / "
                     r"Conv2d", report), report
    # time MLP x 2 + time_projection, all on HiDi-TQ; text embedding x 2 and cross_attn.k / v per block.
    assert _report_roles(report) == (3, 3, 2 + 2 * WAN_CONFIG["num_layers"]), report

    path = wan_server.base / "models" / "qvd" / "wan21.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        int8 = {k for k in keys if k.endswith(".weight") and f.get_slice(k).get_dtype() == "I8"}
        levels = {k for k in keys if k.endswith(".levels")}
    assert "diffusion_model.blocks.1.ffn.2.weight" in int8 and "diffusion_model.blocks.0.cross_attn.o.weight" in int8
    assert not any(k.startswith("diffusion_model.head.head.") for k in keys)
    assert levels == {f"diffusion_model.{n}.levels" for n in ("time_embedding.0", "time_embedding.2",
                                                               "time_projection.1")}

    entry = wan_server.run(with_latent_output(_loaded(wf, "wan21.safetensors"), "20", "wan_loaded"))
    assert torch.equal(read_latent(wan_server, entry, "save_wan_loaded"), q)
    assert "head.head (float)" in entry["outputs"]["13"]["text"][0]


def test_wan21_another_prompt_in_the_same_server_stays_close_to_fp(wan_server):
    """A second graph in the same server (default cache) samples another prompt with the file calibrated on the
    first: the text path carries no prompt-specific SCRI, so the error stays at the calibrated prompt's level."""
    wf = wan_graph("wan21_other", prompt="a lighthouse in a storm at night, waves")
    fp = read_latent(wan_server, wan_server.run(fp_graph(wf, "wan_other_fp")), "save_wan_other_fp")
    loaded = with_latent_output(_loaded(wf, "wan21.safetensors"), "20", "wan_other_q")
    q = read_latent(wan_server, wan_server.run(loaded), "save_wan_other_q")
    rel = float((q - fp).norm() / fp.norm())
    print(f"\nWan 2.1 T2V, a prompt never calibrated: W8A8 vs FP {rel:.4f}")
    assert torch.isfinite(q).all() and 0 < rel < BOUND, rel


def test_wan_lora_in_the_distillation_loras_format_runs_on_the_quantized_model(wan_server):
    """A Wan LoRA as lightx2v / CausVid ship them (``diffusion_model.`` keys, ``lora_A`` / ``lora_B``) through
    LoraLoaderModelOnly on the loaded file: every key loads (none reported unused) and its effect on the quantized
    model's output follows its effect on FP's."""
    from synthetic_models import write_wan_lora

    loras = wan_server.base / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    name = "qvd_synth_wan_lora.safetensors"
    if not (loras / name).exists():
        write_wan_lora(build_model("wan21", WAN_NAME), loras / name)
    wf = wan_graph("wan21_lora")
    base = without(copy.deepcopy(wf), "10", "11", "12", "20")
    base["13"] = {"class_type": "QVDLoadQuantized",
                  "inputs": {"model": ["6", 0], "qvd_name": "wan21.safetensors", "compute": COMPUTE}}
    models = {"fp": ["6", 0], "q": ["13", 0]}
    for i, (key, ref) in enumerate(list(models.items())):
        base[f"3{i}"] = {"class_type": "LoraLoaderModelOnly",
                         "inputs": {"model": ref, "lora_name": name, "strength_model": 1.0}}
        models[f"{key}_lora"] = [f"3{i}", 0]
    log_start = len(wan_server.log_path.read_bytes())
    out = {}
    for key, ref in models.items():
        prompt = copy.deepcopy(base)
        prompt["20"] = copy.deepcopy(wf["20"])
        prompt["20"]["inputs"]["model"] = ref
        out[key] = read_latent(wan_server, wan_server.run(with_latent_output(prompt, "20", f"wan_{key}")),
                               f"save_wan_{key}")
    log = wan_server.log_path.read_bytes()[log_start:].decode(errors="replace")
    assert "lora key not loaded" not in log.lower() and "not loaded" not in log, log[-3000:]
    fp_effect, q_effect = out["fp_lora"] - out["fp"], out["q_lora"] - out["q"]
    cos = float(F.cosine_similarity(fp_effect.flatten(), q_effect.flatten(), dim=0))
    mag = float(q_effect.norm() / fp_effect.norm())
    effect = float(fp_effect.norm() / out["fp"].norm())
    print(f"\nWan LoRA: its effect on FP {effect:.3f} of the output; quantized vs FP effect cosine {cos:.4f}, "
          f"magnitude {mag:.3f}x")
    assert effect > 0.02  # the LoRA does something
    assert cos > 0.9 and 0.8 < mag < 1.25, (cos, mag)


def test_wan22_expert_pair_each_quantized_in_a_ksampler_advanced_split(wan_server):
    """Workflow (g), Wan 2.2 A14B's graph: a high-noise and a low-noise expert (Wan 2.1's architecture, two files),
    each through its own QVD Calibrate -> QVD Quantize Model, sampled by two KSamplerAdvanced (steps 0-2 with the
    high-noise expert, leftover noise returned; 2-4 with the low-noise one); the two quantized models in one graph
    stay apart."""
    wf = wan_graph("wan22_high", workflow="qvd_wan22_t2v_a14b_calibrate_quantize")
    wf["41"]["inputs"]["unet_name"] = WAN_LOW_NAME
    wf["60"]["inputs"]["end_at_step"] = wf["61"]["inputs"]["start_at_step"] = SIZES["steps"] // 2
    wf["52"]["inputs"]["filename"], wf["51"]["inputs"]["compute"] = "wan22_low", COMPUTE
    fp = with_latent_output(without(copy.deepcopy(wf), "10", "11", "12", "50", "51", "52"), "61", "wan22_fp")
    fp["60"]["inputs"]["model"], fp["61"]["inputs"]["model"] = ["6", 0], ["46", 0]
    fp = read_latent(wan_server, wan_server.run(fp), "save_wan22_fp")
    entry = wan_server.run(with_latent_output(wf, "61", "wan22_q"))
    q = read_latent(wan_server, entry, "save_wan22_q")
    rel = float((q - fp).norm() / fp.norm())
    print(f"\nWan 2.2-style expert pair (KSamplerAdvanced 0-2 / 2-4): W8A8 vs FP {rel:.4f}")
    assert torch.isfinite(q).all() and 0 < rel < BOUND, rel
    assert all("head.head (float)" in entry["outputs"][nid]["text"][0] for nid in ("11", "51"))
    files = [wan_server.base / "models" / "qvd" / f"{n}.safetensors" for n in ("wan22_high", "wan22_low")]
    with safe_open(str(files[0]), "pt") as a, safe_open(str(files[1]), "pt") as b:
        key = "diffusion_model.blocks.0.self_attn.q.weight"
        assert not torch.equal(a.get_tensor(key), b.get_tensor(key))  # each expert's own codes


def _link_models(server, **files) -> None:
    """Link synthetic models into the server's model folders (``folder=(kind, name)``); ComfyUI lists them live."""
    for folder, (kind, name) in files.items():
        target = server.base / "models" / folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(build_model(kind, name))


def _start_image(server, name: str, seed: int) -> str:
    """A seeded 96 x 80 RGB picture in the server's input folder (LoadImage resizes nothing: the I2V nodes do)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    smooth = rng.random((6, 5, 3)).repeat(16, 0).repeat(16, 1)  # blocks, as a picture's regions
    pixels = np.clip(smooth + 0.1 * rng.standard_normal(smooth.shape), 0, 1)
    Image.fromarray((pixels * 255).astype(np.uint8)).save(server.base / "input" / name)
    return name


def _loaded(wf: dict, qvd_name: str) -> dict:
    """The graph with QVD Load Quantized of ``qvd_name`` on the FP MODEL in place of calibration + quantization."""
    loaded = without(copy.deepcopy(wf), "10", "11", "12")
    loaded["13"] = {"class_type": "QVDLoadQuantized",
                    "inputs": {"model": ["6", 0], "qvd_name": qvd_name, "compute": COMPUTE}}
    loaded["20"]["inputs"]["model"] = ["13", 0]
    return loaded


def _report_roles(report: str) -> tuple[int, int, int]:
    """(temporal layers, of them on HiDi-TQ, conditioning-path layers) as the QVD Quantize Model report states them."""
    temporal = re.search(r"^temporal \(.*; observed\): (\d+) layers, .* (\d+) on HiDi-TQ$", report, re.M)
    cond = re.search(r"^conditioning path .*: (\d+) layers without prompt-specific SCRI$", report, re.M)
    assert temporal and cond, report
    return int(temporal.group(1)), int(temporal.group(2)), int(cond.group(1))


@pytest.mark.full
def test_wan21_i2v_start_image_through_the_wan_vae_and_clip_vision(wan_server):
    """Workflow (h), Wan 2.1 I2V: a start image through WanImageToVideo (the Wan VAE encodes it into the concat latent
    beside the noise; CLIP vision's features reach every block's image cross-attention), calibrated, quantized, saved
    and loaded; then another start image with the same file. The image path is found by calibration like the text
    path: ``img_emb`` and each block's ``k_img`` / ``v_img`` get no image-specific SCRI."""
    _link_models(wan_server, diffusion_models=("wan21_i2v", WAN_I2V_NAME), vae=("wan21_vae", WAN21_VAE_NAME))
    wf = wan_graph("wan21_i2v", workflow="qvd_wan21_i2v_calibrate_quantize", unet=WAN_I2V_NAME, drop=("31",))
    wf["7"]["inputs"]["vae_name"] = WAN21_VAE_NAME
    wf["30"]["inputs"]["image"] = _start_image(wan_server, "qvd_i2v_start.png", 0)
    wf["32"] = {"class_type": "QVDTestClipVisionEncode", "inputs": {"image": ["30", 0]}}
    fp, q, report = fp_and_quantized(wan_server, wf, "i2v")
    rel = float((q - fp).norm() / fp.norm())
    print(f"\nWan 2.1 I2V: W8A8 vs FP {rel:.4f}\n{report}")
    assert q.shape == (1, 16, 3, 8, 8) and torch.isfinite(q).all() and 0 < rel < BOUND, rel
    assert "diffusion_model.head.head (float)" in report, report
    # time MLP x 2 + time_projection; text embedding x 2, img_emb's Linears x 2, per block k / v / k_img / v_img.
    assert _report_roles(report) == (3, 3, 2 + 2 + 4 * WAN_CONFIG["num_layers"]), report
    path = wan_server.base / "models" / "qvd" / "wan21_i2v.safetensors"
    with safe_open(str(path), "pt") as f:
        assert f.get_slice("diffusion_model.blocks.0.cross_attn.k_img.weight").get_dtype() == "I8"
        assert f.get_slice("diffusion_model.img_emb.proj.1.weight").get_dtype() == "I8"

    loaded = _loaded(wf, "wan21_i2v.safetensors")
    entry = wan_server.run(with_latent_output(loaded, "20", "i2v_loaded"))
    assert torch.equal(read_latent(wan_server, entry, "save_i2v_loaded"), q)

    other = copy.deepcopy(loaded)  # another start image: the file calibrated on the first
    other["30"]["inputs"]["image"] = _start_image(wan_server, "qvd_i2v_other.png", 1)
    fp_other = fp_graph(copy.deepcopy(wf), "i2v_other_fp")
    fp_other["30"]["inputs"]["image"] = other["30"]["inputs"]["image"]
    fp2 = read_latent(wan_server, wan_server.run(fp_other), "save_i2v_other_fp")
    q2 = read_latent(wan_server, wan_server.run(with_latent_output(other, "20", "i2v_other_q")), "save_i2v_other_q")
    rel2 = float((q2 - fp2).norm() / fp2.norm())
    print(f"Wan 2.1 I2V, a start image never calibrated: W8A8 vs FP {rel2:.4f} (FP moved "
          f"{float((fp2 - fp).norm() / fp.norm()):.3f} with the image)")
    assert not torch.equal(fp2, fp) and torch.isfinite(q2).all() and 0 < rel2 < BOUND, rel2


@pytest.mark.full
def test_wan22_ti2v_5b_image_to_video_with_per_frame_timesteps(wan_server):
    """Workflow (i), Wan 2.2 TI2V-5B from a start image: Wan22ImageToVideoLatent encodes it with the Wan 2.2 VAE
    into the first latent frame and masks it, so every model call has per-frame timesteps (the image's frame at 0,
    ComfyUI's WAN22.process_timestep). Calibration keeps the time path's rows under their own timesteps (0
    included) and records each call's noisy timestep; the quantized model keeps the image frame exactly and its
    file reloads bit-identically."""
    from qvd.io import load_calibration

    _link_models(wan_server, diffusion_models=("wan22_ti2v", WAN_TI2V_NAME), vae=("wan22_vae", WAN22_VAE_NAME))
    sizes = {**SIZES, "width": 128, "height": 128}  # the Wan 2.2 VAE's 16x: 8 x 8 latent frames
    wf = wan_graph("wan22_ti2v", workflow="qvd_wan22_ti2v_5b_calibrate_quantize", unet=WAN_TI2V_NAME, sizes=sizes,
                   drop=())
    wf["7"]["inputs"]["vae_name"] = WAN22_VAE_NAME
    wf["30"]["inputs"]["image"] = _start_image(wan_server, "qvd_ti2v_start.png", 2)
    wf["10"]["inputs"]["save_name"] = "wan22_ti2v"
    fp, q, report = fp_and_quantized(wan_server, wf, "ti2v")
    rel = float((q[:, :, 1:] - fp[:, :, 1:]).norm() / fp[:, :, 1:].norm())
    print(f"\nWan 2.2 TI2V-5B image-to-video: W8A8 vs FP on the generated frames {rel:.4f}\n{report}")
    assert q.shape == (1, 48, 3, 8, 8) and torch.isfinite(q).all() and 0 < rel < BOUND, rel
    assert torch.equal(q[:, :, 0], fp[:, :, 0]) and q[:, :, 0].abs().max() > 0  # the image's frame, kept
    assert "diffusion_model.head.head (float)" in report and _report_roles(report) == (3, 3, 6), report

    cal = load_calibration(str(wan_server.base / "models" / "qvd" / "wan22_ti2v.calibration.safetensors"))
    rows = sorted(cal.layers["diffusion_model.time_projection.1"].temporal_vectors)
    assert rows[0] == 0.0 and len(rows) == len(cal.timesteps) + 1 and min(cal.timesteps) > 0, (rows, cal.timesteps)
    assert rows[1:] == sorted(cal.timesteps), (rows, cal.timesteps)

    entry = wan_server.run(with_latent_output(_loaded(wf, "wan22_ti2v.safetensors"), "20", "ti2v_loaded"))
    assert torch.equal(read_latent(wan_server, entry, "save_ti2v_loaded"), q)


@pytest.mark.full
def test_wan_lora_exact_per_layer_and_under_a_low_vram_partial_load(tmp_path):
    """The Wan LoRA on the quantized Wan model (``lowvram_probe.py wan``, in a ComfyUI process, with the calls ComfyUI
    makes when VRAM is short): per patched layer, its change on the layer's calibration rows against FP's ``dW x``,
    loaded whole and partially; offloaded quantized layers carry the LoRA as a call-time patch and give exactly the
    whole-load output; a partial unload too; without the LoRA the model is as before."""
    from comfy_host import REPO, run_probe
    from synthetic_models import WAN_LORA_LAYERS, write_wan_lora

    model = build_model("wan21", WAN_NAME)
    write_wan_lora(model, tmp_path / "lora.safetensors")
    probe = run_probe("lowvram_probe.py", "wan", model, tmp_path / "lora.safetensors", REPO, timeout=900)
    print(f"\nWan low-VRAM: {probe}")
    assert probe["model_lowvram"] and probe["offloaded"] > 0 and probe["offloaded_with_lora"] > 0, probe
    assert probe["offloaded_with_lora"] == len(WAN_LORA_LAYERS) and probe["flags_cleared"], probe
    assert probe["finite"] and probe["lora_effect"] > 0.01, probe
    assert probe["lowvram_equal"] and probe["unloaded_equal"] and probe["quantized_restored"], probe
    for path in ("whole", "partial"):  # per layer, on its calibration rows, against FP's dW x
        layer = probe[f"per_layer_{path}"]
        assert layer["layers"] == len(WAN_LORA_LAYERS) and layer["worst_cos"] > 0.9999, layer
        assert 0.9999 < layer["min_mag"] <= layer["max_mag"] < 1.0001, layer


@pytest.mark.full
def test_wan_at_1_3b_block_width_auto_decides_the_route_this_cpu_allows():
    """The synthetic Wan 2.1 at 1.3B's block width (dim 1536, ffn 8960; 2 blocks), KSampler on the FP and the
    quantized MODEL (compute auto) alternated in one ComfyUI process (``speed_probe.py wan``, what ``python -m
    bench.host_speed --model wan`` prints with its time ratio); 128 px, 9 frames (192 tokens), 2 steps. Asserted: what
    ``auto`` decided on this CPU and the output near FP (``test_host_speed.check_routes``)."""
    import argparse

    from bench.host_speed import table
    from comfy_host import REPO, run_probe, synth_name
    from test_host_speed import check_routes

    model = build_model("wan21_1_3b_width", synth_name("wan21_1_3b_width"))
    f = run_probe("speed_probe.py", "wan", model, REPO, "auto", 128, 9, 2, 2, timeout=1800)
    print("\n" + table(f, argparse.Namespace(model="wan", size=128, frames=9, steps=2, ade=None, compute="auto")))
    check_routes(f, 0.1)


@pytest.mark.full
def test_wan_error_by_layer_group_tool_runs_every_variant_and_group():
    """``python -m tools.wan_groups`` (``wan_groups_probe.py``) at 2 steps, one seed: every method variant and every
    group alone samples finite and near FP from one calibration, the table names each, the time path kept float
    leaves its 3 layers out, and the groups alone add up to the whole quantized model."""
    import argparse

    from comfy_host import REPO, run_probe
    from tools.wan_groups import render
    from wan_groups_probe import GROUPS, VARIANTS

    f = run_probe("wan_groups_probe.py", "wan", build_model("wan21", WAN_NAME), REPO, 2, 64, 9, 1, timeout=1800)
    table = render(f, "synthetic Wan", "this machine")
    print("\n" + table)
    assert list(f["variants"]) == [label for label, _ in VARIANTS] and list(f["alone"]) == list(GROUPS)
    for row in (*f["variants"].values(), *f["alone"].values()):
        assert all(0 < e < BOUND for e in row["calibrated"] + row["other_prompt"]), row
        assert row["w8a8_layers"] > 0
    qvd, float_time = (f["variants"][label] for label, _ in VARIANTS[:3:2])
    assert qvd["w8a8_layers"] - float_time["w8a8_layers"] == 3  # time MLP x 2, time_projection
    assert sum(v["w8a8_layers"] for v in f["alone"].values()) == qvd["w8a8_layers"]
    assert all(label in table for label in (*f["variants"], *f["alone"]))
