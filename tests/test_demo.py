"""`make demo` end to end on the shipped model: clips, quantized file and report are written."""
import json

import pytest
from PIL import Image

from qvd_demo import demo, tinyvdm


@pytest.mark.slow
def test_demo_writes_clips_and_report(tmp_path, monkeypatch):
    """The demo at 4 steps, its default 12 clips per model. Its step timing runs (``evaluate.step_times``, tested
    with a fake clock in test_evaluate), then reports these figures: the float simulation is faster, so the W8A8
    clips run it."""
    from qvd_demo import evaluate

    real, ran = evaluate.step_times, []
    monkeypatch.setattr(evaluate, "step_times", lambda *a: ran.append(real(*a)) or
                        {"fp32": 0.03, "int": 0.05, "fake": 0.04})
    report = demo.main(["--out", str(tmp_path), "--steps", "4"])
    assert report["model"].endswith("tiny_vdm.safetensors")  # the shipped trained default
    for clip in report["clips"]:
        gif = Image.open(tmp_path / clip["gif"])
        assert gif.n_frames == tinyvdm.FRAMES and gif.width >= 2 * 8 * tinyvdm.SIZE  # two clips, upscaled 8x
        assert clip["psnr_db"] > 25
    assert Image.open(tmp_path / report["gif_all_classes"]).width >= 8 * 5 * tinyvdm.SIZE
    assert report["fidelity"]["clips"] == 12 and report["fidelity"]["psnr_db"] > 25
    for name in ("fp", "w8a8", "data"):
        q = report["quality"][name]
        assert q["clips"] == 12 and 0 <= q["recognised"] <= 1 and q["speed"] >= 0
    assert set(report["quality_check"]["w8a8"]) == {"recognised", "background_over_data", "speed_rel_err",
                                                    "size_stable"}
    assert (tmp_path / report["quantized_file"]).is_file()
    assert report["weight_bytes"]["ratio"] > 1.8
    steps = report["cpu_step_seconds"]
    assert len(ran) == 1 and (steps["fp32"], steps["w8a8"], steps["w8a8_fake"]) == (0.03, 0.05, 0.04)
    assert report["w8a8_clips_mode"] == "fake"
    assert report["total_seconds"] >= sum(report[f"{k}_seconds"] for k in ("calibration", "quantize", "sampling"))
    assert 0.9 < report["temporal_tdscore_min"] <= 1.0
    assert json.loads((tmp_path / "report.json").read_text())["fidelity"] == report["fidelity"]
    md = (tmp_path / "report.md").read_text()
    assert "PSNR" in md and "recognised" in md and "--quality-seeds 48" in md and "float simulation" in md


def test_too_few_quality_seeds_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path), "--quality-seeds", "4"])
