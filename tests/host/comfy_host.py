"""Helpers for tests against a real ComfyUI server: paths, synthetic-model cache, the server process."""
from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
COMFYUI_PATH = Path(os.environ.get("COMFYUI_PATH", REPO / ".cache" / "comfyui"))
# Every process started in COMFYUI_PATH (which may be the user's own ComfyUI) writes nothing there: no bytecode,
# and ComfyUI's own folders (models, output, user, database) live in a temporary --base-directory.
HOST_ENV = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(COMFYUI_PATH)}

def comfyui_version(path: Path = COMFYUI_PATH) -> str:
    text = (path / "comfyui_version.py").read_text() if (path / "comfyui_version.py").is_file() else ""
    return text.split('__version__ = "')[-1].split('"')[0] if '__version__ = "' in text else "unknown"


# Synthetic models are written by the host's own ComfyUI code, once per ComfyUI version (QVD_HOST_MODEL_CACHE
# points a test's child pytest at its parent's cache).
MODEL_CACHE = Path(os.environ.get("QVD_HOST_MODEL_CACHE", REPO / ".cache" / "qvd-host" / comfyui_version()))
SYNTH_VERSION = "v1"  # bump when synthetic_models.py changes what it writes
CKPT_NAME = f"qvd_synth_sd15_{SYNTH_VERSION}.safetensors"


def synth_name(kind: str) -> str:
    """The cache file name of a synthetic model of ``kind`` (``synthetic_models.py``'s kinds)."""
    return f"qvd_synth_{kind}_{SYNTH_VERSION}.safetensors"

MOTION_NAME = f"qvd_synth_mm_sd_v15_v2_{SYNTH_VERSION}.safetensors"
SERVER_START_TIMEOUT = 180.0
PACK_NAME = "ComfyUI-QVD"
WORKFLOWS = REPO / "workflows"
# Tiny settings for the 2-core CPU: 64x64 px (8x8 latent), 2 frames, 1 step, 3 timestep-coverage points (2 calls
# beside the sampled one; the default 20 is measured by test_host_clipping.py).
# Quantization is limited to the first and last UNet blocks, the middle block and the time embedding
# (the other blocks stay fp through the Quantize node's skip list) to keep the 2-core CPU suite short.
TINY = {"width": 64, "height": 64, "batch_size": 2, "steps": 1, "calibration_seeds": 1, "timestep_coverage": 3,
        "skip": "input_blocks.[3-9].*, input_blocks.1[01].*, output_blocks.[0-8].*"}


def build_model(kind: str, name: str) -> Path:
    """Build a synthetic model file in a subprocess (frees its memory) unless it is cached."""
    path = MODEL_CACHE / name
    if not path.is_file():
        MODEL_CACHE.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, **HOST_ENV)
        subprocess.run([sys.executable, str(Path(__file__).with_name("synthetic_models.py")), kind, str(path)],
                       cwd=COMFYUI_PATH, env=env, check=True, timeout=900)
    return path


def ade_path() -> Path | None:
    """ComfyUI-AnimateDiff-Evolved checkout: $ADE_PATH, else ComfyUI's custom_nodes, else None."""
    candidates = [os.environ.get("ADE_PATH"), COMFYUI_PATH / "custom_nodes" / "ComfyUI-AnimateDiff-Evolved",
                  REPO / ".cache" / "ComfyUI-AnimateDiff-Evolved"]
    for c in candidates:
        if c and (Path(c) / "animatediff" / "motion_module_ad.py").is_file():
            return Path(c)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A ComfyUI server subprocess on 127.0.0.1 and small JSON helpers for its HTTP API."""

    def __init__(self, base: Path, extra_args: tuple[str, ...] = (), env: dict | None = None):
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        self.client_id = uuid.uuid4().hex
        self._log = open(self.log_path, "wb")
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(base), "--disable-auto-launch", "--database-url", f"sqlite:///{base / 'comfyui.db'}",
               *extra_args]
        env = dict(os.environ, **HOST_ENV, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
                   **(env or {}))
        self.proc = subprocess.Popen(cmd, cwd=COMFYUI_PATH, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} during start:\n{self.log()}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"ComfyUI did not answer within {SERVER_START_TIMEOUT}s:\n{self.log()}")
                time.sleep(0.5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-20000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)
        self._log.close()

    def get(self, route: str):
        with urllib.request.urlopen(self.url + route, timeout=30) as r:
            return json.loads(r.read())

    def post(self, route: str, payload: dict):
        req = urllib.request.Request(self.url + route, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
            return json.loads(body) if body else None

    def queue(self, prompt: dict) -> str:
        """POST /prompt; a validation failure raises with ComfyUI's node errors."""
        try:
            return self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"/prompt rejected the graph: {e.read().decode(errors='replace')}") from None

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """Poll /history until the prompt finishes; returns its history entry (status + outputs)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"]["completed"] or entry["status"].get("status_str") == "error"):
                return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log()}")
            time.sleep(0.5)
        self.post("/interrupt", {})
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s:\n{self.log()[-4000:]}")

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        """Queue ``prompt`` and wait for it; a failed execution raises with the node's error message."""
        entry = self.wait(self.queue(prompt), timeout)
        if entry["status"].get("status_str") != "success":
            raise AssertionError(f"prompt failed: {execution_error(entry)}")
        return entry

    def run_failing(self, prompt: dict, timeout: float = 600.0) -> dict:
        """Queue ``prompt``, which must fail in execution; returns its ``execution_error`` message."""
        entry = self.wait(self.queue(prompt), timeout)
        assert entry["status"]["status_str"] == "error", entry["status"]
        return execution_error(entry)


