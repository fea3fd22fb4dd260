"""Low-VRAM (partial) loading of a quantized MODEL with a LoRA, through ComfyUI's own ModelPatcher (0.3.75 and 0.33).

A CPU server always loads whole, so ``lowvram_probe.py`` makes, in a ComfyUI process, the calls ComfyUI
makes on a GPU short of VRAM: a partial load (quantized layers left offloaded, the LoRA queued as a
call-time patch) and a partial unload of a loaded model. Both must give exactly the whole-load output.
"""
from __future__ import annotations

import pytest

from comfy_host import REPO, run_probe
from synthetic_models import LORA_BLOCKS, LORA_LAYERS, write_lora

pytestmark = pytest.mark.full


@pytest.fixture(scope="module")
def probe(sd15_checkpoint, tmp_path_factory):
    lora = tmp_path_factory.mktemp("lowvram") / "lora.safetensors"
    write_lora(sd15_checkpoint, lora)
    return run_probe("lowvram_probe.py", sd15_checkpoint, lora, REPO, timeout=900)


@pytest.mark.slow
def test_partial_load_offloads_quantized_layers_and_queues_the_lora(probe):
    assert probe["model_lowvram"] and probe["quantized_layers"] > 0
    assert probe["offloaded"] == probe["quantized_layers"], probe
    assert probe["offloaded_with_lora"] == len(LORA_BLOCKS) * len(LORA_LAYERS), probe
    assert probe["flags_cleared"], "unpatching left low-VRAM flags or patches on the quantized layers"


@pytest.mark.slow
def test_offloaded_channels_last_codes_are_offered_for_pinning_contiguous(probe):
    """ComfyUI pins offloaded weights only when ``is_contiguous()``; a 3x3 conv's channels-last codes are offered
    through a contiguous view of the same bytes (so a GPU copies them non-blocking from pinned memory)."""
    assert probe["offloaded_3x3_codes"] > 0, probe
    assert probe["pinnable_3x3_codes"] == probe["offloaded_3x3_codes"], probe


@pytest.mark.slow
def test_offloaded_quantized_layers_give_the_whole_load_output_with_the_lora(probe):
    assert probe["finite"] and probe["lora_effect"] > 0.05, probe
    assert probe["lowvram_equal"], probe["lowvram_vs_whole"]
    assert probe["freed_bytes"] > 0 and probe["offloaded_after_unload"] == probe["quantized_layers"], probe
    assert probe["unloaded_equal"], probe["unloaded_vs_whole"]
    assert probe["quantized_restored"], "the quantized MODEL without the LoRA changed after low-VRAM runs"
