"""QVD on a real AnimateDiff architecture (diffusers UNetMotionModel), calibrated over several sampler
timesteps and 8 frames."""
import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from qvd import (CalibrationError, Calibrator, HiDiTQLinear, ModelMismatchError, NonFiniteActivationError, QConv2d,
                 QLinear, QVDConfig, QVDError, load_calibration, quantize_model, save_calibration, set_mode)
from qvd.delta import WeightDelta
from qvd.identity import find_layers

from unet_fixtures import FRAMES, TIMESTEPS, build_unet, rel_err

# Stated bound: W8A8 output of the whole UNet within 6% relative L2 of FP at every timestep
# (random-weight model; measured ~3%).
W8A8_BOUND = 0.06
INT_OPS = {"aten::_int_mm", "onednn::qlinear_pointwise", "onednn::qconv2d_pointwise"}


def test_calibration_records_timesteps_frames_and_bounded_stats(unet, calibration):
    assert calibration.timesteps == sorted(map(float, TIMESTEPS), reverse=True)
    assert set(calibration.layers) == set(find_layers(unet, QVDConfig()))
    # Roles observed, no names configured: exactly the layers the diffusers names give (time embedding MLP and every
    # ResBlock's time projection; conv_in / conv_out), none of the cross-attention or motion-module Linears.
    temporal = {n for n, s in calibration.layers.items() if s.temporal}
    assert temporal == {n for n in calibration.layers if n.startswith("time_embedding.") or n.endswith("time_emb_proj")}
    assert len(temporal) > 4
    assert calibration.roles == {"first": ["conv_in"], "last": ["conv_out"]}
    cond = {n for n, s in calibration.layers.items() if s.conditioning_only}
    assert cond == {n for n in calibration.layers if ".attentions." in n and n.endswith(("attn2.to_k", "attn2.to_v"))}
    f = calibration.temporal_features("down_blocks.0.resnets.0.time_emb_proj")
    assert f.shape == (len(TIMESTEPS), unet.down_blocks[0].resnets[0].time_emb_proj.in_features)
    assert torch.all(f.min(1).values >= -0.2785)  # SiLU outputs: the skewed temporal features
    for s in calibration.layers.values():
        assert s.rows.shape[0] <= QVDConfig().calib_rows  # statistics, not raw activations
    conv = calibration.layers["down_blocks.0.resnets.0.conv1"]
    assert conv.rows.shape[1] == 9 * 32  # 3x3 receptive-field patches


def test_w8a8_output_close_to_fp(unet, inputs, quantized):
    q, _ = quantized
    for t in TIMESTEPS:
        assert rel_err(inputs.run(q, t), inputs.run(unet, t)) < W8A8_BOUND


def test_every_layer_swapped_and_reported(unet, quantized):
    """Every Linear / Conv2d but the first and last convolutions (kept in float by default) is swapped."""
    q, res = quantized
    kinds = {type(m) for m in q.modules()}
    left = {n for n, m in q.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert left == {"conv_in", "conv_out"}
    assert {QLinear, QConv2d, HiDiTQLinear} <= kinds
    by_name = {r["name"]: r for r in res.report}
    assert set(by_name) == set(find_layers(unet, QVDConfig()))
    assert all("keep_ends_float" in by_name[n]["skipped"] and "call graph" in by_name[n]["role"] for n in left)
    tp = by_name["up_blocks.1.resnets.0.time_emb_proj"]
    assert tp["kind"] == "temporal" and 0.9 < tp["tdscore"] <= 1.0
    assert any(str(r.get("scri_fold")).startswith("norm:") for r in res.report)
    assert all(r["out_rel_err"] < 0.05 for r in res.report if "skipped" not in r)


def test_the_plan_decides_every_layer_with_a_named_handler_and_build_follows_it(unet, calibration, quantized):
    """Every handler is used on this UNet, each decision says why, the plan leaves the model untouched, and the
    built modules are the ones quantize_model installs."""
    from qvd.quantize import build, plan
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    p = plan(unet, calibration, QVDConfig())
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items())
    by = {d.name: d for d in p.decisions}
    assert {d.handler for d in p.decisions} == {"float", "hiditq", "scri-norm", "scri-kernel", "uniform"}
    assert all(d.why for d in p.decisions)
    assert by["conv_in"].handler == "float" and by["down_blocks.0.resnets.0.time_emb_proj"].handler == "hiditq"
    cross = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # in the default scri_skip
    assert by[cross].handler == "uniform" and by[cross].fit.alpha is None
    norm = next(d.norm for d in p.decisions if d.handler == "scri-norm")
    assert norm in p.norms and all(d.fit.alpha == by[d.name].fit.alpha for d in p.decisions if d.norm == norm)
    result = build(unet, p)
    assert result.report == p.report == quantized[1].report
    for name, m in quantized[1].modules.items():
        assert torch.equal(result.modules[name].weight, m.weight), name


