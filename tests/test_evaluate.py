import math

import torch

from qvd_demo import evaluate as E
from qvd_demo import tinyvdm as T


def test_identical_clips_are_perfect():
    x = T.make_clips([0], torch.Generator().manual_seed(0))[0]
    assert E.psnr(x, x) == math.inf
    assert abs(E.ssim(x, x) - 1) < 1e-6
    assert E.temporal_error(x, x) == 0


def test_known_noise_gives_expected_psnr():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(8, 3, 24, 24)
    sigma = 0.1
    y = x + sigma * torch.randn(x.shape, generator=g)
    expected = 10 * math.log10(4 / sigma ** 2)  # data range 2 -> 26.0 dB
    assert abs(E.psnr(x, y) - expected) < 0.1
    assert E.ssim(x, y) < 0.99


def test_motion_statistic_separates_moving_from_static():
    g = torch.Generator().manual_seed(1)
    moving = T.make_clips([5], g)[0]
    static = T.make_clips([5], torch.Generator().manual_seed(1), static=True)[0]
    assert E.clip_stats(moving, 5)["speed"] > 0.5
    assert E.clip_stats(static, 5)["speed"] < 1e-4


def test_colour_statistic_checks_the_class():
    x = T.make_clips([T.class_id("red circle")], torch.Generator().manual_seed(0))[0]
    assert E.clip_stats(x, "red circle")["colour_ok"] == 1.0
    assert E.clip_stats(x, "blue circle")["colour_ok"] == 0.0
