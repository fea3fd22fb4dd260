"""Fixtures for tests against a real ComfyUI server: the managed 0.3.75 (`make host`), your own (COMFYUI_PATH,
only read) or a newer one (`make test-host-git`).

Session fixtures build seeded synthetic models under .cache/qvd-host (reused while their version string
matches), lay out a temporary ComfyUI base directory (models, output, custom_nodes with this pack
linked in) and run ``main.py --cpu`` on a free loopback port; the server is always terminated.
"""
from __future__ import annotations

import shutil

import pytest

from comfy_host import CKPT_NAME, COMFYUI_PATH, MOTION_NAME, ComfyServer, build_model, make_base_dir


@pytest.fixture(scope="session")
def sd15_checkpoint():
    if not (COMFYUI_PATH / "main.py").is_file():
        pytest.skip(f"ComfyUI not found at {COMFYUI_PATH}: run `make host` (or set COMFYUI_PATH)")
    return build_model("sd15", CKPT_NAME)


@pytest.fixture(scope="session")
def motion_model():
    return build_model("motion", MOTION_NAME)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, sd15_checkpoint):
    """ComfyUI with this pack, no node-output cache (every prompt re-executes every node)."""
    base = make_base_dir(tmp_path_factory.mktemp("comfy_base"), sd15_checkpoint)
    server = ComfyServer(base, ("--cache-none",))
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base / "temp", ignore_errors=True)