def test_a_channel_subset_search_gives_the_whole_layers_codes_for_the_alpha_it_picks(unet, inputs, calibration,
                                                                                  quantized):
    """``search_channels`` only narrows where the alpha search measures: a layer that picks the alpha the
    all-channel search picked gets bit-identical codes and scales; the model stays within the W8A8 bound."""
    exact = {r["name"]: r for r in quantized[1].report}
    q = copy.deepcopy(unet)
    res = quantize_model(q, calibration, QVDConfig(search_channels=16))
    same = 0
    for r in res.report:
        if "skipped" in r or r["kind"] == "temporal":
            continue
        n_out = dict(unet.named_modules())[r["name"]].weight.shape[0]
        assert r["out_err_channels"] == min(16, n_out) and exact[r["name"]]["out_err_channels"] == n_out
        if r["scri_alpha"] == exact[r["name"]]["scri_alpha"]:
            same += 1
            for field in ("weight", "weight_scale", "act_scale"):
                assert torch.equal(getattr(res.modules[r["name"]], field),
                                   getattr(quantized[1].modules[r["name"]], field)), (r["name"], field)
    assert same >= 0.6 * len([r for r in res.report if "scri_alpha" in r])
    for t in TIMESTEPS:
        assert rel_err(inputs.run(q, t), inputs.run(unet, t)) < W8A8_BOUND


def test_first_and_last_convolutions_quantize_at_8_bit_when_not_kept_in_float(unet, calibration):
    res = quantize_model(copy.deepcopy(unet), calibration, QVDConfig(w_bits=4, a_bits=6, keep_ends_float=False),
                         apply=False)
    by_name = {r["name"]: r for r in res.report}
    assert {by_name[n]["w_bits"] for n in ("conv_in", "conv_out")} == {8}
    assert isinstance(res.modules["conv_in"], QConv2d) and res.modules["conv_out"].a_bits == 8
    assert by_name["down_blocks.0.resnets.0.conv1"]["w_bits"] == 4


def test_int8_layers_run_integer_kernels(inputs, quantized, monkeypatch):
    from qvd.kernels import cpu
    # the int8 ops proper (the exact "float" CPU route runs the same codes through float GEMMs: tests/test_kernels.py)
    monkeypatch.setattr(cpu, "ROUTE", "onednn" if cpu._onednn_ok() else "int_mm")
    q, _ = quantized
    n_int = sum(isinstance(m, (QLinear, QConv2d)) for m in q.modules())
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        inputs.run(q, 400)
    counts = {}
    for e in prof.events():
        counts[e.name] = counts.get(e.name, 0) + 1
    assert sum(counts.get(k, 0) for k in INT_OPS) >= n_int
    assert counts.get("aten::linear", 0) == 0  # no fp GEMM left but the float first / last convolutions
    assert counts.get("aten::conv2d", 0) == 2
    weights = [m.weight for m in q.modules() if isinstance(m, (QLinear, QConv2d))]
    assert all(w.dtype == torch.int8 for w in weights)


def test_fake_quant_mode_matches_integer_kernels_per_layer(inputs, quantized):
    q, _ = quantized
    captured = {}

    def keep(name):
        def hook(_module, args, kwargs):
            captured[name] = args[0] if args else kwargs["input"]
        return hook

    hooks = [m.register_forward_pre_hook(keep(n), with_kwargs=True)
             for n, m in q.named_modules() if isinstance(m, (QLinear, QConv2d))]
    try:
        inputs.run(q, 600)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for n, x in captured.items():
            m = q.get_submodule(n)
            y_int = m(x)
            set_mode(m, "fake")
            y_fake = m(x)
            set_mode(m, "int")
            assert rel_err(y_int, y_fake) < 1e-5, n


