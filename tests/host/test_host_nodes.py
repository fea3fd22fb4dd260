"""The QVD nodes inside a real ComfyUI server (0.3.75, 0.33), driven over its HTTP API like the frontend does."""
from __future__ import annotations

import copy
import json
import re
import time

import pytest
import torch

import file_mutations as fm
from comfy_host import CKPT_NAME, WORKFLOWS, load_and_sample, load_api, read_latent, tiny, with_latent_output, without
from qvd.io import KEY

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
QVD_INPUTS = {
    "QVDCalibrate": {"model", "positive", "negative", "latent_image", "seed", "steps", "cfg", "sampler_name",
                     "scheduler", "calibration_seeds", "save_name", "timestep_coverage"},
    "QVDQuantizeModel": {"model", "calibration", "weight_bits", "activation_bits", "htdq", "scri", "skip", "compute"},
    "QVDSaveQuantized": {"model", "filename"},
    "QVDLoadQuantized": {"model", "qvd_name", "compute"},
    "QVDQuantizeControlNet": {"control_net", "calibration", "weight_bits", "activation_bits", "htdq", "scri", "skip",
                              "compute"},
    "QVDSaveQuantizedControlNet": {"control_net", "filename"},
    "QVDLoadQuantizedControlNet": {"control_net", "qvd_name", "compute"},
}

