#!/usr/bin/env bash
# A newer ComfyUI for tests/host, from a fetched git directory (no work tree needed), e.g. ComfyUI 0.33:
#   bash scripts/setup_host_git.sh /path/to/ComfyUI.git
# writes the tree of its HEAD to .cache/comfyui-<version> and builds its own venv .cache/venv-comfyui-<version>
# (this repository's pins, ComfyUI's requirements, host-constraints.txt's torchaudio, playwright). Only paths
# under .cache/ are written; the git directory is only read. Prints "<tree> <venv python>" on its last line.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
GIT_DIR="${1:?usage: setup_host_git.sh GIT_DIR (a fetched ComfyUI repository)}"
PY="${PY:-python3}"
commit="$(git --git-dir="$GIT_DIR" rev-parse HEAD)"
version="$(git --git-dir="$GIT_DIR" show HEAD:comfyui_version.py | sed -n 's/^__version__ = "\(.*\)"/\1/p')"
[ -n "$version" ] || { echo "setup_host_git.sh: $GIT_DIR has no comfyui_version.py at HEAD" >&2; exit 1; }
TREE="$ROOT/.cache/comfyui-$version"
VENV="$ROOT/.cache/venv-comfyui-$version"

# 1. The tree (blobs absent from a partial fetch, such as large tokenizer files, are skipped).
if [ "$(cat "$TREE/.qvd-commit" 2>/dev/null)" != "$commit" ]; then
    rm -rf "$TREE.partial"
    "$PY" - "$GIT_DIR" "$TREE.partial" <<'PY'
import pathlib, subprocess, sys
git, dest = sys.argv[1], pathlib.Path(sys.argv[2])
listing = subprocess.run(["git", f"--git-dir={git}", "ls-tree", "-r", "-z", "HEAD"], check=True,
                         capture_output=True).stdout.split(b"\0")
blobs = [(e.split(b"\t", 1)[0].split()[2].decode(), e.split(b"\t", 1)[1].decode()) for e in listing
         if e and e.split()[1] == b"blob"]
cat = subprocess.Popen(["git", f"--git-dir={git}", "cat-file", "--batch"], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE)
skipped = 0
for sha, path in blobs:
    cat.stdin.write(sha.encode() + b"\n")
    cat.stdin.flush()
    head = cat.stdout.readline().split()
    if head[1] == b"missing":
        skipped += 1
        continue
    data = cat.stdout.read(int(head[2]))
    cat.stdout.read(1)
    target = dest / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
cat.stdin.close()
cat.wait()
print(f"wrote {len(blobs) - skipped} files, skipped {skipped} absent blobs")
PY
    echo "$commit" > "$TREE.partial/.qvd-commit"
    rm -rf "$TREE"
    mv "$TREE.partial" "$TREE"
fi

# 2. Its venv: this repository's pins first, then ComfyUI's requirements around them.
stamp="$VENV/.qvd-$(cat "$TREE/requirements.txt" constraints.txt requirements-dev.txt | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
    PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt)
    "${PIP[@]}" -r requirements-dev.txt
    reqs="$(mktemp)"
    grep -v -E '^(torch|torchvision|torchaudio)[[:space:]]*$' "$TREE/requirements.txt" > "$reqs"
    "${PIP[@]}" -r "$reqs" "$(grep '^torchaudio==' scripts/host-constraints.txt)" requests playwright
    rm -f "$reqs" "$VENV"/.qvd-*
    touch "$stamp"
fi
echo "ComfyUI $version ($commit) ready: $TREE $VENV/bin/python"
echo "$TREE $VENV/bin/python"
