import pytest
import torch
from PIL import Image

from qvd import tinyvdm as T
from tools import ablation as A


def test_calibration_and_evaluation_classes_are_disjoint_and_calibration_covers_all_parts():
    assert not set(A.CALIB_CLASSES) & set(A.EVAL_CLASSES)
    parts = [T.class_parts(c) for c in A.CALIB_CLASSES]
    assert {c for c, _ in parts} == set(T.COLOURS)
    assert {s for _, s in parts} == set(T.SHAPES)


def test_tiny_ablation_writes_markdown_and_plots(tmp_path):
    torch.set_num_threads(1)
    rows = A.main(["--n", "1", "--steps", "2", "--configs", "naive-w8a8,qvd-w8a8", "--out", str(tmp_path)])
    assert set(rows) == {"naive-w8a8", "qvd-w8a8"}
    for r in rows.values():
        assert 0 < r["psnr_db"] < float("inf")
        assert 0 < r["min_tdscore"] <= 1
        assert r["weight_bytes"] > 0
    md = (tmp_path / "results.md").read_text()
    assert "| naive min-max |" in md and "| QVD (HTDQ + SCRI) |" in md
    assert f"{rows['qvd-w8a8']['psnr_db']:.2f}" in md
    assert "MSE <= 0.5x naive min-max's" in md
    for name in ("results_temporal_hist.png", "results_scri_coverage.png"):
        img = Image.open(tmp_path / "img" / name)
        assert img.size[0] > 400 and len(img.getcolors(1 << 16)) > 3  # drawn, not blank
        assert f"img/{name}" in md


def test_unknown_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown configs"):
        A.run(n=1, steps=1, configs=["qvd-w2a2"], out_md=tmp_path / "r.md", img_dir=tmp_path)
