import json
import sys
from pathlib import Path

import pytest
import torch

from qvd_demo import tinyvdm as T

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import train_tiny_vdm  # noqa: E402


@pytest.fixture(scope="module")
def trained():
    return T.load_trained()


def test_shipped_weights_load(trained):
    meta = trained.metadata
    assert int(meta["steps_done"]) == int(meta["steps"]) > 0 and meta["partial"] == "false"  # a finished run
    assert trained.prediction_type == meta["prediction"] == "v_prediction"
    assert T.DEFAULT_WEIGHTS.stat().st_size <= 5e6


@pytest.mark.full
def test_shipped_model_meets_the_quality_thresholds_on_the_demos_clips(trained):
    """The shipped model at make demo's settings (DDIM 10, CFG 2) on make demo's 48 clips (seed i, class i % 12):
    recognised, background, speed and size stability all meet quality.check (issue 16)."""
    from qvd_demo import demo, quality as Q

    torch.set_num_threads(2)
    conds = [i % T.NULL_CLASS for i in range(48)]
    clips = T.sample_many(trained, conds, range(48), steps=demo.STEPS, guidance=demo.GUIDANCE)
    q = Q.quality(list(clips), conds)
    check = Q.check(q, Q.data_quality(conds))
    assert all(ok for _, _, ok in check.values()), check


def test_missing_weights_say_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_tiny_vdm"):
        T.load_trained(tmp_path / "nope.safetensors")


def test_sampling_is_deterministic_and_batching_keeps_each_seed(trained):
    a = T.sample(trained, "red circle", seed=3, steps=4)
    b = T.sample(trained, "red circle", seed=3, steps=4)
    assert a.shape == (T.FRAMES, 3, T.SIZE, T.SIZE)
    assert torch.equal(a, b)
    many = T.sample_many(trained, ["blue square", "red circle"], [5, 3], steps=4)
    assert (many[1] - a).abs().max() < 0.02  # same noise, batched: float rounding only


def test_prediction_type_travels_with_the_weights(tmp_path):
    m = T.build_model(0, "v_prediction")
    T.save_weights(m, tmp_path / "v.safetensors", {"steps": 0})
    assert T.load_trained(tmp_path / "v.safetensors").prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type"):
        T.build_model(0, "x0")


def test_training_resumes_to_the_same_weights(tmp_path):
    common = ["--steps", "4", "--batch", "2", "--threads", "1", "--log-every", "1", "--save-every", "1"]
    whole = tmp_path / "whole.safetensors"
    train_tiny_vdm.main(common + ["--out", str(whole), "--state", str(tmp_path / "a.pt")])
    split = tmp_path / "split.safetensors"
    args = common + ["--out", str(split), "--state", str(tmp_path / "b.pt")]
    train_tiny_vdm.main(args + ["--run-steps", "3"])
    assert not split.exists()  # not finished: nothing shipped
    train_tiny_vdm.main(args)
    from safetensors.torch import load_file
    a, b = load_file(str(whole)), load_file(str(split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit, match="other settings"):
        train_tiny_vdm.main(args + ["--lr", "1e-4"])
    longer = [a if a != "4" else "6" for a in args]  # --steps 6
    with pytest.raises(SystemExit, match="--extend"):
        train_tiny_vdm.main(longer)
    train_tiny_vdm.main(longer + ["--extend"])
    assert json.loads(T.load_trained(split).metadata["schedule"]) == [[0, 4], [4, 6]]
    assert T.load_trained(split).metadata["steps_done"] == "6"


def test_a_new_run_starts_from_a_shipped_file_when_the_state_is_gone(tmp_path):
    common = ["--steps", "2", "--batch", "2", "--threads", "1", "--log-every", "1", "--lr", "0"]
    first = tmp_path / "first.safetensors"
    train_tiny_vdm.main(common + ["--out", str(first), "--state", str(tmp_path / "a.pt")])
    # lr 0: the weights stay those of the file it starts from (the EMA of unchanged weights)
    second = tmp_path / "second.safetensors"
    train_tiny_vdm.main(common + ["--out", str(second), "--state", str(tmp_path / "b.pt"), "--init-from", str(first)])
    from safetensors.torch import load_file
    a, b = load_file(str(first)), load_file(str(second))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = T.load_trained(second).metadata
    src = json.loads(meta["init_from"])
    assert src["file"] == "first.safetensors" and src["clips_seen_total"] == 4 and len(src["sha256"]) == 16
    assert meta["clips_seen_total"] == "8"
    eps = tmp_path / "eps.safetensors"
    T.save_weights(T.build_model(0, "epsilon"), eps, {"steps": 0})
    with pytest.raises(SystemExit, match="--prediction epsilon"):
        train_tiny_vdm.main(common + ["--out", str(tmp_path / "c.safetensors"), "--state", str(tmp_path / "c.pt"),
                                      "--init-from", str(eps)])
    assert not (tmp_path / "c.safetensors").exists()


@pytest.mark.full
def test_quality_sweep_prints_a_row_per_setting_and_the_step_times(tmp_path, capsys, monkeypatch):
    """The step times are ``evaluate.step_times``'s (tested with a fake clock in test_evaluate), printed as measured."""
    from qvd_demo import evaluate as E
    from tools import quality_sweep

    timed = []
    monkeypatch.setattr(E, "step_times", lambda model, q: timed.append(q) or {"fp32": 0.03, "int": 0.02, "fake": 0.06})
    path = tmp_path / "m.safetensors"
    T.save_weights(T.build_model(0, "v_prediction"), path, {"steps": 0})
    out = quality_sweep.main(["--weights", str(path), "--settings", "1:2,2:1", "--seeds", "5-6", "--step-times", "1",
                              "--threads", "1"])
    rows = [line for line in out["table"] if line.startswith("| DDIM")]
    assert [r.split(" |")[0] for r in rows] == ["| DDIM 1, CFG 2 (2)", "| DDIM 2, CFG 1 (2)"]
    assert any(line.startswith("| data (2)") for line in out["table"])
    assert out["step_times"] == [{"fp32": 0.03, "int": 0.02, "fake": 0.06}] and len(timed) == 1
    assert "fp32 30.0 ms, W8A8 integer kernels 20.0 ms (1.50x fp32), float simulation 60.0 ms" in \
        capsys.readouterr().out
    with pytest.raises(SystemExit):
        quality_sweep.main(["--weights", str(path), "--seeds", "9-3"])