def ui_to_api(ui: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow to the API format with the server's node definitions (as the
    frontend's graphToPrompt does for plain widgets and links)."""
    links = {l[0]: l for l in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        info = object_info[node["type"]]["input"]
        inputs = {i["name"]: [str(links[i["link"]][1]), links[i["link"]][2]]
                  for i in node["inputs"] if i["link"] is not None}
        values = list(node["widgets_values"])
        for section in ("required", "optional"):
            for name, spec in info.get(section, {}).items():
                if name in inputs or not (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES):
                    continue
                inputs[name] = values.pop(0)
                if len(spec) > 1 and spec[1].get("control_after_generate"):
                    values.pop(0)
                if len(spec) > 1 and any("upload" in k for k in spec[1]) and values and values[0] == "image":
                    values.pop(0)  # the frontend's upload button widget (LoadImage, LoadVideo) after the file combo
        assert not values, f"node {node['id']} ({node['type']}) has unused widget values {values}"
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get("/object_info")


def test_object_info_lists_every_qvd_node_with_its_inputs(object_info):
    for name, expected in QVD_INPUTS.items():
        info = object_info[name]
        assert info["category"] == "QVD"
        declared = set(info["input"]["required"]) | set(info["input"].get("optional", {}))
        assert declared == expected, name
    assert object_info["QVDCalibrate"]["output"] == ["QVD_CALIBRATION"]
    assert object_info["QVDQuantizeModel"]["input"]["required"]["calibration"][0] == "QVD_CALIBRATION"
    assert object_info["QVDCalibrate"]["output_node"] and object_info["QVDSaveQuantized"]["output_node"]


@pytest.mark.parametrize("name", sorted(p.stem for p in WORKFLOWS.glob("*.json")))
def test_ui_workflow_matches_its_api_twin(object_info, name):
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    missing = sorted({n["type"] for n in ui["nodes"]} - set(object_info))
    if missing:
        assert all(t.startswith("ADE_") for t in missing), missing
        pytest.skip(f"AnimateDiff-Evolved is not installed in this ComfyUI (missing {missing})")
    assert ui_to_api(ui, object_info) == load_api(name)


@pytest.fixture(scope="module")
def core_runs(comfy_server):
    """Workflow (c) at TINY size: FP, quantized (+ save), FP again, and loaded from the saved file."""
    wf = tiny(load_api("qvd_core_txt2vid_calibrate_quantize"))
    wf["12"]["inputs"]["filename"] = "core_w8a8"
    wf["10"]["inputs"]["seed"] = wf["20"]["inputs"]["seed"]  # calibrate on the trajectory that is sampled
    fp_prompt = with_latent_output(without(copy.deepcopy(wf), "10", "11", "12"), "20", "fp")
    fp_prompt["20"]["inputs"]["model"] = ["1", 0]
    latents = {"fp": read_latent(comfy_server, comfy_server.run(fp_prompt), "save_fp")}
    entry = comfy_server.run(with_latent_output(copy.deepcopy(wf), "20", "quantized"))
    latents["quantized"] = read_latent(comfy_server, entry, "save_quantized")
    latents["report"] = entry["outputs"]["11"]["text"][0]
    latents["fp_again"] = read_latent(comfy_server, comfy_server.run(fp_prompt), "save_fp")
    entry = comfy_server.run(load_and_sample("core_w8a8.safetensors", "loaded"))
    latents["loaded"] = read_latent(comfy_server, entry, "save_loaded")
    return latents


@pytest.mark.slow
def test_quantized_workflow_runs_the_route_auto_picks_here_and_stays_close_to_fp(core_runs):
    """The workflow's compute ``auto``: on a CPU without VNNI weight-only (int8 weights, float activations), with VNNI
    the int8 kernels where they time faster (measured 0.094 from FP with every layer W8A8); the report says which, as
    ``qvd.kernels`` decides on this CPU. This graph's W8A8 route, forced, is asserted in test_host_compute."""
    from qvd import kernels

    fp, q = core_runs["fp"], core_runs["quantized"]
    assert torch.isfinite(q).all()
    rel = float((q - fp).norm() / fp.norm())
    assert 0 < rel < 0.2, rel  # > 0: the int8 weights were used
    skips = kernels.auto_skips_int8(torch.device("cpu"))
    want = f"compute: auto on cpu: weight-only ({skips})" if skips else "compute: auto on cpu: int8 kernels where"
    assert want in core_runs["report"], core_runs["report"]


@pytest.mark.slow
def test_sd15_roles_found_by_calibration_are_those_its_names_gave(core_runs, comfy_server):
    """ComfyUI's SD1.5 UNet, no layer name in QVD's config: the time embedding and every ResBlock's emb_layers are
    temporal, input_blocks.0.0 / out.2 first / last (float), the cross-attention keys / values the conditioning path
    (what the SD1.5 name lists gave before roles were observed)."""
    from safetensors import safe_open
    with safe_open(str(comfy_server.base / "models" / "qvd" / "core_w8a8.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()[KEY])
    report = {r["name"]: r for r in meta["report"]}
    temporal = {n for n, r in report.items() if r["kind"] == "temporal"}
    assert temporal == {n for n in report if re.search(r"\.(time_embed\.[02]|emb_layers\.1)$", n)}, temporal
    assert len(temporal) > 2 and all("observed" in report[n]["role"] for n in temporal)
    assert meta["calibrated"]["roles"] == {"first": ["diffusion_model.input_blocks.0.0"],
                                           "last": ["diffusion_model.out.2"]}
    assert all(report[n]["handler"] == "float" for n in ("diffusion_model.input_blocks.0.0", "diffusion_model.out.2"))
    cond = {n for n, r in report.items() if r.get("conditioning")}
    assert cond == {n for n in report if re.search(r"attn2\.to_[kv]$", n)} and cond


@pytest.mark.slow
def test_input_model_is_untouched_by_quantization(core_runs):
    assert torch.equal(core_runs["fp_again"], core_runs["fp"])


@pytest.mark.slow
def test_save_then_load_reproduces_the_quantized_output(core_runs, comfy_server):
    assert (comfy_server.base / "models" / "qvd" / "core_w8a8.safetensors").is_file()
    assert torch.equal(core_runs["loaded"], core_runs["quantized"])


@pytest.mark.slow
def test_saving_never_overwrites_a_file(core_runs, comfy_server):
    (comfy_server.base / "models" / "qvd" / "taken.calibration.safetensors").write_bytes(b"keep me")
    calibrate = tiny(load_api("qvd_core_txt2vid_calibrate_quantize"))
    calibrate["10"]["inputs"]["save_name"] = "taken"
    err = comfy_server.run_failing(without(calibrate, "11", "12", "20", "21", "22"))
    assert err["node_type"] == "QVDCalibrate" and "taken.calibration.safetensors" in err["exception_message"]
    assert "already exists" in err["exception_message"]
    resave = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT_NAME}},
              "13": {"class_type": "QVDLoadQuantized", "inputs": {"model": ["1", 0], "qvd_name": "core_w8a8.safetensors"}},
              "30": {"class_type": "QVDSaveQuantized", "inputs": {"model": ["13", 0], "filename": "core_w8a8"}}}
    err = comfy_server.run_failing(resave)
    assert err["node_type"] == "QVDSaveQuantized" and "core_w8a8.safetensors already exists" in err["exception_message"]
    assert (comfy_server.base / "models" / "qvd" / "taken.calibration.safetensors").read_bytes() == b"keep me"


@pytest.mark.slow
def test_load_rejects_a_corrupt_or_truncated_file(core_runs, comfy_server):
    folder = comfy_server.base / "models" / "qvd"
    good = (folder / "core_w8a8.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (folder / "garbage.safetensors").write_bytes(b"\x00" * 64)
    for name in ("truncated.safetensors", "garbage.safetensors"):
        prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT_NAME}},
                  "13": {"class_type": "QVDLoadQuantized", "inputs": {"model": ["1", 0], "qvd_name": name}},
                  "30": {"class_type": "QVDSaveQuantized", "inputs": {"model": ["13", 0], "filename": "never"}}}
        err = comfy_server.run_failing(prompt)
        assert err["node_type"] == "QVDLoadQuantized", err
        assert name in err["exception_message"], err["exception_message"]


