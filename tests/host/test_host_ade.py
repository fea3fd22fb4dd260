"""Workflow (a): AnimateDiff-Evolved txt2vid with QVD Calibrate -> Quantize -> KSampler, in ComfyUI with its default
cache (node outputs and loaded models kept across prompts, as artists run it).

Needs ComfyUI-AnimateDiff-Evolved: $ADE_PATH, ComfyUI's custom_nodes, or .cache/ComfyUI-AnimateDiff-Evolved.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch

from comfy_host import (MOTION_NAME, TINY, ComfyServer, ade_path, build_model, execution_error, load_api, make_base_dir,
                        read_latent, tiny, with_latent_output, without)
from synthetic_models import write_lora

LCM_LORA = "lcm_lora_stand_in.safetensors"  # a seeded rank-4 LoRA in the place of AnimateLCM's LoRA

pytestmark = [pytest.mark.slow, pytest.mark.ade, pytest.mark.full]


@pytest.fixture(scope="module")
def ade_server(tmp_path_factory, sd15_checkpoint):
    ade = ade_path()
    if ade is None:
        pytest.skip("ComfyUI-AnimateDiff-Evolved not found: set ADE_PATH or check it out under "
                    ".cache/ComfyUI-AnimateDiff-Evolved")
    motion = build_model("motion", MOTION_NAME)
    base = make_base_dir(tmp_path_factory.mktemp("comfy_ade"), sd15_checkpoint, motion, ade)
    (base / "models" / "loras").mkdir(parents=True)
    write_lora(sd15_checkpoint, base / "models" / "loras" / LCM_LORA)
    server = ComfyServer(base)  # ComfyUI's default cache: a quantized MODEL stays loaded (and injected) across prompts
    try:
        yield server
    finally:
        server.stop()


def test_ade_workflow_quantizes_unet_and_motion_model(ade_server):
    # Motion modules of the first down / last up block and the middle block are quantized, the rest skipped.
    skip = TINY["skip"] + ", down_blocks.[1-3].*, up_blocks.[0-2].*"
    wf = tiny(load_api("qvd_ade_txt2vid_calibrate_quantize"), model_name=MOTION_NAME, skip=skip)
    wf["12"]["inputs"]["filename"] = "ade_w8a8"
    wf["10"]["inputs"]["seed"] = wf["20"]["inputs"]["seed"]
    fp_prompt = with_latent_output(without(copy.deepcopy(wf), "10", "11", "12"), "20", "fp")
    fp_prompt["20"]["inputs"]["model"] = ["7", 0]
    fp = read_latent(ade_server, ade_server.run(fp_prompt), "save_fp")
    entry = ade_server.run(with_latent_output(wf, "20", "q"))
    q = read_latent(ade_server, entry, "save_q")
    report = entry["outputs"]["11"]["text"][0]
    assert "motion linear" in report and "unet conv" in report, report
    rel = float((q - fp).norm() / fp.norm())
    assert 0 < rel < 0.2, rel
    assert torch.isfinite(q).all()
    loaded = load_api("qvd_ade_txt2vid_load_quantized")
    loaded = tiny(loaded, model_name=MOTION_NAME, qvd_name="ade_w8a8.safetensors")
    entry = ade_server.run(with_latent_output(loaded, "20", "loaded"))
    assert torch.equal(read_latent(ade_server, entry, "save_loaded"), q)
    for text in (report, entry["outputs"]["13"]["text"][0]):  # what the calibration covered, as the file says
        m = re.search(r"calibrated at (\d+) timestep\(s\), t = ([\d.]+) \.\. ([\d.]+), on \d+ layers", text)
        assert m and int(m[1]) > 1 and float(m[2]) > 900 and float(m[3]) < 100, text  # 1 sampled + coverage
        assert re.search(rf"sampled with sampler euler, scheduler normal, steps 1, cfg [\d.]+, seeds 1, latent "
                         rf"2 x 4 x 8 x 8; {int(m[1]) - 1} of the timesteps added to cover the noise schedule",
                         text), text
        assert "weights quantized from F32" in text, text


def test_calibration_of_the_ade_model_does_not_fit_the_plain_model(ade_server):
    wf = tiny(load_api("qvd_ade_txt2vid_calibrate_quantize"), model_name=MOTION_NAME)
    wf["11"]["inputs"]["model"] = ["1", 0]  # quantize the checkpoint's MODEL with the ADE model's calibration
    entry = ade_server.wait(ade_server.queue(without(wf, "12", "20", "21", "22") | {
        "30": {"class_type": "QVDSaveQuantized", "inputs": {"model": ["11", 0], "filename": "never"}}}))
    err = execution_error(entry)
    assert err["node_type"] == "QVDQuantizeModel" and "different model" in err["exception_message"], err


def _ade_with(server, prefix: str, frames: int, extra: dict, use: dict) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(the FP prompt, its latent, the W8A8 latent) of the ADE graph with ``extra`` nodes and ``use`` set on ADE's Use
    Evolved Sampling, quantized as in ``test_ade_workflow_quantizes_unet_and_motion_model``; asserts that the saved
    file, loaded by QVD Load Quantized into the same graph, samples the same latent."""
    skip = TINY["skip"] + ", down_blocks.[1-3].*, up_blocks.[0-2].*"
    wf = tiny(load_api("qvd_ade_txt2vid_calibrate_quantize"), model_name=MOTION_NAME, skip=skip, batch_size=frames)
    loaded = tiny(load_api("qvd_ade_txt2vid_load_quantized"), model_name=MOTION_NAME, batch_size=frames,
                  qvd_name=f"{prefix}.safetensors")
    for prompt in (wf, loaded):
        prompt.update(copy.deepcopy(extra))
        prompt["7"]["inputs"].update(use)
    wf["12"]["inputs"]["filename"] = prefix
    wf["10"]["inputs"]["seed"] = wf["20"]["inputs"]["seed"]
    fp_prompt = with_latent_output(without(copy.deepcopy(wf), "10", "11", "12"), "20", f"{prefix}_fp")
    fp_prompt["20"]["inputs"]["model"] = ["7", 0]
    fp = read_latent(server, server.run(fp_prompt), f"save_{prefix}_fp")
    q = read_latent(server, server.run(with_latent_output(wf, "20", f"{prefix}_q")), f"save_{prefix}_q")
    entry = server.run(with_latent_output(loaded, "20", f"{prefix}_loaded"))
    assert torch.equal(read_latent(server, entry, f"save_{prefix}_loaded"), q)
    return fp_prompt, fp, q


