"""SCRI: the fold is exact before rounding, and integrating scattered channel ranges cuts W8A8 error."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qvd import Calibrator, QVDConfig, quantize_model
from qvd.scri import ScriTransform


def scattered(n: int, c: int, seed: int = 0) -> torch.Tensor:
    """Activations whose channels have scattered, asymmetric ranges (offsets and widths over 3 decades)."""
    g = torch.Generator().manual_seed(seed)
    width = torch.logspace(-1.5, 1.5, c)[torch.randperm(c, generator=g)]
    offset = torch.randn(c, generator=g) * 4
    return torch.randn(n, c, generator=g).abs() * width + offset


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_linear_fold_is_exact(alpha):
    x = scattered(64, 48).double()
    lin = nn.Linear(48, 24).double()
    t = ScriTransform.from_range(x.amin(0), x.amax(0), alpha)
    t = ScriTransform(t.shift.double(), t.scale.double())
    w = lin.weight.double()
    w2, b2 = t.fold_weight(w).double(), t.fold_bias(w, lin.bias.double()).double()
    y2 = t.apply(x) @ w2.t() + b2
    assert torch.allclose(y2, lin(x), atol=1e-10, rtol=1e-10)
    assert torch.allclose(t.unfold_weight(w2).double(), w, atol=1e-12) and torch.allclose(t.unapply(t.apply(x)), x)


def test_padded_conv_fold_is_exact_at_the_borders():
    x = scattered(2 * 9 * 9, 6).view(2, 9, 9, 6).permute(0, 3, 1, 2).double()
    conv = nn.Conv2d(6, 5, 3, padding=1).double()
    t = ScriTransform.from_range(x.amin((0, 2, 3)), x.amax((0, 2, 3)), 0.75)
    t = ScriTransform(t.shift.double(), t.scale.double())
    w = conv.weight.double()
    xp = F.pad(x, (1, 1, 1, 1))  # real-domain zero padding first, then the transform
    xt = t.apply(xp.movedim(1, -1)).movedim(-1, 1)
    y2 = F.conv2d(xt, t.fold_weight(w).double(), t.fold_bias(w, conv.bias.double()).double())
    assert torch.allclose(y2, conv(x), atol=1e-10)


def test_norm_fold_is_exact():
    ln = nn.LayerNorm(32)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2)
        ln.bias.normal_()
    x = torch.randn(10, 32)
    t = ScriTransform(torch.randn(32), torch.rand(32) + 0.1)
    folded = t.fold_norm(ln)
    assert torch.allclose(folded(x), t.apply(ln(x)), atol=1e-5) and folded.qvd_scri_norm


def test_scri_reduces_w8a8_error_on_scattered_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    x = scattered(4096, 64)
    with Calibrator(model, QVDConfig(calib_rows=512)) as cal:
        model(x)
    calib = cal.result()
    errs = {}
    for scri in (False, True):
        q = copy.deepcopy(model)
        res = quantize_model(q, calib, QVDConfig(scri=scri, keep_ends_float=False))  # its one layer is first and last
        with torch.no_grad():
            errs[scri] = float((q(x) - model(x)).pow(2).sum() / model(x).pow(2).sum())
        assert (res.report[0]["scri_alpha"] is not None) == scri
    assert errs[True] < 0.5 * errs[False], errs


def test_transformer_block_norm_fold_keeps_output_exact(unet, calibration):
    """Folding SCRI into a diffusers LayerNorm feeding to_q/to_k/to_v changes nothing before rounding."""
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    prefix = "down_blocks.0.attentions.0.transformer_blocks.0."
    consumers = calibration.norm_groups[prefix + "norm1"]
    assert sorted(consumers) == sorted(prefix + f"attn1.to_{p}" for p in "qkv")
    st = calibration.layers[consumers[0]]
    t = ScriTransform.from_range(st.ch_min, st.ch_max, 1.0)
    folded = copy.deepcopy(block)
    folded.norm1 = t.fold_norm(block.norm1)
    for p in "qkv":
        lin = getattr(folded.attn1, f"to_{p}")
        w, b = t.fold_weight(lin.weight.detach()), t.fold_bias(lin.weight.detach(), lin.bias)
        lin.weight.data, lin.bias = w, nn.Parameter(b)
    x, ctx = torch.randn(8, 64, 32), torch.randn(8, 7, 32)
    with torch.no_grad():
        assert torch.allclose(folded(x, encoder_hidden_states=ctx), block(x, encoder_hidden_states=ctx), atol=1e-4)


@pytest.mark.parametrize("name, skipped", [
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", True),  # diffusers spatial cross-attention
    ("mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0", True),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k", False),  # self-attention
    ("down_blocks.1.motion_modules.0.transformer_blocks.0.attn2.to_v", False),  # temporal self-attention
    ("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v", True),  # ComfyUI UNet
    ("diffusion_model.output_blocks.9.1.transformer_blocks.0.attn2.to_q", False),
    ("motion_0.down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.to_k",
     False),  # ADE motion module in the ComfyUI tree
])
def test_default_scri_skip_is_the_spatial_cross_attention_in_both_namings(name, skipped):
    from qvd.config import matches
    assert matches(name, QVDConfig().scri_skip) == skipped


def test_motion_module_attn2_gets_scri_and_cross_attention_does_not(unet, calibration):
    report = quantize_model(copy.deepcopy(unet), calibration, QVDConfig(), apply=False).report
    alphas = {r["name"]: r.get("scri_alpha") for r in report}
    cross = [n for n in alphas if ".attentions." in n and ".attn2.to_" in n and ".to_q" not in n]
    assert cross and all(alphas[n] is None for n in cross)
    motion = [n for n in alphas if ".motion_modules." in n and ".attn2." in n]
    assert any(alphas[n] is not None for n in motion)


class _SharedNorm(nn.Module):
    """A LayerNorm feeding two Linears; with ``other_use`` its output is also added to the result (like another
    node's attention patch reading the norm output)."""

    def __init__(self, other_use: bool):
        super().__init__()
        self.norm, self.a, self.b, self.other_use = nn.LayerNorm(32), nn.Linear(32, 32), nn.Linear(32, 32), other_use

    def forward(self, x):
        n = self.norm(x)
        y = self.a(n) + self.b(n)
        return y + 3 * n if self.other_use else y


@pytest.mark.parametrize("other_use", [False, True])
def test_scri_folds_into_a_norm_only_when_nothing_else_reads_its_output(other_use):
    torch.manual_seed(0)
    model = _SharedNorm(other_use)
    with torch.no_grad():
        model.norm.weight.copy_(torch.logspace(-1, 1, 32)[torch.randperm(32)])
        model.norm.bias.copy_(torch.randn(32) * 3)
    x = torch.randn(4, 64, 32)
    cfg = QVDConfig(calib_rows=256, keep_ends_float=False)
    with Calibrator(model, cfg) as cal:
        model(x)
    calib = cal.result()
    assert ("norm" in calib.norm_groups) == (not other_use)
    q = copy.deepcopy(model)
    res = quantize_model(q, calib, cfg)
    folds = {r["name"]: r["scri_fold"] for r in res.report}
    assert (folds["a"] == "norm:norm") == (not other_use) and (folds["b"] == "norm:norm") == (not other_use)
    with torch.no_grad():
        assert float((q(x) - model(x)).norm() / model(x).norm()) < 0.02  # the other reader sees the real output


def test_a_conditioning_path_under_other_names_gets_no_prompt_scri():
    """A DiT-shaped model with its own names (``text_embedding``, ``cross_attn.k / v``): calibration observes which
    layers saw the same inputs at every timestep (also over two prompts) and those get no SCRI, with the reason in
    the report; a calibration file keeps the finding."""
    import copy
    import tempfile
    from pathlib import Path

    from torch import nn

    from qvd import Calibrator, QVDConfig, load_calibration, quantize_model, save_calibration

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.q, self.ffn = nn.Linear(d, d), nn.Linear(d, d)
            self.cross_attn = nn.ModuleDict({"k": nn.Linear(d, d), "v": nn.Linear(d, d)})

        def forward(self, x, text):
            k, v = self.cross_attn["k"](text), self.cross_attn["v"](text)
            att = torch.softmax(self.q(x) @ k.transpose(1, 2) / 4, -1) @ v
            return x + self.ffn(att)

    class TinyDiT(nn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.text_embedding = nn.Linear(12, d)
            self.time = nn.Linear(1, d)
            self.blocks = nn.ModuleList(Block(d) for _ in range(2))
            self.head = nn.Linear(d, 4)

        def forward(self, x, t, text):
            text = self.text_embedding(text)
            x = x + self.time(t.view(1, 1, 1).expand(x.shape[0], 1, 1))
            for b in self.blocks:
                x = b(x, text)
            return self.head(x)

    g = torch.Generator().manual_seed(3)
    model = TinyDiT()
    prompts = [torch.randn(1, 7, 12, generator=g) * (1 + 3 * torch.rand(12, generator=g)) for _ in range(2)]
    x = torch.randn(1, 9, 16, generator=g)
    with torch.no_grad(), Calibrator(model, QVDConfig(keep_ends_float=False)) as cal:
        for t in (900.0, 500.0, 100.0):
            cal.set_timestep(t)
            for text in prompts:
                model(x + t / 1000, torch.tensor(t / 1000), text)
    calibration = cal.result()
    cond = sorted(n for n, s in calibration.layers.items() if s.conditioning_only)
    assert cond == ["blocks.0.cross_attn.k", "blocks.0.cross_attn.v", "blocks.1.cross_attn.k",
                    "blocks.1.cross_attn.v", "text_embedding"], cond
    with tempfile.TemporaryDirectory() as d:
        save_calibration(Path(d) / "c.calibration.safetensors", calibration)
        again = load_calibration(Path(d) / "c.calibration.safetensors")
    assert sorted(n for n, s in again.layers.items() if s.conditioning_only) == cond
    result = quantize_model(copy.deepcopy(model), again, QVDConfig(keep_ends_float=False, scri_skip=()),
                            apply=False)
    report = {r["name"]: r for r in result.report}
    assert all(report[n].get("scri_alpha") is None and "conditioning path" in report[n]["conditioning"] for n in cond)