@pytest.mark.slow
def test_damaged_files_give_a_node_error_and_the_server_stays_up(core_runs, comfy_server):
    """Found by the mutation runs (issues 13, 30): a file whose conv stride was 0 loaded, then the server died with
    SIGFPE in KSampler; a zero point edited in place sampled 8 % away; a re-signed code edit loaded; a report
    field of the wrong type crashed the node; two norms of one block swapped loaded (issue 42: refused by the first
    model call, before any output). All are refused by name now."""
    folder = comfy_server.base / "models" / "qvd"
    good = folder / "core_w8a8.safetensors"

    def stride0(meta):
        meta["layers"][next(n for n, i in sorted(meta["layers"].items()) if i["kind"] == "conv")]["stride"] = 0
    fm.resign(good, folder / "stride0.safetensors", KEY, edit_meta=stride0)
    raw = good.read_bytes()
    digit = re.search(rb'zero_point\\": \[-?(\d)', raw)
    (folder / "zeropoint.safetensors").write_bytes(
        raw[:digit.start(1)] + str((int(digit[1]) + 1) % 10).encode() + raw[digit.end(1):])

    def one_code(tensors):  # re-signed: one int8 code of a conv moved well off its rounding
        key = next(k for k in sorted(tensors) if k.endswith(".weight") and tensors[k].dim() == 4
                   and tensors[k].dtype == torch.int8)
        flat = tensors[key].reshape(-1)
        flat[0] += 9 if int(flat[0]) < 0 else -9
    fm.resign(good, folder / "onecode.safetensors", KEY, edit_tensors=one_code)

    def report_text(meta):  # a report field of the wrong type crashed the node's summary (a raw TypeError)
        meta["report"][0]["out_rel_err"] = "0.1"
    fm.resign(good, folder / "report.safetensors", KEY, edit_meta=report_text)
    for name, why in (("stride0.safetensors", "stride is 0"), ("zeropoint.safetensors", "checksum"),
                      ("onecode.safetensors", "values of the int8 codes (weight) differ from this model's"),
                      ("report.safetensors", "out_rel_err is '0.1', expected a finite number")):
        err = comfy_server.run_failing(load_and_sample(name, "damaged"))
        assert err["node_type"] == "QVDLoadQuantized", err
        assert name in err["exception_message"] and why in err["exception_message"], err["exception_message"]
    swapped, layer = _norms_swapped(comfy_server, good)
    err = comfy_server.run_failing(load_and_sample(swapped.name, "swapped"))
    assert err["node_type"] == "KSampler" and err["exception_type"].endswith("ModelMismatchError"), err
    assert (swapped.name in err["exception_message"] and f"layer {layer}: the file folds its SCRI into norm"
            in err["exception_message"] and "reads the output of" in err["exception_message"]), err["exception_message"]
    err = comfy_server.run_failing(load_and_sample(swapped.name, "swapped_again"))  # the cached MODEL stays refused
    assert err["node_type"] == "KSampler" and "reads the output of" in err["exception_message"], err
    entry = comfy_server.run(load_and_sample("core_w8a8.safetensors", "after_damaged"))
    assert torch.equal(read_latent(comfy_server, entry, "save_after_damaged"), core_runs["loaded"])