def execution_error(entry: dict) -> dict | None:
    """The ``execution_error`` message of a history entry (node_type, exception_message, ...), if any."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


def make_base_dir(root: Path, checkpoint: Path | None, motion: Path | None = None, ade: Path | None = None) -> Path:
    """A ComfyUI base directory: this pack (and ADE) in custom_nodes, the synthetic models linked in."""
    for d in ("custom_nodes", "models/checkpoints", "models/diffusion_models", "models/animatediff_models",
              "models/qvd", "output", "input", "temp", "user"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "custom_nodes" / PACK_NAME).symlink_to(REPO, target_is_directory=True)
    if checkpoint is not None:
        (root / "models" / "checkpoints" / checkpoint.name).symlink_to(checkpoint)
    if motion is not None:
        (root / "models" / "animatediff_models" / motion.name).symlink_to(motion)
    if ade is not None:
        (root / "custom_nodes" / ade.name).symlink_to(ade, target_is_directory=True)
    return root


def load_api(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


def tiny(prompt: dict, **overrides) -> dict:
    """The prompt with the synthetic checkpoint and TINY sizes (plus ``overrides``) wherever they apply."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = CKPT_NAME
        for k, v in {**TINY, **overrides}.items():
            if k in inputs:
                inputs[k] = v
    return prompt


def with_latent_output(prompt: dict, sampler_id: str, prefix: str) -> dict:
    prompt[f"save_{prefix}"] = {"class_type": "SaveLatent",
                                "inputs": {"samples": [sampler_id, 0], "filename_prefix": f"latents/{prefix}"}}
    return prompt


def read_latent(server, entry: dict, node_id: str) -> torch.Tensor:
    (item,) = entry["outputs"][node_id]["latents"]
    path = server.base / "output" / item["subfolder"] / item["filename"]
    return load_file(str(path))["latent_tensor"]


def without(prompt: dict, *ids: str) -> dict:
    return {k: v for k, v in prompt.items() if k not in ids}


def load_and_sample(qvd_name: str, prefix: str, model: list | None = None) -> dict:
    """Workflow (c) with QVD Load Quantized of ``qvd_name`` (on ``model``, default the checkpoint) in place of
    calibration + quantization; the sampled latent is saved as ``save_<prefix>``."""
    wf = tiny(load_api("qvd_core_txt2vid_calibrate_quantize"))
    prompt = with_latent_output(without(wf, "10", "11", "12"), "20", prefix)
    prompt["13"] = {"class_type": "QVDLoadQuantized", "inputs": {"model": model or ["1", 0], "qvd_name": qvd_name}}
    prompt["20"]["inputs"]["model"] = ["13", 0]
    return prompt


def run_probe(script: str, *args, timeout: float) -> dict:
    """Run ``tests/host/<script> ARGS...`` in a ComfyUI process (cwd = the ComfyUI directory, on PYTHONPATH) and
    return the JSON of the last ``QVD_PROBE`` line it prints."""
    run = subprocess.run([sys.executable, str(Path(__file__).with_name(script)), *map(str, args)],
                         cwd=COMFYUI_PATH, env=dict(os.environ, **HOST_ENV), capture_output=True, text=True,
                         timeout=timeout)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("QVD_PROBE ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-6000:]
    return json.loads(lines[-1].removeprefix("QVD_PROBE "))
