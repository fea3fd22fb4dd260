"""ControlNet vid2vid (issue 28), the most common AnimateDiff graph: frames -> VAE Encode -> KSampler at denoise 0.6
with core ComfyUI's ControlNet on the synthetic SD1.5, calibrated with the ControlNet on; the ControlNet full precision
and quantized by QVD Quantize ControlNet from the same calibration, saved and loaded (``controlnet_probe.py``)."""
from __future__ import annotations

import pytest

from comfy_host import REPO, run_probe

pytestmark = [pytest.mark.slow, pytest.mark.full]


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


def test_quantizing_the_controlnet_lowers_its_share_of_a_step_where_int8_is_the_fast_route(probe):
    """Its share of a vid2vid step, FP, beside a W8A8 UNet, and quantized too (stated in the README; the probe runs
    compute int8). Where the integer kernels are the fast route the W8A8 UNet leaves the FP ControlNet a larger share
    and quantizing it lowers that; on a CPU where they are slower than its float GEMM (no VNNI: ``auto`` runs
    weight-only there) there is nothing to compare, and the test says so."""
    shares = [probe[k] for k in ("control_share_fp", "control_share_q", "control_share_q_qcn")]
    print(f"ControlNet's share of a step: FP {shares[0]:.2f}, beside the W8A8 UNet {shares[1]:.2f}, quantized "
          f"{shares[2]:.2f}")
    assert all(0 < s < 1 for s in shares), probe
    if probe["int8_skipped_by_auto"] is not None:
        pytest.skip(f"the integer kernels are not the fast route on this CPU: {probe['int8_skipped_by_auto']}")
    assert shares[0] < shares[1] and shares[2] < shares[1], probe


def test_a_quantized_controlnet_keeps_the_output_and_its_effect(probe):
    """QVD Quantize ControlNet from the calibration that sampled it: the output with both quantized stays within the
    quantized UNet's own error of FP, the ControlNet's effect follows FP's, and its patcher tells ComfyUI the int8
    size; the ControlNet it was made from samples as before."""
    assert probe["error_with_quantized_cn"] <= 1.25 * probe["error_without"], probe
    assert probe["quantized_cn_effect_cosine"] > 0.85 and abs(probe["quantized_cn_effect_norm_ratio"] - 1) < 0.15, \
        probe
    assert probe["cn_told_mib"] < 0.4 * probe["cn_float_told_mib"], probe
    assert "controlnet conv" in probe["cn_report"] and "controlnet linear" in probe["cn_report"], probe["cn_report"]
    assert probe["original_cn_unchanged"], probe


def test_a_quantized_controlnet_file_round_trips_and_wrong_inputs_are_refused(probe):
    assert probe["file_round_trip_equal"], probe
    assert "different model" in probe["refused_unet_file"], probe["refused_unet_file"]
    assert "NOT REFUSED" not in probe["refused_damaged_file"], probe["refused_damaged_file"]
    assert "already quantized" in probe["refused_quantized_twice"], probe["refused_quantized_twice"]
    assert "not in the graph the calibration sampled" in probe["refused_uncalibrated_cn"], probe