def test_context_windows_over_24_frames(ade_server):
    """ADE's context options (Standard Uniform, windows of 16 frames with overlap 4) over 24 frames: calibrated and
    sampled through the windows, the quantized output stays within the synthetic model's usual error of FP, and the
    saved file loads to the same output (issue 28)."""
    options = {"8": {"class_type": "ADE_StandardUniformContextOptions",
                     "inputs": {"context_length": 16, "context_stride": 1, "context_overlap": 4}}}
    _, fp, q = _ade_with(ade_server, "ade_context", 24, options, {"context_options": ["8", 0]})
    assert fp.shape[0] == 24 and torch.isfinite(q).all()
    assert "Sliding context window sampling activated" in ade_server.log()
    rel = float((q - fp).norm() / fp.norm())
    print(f"\ncontext windows, 24 frames: W8A8 vs FP {rel:.4f}")
    assert 0 < rel < 0.2, rel


def test_freeinit_iterations(ade_server):
    """ADE's FreeInit (2 iterations, gaussian filter) through its sample settings: every iteration samples the
    quantized MODEL (calibrated the same way), within the usual error of FP; the file loads to the same output."""
    settings = {
        "8": {"class_type": "ADE_IterationOptsFreeInit",
              "inputs": {"iterations": 2, "filter": "gaussian", "d_s": 0.25, "d_t": 0.25, "n_butterworth": 4,
                         "sigma_step": 999, "apply_to_1st_iter": False, "init_type": "FreeInit [sampler sigma]"}},
        "9": {"class_type": "ADE_AnimateDiffSamplingSettings",
              "inputs": {"batch_offset": 0, "noise_type": "default", "seed_gen": "comfy", "seed_offset": 0,
                         "iteration_opts": ["8", 0]}}}
    fp_prompt, fp, q = _ade_with(ade_server, "ade_freeinit", 8, settings, {"sample_settings": ["9", 0]})
    plain = copy.deepcopy(fp_prompt)
    del plain["7"]["inputs"]["sample_settings"]
    plain = with_latent_output(without(plain, "8", "9", "save_ade_freeinit_fp"), "20", "fi_plain")
    assert not torch.equal(read_latent(ade_server, ade_server.run(plain), "save_fi_plain"), fp)  # FreeInit acted
    rel = float((q - fp).norm() / fp.norm())
    print(f"\nFreeInit, 2 iterations: W8A8 vs FP {rel:.4f}")
    assert torch.isfinite(q).all() and 0 < rel < 0.2, rel


