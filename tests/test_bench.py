import torch

from bench.first_last_share import share


def test_sd15_first_and_last_convolutions_are_a_negligible_share_of_the_macs():
    total_gmac, first_last_mmac = share()
    # 3x3 convs 4 -> 320 and 320 -> 4 at 64x64, batch 2: 2 x 2 x 4 x 320 x 9 x 4096 MACs exactly
    assert first_last_mmac * 1e6 == 2 * 2 * 4 * 320 * 9 * 64 * 64
    assert 700 < total_gmac < 900  # SD1.5 at 512x512 is ~400 GMAC per sample
    assert first_last_mmac / 1e3 / total_gmac < 3e-4


def test_the_lora_branch_bench_puts_a_branch_of_the_loras_own_size_on_every_attention_and_ff_linear(quantized,
                                                                                                   inputs):
    import copy

    from bench.lora_branch import attach, lora_layers

    q = copy.deepcopy(quantized[0])
    layers = lora_layers(q)
    kinds = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
    assert all(any(n.endswith(k) for n in layers) for k in kinds) and all(n.endswith(kinds) for n in layers)
    before = inputs.run(q, 600)
    held, lora = attach(layers, rank=4)
    assert held == lora > 0  # the low-rank branch holds exactly the fp16 LoRA's bytes
    assert not torch.equal(inputs.run(q, 600), before)
    held, lora = attach(layers, rank=None)
    assert lora == 0 and held == sum(m.weight.numel() * 2 for m in layers.values())


def test_the_quantize_time_bench_times_both_steps_of_quantize_model(unet, calibration, quantized, monkeypatch):
    """The clock is read around each of ``quantize_model``'s two steps (a fake clock: the figures are exact)."""
    import types

    from bench import quantize_time
    from bench.quantize_time import SD15_MOTION, timed_quantize
    from qvd import QVDConfig

    events, now = [], iter([10.0, 12.0, 17.0])
    monkeypatch.setattr(quantize_time, "time", types.SimpleNamespace(
        perf_counter=lambda: events.append("clock") or next(now)))
    for step in ("plan", "build"):
        real = getattr(quantize_time, step)
        monkeypatch.setattr(quantize_time, step, lambda *a, step=step, real=real: events.append(step) or real(*a))
    result, t_plan, t_build, kinds = timed_quantize(unet, calibration, QVDConfig())
    assert events == ["clock", "plan", "clock", "build", "clock"] and (t_plan, t_build) == (2.0, 5.0)
    assert sum(kinds.values()) == len(calibration.layers)
    assert result.report == quantized[1].report
    assert SD15_MOTION["cross_attention_dim"] == 768 and SD15_MOTION["use_motion_mid_block"]  # mm_sd_v15_v2
