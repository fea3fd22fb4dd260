"""Seeded synthetic test models with real shapes, written as safetensors files.

- ``build_sd15_checkpoint``: a full SD1.5 checkpoint (UNet + CLIP-L + VAE, fp16) built from ComfyUI's own
  classes, so ComfyUI's ``CheckpointLoaderSimple`` detects it as SD1.5. Needs ComfyUI importable.
- ``build_sdxl_checkpoint``: the same for an SDXL-family checkpoint (SDXL's UNet at Segmind Vega's depth).
- ``build_motion_model``: an AnimateDiff motion model (plain torch): ``mm_sd_v15_v2`` (588 keys), the SDXL
  ``mm_sdxl_v10_beta`` layout or HotShotXL's.
- ``build_wan_model``: a Wan diffusion model (ComfyUI's ``WanModel``, what ``UNETLoader`` reads) at toy width and
  depth: Wan 2.1 T2V (``WAN_CONFIG``), I2V, Wan 2.2 TI2V-5B; its text embedding keeps Wan's 4096-wide input
  (umt5-xxl's, fixed by ComfyUI). ``build_wan_vae``: the Wan 2.1 / 2.2 VAE.
- ``write_lora``: a seeded rank-4 LoRA for the SD1.5 checkpoint's spatial transformers.

ComfyUI builds layers uninitialised, so every parameter is filled explicitly from one seeded generator:
norm weights 1 / biases 0, other weights N(0, 0.02), other biases N(0, 0.01).
Run as a script to write a file: ``python synthetic_models.py KIND OUT.safetensors``, KIND one of sd15, sdxl,
motion, motion_sdxl, motion_hotshotxl, wan21, wan21_low (another seed: a Wan 2.2 A14B-style expert pair),
wan21_1_3b_width (for speed), wan21_i2v, wan22_ti2v, wan21_vae, wan22_vae (the checkpoints and the Wan models with
ComfyUI on ``sys.path``, e.g. from its directory).
"""
from __future__ import annotations

import inspect
import math
import os
import re
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

SEED = 20240715

# The full SD1.5 UNet config (ComfyUI's model_detection table for diffusers SD15).
SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# SDXL's UNet (Linear proj_in / proj_out, context 2048, the 2816-wide label embedding) at Segmind Vega's transformer
# depth (1 / 2 blocks per level instead of 2 / 10; ComfyUI's own SDXL-family config, loaded as model_base.SDXL):
# 745 M parameters, 3 GB in fp32, where the full SDXL's 10 GB does not fit a 24 GiB CI machine beside the suite.
SDXL_VEGA_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 1, 1, 2, 2], "channel_mult": [1, 2, 4],
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2], "transformer_depth_middle": -1,
    "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SD15_VAE_CONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                   "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                   "dropout": 0.0}
_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)


