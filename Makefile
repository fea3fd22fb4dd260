# `make demo`: calibrate, quantize and render FP vs W8A8 clips with a report (out/demo/).
# `make test`: the test suite CI runs, CPU only (Triton kernels run under TRITON_INTERPRET=1), <= 20 min on 2 cores;
# `make test-full`: with the heavier checks (marker `full`), before an issue is resolved and on bigger machines.
# Both build .venv themselves (torch/torchvision pinned by constraints.txt).
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.qvd-installed

.PHONY: venv host demo test test-full test-core test-host-git tinyvdm gpu-check clean

venv: $(STAMP)
$(STAMP): requirements-dev.txt constraints.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements-dev.txt -c constraints.txt
	touch $(STAMP)

# The ComfyUI host (ComfyUI 0.3.75, Chromium + Playwright) used by tests/host.
host: venv
	bash scripts/setup_host.sh

demo: venv
	$(VPY) -m qvd_demo.demo --out out/demo

# Train the demo model (tools/train_tiny_vdm.py, its default settings) for MINUTES, resuming the run kept in
# .cache/; the shipped assets/tiny_vdm.safetensors is written when the run's last step is done.
MINUTES ?= 60
tinyvdm: venv
	$(VPY) tools/train_tiny_vdm.py --max-minutes $(MINUTES)

# On a CUDA machine: kernel correctness vs reference.py, per-layer and whole-UNet-step times, compile + tune
# seconds, peak VRAM, residency as ComfyUI loads / frees layers, and (COMFYUI_PATH=a ComfyUI >= 0.33 with
# comfy-aimdo) the dynamic-VRAM graphs of tests/host/test_host_dynamic.py -> docs/gpu-check.md + .json.
gpu-check: venv
	$(VPY) -m bench.gpu_check --out docs

test-core: venv
	$(VPY) -m pytest -q tests --ignore=tests/host

# Both print the 25 slowest tests: every run shows where the time goes.
test: host
	$(VPY) -m pytest -q -rs -m "not full" --durations=25 tests

test-full: host
	$(VPY) -m pytest -q -rs --durations=25 tests

# tests/host against another ComfyUI, from a fetched git directory (e.g. 0.33.0: COMFYUI_GIT=/path/to/ComfyUI.git),
# set up by scripts/setup_host_git.sh in its own venv under .cache/.
test-host-git: venv
	@test -n "$(COMFYUI_GIT)" || { echo "usage: make test-host-git COMFYUI_GIT=/path/to/a/fetched/ComfyUI/git/dir"; exit 2; }
	set -e; ready="$$(bash scripts/setup_host_git.sh "$(COMFYUI_GIT)" | tail -n 1)"; \
	COMFYUI_PATH="$${ready% *}" "$${ready#* }" -m pytest -q -rs tests/host

clean:
	rm -rf out .pytest_cache
