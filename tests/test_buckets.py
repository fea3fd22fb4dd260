"""Timestep buckets (issue 29): per-bucket static activation quantizers, the clock that picks one from the model
call's timestep, and the file formats (version 3; version 2 files load as one bucket)."""
import copy
import dataclasses

import pytest
import torch

import file_mutations as fm
from qvd import Calibrator, QuantizedFileError, QVDConfig, QVDError, load_quantized, quantize_model, save_quantized
from qvd.io import KEY
from qvd.modules import QConv2d, QLinear
from qvd.timesteps import TimestepClock, bucket_edges, bucket_of
from unet_fixtures import TIMESTEPS, rel_err

NOSCRI = QVDConfig(scri=False, act_range="minmax")


def test_bucket_edges_split_the_calibrated_range_evenly_and_merge_empty_intervals():
    assert bucket_edges([999, 50], 1) == [] and bucket_edges([500], 4) == []
    assert bucket_edges([0, 300, 600, 1000], 4) == [250, 500, 750] and bucket_edges([0, 1000], 4) == [250]
    # 0 / 727 / 889 / 960 / 999 in four intervals of 249.75: the second holds none, merged into the third
    assert bucket_edges([999, 960, 889, 727, 0], 4) == [249.75, 749.25]
    edges = bucket_edges(TIMESTEPS, 4)
    assert [bucket_of(t, edges) for t in (-5, 50, 200, 400, 600, 800, 999, 5000)] == [0, 0, 0, 1, 2, 3, 3, 3]


def test_one_bucket_is_the_single_scale_quantizer(unet, calibration, inputs):
    """timestep_buckets=1 (the default, measured: docs/results.md) gives exactly today's layers."""
    a = quantize_model(copy.deepcopy(unet), calibration, QVDConfig(), apply=False)
    b = quantize_model(copy.deepcopy(unet), calibration, QVDConfig(timestep_buckets=1), apply=False)
    assert a.clock.edges == [] and QVDConfig().timestep_buckets == 1
    for n, m in a.modules.items():
        if isinstance(m, (QLinear, QConv2d)):
            assert m.act_scale.shape == (1,) and torch.equal(m.act_scale, b.modules[n].act_scale)
            assert m.zero_points == b.modules[n].zero_points


def _calibrate(unet, inputs, timesteps):
    with Calibrator(unet, NOSCRI) as cal:
        for t in timesteps:
            inputs.run(unet, t)
    return cal.result()


def test_each_bucket_is_fit_on_its_own_timesteps(unet, inputs):
    """Min-max ranges: a bucket's quantizer is the one a calibration of only its timesteps gives (narrowed, never
    widened, from the whole calibration's)."""
    whole = _calibrate(unet, inputs, TIMESTEPS)
    q = quantize_model(copy.deepcopy(unet), whole, dataclasses.replace(NOSCRI, timestep_buckets=2),
                       apply=False)
    edges = q.clock.edges
    assert len(edges) == 1
    parts = [[t for t in TIMESTEPS if bucket_of(t, edges) == b] for b in range(2)]
    alone = [quantize_model(copy.deepcopy(unet), _calibrate(unet, inputs, ts), NOSCRI, apply=False) for ts in parts]
    differ = 0
    for n, m in q.modules.items():
        if not isinstance(m, (QLinear, QConv2d)):
            continue
        for b in range(2):
            want = alone[b].modules[n]
            assert float(m.act_scale[b]) == pytest.approx(float(want.act_scale[0]), rel=1e-6), (n, b)
            assert m.zero_points[b] == want.zero_points[0], (n, b)
        differ += m.zero_points[0] != m.zero_points[1] or float(m.act_scale[0]) != float(m.act_scale[1])
    assert differ > 10  # the two halves of the schedule do differ


@pytest.fixture(scope="module")
def bucketed(unet, calibration):
    model = copy.deepcopy(unet)
    return model, quantize_model(model, calibration, QVDConfig(timestep_buckets=4))


