"""ControlNet vid2vid (issue 28), the most common AnimateDiff graph: frames -> VAE Encode -> KSampler at denoise 0.6
with core ComfyUI's ControlNet on the synthetic SD1.5, calibrated with the ControlNet on (``controlnet_probe.py``)."""
from __future__ import annotations

import pytest

from comfy_host import REPO, run_probe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def probe(sd15_checkpoint):
    facts = run_probe("controlnet_probe.py", sd15_checkpoint, REPO, timeout=1800)
    print(f"\ncontrolnet vid2vid: {facts}")
    return facts


def test_a_controlnet_vid2vid_graph_keeps_the_quantized_output_as_close_to_fp(probe):
    assert probe["finite"] and probe["quantized_layers"] > 100, probe
    assert probe["error_with"] <= 1.25 * probe["error_without"], probe


def test_the_controlnets_effect_on_the_quantized_model_follows_fp(probe):
    assert probe["effect_size"] > 0.05, probe
    assert probe["effect_cosine"] > 0.85 and abs(probe["effect_norm_ratio"] - 1) < 0.15, probe  # LoRA graph: 0.8


def test_the_controlnets_share_of_a_step_is_measured(probe):
    """ControlNet stays full precision: its share of a vid2vid step, FP and W8A8 (stated in the README)."""
    assert 0 < probe["control_share_fp"] < probe["control_share_q"] < 1, probe
