"""Attention patches on a QVD-quantized MODEL whose SCRI is folded into norms (issue 28): ComfyUI's core hypernetwork
(``HypernetworkLoader``'s patch, added after QVD Quantize Model) sees the norm outputs it would see on the FP model,
an identity patch changes nothing, and the quantized output with it stays as close to FP's as without
(``hypernetwork_probe.py``)."""
from __future__ import annotations

import pytest

from comfy_host import REPO, run_probe
from synthetic_models import write_hypernetwork

pytestmark = [pytest.mark.slow, pytest.mark.full]


@pytest.fixture(scope="module")
def probe(sd15_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("hypernetwork") / "hn.pt"
    write_hypernetwork(path, dims=(320,), std=0.04)  # the attention width of the blocks SKIP leaves quantized
    facts = run_probe("hypernetwork_probe.py", sd15_checkpoint, REPO, path, timeout=1200)
    print(f"\nhypernetwork: {facts}")
    return facts


def test_attention_patches_receive_the_norm_output_they_would_on_fp(probe):
    assert {"norm1", "norm2"} <= set(probe["folded_norms"]), probe
    assert probe["compared"]["attn1_patch"] > 0 and probe["compared"]["attn2_patch"] > 0, probe
    assert max(probe["seen_vs_norm"].values()) < 1e-5, probe
    assert min(probe["seen_vs_norm_without_unfolding"].values()) > 0.05, probe  # the control: what it was


def test_an_identity_patch_leaves_the_quantized_output_unchanged(probe):
    assert probe["identity_vs_plain"] < 1e-5, probe


def test_the_hypernetwork_on_the_quantized_model_stays_as_close_to_fp_as_without(probe):
    """Loaded after QVD Quantize Model (the wrapper) or before QVD Calibrate (calibrated with it): the quantized output
    with the hypernetwork is as close to FP with it as the plain quantized output is to plain FP. (On this synthetic
    model the hypernetwork's effect, ~2 % of the output, is below W8A8's own error, ~8 %, so the output alone cannot
    tell the unfolded patch from the folded one: the two tests above do.)"""
    assert probe["effect_size"] > 0.01, probe
    assert probe["error_after"] <= 1.1 * probe["error_plain"], probe
    assert probe["error_calibrated_with"] <= 1.1 * probe["error_plain"], probe
    assert probe["effect_cosine"] > 0.6, probe
