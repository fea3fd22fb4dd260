"""ComfyUI 0.33's dynamic-VRAM loader (``ModelPatcherDynamic``, the default on NVIDIA) running QVD's graphs in one
process, driven on a CPU by ``dynamic_probe.py`` (its device parts stood in; on 0.3.75 its call order replayed): the
shared backups it restores by key path never land in the wrong modules, the FP MODEL and ControlNet stay bit-identical
to the checkpoint, QVD's modules keep what quantization made, and every output equals its first run, through
Calibrate -> Quantize -> KSampler in one go, FP and quantized in turn, two quantized MODELs of one checkpoint, a
quantized ControlNet, ComfyUI's partial unload and eviction. A quantized MODEL larger than the memory given streams
the layers that do not fit."""
from __future__ import annotations

import pytest

from comfy_host import REPO, run_probe

pytestmark = pytest.mark.full  # ~5.5 min on 2 cores; on 0.3.75 a replay of 0.33's order, the real loader on 0.33


@pytest.fixture(scope="module")
def probe(sd15_checkpoint):
    return run_probe("dynamic_probe.py", sd15_checkpoint, REPO, timeout=1800)


def test_qvd_patchers_run_under_the_dynamic_loader(probe):
    assert probe["patcher"] in ("CPUDynamic", "Replay"), probe["patcher"]
    assert probe["patcher_quantized"] == "QVD" + probe["patcher"], probe


@pytest.mark.parametrize("what", ["fp_changed", "controlnet_changed", "qvd_changed", "outputs_differ"])
def test_every_graph_leaves_every_model_as_it_was(probe, what):
    steps = [c["step"] for c in probe["checks"]]
    assert len(steps) == 16, steps
    bad = {c["step"]: c[what] for c in probe["checks"] if c[what]}
    assert not bad, bad


def test_comfyuis_memory_freeing_reaches_every_model(probe):
    assert {"BaseModel", "ControlNet"} <= set(probe["loaded_before_freeing"]), probe
    assert all(v > 0 for v in probe["partially_unloaded"].values()), probe
    assert probe["after_unloading"] == {"backups": 0, "quantized_in_place": 0}, probe
    assert [c["quantized_in_place"] > 0 for c in probe["checks"][:3]] == [False, True, False], probe["checks"][:3]


def test_a_model_larger_than_the_memory_given_streams_what_does_not_fit(probe):
    s = probe["streaming"]
    assert 0 < s["resident_layers"] < s["layers"], s
    assert s["held"] <= s["budget"] < s["quantized_bytes"], s
    assert s["loaded_size_counts_them"] and s["streamed_stay_home"], s
    assert s["quantized_bytes"] // 8 < s["held_reloaded_with_a_quarter"] <= s["quantized_bytes"] // 4 < s["held"], s


def test_copies_follow_what_comfyui_loads_and_frees(probe):
    s = probe["streaming"]
    assert s["held_after_a_clone_was_collected"] == s["held_reloaded_with_a_quarter"], s  # a sibling's GC keeps them
    assert s["partially_unloaded"] >= s["held_reloaded_with_a_quarter"] // 2 > 0, s
    assert s["held_after_partial_unload"] < s["held_reloaded_with_a_quarter"], s
    assert s["held_after_another_run_placed"]["first"] == 0 < s["held_after_another_run_placed"]["other"], s
    assert s["held_after_detach"] == 0 and s["stored_tensors_back"], s
    assert s["device_tensors_reachable_after_detach"] == 0, s