def init_seeded_(modules: list[nn.Module], seed: int = SEED) -> None:
    """Fill every parameter of ``modules`` (in order, by sorted name) from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    for root in modules:
        owners = {f"{m}.{p}" if m else p: mod for m, mod in root.named_modules()
                  for p, _ in mod.named_parameters(recurse=False)}
        params = dict(root.named_parameters())
        with torch.no_grad():
            for name in sorted(params):
                p, owner = params[name], owners[name]
                if isinstance(owner, _NORMS) or type(owner).__name__.endswith("RMSNorm"):
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
                else:
                    std = 0.02 if p.ndim > 1 or "embedding" in name else 0.01
                    p.copy_(torch.randn(p.shape, generator=gen) * std)


def build_sd15_checkpoint(path: str, seed: int = SEED) -> None:
    """Write a seeded fp16 SD1.5 checkpoint (ComfyUI / LDM key layout) to ``path``."""
    _build_checkpoint(path, SD15_UNET_CONFIG, "SD15", "comfy.sd1_clip.SDClipModel", "clip_l.", seed)


def build_sdxl_checkpoint(path: str, seed: int = SEED) -> None:
    """Write a seeded fp16 SDXL-family checkpoint (ComfyUI / SGM key layout: UNet, CLIP-L + CLIP-G, VAE) to
    ``path``: SDXL's UNet at Segmind Vega's depth (SDXL_VEGA_UNET_CONFIG), which ComfyUI loads as an SDXL model."""
    _build_checkpoint(path, SDXL_VEGA_UNET_CONFIG, "Segmind_Vega", "comfy.sdxl_clip.SDXLClipModel", "", seed)


def _build_checkpoint(path: str, unet_config: dict, expect: str, clip: str, clip_prefix: str, seed: int) -> None:
    from comfy.cli_args import args
    args.cpu = True  # before any other ComfyUI import
    import importlib

    import comfy.model_detection
    from comfy.ldm.models.autoencoder import AutoencoderKL
    clip_module, clip_class = clip.rsplit(".", 1)

    model_config = comfy.model_detection.model_config_from_unet_config(dict(unet_config))
    if type(model_config).__name__ != expect:
        raise RuntimeError(f"ComfyUI detected {type(model_config).__name__} for the {expect} config")
    model_config.set_inference_dtype(torch.float16, None)
    model = model_config.get_model({}, device="cpu")
    clip = getattr(importlib.import_module(clip_module), clip_class)(device="cpu", dtype=torch.float16)
    vae = AutoencoderKL(ddconfig=dict(SD15_VAE_CONFIG), embed_dim=4)
    init_seeded_([model.diffusion_model, clip, vae], seed)
    clip_sd = {f"{clip_prefix}{k}": v for k, v in clip.state_dict().items()}
    if next(iter(inspect.signature(model.state_dict_for_saving).parameters)) == "unet_state_dict":  # >= 0.12
        sd = model.state_dict_for_saving(model.diffusion_model.state_dict(), clip_state_dict=clip_sd,
                                         vae_state_dict=vae.state_dict())
    else:
        sd = model.state_dict_for_saving(clip_sd, vae.state_dict())
    if "model.diffusion_model.input_blocks.0.0.weight" not in sd:
        raise RuntimeError("ComfyUI's state_dict_for_saving returned no UNet: the checkpoint would be unusable")
    sd = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in sd.items()}
    _save_atomic(sd, path, {"qvd_synthetic": f"{expect.lower()} seed={seed}"})


# Wan 2.1 T2V at toy size: ComfyUI reads dim, ffn_dim, depth and in / out channels from the weights (heads = dim /
# 128); the text width is 4096 whatever the file holds, so the text embedding keeps it (1 M of the 3.4 M parameters).
# Weights are scaled for unit gain and the adaLN modulation to gates of ~0.5: at init_seeded_'s 0.02 the blocks'
# gated outputs were ~1e-3 of the residual stream, so the model was nearly its float first and last layers.
WAN_MODULATION_STD = 0.5
WAN_CONFIG = {"model_type": "t2v", "dim": 256, "ffn_dim": 512, "num_heads": 2, "num_layers": 2, "in_dim": 16,
              "out_dim": 16, "text_dim": 4096, "freq_dim": 256}


# Wan 2.1 T2V 1.3B's block width (dim 1536, 12 heads, ffn 8960) at 2 of its 30 blocks: its GEMM shapes, for speed.
WAN_1_3B_WIDTH = {**WAN_CONFIG, "dim": 1536, "ffn_dim": 8960, "num_heads": 12}


# Wan 2.1 I2V (14B: 36 input channels, the image latent and its mask beside the noise; CLIP vision's 1280-wide
# penultimate features through ``img_emb``) and Wan 2.2 TI2V-5B (the Wan 2.2 VAE's 48 latent channels in and out,
# per-frame timesteps when it starts from an image) at the same toy width.
WAN_I2V_CONFIG = {**WAN_CONFIG, "model_type": "i2v", "in_dim": 36}
WAN_TI2V_CONFIG = {**WAN_CONFIG, "in_dim": 48, "out_dim": 48}


def build_wan_model(path: str, seed: int = SEED, config: dict = WAN_CONFIG, expect: str = "WAN21_T2V") -> None:
    """Write a seeded fp16 Wan diffusion model (ComfyUI's key layout, no prefix) to ``path``; checks that ComfyUI
    detects it as ``expect`` (a ``comfy.supported_models`` class name)."""
    from comfy.cli_args import args
    args.cpu = True
    import comfy.model_detection
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    model = WanModel(**config, operations=comfy.ops.disable_weight_init, device="cpu", dtype=torch.float32)
    init_seeded_([model], seed)
    with torch.no_grad():  # a trained DiT's signal: unit-gain layers (std 1 / sqrt(fan in)), adaLN gates ~ 0.5
        for name, p in model.named_parameters():
            if name.endswith("modulation"):
                p.mul_(WAN_MODULATION_STD / 0.02)
            elif name.endswith("weight") and p.ndim > 1:
                p.mul_(1 / (0.02 * p[0].numel() ** 0.5))
    sd = {k: v.to(torch.float16) for k, v in model.state_dict().items()}
    detected = type(comfy.model_detection.model_config_from_unet(sd, "")).__name__
    if detected != expect:
        raise RuntimeError(f"ComfyUI detected {detected} for the synthetic {expect} model")
    _save_atomic(sd, path, {"qvd_synthetic": f"{expect.lower()} seed={seed}"})


def build_wan_vae(path: str, wan22: bool = False, seed: int = SEED + 9) -> None:
    """Write a seeded fp16 Wan VAE (ComfyUI's ``VAELoader`` layout): Wan 2.1's at ``dim`` 16 (ComfyUI reads its
    width from the weights; the real one is 96) or Wan 2.2's (48 latent channels), which ComfyUI builds at its full
    width whatever a file holds (705 M parameters, 1.4 GB in fp16)."""
    from comfy.cli_args import args
    args.cpu = True
    import comfy.ldm.wan.vae
    import comfy.ldm.wan.vae2_2

    ddconfig = {"dim": 160 if wan22 else 16, "z_dim": 48 if wan22 else 16, "dim_mult": [1, 2, 4, 4],
                "num_res_blocks": 2, "attn_scales": [], "temperal_downsample": [False, True, True], "dropout": 0.0}
    vae = (comfy.ldm.wan.vae2_2 if wan22 else comfy.ldm.wan.vae).WanVAE(**ddconfig)
    init_seeded_([vae], seed)
    sd = {k: v.to(torch.float16) for k, v in vae.state_dict().items()}
    if ("decoder.upsamples.0.upsamples.0.residual.2.weight" in sd) != wan22:
        raise RuntimeError("the synthetic Wan VAE would not be detected as the Wan VAE it stands for")
    _save_atomic(sd, path, {"qvd_synthetic": f"wan{'22' if wan22 else '21'}_vae seed={seed}"})


def motion_module_shapes(sdxl: bool = False, hotshot: bool = False) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an AnimateDiff motion model: mm_sd_v15_v2 (21 modules, 588 keys), for SDXL the
    mm_sdxl_v10_beta layout (3 down / up blocks, no middle block), or HotShotXL's names for the same modules
    (``temporal_attentions.<j>.`` and ``pos_encoder.positional_encoding``, 24 positions)."""
    widths = (320, 640, 1280) if sdxl else (320, 640, 1280, 1280)
    blocks = [(f"down_blocks.{i}", c, 2) for i, c in enumerate(widths)]
    blocks += [(f"up_blocks.{i}", c, 3) for i, c in enumerate(reversed(widths))]
    blocks += [] if sdxl else [("mid_block", 1280, 1)]
    positions, pe = (24, "pos_encoder.positional_encoding") if hotshot else (32, "pos_encoder.pe")
    shapes = {}
    for block, c, n in blocks:
        for j in range(n):
            t = f"{block}.temporal_attentions.{j}." if hotshot else f"{block}.motion_modules.{j}.temporal_transformer."
            b = t + "transformer_blocks.0."
            shapes.update({t + "norm.weight": (c,), t + "norm.bias": (c,),
                           t + "proj_in.weight": (c, c), t + "proj_in.bias": (c,),
                           t + "proj_out.weight": (c, c), t + "proj_out.bias": (c,),
                           b + "ff.net.0.proj.weight": (8 * c, c), b + "ff.net.0.proj.bias": (8 * c,),
                           b + "ff.net.2.weight": (c, 4 * c), b + "ff.net.2.bias": (c,),
                           b + "ff_norm.weight": (c,), b + "ff_norm.bias": (c,)})
            for a in range(2):
                ab = f"{b}attention_blocks.{a}."
                shapes.update({ab + "to_q.weight": (c, c), ab + "to_k.weight": (c, c),
                               ab + "to_v.weight": (c, c), ab + "to_out.0.weight": (c, c),
                               ab + "to_out.0.bias": (c,), f"{ab}{pe}": (1, positions, c),
                               f"{b}norms.{a}.weight": (c,), f"{b}norms.{a}.bias": (c,)})
    return shapes


def _sinusoid(length: int, dim: int) -> torch.Tensor:
    position = torch.arange(length).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, length, dim)
    pe[0, :, 0::2] = torch.sin(position * div_term)
    pe[0, :, 1::2] = torch.cos(position * div_term)
    return pe


def build_motion_model(path: str, seed: int = SEED, sdxl: bool = False, hotshot: bool = False) -> None:
    """Write a seeded fp16 motion model (``motion_module_shapes``' layout) to ``path``."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in sorted(motion_module_shapes(sdxl, hotshot).items()):
        if key.endswith(("pos_encoder.pe", "pos_encoder.positional_encoding")):
            t = _sinusoid(shape[1], shape[2])
        elif re.search(r"\.(norm|norms\.\d|ff_norm)\.(weight|bias)$", key):
            t = torch.ones(shape) if key.endswith("weight") else torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=gen) * (0.02 if len(shape) > 1 else 0.01)
        sd[key] = t.to(torch.float16)
    layout = "hotshotxl" if hotshot else "mm_sdxl_v10_beta" if sdxl else "mm_sd_v15_v2"
    _save_atomic(sd, path, {"qvd_synthetic": f"{layout} seed={seed}"})


def _save_atomic(sd: dict, path: str, metadata: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


LORA_NAME = "qvd_synth_lora.safetensors"
LORA_SEED = 1234
RANK = 4
LORA_STD = 0.06  # up / down entries: delta W entries ~ RANK**0.5 * 0.06**2 = 0.007, a third of W's 0.02
# The spatial transformers of the blocks that TINY's skip list quantizes: their 1x1 conv projections and
# the attention / feed-forward Linears (self- and cross-attention, with and without SCRI).
LORA_BLOCKS = ("input_blocks.1.1", "input_blocks.2.1", "middle_block.1", "output_blocks.9.1",
               "output_blocks.10.1", "output_blocks.11.1")
LORA_LAYERS = ("proj_in", "proj_out") + tuple(f"transformer_blocks.0.{n}" for n in (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_v", "ff.net.0.proj",
    "ff.net.2"))


def write_lora(checkpoint, path) -> list[str]:
    """A seeded rank-4 LoRA in ComfyUI's ``lora_unet_<path>`` format for LORA_LAYERS in LORA_BLOCKS."""
    gen = torch.Generator().manual_seed(LORA_SEED)
    tensors = {}
    with safe_open(str(checkpoint), "pt") as ckpt:
        for block in LORA_BLOCKS:
            for layer in LORA_LAYERS:
                name = f"{block}.{layer}"
                out_f, in_f, *kernel = ckpt.get_slice(f"model.diffusion_model.{name}.weight").get_shape()
                key = "lora_unet_" + name.replace(".", "_")
                tensors[f"{key}.lora_up.weight"] = torch.randn(out_f, RANK, *kernel, generator=gen) * LORA_STD
                tensors[f"{key}.lora_down.weight"] = torch.randn(RANK, in_f, *kernel, generator=gen) * LORA_STD
                tensors[f"{key}.alpha"] = torch.tensor(float(RANK))
    save_file(tensors, str(path))
    return sorted(k for k in tensors if k.endswith(".alpha"))


# Wan LoRAs as the lightx2v / CausVid distillation LoRAs are shipped: PEFT keys (``lora_A`` / ``lora_B``, no alpha:
# scale 1) under ``diffusion_model.``, on every block's attention and feed-forward Linears (and ``time_projection``).
WAN_LORA_LAYERS = [f"blocks.{b}.{n}" for b in range(WAN_CONFIG["num_layers"])
                   for n in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q",
                             "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")] + ["time_projection.1"]


