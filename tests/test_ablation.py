import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from qvd_demo import tinyvdm as T
from tools import ablation as A


def test_calibration_and_evaluation_classes_are_disjoint_and_calibration_covers_all_parts():
    assert not set(A.CALIB_CLASSES) & set(A.EVAL_CLASSES)
    parts = [T.class_parts(c) for c in A.CALIB_CLASSES]
    assert {c for c, _ in parts} == set(T.COLOURS)
    assert {s for _, s in parts} == set(T.SHAPES)


@pytest.mark.full
def test_tiny_ablation_writes_markdown_and_plots(tmp_path):
    threads = torch.get_num_threads()
    keys = ["naive-w8a8", "mse-w8a8", "qvd-w8a8", "dynamic-w8a8", "qvd-w8a8-all"]
    (tmp_path / "results.md").write_text("# old\n\n" + A.SECTION + "\n\nthe generalisation section\n")
    rows = A.main(["--n", "2", "--steps", "2", "--guidance", "1.5", "--configs", ",".join(keys),
                   "--sensitivity", "shortcut,up.1", "--no-error-budget", "--out", str(tmp_path), "--w8a8-mode", "fake",
                   "--threads", str(threads)])
    sens = rows.pop("sensitivity")
    assert rows.pop("mode") == "fake"
    assert set(rows) == set(keys)
    for k, r in rows.items():
        assert 0 < r["psnr_db"] < float("inf")
        assert (r["min_tdscore"] is None) == (k == "dynamic-w8a8")
        assert 0 < (r["min_tdscore"] or 1) <= 1
        assert r["weight_bytes"] > 0
        assert len(r["psnr_clips"]) == 2 and abs(sum(r["psnr_clips"]) / 2 - r["psnr_db"]) < 1e-9
    assert rows["dynamic-w8a8"]["weight_bytes"] < rows["qvd-w8a8"]["weight_bytes"]  # int8 codes, no act params
    md = (tmp_path / "results.md").read_text()
    assert "# old" not in md and md.endswith(A.SECTION + "\n\nthe generalisation section\n")  # run on its own: kept
    assert "W8A8 layers in their float simulation" in md
    assert f"{threads} CPU thread(s)" in md and "Sampler: DDIM, 2 steps, CFG 1.5 " in md  # the settings it ran
    for label in ("naive min-max", "QVD (HTDQ + SCRI)", "per-token dynamic (peer)", "QVD, first / last W8A8"):
        assert f"| {label} |" in md
    assert "## First and last convolutions (W8A8)" in md
    assert f"{rows['qvd-w8a8']['psnr_db']:.2f}" in md
    assert "MSE <= 0.5x naive min-max's" in md
    d = [a - b for a, b in zip(rows["qvd-w8a8"]["psnr_clips"], rows["mse-w8a8"]["psnr_clips"])]
    assert f"HTDQ + SCRI {A._verdict(*A._paired(rows, 'qvd-w8a8', 'mse-w8a8'))} ({(d[0] + d[1]) / 2:+.2f} ± " \
           f"{abs(d[0] - d[1]) / 2:.2f} dB)" in md  # paired mean and standard error over the two clips
    # Sensitivity: one group at a time; the shortcut convs are a subset of every block's layers
    assert set(sens) == {"shortcut", "up.1"} and set(sens["shortcut"]) == {"naive", "qvd"}
    assert sens["shortcut"]["qvd"]["layers"] == 5 and sens["up.1"]["qvd"]["layers"] > 20
    assert "## Where the remaining error lives (W8A8)" in md
    assert sens["shortcut"]["qvd"]["channel_spread"] >= 1
    assert (f"| ResNet 1x1 shortcut | 5 | {sens['shortcut']['qvd']['channel_spread']:.1f} "
            f"| {sens['shortcut']['naive']['psnr_db']:.2f} |") in md
    for name in ("results_temporal_hist.png", "results_scri_coverage.png"):
        img = Image.open(tmp_path / "img" / name)
        assert img.size[0] > 400 and len(img.getcolors(1 << 16)) > 3  # drawn, not blank
        assert f"img/{name}" in md


def test_unknown_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown configs"):
        A.run(n=1, steps=1, configs=["qvd-w2a2"], out_md=tmp_path / "r.md", img_dir=tmp_path)
    with pytest.raises(ValueError, match=r"unknown configs / groups \['attn3'\]"):
        A.run(n=1, steps=1, configs=["qvd-w8a8"], groups=["attn3"], out_md=tmp_path / "r.md", img_dir=tmp_path)


