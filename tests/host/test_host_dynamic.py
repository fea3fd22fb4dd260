"""QVD's layers under ComfyUI 0.33's dynamic-VRAM loader (CUDA only), driven on a CPU by ``dynamic_probe.py``: the
ON_LOAD callback puts their tensors on the device with ComfyUI's backups (that loader streams only ComfyUI's own ops,
so a QVD layer left to it would copy its codes from unpinned memory at every call), counts them, and ComfyUI's own
``restore_loaded_backups`` gives the stored tensors back."""
from __future__ import annotations

import pytest

from comfy_host import REPO, run_probe


@pytest.fixture(scope="module")
def probe():
    return run_probe("dynamic_probe.py", REPO, timeout=600)


def test_the_dynamic_loader_gets_qvd_tensors_force_loaded_with_backups(probe):
    assert probe["devices"] == ["meta"] and probe["channels_last"], probe
    assert probe["backed_up"] == ["act_scale", "bias", "weight", "weight_scale"], probe
    assert probe["backups_are_the_stored"], probe
    assert probe["loaded_bytes"] == probe["stored_bytes"] > 0 and not probe["cast_flag"], probe
    assert probe["told"] == 1000, probe  # no weight patches: the size told is the base


def test_comfyuis_own_restore_gives_the_stored_tensors_back(probe):
    if "restored" not in probe:
        pytest.skip("this ComfyUI has no dynamic-VRAM loader (0.3.75)")
    assert probe["restored"], probe