def test_animatelcm_lcm_sampler_and_lcm_lora(ade_server):
    """AnimateLCM as artists run it (issue 28): ADE with an LCM beta schedule, the LCM sampler (sgm_uniform, 4 steps,
    CFG 1.5) and an LCM LoRA on the UNet (here a seeded rank-4 LoRA at strength 1). Calibrated and quantized with the
    LoRA in the graph, and from a file quantized without it then loaded under it (the LoRA before QVD Load Quantized
    stays a LoRA): each within the synthetic model's usual error of FP, and the LoRA's effect on the quantized model
    follows its effect on FP."""
    skip = TINY["skip"] + ", down_blocks.[1-3].*, up_blocks.[0-2].*"
    lcm = {"sampler_name": "lcm", "scheduler": "sgm_uniform", "cfg": 1.5, "steps": 4}
    lora = {"40": {"class_type": "LoraLoaderModelOnly",
                   "inputs": {"model": ["1", 0], "lora_name": LCM_LORA, "strength_model": 1.0}}}

    def graph(name: str, with_lora: bool, **over) -> dict:
        wf = tiny(load_api(name), model_name=MOTION_NAME, skip=skip, **over)
        for nid in ("10", "20"):
            if nid in wf:
                wf[nid]["inputs"].update(lcm)
        wf["7"]["inputs"]["beta_schedule"] = "lcm avg(sqrt_linear,linear)"
        if with_lora:
            wf.update(copy.deepcopy(lora))
            wf["7"]["inputs"]["model"] = ["40", 0]
        if "10" in wf:
            wf["10"]["inputs"]["seed"] = wf["20"]["inputs"]["seed"]
        return wf

    def run(prompt: dict, tag: str) -> torch.Tensor:
        return read_latent(ade_server, ade_server.run(with_latent_output(prompt, "20", tag)), f"save_{tag}")

    out = {}
    for tag, with_lora in (("lcm_fp", False), ("lcm_fp_lora", True)):
        fp = without(graph("qvd_ade_txt2vid_calibrate_quantize", with_lora), "10", "11", "12")
        fp["20"]["inputs"]["model"] = ["7", 0]
        out[tag] = run(fp, tag)
    out["lcm_q_lora"] = run(without(graph("qvd_ade_txt2vid_calibrate_quantize", True), "12"), "lcm_q_lora")
    plain = graph("qvd_ade_txt2vid_calibrate_quantize", False)
    plain["12"]["inputs"]["filename"] = "lcm_w8a8"
    out["lcm_q"] = run(plain, "lcm_q")
    out["lcm_loaded_lora"] = run(graph("qvd_ade_txt2vid_load_quantized", True, qvd_name="lcm_w8a8.safetensors"),
                                 "lcm_loaded_lora")
    rel = lambda a, b: float((out[a] - out[b]).norm() / out[b].norm())  # noqa: E731
    errors = {k: rel(k, ref) for k, ref in (("lcm_q", "lcm_fp"), ("lcm_q_lora", "lcm_fp_lora"),
                                            ("lcm_loaded_lora", "lcm_fp_lora"))}
    effect_fp, effect_q = out["lcm_fp_lora"] - out["lcm_fp"], out["lcm_loaded_lora"] - out["lcm_q"]
    cos = float(torch.nn.functional.cosine_similarity(effect_q.flatten(), effect_fp.flatten(), 0))
    size = float(effect_fp.norm() / out["lcm_fp"].norm())
    print(f"\nAnimateLCM: W8A8 vs FP {errors}; the LoRA moves FP by {size:.3f}, cosine of its effects {cos:.3f}")
    assert all(torch.isfinite(t).all() for t in out.values())
    assert all(0 < e < 0.2 for e in errors.values()), errors
    assert size > 0.05 and cos > 0.8, (size, cos)


def test_two_files_on_one_ade_model_in_one_graph_while_a_quantized_clone_stays_loaded(ade_server):
    """Under the default cache the quantized MODEL that sampled last stays loaded with ADE's motion modules injected
    into the shared UNet: QVD Load Quantized reads the ADE MODEL through that, and two files (quantized apart) loaded
    onto the same ADE MODEL in one graph each sample what they sampled alone."""
    skip = TINY["skip"] + ", down_blocks.[1-3].*, up_blocks.[0-2].*"
    alone = {}
    for tag, extra in (("two_a", ""), ("two_b", ", middle_block.*, mid_block.*")):
        wf = tiny(load_api("qvd_ade_txt2vid_calibrate_quantize"), model_name=MOTION_NAME, skip=skip + extra)
        wf["12"]["inputs"]["filename"] = tag
        alone[tag] = read_latent(ade_server, ade_server.run(with_latent_output(wf, "20", tag)), f"save_{tag}")
    both = tiny(load_api("qvd_ade_txt2vid_load_quantized"), model_name=MOTION_NAME, qvd_name="two_a.safetensors")
    both["13b"] = {"class_type": "QVDLoadQuantized", "inputs": {"model": ["7", 0], "qvd_name": "two_b.safetensors"}}
    both["20b"] = copy.deepcopy(both["20"])
    both["20b"]["inputs"]["model"] = ["13b", 0]
    both = with_latent_output(with_latent_output(both, "20", "both_a"), "20b", "both_b")
    entry = ade_server.run(both)
    got = {tag: read_latent(ade_server, entry, f"save_both_{tag[-1]}") for tag in alone}
    assert all(torch.equal(got[t], alone[t]) for t in alone), {t: float((got[t] - alone[t]).norm()) for t in alone}
