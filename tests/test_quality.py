import math

import pytest
import torch

from qvd_demo import quality as Q
from qvd_demo import tinyvdm as T

ALL = list(range(T.NULL_CLASS))


def data(ids, seed=0, **kw):
    return list(T.make_clips(ids, torch.Generator().manual_seed(seed), **kw))


def test_procedural_data_meets_every_threshold():
    conds = ALL * 2
    q = Q.data_quality(conds, seed=1)
    assert q["recognised"] == 1.0 and q["frames_recognised"] == 1.0
    assert q["background"] < 1e-3 and q["size_stable"] == 1.0
    assert 1.0 < q["speed"] < 1.6  # 0.75 .. 2 px/frame, less at bounces
    assert all(ok for _, _, ok in Q.check(q, Q.data_quality(conds, seed=2)).values())


@pytest.mark.parametrize("wrong", ["colour", "shape"])
def test_the_wrong_class_is_not_recognised(wrong):
    for cid in ALL:
        clip = data([cid], seed=cid)[0]
        colour, shape = T.class_parts(cid)
        other = T.CLASSES.index(f"{T.class_parts((cid + 1) % 4)[0]} {shape}" if wrong == "colour"
                                else f"{colour} {T.SHAPES[(T.SHAPES.index(shape) + 1) % 3]}")
        assert Q.clip_quality(clip, cid)["recognised"] == 1.0
        assert Q.clip_quality(clip, other)["recognised"] == 0.0, (T.CLASSES[cid], T.CLASSES[other])


def test_one_blank_frame_fails_the_clip_and_noise_raises_the_background():
    clip = data([4])[0]
    blank = clip.clone()
    blank[3] = -1
    q = Q.clip_quality(blank, 4)
    assert q["recognised"] == 0.0 and q["frames_recognised"] == 7 / 8
    noisy = (clip + 0.2 * torch.randn(clip.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    # sigma 0.2 on black (half of it clipped) is plainly visible: above the threshold over the data
    assert Q.clip_quality(noisy, 4)["background"] > Q.THRESHOLDS["background_over_data"] > Q.clip_quality(clip, 4)["background"]


def test_speed_and_size_stability():
    assert Q.clip_quality(data([7], static=True)[0], 7)["speed"] < 1e-4
    assert Q.clip_quality(data([7])[0], 7)["speed"] > 0.5
    # a circle growing from half-size 3 to 6 px: recognised, but not of stable size
    r = torch.linspace(3, 6, T.FRAMES)
    alpha = T.render_alpha(torch.tensor(1), torch.tensor([[12.0, 12.0]]).expand(T.FRAMES, 2), r)
    red = torch.tensor(T.COLOURS["red"])[None, :, None, None]
    growing = -1 + alpha[:, None] * (red + 1)
    q = Q.clip_quality(growing, "red circle")
    assert q["recognised"] == 1.0 and q["size_stable"] == 0.0 and q["size_cv"] > 0.15


def test_check_names_what_fails():
    conds = ALL
    ref = Q.data_quality(conds)
    fast = dict(ref, speed=ref["speed"] * 1.5, background=ref["background"] + 0.1)
    res = Q.check(fast, ref)
    assert not res["speed_rel_err"][2] and not res["background_over_data"][2]
    assert res["recognised"][2] and res["size_stable"][2]
    assert math.isclose(res["speed_rel_err"][0], 0.5)
    assert "recognised" in "\n".join(Q.table({"FP": ref}, ref))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="F, 3, H, H"):
        Q.clip_quality(torch.zeros(3, 24, 24), 0)
    with pytest.raises(ValueError, match="unconditional"):
        Q.clip_quality(data([0])[0], T.NULL_CLASS)
    with pytest.raises(ValueError, match="one class per clip"):
        Q.quality(data([0, 1]), [0])
