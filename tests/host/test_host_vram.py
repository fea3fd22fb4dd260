"""The quantized MODEL's size as ComfyUI's memory planner sees it (0.3.75 and 0.33): the bytes it holds, not the
float size it was cloned with (issue 26: it told 3.98x what it held, so the planner evicted other models for bytes
never used and took low-VRAM loads where a full int8 load fits).

``size_probe.py`` quantizes the synthetic SD1.5 UNet whole (and, with AnimateDiff-Evolved, the motion model) with the
pack's nodes in a ComfyUI process, then compares each patcher's ``model_size()`` (also of a clone, and of the MODEL
QVD Load Quantized makes) with the bytes its model holds, and a partial load's loaded + offloaded bytes with both;
and it loads the quantized MODEL with a LoRA and a bias patch, counting the float work ComfyUI would merge and throw
away, and timing the load against the load without.
"""
from __future__ import annotations

import pytest

from comfy_host import REPO, ade_path, run_probe
from synthetic_models import write_lora

pytestmark = pytest.mark.full


def _close(a: int, b: int, share: float = 0.05) -> bool:
    return abs(a - b) <= share * b


@pytest.fixture(scope="module")
def probe(sd15_checkpoint, motion_model, tmp_path_factory):
    lora = tmp_path_factory.mktemp("vram") / "lora.safetensors"
    write_lora(sd15_checkpoint, lora)
    ade = ade_path()
    extra = (ade, motion_model) if ade is not None else ()
    facts = run_probe("size_probe.py", sd15_checkpoint, REPO, lora, *extra, timeout=1800)
    print(f"\nsize told / held (MiB): float {facts['float_told'] / 2**20:.0f}; " + "; ".join(
        f"{k} {facts[k]['told'] / 2**20:.0f} / {facts[k]['held'] / 2**20:.0f}" for k in ("quantized", "loaded"))
        + "".join(f"; motion {m['float_told'] / 2**20:.0f} -> {m['told'] / 2**20:.0f} / {m['held'] / 2**20:.0f}"
                  for m in facts["motion"]))
    return facts


@pytest.mark.slow
def test_a_load_holds_the_file_once(probe):
    """Issue 42: ComfyUI runs nodes under ``inference_mode``, so the tensors read from a file were inference tensors
    and every one was cloned: a load held the file twice, plus its working memory. Measured on the whole SD1.5 +
    mm_sd_v15_v2 file (1,260 MiB) on 0.3.75: a peak of 1,852 MiB above the start (1.47x the file; the model check's
    and the bounds' fp32 copies of a layer at a time, and the allocator's high-water mark), asserted below 1.6x: a
    second copy of the file would be 2x."""
    f = probe["load_memory"]
    print(f"\nQVD Load Quantized: peak {f['peak'] / 2**20:.0f} MiB above the start for a {f['file'] / 2**20:.0f} MiB "
          f"file (largest layer in fp32 {f['largest_layer_fp32'] / 2**20:.0f} MiB)")
    assert f["peak"] <= 1.6 * f["file"], f


@pytest.mark.slow
def test_the_qvd_nodes_never_reload_a_model_already_loaded(probe):
    """QVD Calibrate (its sampling included), Quantize Model, Save Quantized and the Load Quantized path on a MODEL
    ComfyUI has loaded: no load, no unpatch of its weights; it stays loaded."""
    assert probe["reloads"] == [], probe["reloads"]
    assert probe["still_loaded"]


@pytest.mark.slow
@pytest.mark.parametrize("made_by", ["quantized", "loaded"])
def test_the_quantized_model_tells_the_planner_the_bytes_it_holds(probe, made_by):
    f = probe[made_by]
    assert _close(f["told"], f["held"]) and f["clone_told"] == f["told"], f
    assert f["told"] < 0.35 * probe["float_told"], (f, probe["float_told"])  # int8 codes, not the float size


@pytest.mark.slow
def test_a_weight_only_model_on_the_cpu_tells_the_float_weights_it_keeps(probe):
    """On a CPU the weight-only route keeps each layer's float weight (made at load): ComfyUI is told those bytes too."""
    f = probe["weight_only"]
    assert f["kept"] > 0 and _close(f["told"], f["held"]), f


@pytest.mark.slow
@pytest.mark.parametrize("made_by", ["quantized", "loaded"])
def test_a_partial_load_counts_the_quantized_modules_as_they_are(probe, made_by):
    f = probe[made_by]
    loaded, offloaded = f["partial"]
    assert loaded > 0 and offloaded > 0, f
    assert _close(loaded + offloaded, f["held"]), f


