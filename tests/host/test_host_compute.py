"""The compute routes inside a real ComfyUI server (0.3.75, 0.33): a server whose integer kernels are declared
unavailable (``QVD_INT8=off``: what an Apple MPS, ROCm or Intel XPU machine sees) quantizes, loads and samples on the
weight-only route, says so, and refuses ``compute: int8`` by name; on the default server the ``compute`` option of
QVD Load Quantized picks the route (int8 and weight-only give different latents, both near FP)."""
from __future__ import annotations

import copy
import shutil

import pytest
import torch

from comfy_host import ComfyServer, load_and_sample, load_api, make_base_dir, read_latent, tiny, with_latent_output, without

pytestmark = pytest.mark.full  # a server of its own (QVD_INT8=off) and 3 calibrations: ~2.5 min


def _report(entry: dict, node_id: str) -> str:
    return "\n".join(entry["outputs"][node_id]["text"])


def _fp_and_quantized(server, name: str) -> dict:
    """Workflow (c) at TINY size: the FP latent, the quantized one (saved as ``name``) and its report."""
    wf = tiny(load_api("qvd_core_txt2vid_calibrate_quantize"))
    wf["12"]["inputs"]["filename"] = name
    wf["10"]["inputs"]["seed"] = wf["20"]["inputs"]["seed"]
    fp_prompt = with_latent_output(without(copy.deepcopy(wf), "10", "11", "12"), "20", "fp")
    fp_prompt["20"]["inputs"]["model"] = ["1", 0]
    fp = read_latent(server, server.run(fp_prompt), "save_fp")
    entry = server.run(with_latent_output(wf, "20", "quantized"))
    return {"fp": fp, "quantized": read_latent(server, entry, "save_quantized"), "report": _report(entry, "11")}


@pytest.fixture(scope="module")
def no_int8_server(tmp_path_factory, sd15_checkpoint):
    base = make_base_dir(tmp_path_factory.mktemp("comfy_no_int8"), sd15_checkpoint)
    server = ComfyServer(base, env={"QVD_INT8": "off"})
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base / "temp", ignore_errors=True)


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.slow
def test_without_int8_kernels_the_graph_samples_weight_only(no_int8_server):
    runs = _fp_and_quantized(no_int8_server, "no_int8")
    assert "compute: weight-only" in runs["report"] and "QVD_INT8=off" in runs["report"], runs["report"]
    assert torch.isfinite(runs["quantized"]).all()
    # weight rounding alone: nearer FP than W8A8's 0.094 on this graph (test_host_nodes), and not FP itself
    assert 0 < _rel(runs["quantized"], runs["fp"]) < 0.05
    entry = no_int8_server.run(load_and_sample("no_int8.safetensors", "loaded"))
    assert torch.equal(read_latent(no_int8_server, entry, "save_loaded"), runs["quantized"])
    assert "compute: weight-only" in _report(entry, "13")


@pytest.mark.slow
def test_without_int8_kernels_compute_int8_is_refused_by_name(no_int8_server):
    prompt = load_and_sample("no_int8.safetensors", "refused")
    prompt["13"]["inputs"]["compute"] = "int8"
    err = no_int8_server.run_failing(prompt)
    assert err["node_type"] == "QVDLoadQuantized", err
    assert "QVD_INT8=off" in err["exception_message"] and "'weight-only'" in err["exception_message"], err
    entry = no_int8_server.run(load_and_sample("no_int8.safetensors", "after_refused"))  # the server is still fine
    assert torch.isfinite(read_latent(no_int8_server, entry, "save_after_refused")).all()


@pytest.mark.slow
def test_compute_option_picks_the_route(comfy_server):
    runs = _fp_and_quantized(comfy_server, "compute_routes")
    latents = {}
    for compute in ("int8", "weight-only"):
        prompt = load_and_sample("compute_routes.safetensors", compute)
        prompt["13"]["inputs"]["compute"] = compute
        entry = comfy_server.run(prompt)
        latents[compute] = read_latent(comfy_server, entry, f"save_{compute}")
        assert f"compute: {compute} on cpu" in _report(entry, "13")
    assert not torch.equal(latents["int8"], latents["weight-only"])
    assert _rel(latents["weight-only"], runs["fp"]) < _rel(latents["int8"], runs["fp"]) < 0.2