def test_skip_list_keeps_calibrated_layers_in_float(unet, calibration):
    q = copy.deepcopy(unet)
    res = quantize_model(q, calibration, QVDConfig(skip=("conv_out", "*.motion_modules.*"), keep_ends_float=False))
    assert type(q.conv_out) is torch.nn.Conv2d and type(q.conv_in) is QConv2d
    assert not any("motion_modules" in n for n in res.modules)


def test_apply_false_leaves_the_model_untouched(unet, inputs, calibration):
    before = inputs.run(unet, 200)
    res = quantize_model(unet, calibration, QVDConfig(), apply=False)
    assert res.modules and torch.equal(inputs.run(unet, 200), before)
    assert all(type(m) is not QLinear for m in unet.modules())


def test_calibration_from_another_model_is_refused(calibration):
    from diffusers import UNetMotionModel
    other = UNetMotionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                            down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
                            up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), norm_num_groups=8,
                            num_attention_heads=2, motion_num_attention_heads=2, in_channels=8, out_channels=4)
    with pytest.raises(ModelMismatchError, match="different model"):
        quantize_model(other, calibration, QVDConfig())


def test_calibration_errors():
    model = build_unet(1)
    with pytest.raises(CalibrationError, match="no calibration forward"):
        with Calibrator(model) as cal:
            pass
        cal.result()
    with pytest.raises(CalibrationError, match="no Linear"):
        Calibrator(torch.nn.ReLU())
    with pytest.raises(CalibrationError, match="needs a Calibration"):
        quantize_model(model, None)
    lat = torch.randn(1, 4, FRAMES, 16, 16)
    lat[0, 0, 0, 0, 0] = float("nan")
    with Calibrator(model) as cal:
        with torch.no_grad():
            model(lat, torch.tensor([10]), encoder_hidden_states=torch.randn(FRAMES, 7, 32))
    with pytest.raises(NonFiniteActivationError, match="conv_in"):
        cal.result()
    assert not any(m._forward_pre_hooks for m in model.modules())  # hooks removed


def test_calibration_file_round_trip(unet, inputs, calibration, tmp_path):
    path = tmp_path / "calib.safetensors"
    save_calibration(path, calibration)
    loaded = load_calibration(path)
    assert loaded.timesteps == calibration.timesteps and loaded.norm_groups == calibration.norm_groups
    a, b = copy.deepcopy(unet), copy.deepcopy(unet)
    quantize_model(a, calibration, QVDConfig())
    quantize_model(b, loaded, QVDConfig())
    assert torch.equal(inputs.run(a, 800), inputs.run(b, 800))
    with pytest.raises(FileExistsError):
        save_calibration(path, calibration)


def _layer_and_input(q, res, calibration, kind: str, fold: str):
    """A quantized layer of ``kind`` with a bias (SCRI fold ``fold``: 'kernel' / 'norm'), its real (pre-SCRI) input
    ``x`` from its calibration rows and the input the layer itself is given (the folded norm's output)."""
    def fits(r):
        m = q.get_submodule(r["name"])
        if r["kind"] != kind or m.bias is None:
            return False
        return kind == "temporal" or str(r.get("scri_fold")).startswith(fold)
    name = next(r["name"] for r in res.report if fits(r))
    layer = copy.deepcopy(q.get_submodule(name))
    x = calibration.layers[name].rows[:64]
    if kind == "conv":  # each (kh, kw, C) row as one k x k patch
        k, c = layer.kernel_size[0], layer.in_channels
        x = x.view(-1, k, k, c).permute(0, 3, 1, 2).contiguous()
    seen = x
    if fold == "norm" and kind != "temporal":
        view = (-1,) if kind == "linear" else (-1, 1, 1)
        seen = (x - layer.scri_shift.view(view)) * layer.scri_inv_scale.view(view)
    return name, layer, x, seen


