# `make demo`: calibrate, quantize and render FP vs W8A8 clips with a report (out/demo/).
# `make test`: the whole test suite, CPU only (Triton kernels run under TRITON_INTERPRET=1).
# Both build .venv themselves (torch/torchvision pinned by constraints.txt).
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.qvd-installed

.PHONY: venv host demo test test-core clean

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
	$(VPY) -m qvd.demo --out out/demo

test-core: venv
	$(VPY) -m pytest -q tests --ignore=tests/host

test: host
	$(VPY) -m pytest -q tests

clean:
	rm -rf out .pytest_cache
