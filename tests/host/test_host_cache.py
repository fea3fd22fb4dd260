"""The QVD nodes in one ComfyUI server with its default settings, as artists run it: node outputs cached across
prompts, and graphs with and without LoRAs, quantized and full precision, interleaved.

ComfyUI leaves the shared UNet modules as the MODEL loaded last left them (its LoRA baked in, its quantized
layers installed). Each sequence here failed before every QVD node made its own MODEL current (issue 12):
a second load refused as "already quantized", a quantization of 0 layers, a good file refused as "made
from a different checkpoint", and a LoRA baked into a plain file.
"""
from __future__ import annotations

import copy
import shutil

import pytest
import torch

import file_mutations as fm
from comfy_host import (ComfyServer, load_and_sample, load_api, make_base_dir, read_latent, tiny, with_latent_output,
                        without)
from qvd.io import KEY
from synthetic_models import LORA_NAME, write_lora

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory, sd15_checkpoint):
    base = make_base_dir(tmp_path_factory.mktemp("comfy_cached"), sd15_checkpoint)
    (base / "models" / "loras").mkdir()
    write_lora(sd15_checkpoint, base / "models" / "loras" / LORA_NAME)
    s = ComfyServer(base)  # default caching
    try:
        yield s
    finally:
        s.stop()


def _workflow() -> dict:
    wf = tiny(load_api("qvd_core_txt2vid_calibrate_quantize"))
    wf["10"]["inputs"]["seed"] = wf["20"]["inputs"]["seed"]
    return wf


def _quantize_and_save(filename: str) -> dict:
    prompt = without(_workflow(), "20", "21", "22")
    prompt["12"]["inputs"]["filename"] = filename
    return prompt


def _lora(model: list) -> dict:
    return {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": LORA_NAME,
                                                             "strength_model": 1.0}}


def _sample(model: list, prefix: str, extra: dict | None = None) -> dict:
    prompt = without(_workflow(), "10", "11", "12")
    prompt.update(copy.deepcopy(extra or {}))
    prompt["20"]["inputs"]["model"] = model
    return with_latent_output(prompt, "20", prefix)


def _file(server, name: str) -> tuple[dict, dict]:
    return fm.read(server.base / "models" / "qvd" / name, KEY)


def _same_file(a: tuple[dict, dict], b: tuple[dict, dict]) -> bool:
    (ta, ma), (tb, mb) = a, b
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta) and ma["layers"] == mb["layers"]


@pytest.fixture(scope="module")
def reference(server):
    """In the fresh server: the full-precision latent, a quantized file and the latent of sampling it loaded."""
    fp = read_latent(server, server.run(_sample(["1", 0], "fp_first")), "save_fp_first")
    server.run(_quantize_and_save("plain_a"))
    entry = server.run(load_and_sample("plain_a.safetensors", "ref"))
    return {"fp": fp, "file": _file(server, "plain_a.safetensors"), "latent": read_latent(server, entry, "save_ref")}


def test_a_second_load_after_sampling_a_loaded_model(server, reference):
    folder = server.base / "models" / "qvd"
    shutil.copy(folder / "plain_a.safetensors", folder / "plain_b.safetensors")
    entry = server.run(load_and_sample("plain_b.safetensors", "second"))
    assert torch.equal(read_latent(server, entry, "save_second"), reference["latent"])


def test_quantizing_right_after_a_quantized_model_sampled(server, reference):
    server.run(load_and_sample("plain_a.safetensors", "before_requantize"))
    server.run(_quantize_and_save("after_quantized"))
    saved = _file(server, "after_quantized.safetensors")
    assert len(saved[1]["layers"]) == len(reference["file"][1]["layers"]) > 0
    assert _same_file(saved, reference["file"])


def test_loading_after_the_plain_model_sampled_with_a_lora(server, reference):
    server.run(_sample(["30", 0], "fp_lora", {"30": _lora(["1", 0])}))
    entry = server.run(load_and_sample("plain_a.safetensors", "after_lora"))
    assert torch.equal(read_latent(server, entry, "save_after_lora"), reference["latent"])


