import math
import types

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


def test_quantized_copy_runs_the_kernels_or_their_simulation_and_auto_picks_by_speed(monkeypatch):
    from qvd import QVDConfig
    from qvd.modules import QConv2d, QLinear

    torch.set_num_threads(1)
    fp = T.build_model(0)
    cal = E.calibrate(fp, QVDConfig(), [0], steps=2)
    q_int, _ = E.quantized_copy(fp, cal, QVDConfig())
    q_fake, _ = E.quantized_copy(fp, cal, QVDConfig(), mode="fake")
    modes = {m.mode for m in q_fake.modules() if isinstance(m, (QLinear, QConv2d))}
    assert modes == {"fake"} and {m.mode for m in q_int.modules() if isinstance(m, (QLinear, QConv2d))} == {"int"}
    a, b = (T.sample(q, 1, seed=3, steps=2, embed=fp) for q in (q_int, q_fake))
    assert E.psnr(a, b) > 40  # the same codes and scales: they differ by float rounding only
    # a fake clock that advances by what ran last: the float model 1 s, the W8A8 one by its layers' mode
    cost, ran, now = {"fp32": 1.0, "fake": 3.0, "int": 2.0}, [], [0.0]
    fp.unet.register_forward_hook(lambda *_: ran.append("fp32"))
    q_fake.unet.register_forward_hook(lambda m, *_: ran.append(next(
        x.mode for x in m.modules() if isinstance(x, (QLinear, QConv2d)))))
    monkeypatch.setattr(E, "time", types.SimpleNamespace(
        perf_counter=lambda: now.__setitem__(0, now[0] + cost[ran[-1]] if ran else 0.0) or now[0]))
    assert E.step_times(fp, q_fake) == cost  # each timed in its own mode: the median of 5 calls, after a warm-up
    assert ran == ["fp32"] * 6 + ["fake"] * 6 + ["int"] * 6
    assert {m.mode for m in q_fake.modules() if isinstance(m, (QLinear, QConv2d))} == {"int"}
    assert E.auto_mode({"int": 1.0, "fake": 1.0}) == "int" and E.auto_mode({"int": 1.01, "fake": 1.0}) == "fake"
