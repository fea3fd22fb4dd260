"""IPAdapter (issue 28): ComfyUI_IPAdapter_plus's IPAdapter Embeds on the synthetic SD1.5 with a seeded IPAdapter,
applied before QVD (calibrated and quantized with it) and after QVD Quantize Model (``ipadapter_probe.py``).

Needs ComfyUI_IPAdapter_plus (not on any registry): $IPADAPTER_PATH, ComfyUI's custom_nodes, or
.cache/ComfyUI_IPAdapter_plus; skipped without it, saying so.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from comfy_host import COMFYUI_PATH, REPO, run_probe

pytestmark = [pytest.mark.slow, pytest.mark.full]


def ipadapter_path() -> Path | None:
    candidates = [os.environ.get("IPADAPTER_PATH"), COMFYUI_PATH / "custom_nodes" / "ComfyUI_IPAdapter_plus",
                  REPO / ".cache" / "ComfyUI_IPAdapter_plus"]
    return next((Path(c) for c in candidates if c and (Path(c) / "IPAdapterPlus.py").is_file()), None)


@pytest.fixture(scope="module")
def probe(sd15_checkpoint):
    path = ipadapter_path()
    if path is None:
        pytest.skip("ComfyUI_IPAdapter_plus not found (it is on no package registry): set IPADAPTER_PATH to a "
                    "checkout of cubiq/ComfyUI_IPAdapter_plus")
    facts = run_probe("ipadapter_probe.py", sd15_checkpoint, REPO, path, timeout=1800)
    print(f"\nipadapter: {facts}")
    return facts


def test_ipadapter_before_or_after_qvd_stays_as_close_to_fp(probe):
    """Its 16 cross-attention patches run on the quantized layers' outputs; the output with IPAdapter stays within the
    quantized model's own error of FP, whether IPAdapter was applied before QVD (and calibrated with) or after."""
    assert probe["finite"] and len(probe["patched"]) == 16, probe
    assert probe["error_before"] <= 1.25 * probe["error_plain"], probe
    assert probe["error_after"] <= 1.25 * probe["error_plain"], probe


def test_an_ipadapter_the_calibration_never_saw_is_said_once(probe):
    """Applied after QVD Quantize Model, IPAdapter's patches were not in the calibrated graph: one log line says so
    and what to do; calibrated with it, or without IPAdapter, nothing is said."""
    assert probe["warnings"] == {"plain": 0, "after": 1, "before": 0}, probe
    assert probe["error_before"] < probe["error_after"], probe


def test_ipadapters_effect_on_the_quantized_model_follows_fp(probe):
    assert probe["effect_size"] > 0.05, probe
    assert probe["effect_cosine_before"] > 0.85 and probe["effect_cosine_after"] > 0.85, probe