def _norms_swapped(comfy_server, good):
    """``good`` re-signed with cross-attention's q and the feed-forward of one transformer block naming each other's
    norm, each folded affine recomputed from the checkpoint (every value agrees with the model): (file, layer)."""
    from safetensors import safe_open

    tensors, meta = fm.read(good, KEY)
    tensors, meta = {k: v.clone() for k, v in tensors.items()}, copy.deepcopy(meta)
    block = next(n.rpartition(".attn2.to_q")[0] for n, i in sorted(meta["layers"].items())
                 if n.endswith(".attn2.to_q") and i.get("scri", "").startswith("norm:")
                 and meta["layers"].get(n.replace("attn2.to_q", "ff.net.0.proj"), {}).get("scri", "").startswith("norm:"))
    with safe_open(str(comfy_server.base / "models" / "checkpoints" / CKPT_NAME), "pt") as ckpt:
        fm.swap_folds(lambda norm: (ckpt.get_tensor(f"model.{norm}.weight"), ckpt.get_tensor(f"model.{norm}.bias")),
                      f"{block}.attn2.to_q", f"{block}.ff.net.0.proj")(meta, tensors)
    path = good.with_name("swapped.safetensors")
    fm.write_text(path, tensors, KEY, json.dumps(meta))
    return path, f"{block}.attn2.to_q"


def test_quantize_without_calibration_is_rejected(comfy_server):
    prompt = tiny(load_api("qvd_core_txt2vid_calibrate_quantize"))
    del prompt["11"]["inputs"]["calibration"]
    with pytest.raises(AssertionError, match="calibration"):
        comfy_server.queue(without(prompt, "10"))


@pytest.mark.slow
def test_load_rejects_a_file_made_from_another_model(comfy_server):
    from qvd import Calibrator, QVDConfig, quantize_model, save_quantized

    other = torch.nn.ModuleDict({"diffusion_model": torch.nn.Sequential(  # first and last stay float: 3 layers
        torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))})
    with Calibrator(other, QVDConfig()) as cal:
        other["diffusion_model"](torch.randn(32, 8))
    result = quantize_model(other, cal.result(), QVDConfig(), apply=False)
    save_quantized(str(comfy_server.base / "models" / "qvd" / "other_model.safetensors"), result)
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT_NAME}},
              "13": {"class_type": "QVDLoadQuantized", "inputs": {"model": ["1", 0], "qvd_name": "other_model.safetensors"}},
              "30": {"class_type": "QVDSaveQuantized", "inputs": {"model": ["13", 0], "filename": "never"}}}
    err = comfy_server.run_failing(prompt)
    assert err["node_type"] == "QVDLoadQuantized" and err["exception_type"].endswith("ModelMismatchError"), err
    assert "different model" in err["exception_message"]


@pytest.mark.slow
def test_cancelled_calibration_leaves_the_model_untouched(comfy_server):
    wf = tiny(load_api("qvd_core_txt2vid_calibrate_quantize"))
    fp_prompt = with_latent_output(without(copy.deepcopy(wf), "10", "11", "12"), "20", "fp_cancel")
    fp_prompt["20"]["inputs"]["model"] = ["1", 0]
    before = read_latent(comfy_server, comfy_server.run(fp_prompt), "save_fp_cancel")
    # Interrupted on an event: the moment QVD Calibrate logs that its sampling starts (ComfyUI checks the flag at every
    # sampler step, so a flag set before the first step counts too), with 20 steps and the coverage calls still ahead.
    calibrate = without(tiny(wf, steps=20), "11", "12", "20", "21", "22")
    log_start = len(comfy_server.log_path.read_bytes())
    prompt_id = comfy_server.queue(calibrate)
    deadline = time.monotonic() + 300
    while b"QVD Calibrate: sampling seed" not in comfy_server.log_path.read_bytes()[log_start:]:
        assert time.monotonic() < deadline, "calibration never started"
        time.sleep(0.02)
    comfy_server.post("/interrupt", {})
    entry = comfy_server.wait(prompt_id)
    kinds = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds and "10" not in entry["outputs"], kinds
    after = read_latent(comfy_server, comfy_server.run(fp_prompt), "save_fp_cancel")
    assert torch.equal(after, before)  # the observers are gone: the shared UNet computes exactly as before
