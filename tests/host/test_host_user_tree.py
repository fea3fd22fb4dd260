"""A user's own ComfyUI (COMFYUI_PATH) is only read: `scripts/setup_host.sh` and the host tests leave it
byte-identical, even when it is not the version the managed host uses (the old script replaced such a tree)."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from comfy_host import COMFYUI_PATH, MODEL_CACHE, REPO

pytestmark = [pytest.mark.slow, pytest.mark.full]


def _manifest(root) -> dict:
    """Every file, folder and link under ``root``: kind, mode and content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if os.path.islink(path):
                out[os.path.relpath(path, root)] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                out[os.path.relpath(path, root)] = ("dir", st.st_mode)
            else:
                with open(path, "rb") as f:
                    out[os.path.relpath(path, root)] = ("file", st.st_mode, hashlib.sha256(f.read()).hexdigest())
    return out


def test_setup_and_host_tests_leave_a_users_comfyui_untouched(tmp_path, sd15_checkpoint):
    user = tmp_path / "ComfyUI"
    shutil.copytree(COMFYUI_PATH, user, ignore=shutil.ignore_patterns("__pycache__"), symlinks=True)
    version = user / "comfyui_version.py"
    version.write_text(version.read_text().replace('__version__ = "', '__version__ = "9.'))  # "not 0.3.75"
    (user / "custom_nodes" / "their_node").mkdir(parents=True)
    (user / "custom_nodes" / "their_node" / "__init__.py").write_text("NODE_CLASS_MAPPINGS = {}\n")
    (user / "models" / "checkpoints").mkdir(parents=True, exist_ok=True)
    (user / "models" / "checkpoints" / "theirs.safetensors").write_bytes(b"their weights")
    before = _manifest(user)
    env = dict(os.environ, COMFYUI_PATH=str(user), VPY=sys.executable, QVD_HOST_MODEL_CACHE=str(MODEL_CACHE))
    subprocess.run(["bash", "scripts/setup_host.sh"], cwd=REPO, env=env, check=True, timeout=900)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                          "tests/host/test_host_nodes.py", "-k", "object_info or without_calibration or damaged"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    after = _manifest(user)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"{len(changed)} path(s) of the user's ComfyUI changed, e.g. {changed[:5]}"