def write_wan_lora(model_path, path, rank: int = RANK, ratio: float = 0.1, seed: int = LORA_SEED) -> list[str]:
    """A seeded rank-``rank`` Wan LoRA for the model at ``model_path``, ``||dW|| / ||W|| = ratio`` per layer at
    strength 1; returns the layers it patches."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    with safe_open(str(model_path), "pt") as f:
        for name in WAN_LORA_LAYERS:
            w = f.get_tensor(f"{name}.weight").float()
            a = torch.randn(rank, w.shape[1], generator=gen) / w.shape[1] ** 0.5
            b = torch.randn(w.shape[0], rank, generator=gen)
            b *= ratio * w.norm() / (b @ a).norm()
            tensors[f"diffusion_model.{name}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"diffusion_model.{name}.lora_B.weight"] = b.to(torch.bfloat16)
    save_file(tensors, str(path))
    return list(WAN_LORA_LAYERS)


# Every adapter family QVD handles, on quantized layers of TINY's quantized blocks: Linears (attention,
# feed-forward, the temporal time projections), 1x1 convs (proj_in / proj_out, some with SCRI in their norm)
# and 3x3 convs (LoCon, with and without its mid core; a LoKr with a 4-d factor, applied as a dense delta).
ADAPTER_LAYERS = {
    "lora": [f"{b}.{n}" for b in LORA_BLOCKS[:3] for n in LORA_LAYERS] + ["input_blocks.1.0.emb_layers.1",
                                                                          "middle_block.0.emb_layers.1"],
    "locon": ["input_blocks.1.0.in_layers.2", "input_blocks.2.0.out_layers.3", "middle_block.0.in_layers.2",
              "output_blocks.9.0.skip_connection"],
    "loha": [f"{b}.{n}" for b in LORA_BLOCKS[:2] for n in (
        "proj_in", "transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn2.to_v", "transformer_blocks.0.ff.net.2")],
    "lokr": [f"{b}.{n}" for b in LORA_BLOCKS[:2] for n in ("transformer_blocks.0.attn1.to_k",
                                                           "transformer_blocks.0.ff.net.0.proj")]
            + ["input_blocks.2.0.in_layers.2"],
}
# The tensor of each adapter that its delta is linear in (rescaled to set ||dW|| / ||W||).
ADAPTER_SCALED = {"lora": "lora_up.weight", "locon": "lora_up.weight", "loha": "hada_w1_a", "lokr": "lokr_w1"}


def adapter_tensors(checkpoint, kind: str, seed: int = LORA_SEED) -> dict[str, torch.Tensor]:
    """A seeded rank-4 adapter of ``kind`` (``ADAPTER_LAYERS``) in the LyCORIS / kohya key format ComfyUI loads."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen) * LORA_STD
    tensors = {}
    with safe_open(str(checkpoint), "pt") as ckpt:
        for i, name in enumerate(ADAPTER_LAYERS[kind]):
            n, c, *kernel = ckpt.get_slice(f"model.diffusion_model.{name}.weight").get_shape()
            k = c * math.prod(kernel)
            key = "lora_unet_" + name.replace(".", "_")
            if kind in ("lora", "locon"):
                one = [1] * len(kernel)
                if kind == "locon" and i == 2:  # LoCon with its k x k mid core
                    tensors[f"{key}.lora_down.weight"] = rnd(RANK, c, *one)
                    tensors[f"{key}.lora_mid.weight"] = rnd(RANK, RANK, *kernel)
                else:
                    tensors[f"{key}.lora_down.weight"] = rnd(RANK, c, *kernel)
                tensors[f"{key}.lora_up.weight"] = rnd(n, RANK, *one)
            elif kind == "loha":
                for w in ("w1", "w2"):
                    tensors[f"{key}.hada_{w}_a"], tensors[f"{key}.hada_{w}_b"] = rnd(n, RANK), rnd(RANK, k)
            else:
                tensors[f"{key}.lokr_w1"] = rnd(4, 4)
                if kernel and kernel != [1, 1]:
                    tensors[f"{key}.lokr_w2"] = rnd(n // 4, c // 4, *kernel)
                else:
                    tensors[f"{key}.lokr_w2_a"], tensors[f"{key}.lokr_w2_b"] = rnd(n // 4, RANK), rnd(RANK, c // 4)
            tensors[f"{key}.alpha"] = torch.tensor(float(RANK))
    return tensors


if __name__ == "__main__":
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    kind, out = sys.argv[1], sys.argv[2]
    {"sd15": build_sd15_checkpoint, "motion": build_motion_model, "sdxl": build_sdxl_checkpoint,
     "motion_sdxl": lambda p: build_motion_model(p, sdxl=True),
     "motion_hotshotxl": lambda p: build_motion_model(p, sdxl=True, hotshot=True), "wan21": build_wan_model,
     "wan21_low": lambda p: build_wan_model(p, seed=SEED + 7),
     "wan21_1_3b_width": lambda p: build_wan_model(p, config=WAN_1_3B_WIDTH),
     "wan21_i2v": lambda p: build_wan_model(p, seed=SEED + 8, config=WAN_I2V_CONFIG, expect="WAN21_I2V"),
     "wan22_ti2v": lambda p: build_wan_model(p, seed=SEED + 10, config=WAN_TI2V_CONFIG, expect="WAN22_T2V"),
     "wan21_vae": build_wan_vae, "wan22_vae": lambda p: build_wan_vae(p, wan22=True)}[kind](out)


def write_hypernetwork(path, dims=(320, 640, 1280, 768), std: float = 0.02) -> None:
    """A seeded hypernetwork in the format ComfyUI's HypernetworkLoader reads: per attention width, two MLPs
    (dim -> 2 dim -> dim, ReLU) added to the keys and the values."""
    gen = torch.Generator().manual_seed(LORA_SEED + 1)

    def mlp(dim: int) -> dict:
        return {"linear.0.weight": torch.randn(2 * dim, dim, generator=gen) * std,
                "linear.0.bias": torch.zeros(2 * dim),
                "linear.1.weight": torch.randn(dim, 2 * dim, generator=gen) * std,
                "linear.1.bias": torch.zeros(dim)}
    sd = {dim: [mlp(dim), mlp(dim)] for dim in dims}
    sd.update(activation_func="relu", is_layer_norm=False, use_dropout=False)
    torch.save(sd, str(path))


def sd15_controlnet_state_dict(seed: int = SEED + 2) -> dict[str, torch.Tensor]:
    """A seeded SD1.5 ControlNet (ComfyUI's ``cldm.ControlNet``, 3-channel hint) in the ``control_model.`` layout of
    the original .pth / .safetensors files, fp16; its zero convolutions seeded non-zero so the control acts."""
    import comfy.cldm.cldm
    import comfy.ops

    config = {k: v for k, v in SD15_UNET_CONFIG.items() if k != "out_channels"}
    net = comfy.cldm.cldm.ControlNet(**config, hint_channels=3, operations=comfy.ops.disable_weight_init,
                                     dtype=torch.float32, device="cpu")
    init_seeded_([net], seed)
    return {f"control_model.{k}": v.to(torch.float16) for k, v in net.state_dict().items()}


# SD1.5's cross-attention layers in the order IPAdapter Plus numbers them (input blocks 1, 2, 4, 5, 7, 8, output
# blocks 3..11, the middle block): their widths.
IPADAPTER_SD15_WIDTHS = (320, 320, 640, 640, 1280, 1280) + (1280,) * 3 + (640,) * 3 + (320,) * 3 + (1280,)


def sd15_ipadapter(seed: int = SEED + 3, clip_dim: int = 1024, std: float = 0.02) -> dict:
    """A seeded SD1.5 IPAdapter (the plain one: 4 image tokens) as IPAdapter Plus holds a loaded model:
    ``{"image_proj": {proj, norm}, "ip_adapter": {"<2i+1>.to_k_ip.weight", "<2i+1>.to_v_ip.weight"}}``."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen) * std  # noqa: E731
    image_proj = {"proj.weight": rnd(4 * 768, clip_dim), "proj.bias": rnd(4 * 768),
                  "norm.weight": torch.ones(768), "norm.bias": torch.zeros(768)}
    ip_adapter = {f"{2 * i + 1}.to_{kv}_ip.weight": rnd(width, 768)
                  for i, width in enumerate(IPADAPTER_SD15_WIDTHS) for kv in ("k", "v")}
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}