def test_a_lora_branch_beside_a_quantize_branch_requeued_with_the_calibration_cached(server, reference):
    prompt = _quantize_and_save("branch_1")
    prompt.update(_sample(["30", 0], "branch_lora", {"30": _lora(["1", 0])}))
    server.run(prompt)
    prompt["12"]["inputs"]["filename"] = "branch_2"  # only the save re-runs; calibration comes from the cache
    server.run(prompt)
    for name in ("branch_1.safetensors", "branch_2.safetensors"):
        assert _same_file(_file(server, name), reference["file"]), f"{name} differs from the plain model's file"


def test_a_lora_before_the_load_rides_on_the_quantized_layers(server, reference):
    before = server.run(load_and_sample("plain_a.safetensors", "lora_first", model=["30", 0]) | {"30": _lora(["1", 0])})
    after = load_and_sample("plain_a.safetensors", "lora_after")
    after["30"] = _lora(["13", 0])
    after["20"]["inputs"]["model"] = ["30", 0]
    after = server.run(after)
    got, want = read_latent(server, before, "save_lora_first"), read_latent(server, after, "save_lora_after")
    assert torch.equal(got, want)
    assert float((got - reference["latent"]).norm() / reference["latent"].norm()) > 0.01  # the LoRA acts


def test_saving_a_quantized_model_after_its_lora_sampled(server, reference):
    prompt = load_and_sample("plain_a.safetensors", "q_lora")
    prompt["30"] = _lora(["13", 0])
    prompt["20"]["inputs"]["model"] = ["30", 0]
    server.run(prompt)
    resave = {"1": prompt["1"], "13": prompt["13"],
              "40": {"class_type": "QVDSaveQuantized", "inputs": {"model": ["13", 0], "filename": "resaved"}}}
    server.run(resave)
    assert _same_file(_file(server, "resaved.safetensors"), reference["file"])
    with_lora = {**resave, "30": _lora(["13", 0]),
                 "40": {"class_type": "QVDSaveQuantized", "inputs": {"model": ["30", 0], "filename": "never"}}}
    err = server.run_failing(with_lora)
    assert err["node_type"] == "QVDSaveQuantized" and "weight patches" in err["exception_message"], err
    assert not (server.base / "models" / "qvd" / "never.safetensors").exists()


@pytest.mark.parametrize("node", ["CheckpointSave", "ModelSave"])
def test_comfyui_save_nodes_refuse_a_quantized_model(server, reference, node):
    prompt = load_and_sample("plain_a.safetensors", "unused")
    inputs = {"model": ["13", 0], "filename_prefix": f"checkpoints/qvd_{node}"}
    if node == "CheckpointSave":
        inputs.update(clip=["1", 1], vae=["1", 2])
    save = {"1": prompt["1"], "13": prompt["13"], "40": {"class_type": node, "inputs": inputs}}
    err = server.run_failing(save)
    assert err["node_type"] == node and "QVD Save Quantized" in err["exception_message"], err
    assert not list((server.base / "output").glob("checkpoints/qvd_*"))


def test_calibrating_a_quantized_model_is_refused(server, reference):
    prompt = without(_workflow(), "11", "12", "20", "21", "22")
    prompt["13"] = load_and_sample("plain_a.safetensors", "unused")["13"]
    prompt["10"]["inputs"]["model"] = ["13", 0]
    err = server.run_failing(prompt)
    assert err["node_type"] == "QVDCalibrate" and "already quantized" in err["exception_message"], err

def test_full_precision_after_all_of_it_is_exact(server, reference):
    """Last: after quantized, LoRA and loaded models sampled in between, the plain MODEL samples as at first."""
    entry = server.run(_sample(["1", 0], "fp_last"))
    assert torch.equal(read_latent(server, entry, "save_fp_last"), reference["fp"])