@pytest.mark.slow
@pytest.mark.ade
def test_the_quantized_motion_patcher_tells_its_own_bytes(probe):
    if ade_path() is None:
        pytest.skip("ComfyUI-AnimateDiff-Evolved not found: set ADE_PATH or check it out under "
                    ".cache/ComfyUI-AnimateDiff-Evolved")
    (m,) = probe["motion"]
    assert _close(m["told"], m["held"]) and m["told"] < 0.35 * m["float_told"], m


@pytest.mark.slow
def test_a_whole_load_with_a_lora_does_no_float_work_on_quantized_layers(probe):
    """ComfyUI merged each LoRA patch into a float copy of the int8 codes and threw it away (3 x 60 convert_weight and
    set_weight calls here, the load 5.8x slower than without the LoRA); the LoRA and a bias patch still apply, the same
    loaded whole or partially, and are gone when the MODEL without them loads."""
    f = probe["lora_load"]
    print(f"\nload with a LoRA on {f['patched_layers']} quantized layers: {f['seconds']['lora'] * 1e3:.1f} ms, "
          f"without: {f['seconds']['plain'] * 1e3:.1f} ms")
    assert f["float_work_calls"] == {"convert_weight": 0, "set_weight": 0}, f
    assert f["seconds"]["lora"] < 1.5 * f["seconds"]["plain"], f["seconds"]
    assert f["patch_effect"] > 0.01 and f["whole_vs_partial"] < 1e-6 and f["plain_again_equal"], f


@pytest.mark.slow
def test_a_model_with_a_lora_tells_its_branches(probe):
    """The LoRA's branches on the quantized layers are in the size told (before the first load too: a sampling run
    gives them to the layers before ComfyUI plans the load) and in the loaded bytes; kept in the model's dtype."""
    f = probe["lora_load"]["with_lora"]
    grew = f["told"] - f["plain_told"]
    print(f"\nwith a LoRA: told {f['told'] / 2**20:.1f} MiB (before load {f['told_before_load'] / 2**20:.1f}), "
          f"held {f['held'] / 2**20:.1f} MiB, branches {grew / 2**20:.2f} MiB")
    assert grew == probe["lora_load"]["delta_bytes"] > 0, f
    assert f["told_before_load"] == f["told"] == f["loaded"], f
    assert _close(f["told"], f["held"], 0.01), f
    assert f["delta_dtypes"] == [f["model_dtype"]], f


@pytest.mark.slow
def test_the_vram_bench_states_these_figures(probe):
    """``python -m bench.vram`` prints this probe's figures (the README's VRAM table comes from it)."""
    from bench.vram import table

    text = table(probe)
    print("\n" + text)
    assert f"{probe['quantized']['held'] / 2**20:,.0f} MiB" in text and f"{probe['float_told'] / 2**20:,.0f} MiB" in text
    assert text.count("| mm_sd_v15_v2") == len(probe["motion"])


@pytest.mark.slow
@pytest.mark.ade
def test_a_motion_lora_through_ades_loader_is_exact_and_compact(probe):
    """ADE merges a motion LoRA into ``up @ down`` differences before ComfyUI sees it (a dense N x K delta per layer,
    ~660 MB on mm_sd_v15_v2): the quantized motion layers recover the factors, checked for exactness, so each branch
    holds the LoRA's own bytes and adds exactly FP's ``dW x``."""
    if "motion_lora" not in probe:
        pytest.skip("ComfyUI-AnimateDiff-Evolved not found: set ADE_PATH or check it out under "
                    ".cache/ComfyUI-AnimateDiff-Evolved")
    layers = probe["motion_lora"]["layers"]
    quantized = [f for f in layers if f["quantized"]]
    assert quantized and all(f["delta"] and not f["dense"] for f in quantized), layers
    worst = min(f["cos"] for f in quantized)
    assert worst >= 0.999 and all(abs(f["norm_ratio"] - 1) < 1e-3 for f in quantized), layers
    assert max(f["bytes_vs_lora"] for f in quantized) <= 1.2, layers
    print(f"\nmotion LoRA on {len(quantized)} quantized layers: worst cosine {worst:.6f}; branches hold "
          f"{sum(f['delta_bytes'] for f in quantized) / 2**20:.2f} MiB (dense deltas: "
          f"{sum(f['dense_bytes'] for f in quantized) / 2**20:.1f} MiB); first load "
          f"{probe['motion_lora']['load_seconds']:.1f} s")
