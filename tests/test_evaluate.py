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