def _seeded_delta(layer, rank: int, ratio: float, gen) -> tuple[WeightDelta, torch.Tensor]:
    """A rank-``rank`` low-rank part plus a dense part, ``||dW|| / ||W||`` = ``ratio``; returns it and dW."""
    w = layer.convert_weight(layer.weight)
    k = w[0].numel()
    up, down = torch.randn(w.shape[0], rank, generator=gen), torch.randn(rank, *w.shape[1:], generator=gen)
    dense = torch.randn(w.shape, generator=gen)
    dw = (up @ down.reshape(rank, k)).reshape(w.shape) + dense
    c = ratio * float(w.norm() / dw.norm())
    return WeightDelta(down=down, up=up * c, dense=dense * c), dw * c


def _effect(layer, x, dw) -> torch.Tensor:
    if dw.dim() == 2:
        return torch.nn.functional.linear(x, dw)
    return torch.nn.functional.conv2d(x, dw, None, layer.stride, layer.padding)


@pytest.mark.parametrize("kind,fold", [("linear", "kernel"), ("linear", "norm"), ("conv", "kernel"),
                                       ("conv", "norm"), ("temporal", "")])
@pytest.mark.parametrize("mode", ["int", "fake"])
def test_a_weight_delta_runs_beside_the_int8_kernel_exactly(quantized, calibration, kind, fold, mode):
    """A LoRA-style delta adds exactly ``dW x`` for the layer's real input x (also where a norm does the SCRI
    transform), at ||dW|| / ||W|| from 0.003 to 0.3; the int8 codes never change; removing it is exact."""
    q, res = quantized
    name, layer, x, seen = _layer_and_input(q, res, calibration, kind, fold)
    if kind != "temporal":
        layer.mode = mode
    codes = layer.weight.clone()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        before = layer(seen)
        for ratio in (0.003, 0.01, 0.03, 0.1, 0.3):
            delta, dw = _seeded_delta(layer, 4, ratio, gen)
            layer.set_delta(delta)
            got, want = layer(seen) - before, _effect(layer, x, dw)
            cos = float(torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), 0))
            assert cos > 0.99999 and abs(float(got.norm() / want.norm()) - 1) < 1e-4, (name, ratio, cos)
        layer.set_delta(None)
        assert torch.equal(layer(seen), before) and torch.equal(layer.weight, codes)


def test_a_host_patch_is_never_rounded_into_the_codes(quantized, calibration):
    """ComfyUI's full load hands ``set_weight`` a patched float weight: the codes stay, and a call before the
    host glue resolved the patch (``set_delta``) is an error, not a silently missing LoRA."""
    q, res = quantized
    _, layer, x, seen = _layer_and_input(q, res, calibration, "linear", "kernel")
    codes = layer.weight.clone()
    w = layer.convert_weight(layer.weight)
    with torch.no_grad():
        before = layer(seen)
        assert layer.set_weight(w * 1.1, inplace_update=True, seed=0) is None and torch.equal(layer.weight, codes)
        with pytest.raises(QVDError, match="outside the model loading"):
            layer(seen)
        layer.set_delta(None)
        assert torch.equal(layer(seen), before)


@pytest.mark.parametrize("kind", ["linear", "conv", "temporal"])
def test_an_offloaded_layer_reads_its_queued_patches_at_call_time(quantized, calibration, kind):
    """ComfyUI's low-VRAM path: with ``comfy_cast_weights`` set, queued weight functions are turned into the
    delta by the host glue's reader (never applied to the codes), bias functions apply to the float bias."""
    q, res = quantized
    _, layer, x, seen = _layer_and_input(q, res, calibration, kind, "kernel")
    gen = torch.Generator().manual_seed(1)
    delta, dw = _seeded_delta(layer, 4, 0.05, gen)
    bias_delta = 0.1 * torch.randn(layer.bias.shape, generator=gen)
    queued = object()
    read = []
    with torch.no_grad():
        before = layer(seen)
        ref = copy.deepcopy(layer)
        ref.bias.data += bias_delta
        want = ref(seen) + _effect(layer, x, dw)
        layer.read_host_patches = lambda module, functions: read.append(functions) or delta
        layer.weight_function, layer.bias_function = [queued], [lambda b: b + bias_delta]
        assert torch.equal(layer(seen), before)  # queued patches apply only once the host sets comfy_cast_weights
        layer.comfy_cast_weights = True
        got = layer(seen)
        assert read == [[queued]] and rel_err(got, want) < 1e-5 and rel_err(got, before) > 0.01
        del layer.read_host_patches
        with pytest.raises(QVDError, match="no host glue"):
            layer(seen)


