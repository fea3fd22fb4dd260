"""Layer roles found by calibration, not by name: a Wan-shaped DiT (Conv3d patch embedding, time MLP, adaLN
``time_projection``, text embedding, cross-attention, modulated blocks, ``head.head``) in plain torch, whose names
no QVD config lists. The diffusers UNet's roles are checked in test_unet_motion.py, ComfyUI's in the host tests."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qvd import Calibrator, QVDConfig, quantize_model
from qvd.io import load_calibration, load_quantized, save_calibration, save_quantized

DIM, TEXT_DIM, FREQ, IN_DIM = 32, 24, 16, 4


def sinusoidal(dim: int, t: torch.Tensor) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    args = t.double()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], 1).float()


class Attention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, context=None):
        context = x if context is None else context
        return self.o(F.scaled_dot_product_attention(self.q(x), self.k(context), self.v(context)))


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.norm3 = nn.LayerNorm(dim)
        self.self_attn, self.cross_attn = Attention(dim), Attention(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def forward(self, x, e0, context):
        e = [c.squeeze(2) for c in (self.modulation + e0).chunk(6, dim=2)]  # [B, L or 1, DIM] each
        x = x + self.self_attn(self.norm1(x) * (1 + e[1]) + e[0]) * e[2]
        x = x + self.cross_attn(self.norm3(x), context)
        return x + self.ffn(self.norm2(x) * (1 + e[4]) + e[3]) * e[5]


class Head(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.head = nn.Linear(dim, out * 4)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)

    def forward(self, x, e):
        shift, scale = (c.squeeze(2) for c in (self.modulation + e.unsqueeze(2)).chunk(2, dim=2))
        return self.head(self.norm(x) * (1 + scale) + shift)


class MiniWan(nn.Module):
    """Wan 2.1's structure at toy size: ``forward(x [B, C, F, H, W], timestep, context [B, L, text_dim])``, the
    timestep per sample ([B]) or, as Wan 2.2 TI2V's image-to-video, per latent frame ([B, F]: the first frame clean)."""

    def __init__(self, blocks: int = 2):
        super().__init__()
        self.patch_embedding = nn.Conv3d(IN_DIM, DIM, (1, 2, 2), stride=(1, 2, 2))
        self.text_embedding = nn.Sequential(nn.Linear(TEXT_DIM, DIM), nn.GELU(approximate="tanh"), nn.Linear(DIM, DIM))
        self.time_embedding = nn.Sequential(nn.Linear(FREQ, DIM), nn.SiLU(), nn.Linear(DIM, DIM))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(DIM, 6 * DIM))
        self.blocks = nn.ModuleList(Block(DIM) for _ in range(blocks))
        self.head = Head(DIM, IN_DIM)

    def forward(self, x, timestep, context):
        b, _, f, h, w = x.shape
        x = self.patch_embedding(x).flatten(2).transpose(1, 2)
        e = self.time_embedding(sinusoidal(FREQ, timestep.flatten())).view(b, -1, 1, DIM)  # [B, F or 1, 1, DIM]
        e = e.expand(b, e.shape[1], x.shape[1] // e.shape[1], DIM).reshape(b, -1, DIM)  # per token: [B, L or 1, D]
        e0 = self.time_projection(e).unflatten(2, (6, DIM))
        context = self.text_embedding(context)
        for block in self.blocks:
            x = block(x, e0, context)
        x = self.head(x, e)  # unpatchify: [B, F*h*w, C*4] -> [B, C, F, H, W]
        x = x.view(b, f, h // 2, w // 2, IN_DIM, 2, 2)
        return torch.einsum("bfhwcpq->bcfhpwq", x).reshape(b, IN_DIM, f, h, w)


TIMESTEPS = (999.0, 750.0, 500.0, 250.0, 50.0)
TEMPORAL = {"time_embedding.0", "time_embedding.2", "time_projection.1"}
CONDITIONING = {"text_embedding.0", "text_embedding.2", "blocks.0.cross_attn.k", "blocks.0.cross_attn.v",
                "blocks.1.cross_attn.k", "blocks.1.cross_attn.v"}


def _calibrate(model, batch: int, prompts: int = 2):
    """Sampling-like calls: every timestep, ``batch`` samples per call (2: cond + uncond at one timestep)."""
    g = torch.Generator().manual_seed(0)
    contexts = [torch.randn(batch, 7, TEXT_DIM, generator=g) * 2 for _ in range(prompts)]
    x = torch.randn(batch, IN_DIM, 2, 8, 8, generator=g)
    with torch.no_grad(), Calibrator(model, QVDConfig()) as cal:
        for t in TIMESTEPS:
            for context in contexts:
                model(x * (1 + t / 1000) + torch.randn(x.shape, generator=g) * 0.1, torch.full((batch,), t), context)
    return cal.result()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MiniWan().eval()


@pytest.mark.parametrize("batch", [1, 2])
def test_roles_of_a_wan_shaped_dit_are_found_without_names(model, batch):
    """Batch 1 is CFG 1 (the distillation LoRAs' setting): one row per call, still broadcast."""
    calibration = _calibrate(model, batch)
    assert {n for n, s in calibration.layers.items() if s.temporal} == TEMPORAL
    assert {n for n, s in calibration.layers.items() if s.conditioning_only} == CONDITIONING
    assert calibration.roles == {"first": ["patch_embedding"], "last": ["head.head"]}
    assert all(calibration.temporal_features(n).shape[0] == len(TIMESTEPS) for n in TEMPORAL)


def test_quantized_wan_shaped_dit_reports_each_role_and_how_it_was_found(model, tmp_path):
    calibration = _calibrate(model, 2)
    save_calibration(str(tmp_path / "c.safetensors"), calibration)
    again = load_calibration(str(tmp_path / "c.safetensors"))
    assert again.roles == calibration.roles
    assert {n for n, s in again.layers.items() if s.temporal} == TEMPORAL
    q = copy.deepcopy(model)
    result = quantize_model(q, again, QVDConfig())
    report = {r["name"]: r for r in result.report}
    assert report["head.head"]["handler"] == "float" and "keep_ends_float" in report["head.head"]["skipped"]
    assert report["head.head"]["role"].startswith("last") and "call graph" in report["head.head"]["role"]
    for n in TEMPORAL:
        assert report[n]["handler"] == "hiditq" and "observed in calibration" in report[n]["role"], report[n]
    for n in CONDITIONING:
        assert report[n].get("scri_alpha") is None and "conditioning path" in report[n]["conditioning"]
    assert result.calibrated["roles"] == {"first": ["patch_embedding"], "last": ["head.head"]}
    # The rest is W8A8 and the model stays close to FP at every timestep.
    assert sum(r["handler"] != "float" for r in report.values()) == len(report) - 1
    g = torch.Generator().manual_seed(5)
    x, context = torch.randn(2, IN_DIM, 2, 8, 8, generator=g), torch.randn(2, 7, TEXT_DIM, generator=g) * 2
    with torch.no_grad():
        for t in (900.0, 400.0, 20.0):
            ts = torch.full((2,), t)
            ref, out = model(x, ts, context), q(x, ts, context)
            assert float((out - ref).norm() / ref.norm()) < 0.05
    # A quantized file keeps the roles and the report; it loads into the float model.
    save_quantized(str(tmp_path / "q.safetensors"), result)
    loaded = load_quantized(str(tmp_path / "q.safetensors"), copy.deepcopy(model))
    assert loaded.calibrated["roles"] == result.calibrated["roles"]
    assert {r["name"]: r.get("role") for r in loaded.report} == {n: r.get("role") for n, r in report.items()}


def test_per_frame_timesteps_wan22_image_to_video(model):
    """Wan 2.2 TI2V's image-to-video: one timestep per latent frame (the first frame, the image, at 0). The time
    path has as many distinct rows as the call has timesteps, still temporal; each row's features are kept under its
    own timestep (0 included), the calibration's timesteps are the noisy frames'."""
    g = torch.Generator().manual_seed(2)
    context = torch.randn(1, 7, TEXT_DIM, generator=g)
    with torch.no_grad(), Calibrator(model, QVDConfig()) as cal:
        for t in TIMESTEPS:
            model(torch.randn(1, IN_DIM, 3, 8, 8, generator=g), torch.tensor([[0.0, t, t]]), context)
    calibration = cal.result()
    assert {n for n, s in calibration.layers.items() if s.temporal} == TEMPORAL
    assert calibration.timesteps == list(TIMESTEPS)
    assert sorted(calibration.layers["time_projection.1"].temporal_vectors) == sorted([0.0, *TIMESTEPS])
    f = calibration.temporal_features("time_embedding.0")
    assert torch.allclose(f[-1], sinusoidal(FREQ, torch.zeros(1))[0]) and torch.allclose(
        f[0], sinusoidal(FREQ, torch.tensor([TIMESTEPS[0]]))[0])
    assert calibration.roles == {"first": ["patch_embedding"], "last": ["head.head"]}


def test_a_config_pattern_adds_a_temporal_layer_and_says_so(model):
    cfg = QVDConfig(temporal=("time_projection.1",))
    context = torch.randn(1, 7, TEXT_DIM)
    with torch.no_grad(), Calibrator(model, cfg) as cal:
        for t in TIMESTEPS:
            model(torch.randn(1, IN_DIM, 2, 8, 8), torch.full((1,), t), context)
    calibration = cal.result()
    report = {r["name"]: r for r in quantize_model(copy.deepcopy(model), calibration, cfg, apply=False).report}
    assert "config pattern" in report["time_projection.1"]["role"]
    assert "observed" in report["time_embedding.0"]["role"]
    assert calibration.roles == {"first": ["patch_embedding"], "last": ["head.head"]}


def test_one_timestep_shows_no_temporal_layer():
    """Whether an input changes with the timestep needs two timesteps: with one, nothing is called temporal (QVD
    Calibrate's timestep coverage adds timesteps)."""
    torch.manual_seed(1)
    model = MiniWan(blocks=1).eval()
    with torch.no_grad(), Calibrator(model, QVDConfig()) as cal:
        model(torch.randn(2, IN_DIM, 1, 4, 4), torch.full((2,), 500.0), torch.randn(2, 3, TEXT_DIM))
    calibration = cal.result()
    assert not any(s.temporal for s in calibration.layers.values())
    assert calibration.roles["last"] == ["head.head"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_broadcast_rows_are_counted_up_to_rounding_in_every_float_dtype(dtype):
    """A time vector repeated over 64 frames is one row, also when some copies differ in their last bits (a GEMM
    rounds identical rows differently by their place in the batch: ComfyUI's Wan 2.2 TI2V calls did); one token that
    differs by more makes two; tokens are many."""
    from qvd.calibrate import _distinct_rows_at_most

    g = torch.Generator().manual_seed(0)
    vector = torch.randn(1, 48, generator=g).to(dtype).expand(64, 48)
    assert _distinct_rows_at_most(vector, 1)
    rounded = vector.clone()
    rounded[5:9, ::3] = torch.nextafter(rounded[5:9, ::3], torch.full_like(rounded[5:9, ::3], 9.0))  # 1 ulp
    assert not torch.equal(rounded, vector) and _distinct_rows_at_most(rounded, 1)
    assert not _distinct_rows_at_most(torch.cat([vector, vector[:1] + 0.05]), 1)
    assert _distinct_rows_at_most(torch.cat([vector, vector[:1] + 0.05]), 2)
    assert not _distinct_rows_at_most(torch.randn(64, 48, generator=g).to(dtype), 8)


class MiniWanI2V(MiniWan):
    """Wan 2.1 I2V's image path: CLIP vision features through ``img_emb`` (a LayerNorm, then a Linear) joined to the
    text context, the same at every timestep of a clip."""

    def __init__(self):
        super().__init__()
        self.img_emb = nn.Sequential(nn.LayerNorm(TEXT_DIM), nn.Linear(TEXT_DIM, TEXT_DIM))

    def forward(self, x, timestep, context, clip_fea):
        return super().forward(x, timestep, torch.cat([self.img_emb(clip_fea), context], 1))


def test_image_path_behind_a_norm_is_conditioning_and_the_report_says_so():
    """``img_emb.1`` reads a LayerNorm that feeds nothing else (a norm group SCRI could fold into): found on the
    conditioning path, it gets no image-specific SCRI and its report entry says why, as a layer without a norm."""
    torch.manual_seed(0)
    model = MiniWanI2V().eval()
    g = torch.Generator().manual_seed(3)
    clip = torch.randn(1, 5, TEXT_DIM, generator=g) * (1 + 4 * torch.rand(TEXT_DIM, generator=g))
    context = torch.randn(2, 7, TEXT_DIM, generator=g)
    with torch.no_grad(), Calibrator(model, QVDConfig()) as cal:
        for t in TIMESTEPS:
            model(torch.randn(2, IN_DIM, 2, 8, 8, generator=g), torch.full((2,), t), context, clip.expand(2, -1, -1))
    calibration = cal.result()
    assert "img_emb.0" in calibration.norm_groups and calibration.layers["img_emb.1"].conditioning_only
    report = {r["name"]: r for r in quantize_model(model, calibration, QVDConfig(), apply=False).report}
    entry = report["img_emb.1"]
    assert entry["handler"] == "uniform" and entry["scri_alpha"] is None, entry
    assert entry["conditioning"] == report["text_embedding.0"]["conditioning"], entry
