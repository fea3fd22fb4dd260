"""A tiny AnimateDiff-architecture video diffusion model trained on procedural clips.

It is the embedded default model of the pack: small enough to train on a CPU, to ship (fp16, < 5 MB) and
to quantize in tests, yet built from the same diffusers ``UNetMotionModel`` blocks (ResNet, spatial
cross-attention transformer, AnimateDiff motion modules) as the real thing. It works in pixel space
(3 x 24 x 24 frames, 8 frames), so no VAE is involved.

Data: a coloured shape (square / circle / triangle in red / green / blue / yellow) moving at constant
speed on a black background, bouncing off the borders. The class (shape x colour, or a caption such as
"red circle") is embedded into a few cross-attention tokens; the embedding is part of the checkpoint.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

FRAMES = 8
SIZE = 24
SHAPES = ("square", "circle", "triangle")
COLOURS = {  # RGB in [-1, 1]
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
}
CLASSES = tuple(f"{c} {s}" for s in SHAPES for c in COLOURS)  # class id -> caption
NULL_CLASS = len(CLASSES)  # the unconditional token (condition dropout / classifier-free guidance)
DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "tiny_vdm.safetensors"

UNET_CONFIG = dict(
    sample_size=SIZE,
    in_channels=3,
    out_channels=3,
    down_block_types=("DownBlockMotion", "CrossAttnDownBlockMotion"),
    up_block_types=("CrossAttnUpBlockMotion", "UpBlockMotion"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=64,
    num_attention_heads=2,
    motion_num_attention_heads=2,
    motion_max_seq_length=16,
    use_motion_mid_block=True,
)
COND_TOKENS = 4
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # what a checkpoint's UNet predicts (its metadata says)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    clip_sample=True,
    clip_sample_range=1.0,
    set_alpha_to_one=False,
    timestep_spacing="trailing",
)


# ----------------------------------------------------------------------------------------------- classes
def class_id(cond: int | str) -> int:
    """Class id from an id or a caption "<colour> <shape>" (e.g. "red circle"); None/"" -> unconditional."""
    if isinstance(cond, bool):
        raise TypeError("condition must be a class id (int) or a caption (str), not bool")
    if isinstance(cond, int):
        if not 0 <= cond <= NULL_CLASS:
            raise ValueError(f"class id {cond} out of range 0..{NULL_CLASS} ({NULL_CLASS} = unconditional)")
        return cond
    if isinstance(cond, str):
        words = cond.lower().split()
        if not words:
            return NULL_CLASS
        colour = [w for w in words if w in COLOURS]
        shape = [w for w in words if w in SHAPES]
        if len(colour) != 1 or len(shape) != 1:
            raise ValueError(f"caption {cond!r} must name one colour of {sorted(COLOURS)} and one shape of "
                             f"{list(SHAPES)}, e.g. 'red circle'")
        return CLASSES.index(f"{colour[0]} {shape[0]}")
    raise TypeError(f"condition must be a class id (int) or a caption (str), got {type(cond).__name__}")


def class_parts(cid: int) -> tuple[str, str]:
    """(colour, shape) of a class id."""
    colour, shape = CLASSES[class_id(cid)].split()
    return colour, shape


# ------------------------------------------------------------------------------------------------- model
class TinyVDM(nn.Module):
    """UNetMotionModel + class embedding. ``forward(sample, timestep, encoder_hidden_states)`` -> the model's
    ``prediction_type`` (epsilon, v or the clean sample; the scheduler is told which).

    ``sample`` is [B, 3, F, H, W]; ``encoder_hidden_states`` must hold one row per frame
    ([B*F, tokens, dim], see :meth:`encode`), as ``UNetMotionModel`` does not broadcast it over frames.
    """

    def __init__(self, unet_config: dict | None = None, cond_tokens: int = COND_TOKENS,
                 prediction_type: str = "epsilon"):
        super().__init__()
        from diffusers import UNetMotionModel

        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.unet_config = dict(UNET_CONFIG if unet_config is None else unet_config)
        self.cond_tokens = cond_tokens
        self.prediction_type = prediction_type
        self.unet = UNetMotionModel(**self.unet_config)
        dim = self.unet_config["cross_attention_dim"]
        self.class_embed = nn.Embedding(NULL_CLASS + 1, cond_tokens * dim)

    def encode(self, class_ids: torch.Tensor, frames: int = FRAMES) -> torch.Tensor:
        """Class ids [B] -> per-frame cross-attention tokens [B*frames, tokens, dim]."""
        dim = self.unet_config["cross_attention_dim"]
        tokens = self.class_embed(class_ids).view(-1, self.cond_tokens, dim)
        return tokens.repeat_interleave(frames, dim=0)

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


def build_model(seed: int = 0, prediction_type: str = "epsilon") -> TinyVDM:
    """A freshly initialised TinyVDM with a seeded, explicit init (independent of the global RNG)."""
    model = TinyVDM(prediction_type=prediction_type)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:  # norm scales
                p.fill_(1.0)
            elif name.startswith("class_embed"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:  # kaiming-uniform (as torch's default Linear/Conv init), from our own generator
                bound = 1.0 / math.sqrt(p[0].numel())
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
        # zero-initialised output conv and motion-module out projections (AnimateDiff convention)
        model.unet.conv_out.weight.zero_()
        for name, p in model.named_parameters():
            if "motion_modules" in name and "proj_out" in name:
                p.zero_()
    return model.eval()


def save_weights(model: TinyVDM, path: str | Path, metadata: dict) -> None:
    """fp16 safetensors with metadata (config + anything JSON-serialisable in ``metadata``)."""
    from safetensors.torch import save_file

    meta = {"unet_config": json.dumps(model.unet_config), "cond_tokens": str(model.cond_tokens),
            "scheduler_config": json.dumps({**SCHEDULER_CONFIG, "prediction_type": model.prediction_type})}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=meta)


def load_trained(path: str | Path | None = None) -> TinyVDM:
    """The shipped trained TinyVDM (``assets/tiny_vdm.safetensors``) or a checkpoint at ``path``, in fp32."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(DEFAULT_WEIGHTS if path is None else path)
    if not path.is_file():
        raise FileNotFoundError(f"TinyVDM weights not found at {path}; the default ships in the repository as "
                                f"assets/tiny_vdm.safetensors (re-create it with tools/train_tiny_vdm.py)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "unet_config" not in meta:
        raise ValueError(f"{path} is not a TinyVDM checkpoint (no 'unet_config' metadata)")
    cfg = json.loads(meta["unet_config"])
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    sched = json.loads(meta.get("scheduler_config", "{}"))
    model = TinyVDM(cfg, int(meta.get("cond_tokens", COND_TOKENS)), sched.get("prediction_type", "epsilon"))
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    model.metadata = meta
    return model.eval()


# -------------------------------------------------------------------------------------------------- data
def _fold(p: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Reflect positions into [lo, hi] (a bounce off each border)."""
    span = hi - lo
    u = torch.remainder(p - lo, 2 * span)
    return lo + span - (u - span).abs()


def render_alpha(shape_idx: torch.Tensor, pos: torch.Tensor, r: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """Coverage [..., H, W] in [0, 1] of shapes (0 square, 1 circle, 2 triangle) of half-size ``r`` at ``pos``.

    ``pos`` is [..., 2] (x, y: the centre of the shape's box); ``shape_idx`` and ``r`` broadcast against
    ``pos[..., 0]``. The one renderer of the data, also used as the templates of :mod:`qvd_demo.quality`.
    """
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    dx = xx - pos[..., 0, None, None]
    dy = yy - pos[..., 1, None, None]
    rr = torch.as_tensor(r, dtype=torch.float32)[..., None, None]
    sd_square = torch.maximum(dx.abs(), dy.abs()) - rr
    sd_circle = torch.sqrt(dx ** 2 + dy ** 2) - rr
    # upward isosceles triangle in the box [-r, r]^2: below the top edges, above the base
    sd_triangle = torch.maximum(dy - rr, (2 * dx.abs() - (dy + rr)) / math.sqrt(5.0))
    idx = torch.as_tensor(shape_idx)[..., None, None].expand(sd_square.shape)
    sd = torch.where(idx == 0, sd_square, torch.where(idx == 1, sd_circle, sd_triangle))
    return (0.5 - sd).clamp(0, 1)  # one-pixel anti-aliased edge


def make_clips(class_ids, generator: torch.Generator, frames: int = FRAMES, size: int = SIZE,
               static: bool = False) -> torch.Tensor:
    """Procedural clips [B, F, 3, H, W] in [-1, 1]: each class's shape/colour moving and bouncing.

    ``static=True`` keeps every shape still (used to test motion statistics).
    """
    ids = torch.as_tensor(class_ids, dtype=torch.long).reshape(-1)
    if ((ids < 0) | (ids >= NULL_CLASS)).any():
        raise ValueError(f"class ids must be in 0..{NULL_CLASS - 1}, got {ids.tolist()}")
    b = ids.numel()
    r = 3.0 + 2.0 * torch.rand(b, generator=generator)  # half-size in pixels
    lo, hi = r, size - 1 - r
    p0 = torch.stack([lo + (hi - lo) * torch.rand(b, generator=generator) for _ in range(2)], 1)  # [B,2] (x,y)
    ang = 2 * math.pi * torch.rand(b, generator=generator)
    speed = 0.75 + 1.25 * torch.rand(b, generator=generator)
    if static:
        speed = torch.zeros_like(speed)
    v = torch.stack([ang.cos(), ang.sin()], 1) * speed[:, None]
    t = torch.arange(frames, dtype=torch.float32)
    pos = _fold(p0[:, None] + v[:, None] * t[None, :, None], lo[:, None, None], hi[:, None, None])  # [B,F,2]
    alpha = render_alpha((ids // len(COLOURS))[:, None], pos, r[:, None], size)  # [B,F,H,W]
    palette = torch.tensor(list(COLOURS.values()))
    colour = palette[ids % len(COLOURS)]  # [B,3]
    return -1 + alpha[:, :, None] * (colour[:, None, :, None, None] + 1)


# ----------------------------------------------------------------------------------------------- sampling
SAMPLERS = ("ddim", "dpmpp")  # DDIM (eta 0), DPM-Solver++ (2nd order multistep)


def make_scheduler(kind: str = "ddim", prediction_type: str = "epsilon"):
    """DDIM or DPM-Solver++ (sampling) or DDPM (training noise) scheduler from the in-code config (no download).

    ``prediction_type`` is what the model predicts: a checkpoint's own (``model.prediction_type``).
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    cfg = {**SCHEDULER_CONFIG, "prediction_type": prediction_type}
    if kind == "ddim":
        return DDIMScheduler(**cfg)
    if kind == "ddpm":
        return DDPMScheduler(**{k: v for k, v in cfg.items() if k != "set_alpha_to_one"})
    if kind == "dpmpp":
        from diffusers import DPMSolverMultistepScheduler
        return DPMSolverMultistepScheduler(**{k: v for k, v in cfg.items() if not k.startswith(("set_alpha", "clip"))})
    raise ValueError(f"scheduler kind must be 'ddim', 'dpmpp' or 'ddpm', got {kind!r}")


def sample(model, cond: int | str, seed: int, steps: int = 20, guidance: float = 3.0, *, embed=None,
           frames: int = FRAMES, size: int = SIZE, sampler: str = "ddim") -> torch.Tensor:
    """DDIM + classifier-free guidance -> video [F, 3, H, W] in [-1, 1]; deterministic for a seed.

    ``model`` is called as ``model(sample, timestep, encoder_hidden_states=...)`` (so a Calibrator sees the
    timestep); it is a TinyVDM or any callable UNet with the same signature, in which case ``embed`` (a
    TinyVDM whose ``encode`` gives the tokens) must be given.
    """
    return sample_many(model, [cond], [seed], steps, guidance, embed=embed, frames=frames, size=size,
                       sampler=sampler)[0]


@torch.no_grad()
def sample_many(model, conds, seeds, steps: int = 20, guidance: float = 3.0, *, embed=None,
                frames: int = FRAMES, size: int = SIZE, batch: int = 1, sampler: str = "ddim") -> torch.Tensor:
    """:func:`sample` of clip i from ``(conds[i], seeds[i])``, ``batch`` clips per UNet call -> [N, F, 3, H, W];
    ``sampler`` one of SAMPLERS.

    Clip i starts from the same noise as ``sample(model, conds[i], seeds[i])``; batching changes only
    float rounding. On a CPU batching does not pay (2-core AVX2, fp32: 211 ms per clip and step alone,
    308 ms in a batch of 16), hence one clip per call by default.
    """
    conds, seeds = list(conds), [int(s) for s in seeds]
    if len(conds) != len(seeds) or not conds:
        raise ValueError(f"need one seed per condition and at least one, got {len(conds)} and {len(seeds)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    enc = embed if embed is not None else model
    if not hasattr(enc, "encode"):
        raise TypeError("model has no encode(); pass embed=<TinyVDM> to supply the class tokens")
    out = []
    for i in range(0, len(conds), batch):
        ids = torch.tensor([class_id(c) for c in conds[i:i + batch]])
        n = len(ids)
        hidden = enc.encode(torch.cat([ids, torch.full_like(ids, NULL_CLASS)]), frames)
        x = torch.cat([torch.randn(1, 3, frames, size, size, generator=torch.Generator().manual_seed(s))
                       for s in seeds[i:i + batch]]).to(hidden.dtype)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        sched = make_scheduler(sampler, enc.prediction_type)
        sched.set_timesteps(steps)
        for t in sched.timesteps:
            pred = model(torch.cat([x, x]), t, encoder_hidden_states=hidden)
            pred_c, pred_u = pred[:n], pred[n:]
            x = sched.step(pred_u + guidance * (pred_c - pred_u), t, x).prev_sample
        out.append(x.permute(0, 2, 1, 3, 4).clamp(-1, 1).float())
    return torch.cat(out)


@torch.no_grad()
def noised_call(model, clip: torch.Tensor, cond: int | str, t: float, seed: int, *, embed=None) -> None:
    """One classifier-free-guidance model call at the training timestep nearest ``t`` on ``clip`` ([F, 3, H, W],
    e.g. a sampled one) noised to it as in training (``sqrt(a) x0 + sqrt(1 - a) eps``): a calibration call at a
    timestep the sampler did not visit (``qvd.calibrate.coverage_timesteps``)."""
    enc = embed if embed is not None else model
    ids = torch.tensor([class_id(cond)])
    hidden = enc.encode(torch.cat([ids, torch.full_like(ids, NULL_CLASS)]), clip.shape[0])
    a = make_scheduler("ddpm", enc.prediction_type).alphas_cumprod
    ti = int(round(min(max(float(t), 0.0), len(a) - 1)))
    x0 = clip.permute(1, 0, 2, 3)[None].to(hidden.dtype)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(hidden.dtype)
    x = a[ti].sqrt() * x0 + (1 - a[ti]).sqrt() * eps
    model(torch.cat([x, x]), torch.tensor(ti), encoder_hidden_states=hidden)


# -------------------------------------------------------------------------------------------------- GIFs
def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[F, 3, H, W] in [-1, 1] -> [F, H, W, 3] uint8."""
    if video.dim() != 4 or video.shape[1] != 3:
        raise ValueError(f"video must be [F, 3, H, W], got {tuple(video.shape)}")
    return ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def side_by_side(videos, scale: int = 4, gap: int = 2) -> torch.Tensor:
    """Several [F, 3, H, W] clips -> one [F, H*scale, W', 3] uint8 clip, placed left to right."""
    frames = [to_uint8(v) for v in videos]
    if len({f.shape for f in frames}) != 1:
        raise ValueError(f"clips must share one shape, got {[tuple(f.shape) for f in frames]}")
    f, h, w, _ = frames[0].shape
    out = torch.full((f, h, len(frames) * (w + gap) - gap, 3), 255, dtype=torch.uint8)
    for i, fr in enumerate(frames):
        out[:, :, i * (w + gap):i * (w + gap) + w] = fr
    return out.repeat_interleave(scale, 1).repeat_interleave(scale, 2)


def write_gif(path: str | Path, videos, scale: int = 8, fps: int = 8, labels=(), per_row: int | None = None) -> Path:
    """Write clips as one looping GIF (Pillow): ``per_row`` clips per row (default: all in one row), each
    upscaled ``scale`` x with square pixels (nearest neighbour, so shapes stay sharp), ``labels[i]`` written
    above column ``i``."""
    from PIL import Image, ImageDraw

    videos = list(videos)
    per_row = per_row or len(videos)
    rows = [side_by_side(videos[i:i + per_row], scale) for i in range(0, len(videos), per_row)]  # 2 px gaps, scaled
    f, h, w, _ = rows[0].shape
    head = 14 if labels else 0
    gap = 2 * scale
    canvas = torch.full((f, head + len(rows) * (h + gap) - gap, w, 3), 255, dtype=torch.uint8)
    for i, r in enumerate(rows):
        canvas[:, head + i * (h + gap):head + i * (h + gap) + h, :r.shape[2]] = r
    imgs = [Image.fromarray(fr.numpy()) for fr in canvas]
    col = videos[0].shape[-1] * scale + gap
    for img in imgs:
        draw = ImageDraw.Draw(img)
        for i, text in enumerate(labels):
            draw.text((i * col + 2, 1), str(text), fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)
    return path


def write_grid_png(path: str | Path, videos, scale: int = 3) -> Path:
    """Frame grid PNG: one row per clip, frames left to right (for looking at samples as a still)."""
    from PIL import Image

    rows = [side_by_side([fr[None] for fr in v], scale)[0] for v in videos]  # each clip's frames laid out as one row
    gap = torch.full((2 * scale, rows[0].shape[1], 3), 255, dtype=torch.uint8)
    grid = torch.cat([t for r in rows for t in (r, gap)][:-1], 0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.numpy()).save(path)
    return path
