import pytest
import torch

from qvd_demo import evaluate as E
from qvd_demo import tinyvdm as T


@pytest.fixture(scope="module")
def trained():
    return T.load_trained()


def test_shipped_weights_load(trained):
    assert int(trained.metadata["steps"]) > 0
    assert T.DEFAULT_WEIGHTS.stat().st_size <= 5e6


def test_missing_weights_say_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_tiny_vdm"):
        T.load_trained(tmp_path / "nope.safetensors")


def test_sampling_is_deterministic(trained):
    a = T.sample(trained, "red circle", seed=3, steps=4)
    b = T.sample(trained, "red circle", seed=3, steps=4)
    assert a.shape == (T.FRAMES, 3, T.SIZE, T.SIZE)
    assert torch.equal(a, b)


def test_trained_samples_beat_untrained(trained):
    conds = ["red circle", "green square", "blue triangle", "yellow circle"]
    untrained = T.build_model(0)
    score = {}
    for name, m in (("trained", trained), ("untrained", untrained)):
        clips = [T.sample(m, c, seed=i, steps=10) for i, c in enumerate(conds)]
        score[name] = E.quality(clips, conds)["colour_ok"]
    assert score["trained"] >= 0.75 > score["untrained"] + 0.25, score
