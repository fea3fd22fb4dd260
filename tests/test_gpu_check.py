"""``make gpu-check``'s script end to end on the CPU: the Triton kernels under the interpreter on tiny shapes,
every section run and reported (a separate process: the interpreter must be set before triton is imported)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.full  # 2.5 min under TRITON_INTERPRET on a 2-core CPU
def test_gpu_check_smoke_runs_every_section(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "gpu-check.json").read_text())
    assert res["smoke"] and res["correctness"] and all(c["ok"] for c in res["correctness"])
    assert {c["dtype"] for c in res["correctness"]} >= {"float16", "bfloat16"}
    assert len(res["layers"]) == 4 and all(row["w8a8"] > 0 for row in res["layers"])
    assert all(row["quantize"] > 0 and row["weight_only"] > 0 and row["separate"] > 0 and row["fused"] > 0
               for row in res["layers"])
    assert res["hiditq"]["per_call"] > 0 and res["hiditq"]["kept"] > 0
    unet = res["unet"]
    assert unet["w8a8_layers"] > 0 and {"fp16", "bf16", "W8A8 (QVD, rest fp16)"} <= set(unet["variants"])
    assert [r["layer"] for r in res["residency"]["rows"]] == ["linear", "conv3x3"]
    assert all(r["identical"] and r["stored_mib"] > 0 for r in res["residency"]["rows"])
    md = (tmp_path / "gpu-check.md").read_text()
    assert "smoke run" in md and "Whole UNet step" in md and "Residency" in md and "**NO**" not in md
    assert "quantize pass (share of pair)" in md and "| fused |" in md and "HiDi-TQ" in md
