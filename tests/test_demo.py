"""`make demo` end to end on the shipped model: clips, quantized file and report are written."""
import json

import pytest

from qvd_demo import demo


@pytest.mark.slow
def test_demo_writes_clips_and_report(tmp_path):
    report = demo.main(["--out", str(tmp_path), "--steps", "4"])  # calibrates on every colour and shape
    assert report["model"].endswith("tiny_vdm.safetensors")  # the shipped trained default
    for clip in report["clips"]:
        assert (tmp_path / clip["gif"]).stat().st_size > 1000
        assert clip["psnr_db"] > 25
    assert (tmp_path / report["quantized_file"]).is_file()
    assert report["weight_bytes"]["ratio"] > 1.8
    assert report["cpu_step_seconds"]["fp32"] > 0 and report["cpu_step_seconds"]["w8a8"] > 0
    assert 0.9 < report["temporal_tdscore_min"] <= 1.0
    assert json.loads((tmp_path / "report.json").read_text())["mean_psnr_db"] == report["mean_psnr_db"]
    assert "PSNR" in (tmp_path / "report.md").read_text()