def test_the_model_call_picks_the_bucket_of_its_timestep(bucketed, unet, inputs):
    """``apply=True``: each forward sets the clock from its timestep; every layer then runs that bucket's quantizer,
    exactly as a one-bucket layer holding it (the kernels, the epilogue bias and a conv's padding codes)."""
    model, result = bucketed
    edges = result.clock.edges
    assert len(edges) == 3
    layers = {n: m for n, m in result.modules.items() if isinstance(m, (QLinear, QConv2d)) and not m.scri_in_norm}
    assert any(isinstance(m, QConv2d) and m.padding for m in layers.values())
    for t in (999, 400, 50):
        out = inputs.run(model, t)
        assert result.clock.index == bucket_of(t, edges)
        assert rel_err(out, inputs.run(unet, t)) < 0.1
        b = result.clock.index
        for n, m in list(layers.items())[::7]:
            single = copy.deepcopy(m)
            single.act_scale = torch.nn.Parameter(m.act_scale[b:b + 1].clone(), requires_grad=False)
            single.zero_points = (m.zero_points[b],)
            x = torch.randn((2, m.in_features) if isinstance(m, QLinear) else (2, m.in_channels, 8, 8),
                            generator=torch.Generator().manual_seed(b))
            assert torch.equal(m(x), single(x)), (n, t)


def test_a_bucketed_layer_without_a_timestep_says_how_to_give_one(unet, calibration):
    result = quantize_model(copy.deepcopy(unet), calibration, QVDConfig(timestep_buckets=4), apply=False)
    m = next(m for m in result.modules.values() if isinstance(m, QLinear))
    with pytest.raises(QVDError, match=r"4 timestep buckets ran before any timestep was known.*set_timestep"):
        m(torch.randn(2, m.in_features))
    result.set_timestep(torch.tensor([500.0, 500.0]))
    assert result.clock.index == bucket_of(500.0, result.clock.edges)
    assert m(torch.randn(2, m.in_features)).isfinite().all()


def test_bucketed_files_round_trip_and_are_checked(bucketed, unet, inputs, tmp_path):
    model, result = bucketed
    path = tmp_path / "b.safetensors"
    save_quantized(path, result)
    loaded_model = copy.deepcopy(unet)
    loaded = load_quantized(path, loaded_model)
    assert loaded.clock.edges == result.clock.edges
    for t in (999, 200):
        assert torch.equal(inputs.run(loaded_model, t), inputs.run(model, t))
    name = next(n for n, m in result.modules.items() if isinstance(m, QLinear))

    def refused(edit_meta=None, edit_tensors=None, match=""):
        fm.resign(path, tmp_path / "e.safetensors", KEY, edit_meta, edit_tensors)
        with pytest.raises(QuantizedFileError, match=match):
            load_quantized(tmp_path / "e.safetensors", copy.deepcopy(unet))

    refused(lambda m: m.update(timestep_edges=m["timestep_edges"][::-1]), match="timestep_edges is .*increasing")
    refused(lambda m: m.update(timestep_edges=[1.0, 2.0, 3.0, 4.0, 5.0]), match="timestep_edges")
    refused(lambda m: m["layers"][name].update(zero_point=[0]), match=r"zero_point is a JSON list, expected 4 integers")
    refused(edit_tensors=lambda t: t.update({f"{name}.act_scale": t[f"{name}.act_scale"][:2]}),
            match=rf"'{name}.act_scale' is F32 \[2\], expected F32 \[4\]")


def test_a_version_2_file_loads_as_one_bucket(unet, calibration, inputs, tmp_path):
    """Files written before buckets (format 2: a scalar scale, an integer zero point, no edges, no
    ``timestep_buckets`` in the config) load and run as they did."""
    model = copy.deepcopy(unet)
    result = quantize_model(model, calibration, QVDConfig())
    save_quantized(tmp_path / "v3.safetensors", result)

    def as_v2(meta):
        meta["format_version"] = 2
        del meta["timestep_edges"], meta["config"]["timestep_buckets"]
        for info in meta["layers"].values():
            if "zero_point" in info:
                info["zero_point"] = info["zero_point"][0]

    def scalars(tensors):
        for k in [k for k in tensors if k.endswith(".act_scale")]:
            tensors[k] = tensors[k].reshape(())

    fm.resign(tmp_path / "v3.safetensors", tmp_path / "v2.safetensors", KEY, as_v2, scalars)
    meta = fm.read(tmp_path / "v2.safetensors", KEY)[1]
    assert meta["format_version"] == 2 and "timestep_edges" not in meta
    old = copy.deepcopy(unet)
    loaded = load_quantized(tmp_path / "v2.safetensors", old)
    assert loaded.clock.edges == [] and loaded.config.timestep_buckets == 1
    for t in (999, 50):
        assert torch.equal(inputs.run(old, t), inputs.run(model, t))


def test_the_clock_keys_a_tensor_timestep_by_its_largest_value():
    clock = TimestepClock([100.0, 500.0])
    clock.set(torch.tensor([[0.0, 999.0], [0.0, 999.0]]))  # per token: the first frame clean (Wan 2.2 TI2V)
    assert clock.index == 2 and clock.timestep == 999.0
    clock.set(99.99)
    assert clock.index == 0