def test_uniform_temporal_tdscore_is_reported_for_the_quantizer_actually_used(calibration, unet):
    res = quantize_model(copy.deepcopy(unet), calibration, QVDConfig(htdq=False), apply=False)
    temporal = [r for r in res.report if r.get("tdscore") is not None]
    assert temporal and all(r["kind"] == "linear" for r in temporal)
    assert min(r["tdscore"] for r in temporal) > 0.95  # 8-bit uniform keeps the steps distinguishable


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
def test_calibration_handles_same_padding_and_dilation():
    """``padding="same"`` (a string) and dilated convs calibrate (patches as the conv sees them); they stay in
    float, and the statistics come back on the CPU."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding="same"), torch.nn.Conv2d(8, 8, 3, dilation=2),
                                torch.nn.Conv2d(8, 8, 4, padding="same"))
    x = torch.randn(2, 3, 12, 12)
    with Calibrator(model, QVDConfig(calib_rows=16)) as cal:
        model(x)
    stats = cal.result().layers
    assert all(s.rows.device.type == "cpu" for s in stats.values())
    same = stats["0"]
    assert same.rows.shape == (16, 27) and float(same.ch_min.max()) <= 0 <= float(same.ch_max.min())
    patch = torch.nn.functional.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1).unfold(1, 3, 1).unfold(2, 3, 1)
    every = patch.permute(0, 1, 2, 4, 5, 3).reshape(-1, 27)  # every (kh, kw, C) patch of the padded input
    assert all(bool((every == r).all(1).any()) for r in same.rows)
    assert stats["1"].rows.shape == (16, 72) and stats["2"].rows.shape == (16, 128)
    report = quantize_model(model, cal.result(), QVDConfig(keep_ends_float=False), apply=False).report
    assert {r["name"]: r.get("skipped") for r in report}["1"] == "grouped / dilated / non-zero-padded conv"


@pytest.mark.parametrize("kind", ["linear", "conv", "temporal"])
def test_a_host_bias_patch_set_at_load_replaces_the_stored_bias_until_removed(quantized, calibration, kind):
    """ComfyUI never merges patches into a quantized layer (``comfy_patched_weights`` stays True whatever it sets or
    deletes): the glue hands the patched float bias to ``set_delta``; the stored bias is never written."""
    q, res = quantized
    _, layer, x, seen = _layer_and_input(q, res, calibration, kind, "kernel")
    gen = torch.Generator().manual_seed(2)
    patched = layer.bias + 0.1 * torch.randn(layer.bias.shape, generator=gen)
    stored = layer.bias.clone()
    with torch.no_grad():
        before = layer(seen)
        ref = copy.deepcopy(layer)
        ref.bias.data.copy_(patched)
        want = ref(seen)
        layer.set_delta(None, patched)
        got = layer(seen)
        assert rel_err(got, want) < 1e-6 and rel_err(got, before) > 0.001
        layer.comfy_patched_weights = False
        del layer.comfy_patched_weights
        assert layer.comfy_patched_weights is True
        layer.set_delta(None)
        assert torch.equal(layer(seen), before) and torch.equal(layer.bias, stored)


def test_the_conditioning_path_is_found_by_what_calibration_observes(unet, calibration, quantized):
    """Layers whose input was the same at every calibrated timestep (the text context: the spatial cross-attention
    keys / values) are the conditioning path, whatever their names; they get no prompt-specific SCRI and the report
    says why. The motion modules' attn2 (temporal self-attention) and every other layer vary with the timestep."""
    cond = sorted(n for n, s in calibration.layers.items() if s.conditioning_only)
    assert cond and all(n.endswith(("attn2.to_k", "attn2.to_v")) and ".attentions." in n for n in cond), cond
    spatial_kv = [n for n, s in calibration.layers.items() if ".attentions." in n and n.endswith(("attn2.to_k",
                                                                                                   "attn2.to_v"))]
    assert sorted(spatial_kv) == cond
    report = {r["name"]: r for r in quantized[1].report}
    assert all("conditioning path" in report[n]["conditioning"] and report[n]["scri_alpha"] is None for n in cond)
    assert not any("conditioning" in r for n, r in report.items() if n not in cond)