def test_per_token_dynamic_peer_quantizes_every_token_on_its_own_scale():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16) * torch.tensor([[1.0], [10.0], [0.1], [100.0]])  # tokens of very different ranges
    peer = A.DynamicPerToken(lin, 8, 8)
    rel = ((peer(x) - lin(x)).norm(dim=1) / lin(x).norm(dim=1))
    assert peer.weight.dtype == torch.int8 and rel.max() < 0.02  # each token keeps its own precision
    conv = torch.nn.Conv2d(6, 4, 3, padding=1)
    xc = torch.randn(2, 6, 5, 5)
    assert ((A.DynamicPerToken(conv, 8, 8)(xc) - conv(xc)).norm() / conv(xc).norm()) < 0.02
    q = A.dynamic_copy(T.build_model(0), 8, 8)
    assert isinstance(q.unet.conv_in, torch.nn.Conv2d) and isinstance(q.unet.conv_out, torch.nn.Conv2d)
    assert not any(type(m) in (torch.nn.Linear, torch.nn.Conv2d) for n, m in q.named_modules()
                   if n and not n.endswith(("conv_in", "conv_out")))


def test_verdict_needs_the_change_above_twice_its_standard_error_and_channel_spread_reads_calibration_ranges():
    assert A._verdict(0.5, 0.2) == "gains" and A._verdict(-0.5, 0.2) == "loses"
    assert A._verdict(0.5, 0.3) == "is within the clip-to-clip spread"  # 0.5 < 2 x 0.3
    assert A._verdict(0.05, None) == "is within the clip-to-clip spread"  # under 0.1 dB
    rows = {"a": {"psnr_clips": [31.0, 32.0, 33.0]}, "b": {"psnr_clips": [30.0, 30.0, 30.0]}}
    mean, se = A._paired(rows, "a", "b")
    assert mean == 2.0 and abs(se - (1 / 3) ** 0.5) < 1e-12

    class Stats:
        ch_min = torch.tensor([-1.0, 0.0, -2.0, -4.0])
        ch_max = torch.tensor([1.0, 2.0, 0.0, 4.0])
    assert A.channel_spread(Stats) == 4.0  # half-ranges 1, 1, 1, 4


def test_simulated_layers_round_exactly_what_they_are_told(unet, inputs, quantized, monkeypatch):
    """tools.error_budget's Simulated layers, on a W8A8 layer of each kind in a model call: "quant" weights are the
    layer's int8 codes times their scales (bias with SCRI's ``W z``), "float" ones the FP weight (SCRI-folded);
    "static" activations are the layer's own codes (the kernels' quantizer), "per-call" ones the codes of the range
    MSE-searched on that input, "float" ones the SCRI-transformed input unrounded. Both rounded, the simulated
    model is the layers' fake mode bit for bit."""
    from qvd.kernels import reference as R
    from qvd.modules import QConv2d, QLinear, set_mode
    from qvd.quantizers import activation_qparams, dequantize_weight
    from tools import error_budget as B
    q, _ = quantized
    fake = copy.deepcopy(q)
    set_mode(fake, "fake")
    kinds = {}  # the first layer of each kind: linear / conv (padded or not), SCRI in the kernel / in a norm / none
    for n, m in fake.named_modules():
        if isinstance(m, (QLinear, QConv2d)):
            kinds.setdefault((type(m), getattr(m, "padding", 0), m.scri_shift is not None, m.scri_in_norm), n)
    seen = {}

    def grab(name):
        def hook(m, args, kwargs):
            seen.setdefault(name, args[0] if args else kwargs["input"])  # diffusers passes ``input`` by name
        return hook
    hooks = [fake.get_submodule(n).register_forward_pre_hook(grab(n), with_kwargs=True) for n in kinds.values()]
    y_fake = inputs.run(fake, 600)
    for h in hooks:
        h.remove()
    assert len(seen) == len(kinds) == 6, kinds
    assert torch.equal(inputs.run(B.simulated_copy(unet, q, "quant", "static"), 600), y_fake)
    ops = []  # (input, weight, bias) of each float op the simulated layers run
    monkeypatch.setattr(B, "F", types.SimpleNamespace(
        pad=F.pad, linear=lambda x, w, b: ops.append((x, w, b)) or F.linear(x, w, b),
        conv2d=lambda x, w, b, stride: ops.append((x, w, b)) or F.conv2d(x, w, b, stride)))
    named_q, named_fp = dict(q.named_modules()), dict(unet.named_modules())
    for name, x in seen.items():
        m, w_fp = named_q[name], named_fp[name].weight.detach()
        conv = isinstance(m, QConv2d)
        view = (1, -1, 1, 1) if conv else (-1,)
        xp = F.pad(x, (m.padding,) * 4) if conv and m.padding else x
        affine = m.scri_shift is not None and not m.scri_in_norm  # SCRI in the quantize kernel, not in the norm
        x_scri = (xp - m.scri_shift.view(view)) * m.scri_inv_scale.view(view) if affine else xp
        s, zp = float(m.act_scale_now("cpu")), m.zero_point
        s_call, zp_call = activation_qparams(x_scri, m.a_bits, "mse", float(x_scri.min()), float(x_scri.max()))
        codes = R.quantize_activation(xp, s, zp, m.qmin, m.qmax, *((m.scri_shift, m.scri_inv_scale) if affine
                                                                    else (None, None)), 1 if conv else -1)
        codes_call = R.quantize_activation(x_scri, s_call, zp_call, m.qmin, m.qmax)
        acts = {"static": (codes.float() - zp) * s, "per-call": (codes_call.float() - zp_call) * s_call,
                "float": x_scri}
        weights = {"quant": (dequantize_weight(m.weight, m.weight_scale), m.scri_bias()),
                   "float": (w_fp, m.bias) if m.scri is None else (m.scri.fold_weight(w_fp),
                                                                 m.scri.fold_bias(w_fp, m.bias))}
        assert not torch.equal(acts["static"], acts["float"]) and not torch.equal(weights["quant"][0], w_fp)
        for w in weights:
            for a in acts:
                ops.clear()
                B.Simulated(m, w_fp, w, a)(x)
                (x_op, w_op, b_op), = ops
                want_w, want_b = weights[w]
                assert torch.equal(x_op, acts[a]) and torch.equal(w_op, want_w), (name, w, a)
                assert b_op is want_b is None or torch.equal(b_op, want_b), (name, w, a)
    with pytest.raises(ValueError, match="use quant"):
        B.Simulated(next(m for m in q.modules() if type(m).__name__ == "QLinear"), torch.zeros(1), "int4", "static")


@pytest.mark.full
def test_error_budget_measures_noise_scaling_and_renders_it(tmp_path):
    torch.set_num_threads(1)
    rows = A.main(["--n", "1", "--steps", "2", "--configs", "naive-w8a8,qvd-w8a8", "--sensitivity", "none",
                   "--out", str(tmp_path)])
    b = rows["budget"]
    assert b["layer"] == "unet.up_blocks.1.resnets.1.conv_shortcut"  # nearest the output
    noise = [b["noise"][s] for s in sorted(b["noise"])]
    assert noise == sorted(noise, reverse=True)  # more noise, lower PSNR
    g = (noise[0] - noise[1]) / (10 * math.log10(2))
    assert abs(A.error_budget.gamma(b["noise"]) - g) < 1e-9 and 0 < g
    assert set(b["splits"]) == {"both", "weights", "activations", "per_call"}
    assert b["splits"]["weights"]["psnr_db"] > b["splits"]["both"]["psnr_db"]  # activations hold error too
    assert b["power_ratio_median"] > 1 and set(b["layer_alone"]) == {"naive", "qvd"}
    md = (tmp_path / "results.md").read_text()
    assert "## What halving naive min-max's error would take (W8A8)" in md
    assert f"clip MSE ~ sigma^{g:.2f}" in md and f"{2 ** (2 / g):.1f}x smaller" in md
    assert "| PSNR vs FP (dB) | " + " | ".join(f"{p:.2f}" for p in noise) + " |" in md


@pytest.mark.full
def test_generalisation_section_is_replaced_in_results(tmp_path, monkeypatch):
    """``--generalisation`` (issue 29): one calibration per timestep coverage, quantized with each bucket count,
    sampled in other settings; its section replaces the old one in results.md and leaves the rest."""
    torch.set_num_threads(1)
    res = A.generalisation(n=2, settings=("(c) DPM-Solver++ 10",), variants=((0, 1), (20, 1), (20, 2)), mode="fake")
    held = res.pop("timesteps")
    assert held[0] == {"timesteps": 10, "added": 0} and held[20]["added"] >= 5
    assert held[20]["timesteps"] == 10 + held[20]["added"]
    row = res["(c) DPM-Solver++ 10"]
    assert set(row) == {(0, 1), (20, 1), (20, 2)} and all(0 < r["psnr_db"] < float("inf") for r in row.values())
    assert row[(20, 1)]["psnr_clips"] != row[(20, 2)]["psnr_clips"]  # the buckets run: another model
    md = tmp_path / "results.md"
    md.write_text("# earlier\n\n" + A.SECTION + "\n\nstale\n")
    monkeypatch.setattr(A, "generalisation", lambda **kw: {**res, "timesteps": held})
    A.main(["--generalisation", "--n", "2", "--out", str(tmp_path)])
    text = md.read_text()
    assert text.startswith("# earlier") and "stale" not in text and text.count(A.SECTION) == 1
    assert "| (c) DPM-Solver++ 10 (FP " in text and "coverage 20 - coverage 0, dB" in text
    assert "2 buckets - 1 bucket, dB" in text and "2 buckets gain in " in text and "the default stays at 1" in text
