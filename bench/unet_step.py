"""Whole-UNet step benchmark, ComfyUI-free: SD1.5 + mm_sd_v15_v2 shapes (a diffusers ``UNetMotionModel``), or the
SD1.5 ``UNet2DConditionModel`` alone (``--model sd15``).

Random seeded weights (the real configs written out, nothing downloaded). Times one forward (batch = frames x
cond/uncond) for fp32, bf16 and W8A8 in one run, W8A8 two ways, labelled:
- **QVD modules** (the README's figure): ``Calibrator`` over three forwards + ``quantize_model`` with the default
  ``QVDConfig``, i.e. the ``QLinear`` / ``QConv2d`` / ``HiDiTQLinear`` users get (SCRI, HTDQ, zero points);
- **synthetic layers**: every Linear / Conv2d as ``bench._common.W8A8`` (abs-max scales, zero point 0, no SCRI),
  the kernels' bound with none of the method's work;
and torchao int8 dynamic on Linear layers when installed.

    python -m bench.unet_step [--model sd15-motion|sd15] [--device cpu|cuda] [--latent 16] [--batch 16] [--runs 3]

``--batch`` = frames x 2 (cond + uncond) for the motion model.
"""
from __future__ import annotations

import argparse
import copy
import gc
import warnings

import torch

from bench._common import W8A8, apply_threads, machine, median_ms, size_options, table

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
    use_linear_projection=False,
)


def build_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    return UNet2DConditionModel(**SD15_UNET).eval()


def inputs(latent: int, batch: int, device, dtype=torch.float32, seed: int = 1, frames: int = 0):
    """(x, t, context); with ``frames`` the motion model's [batch / frames, 4, frames, H, W] latents."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch // frames, 4, frames, latent, latent) if frames else (batch, 4, latent, latent)
    x = torch.randn(shape, generator=g)
    ctx = torch.randn(batch, 77, 768, generator=g)
    return x.to(device, dtype), torch.tensor(500, device=device), ctx.to(device, dtype)


def quantize_core(unet, latent, batch, device, dtype, frames: int = 0, config=None):
    """QVD's own modules: calibrate on three forwards, ``quantize_model`` (default ``QVDConfig``)."""
    from qvd import Calibrator, QVDConfig, quantize_model
    cfg = QVDConfig() if config is None else config
    x, _, ctx = inputs(latent, batch, device, dtype, seed=2, frames=frames)
    with Calibrator(unet, cfg) as cal:
        for t in (900, 500, 100):
            cal.set_timestep(t)
            unet(x, torch.tensor(t, device=device), encoder_hidden_states=ctx)
    res = quantize_model(unet, cal.result(), cfg, apply=True)
    return sum(1 for m in res.modules.values() if getattr(m, "qvd_quantized", False))  # not the norms SCRI folds into


def quantize_direct(unet, latent, batch, device, dtype, frames: int = 0):
    """Synthetic layers: abs-max static scales from two forwards, then every Linear / Conv2d -> W8A8."""
    absmax, hooks = {}, []
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    for name, m in layers.items():
        def hook(_m, args, kwargs, name=name):  # diffusers passes some inputs by name (``input=``)
            x = args[0] if args else kwargs["input"]
            absmax[name] = max(absmax.get(name, 0.0), x.detach().abs().max().item())
        hooks.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    x, _, ctx = inputs(latent, batch, device, dtype, seed=2, frames=frames)
    for t in (900, 300):
        unet(x, torch.tensor(t, device=device), encoder_hidden_states=ctx)
    for h in hooks:
        h.remove()
    for name, m in layers.items():
        parent, _, attr = name.rpartition(".")
        setattr(unet.get_submodule(parent) if parent else unet, attr, W8A8(m, absmax[name]).to(device))
    return len(layers)


def torchao_linear(unet):
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(unet, Int8DynamicActivationInt8WeightConfig())
    return True


def _plain(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors behind a tensor subclass (e.g. torchao's quantized weights)."""
    if hasattr(t, "__tensor_flatten__"):
        inner = [getattr(t, n) for n in t.__tensor_flatten__()[0]]
        return [p for x in inner if isinstance(x, torch.Tensor) for p in _plain(x)]
    return [t]


def weight_mib(model) -> float:
    """Bytes of the model's parameters and buffers (shared ones once; runtime packings such as oneDNN's
    are not counted)."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        for p in _plain(t):
            seen[(p.data_ptr(), p.dtype)] = p.numel() * p.element_size()
    return sum(seen.values()) / 2**20


def run(device, latent, batch, runs, model="sd15-motion", peers=True):
    motion = model == "sd15-motion"
    frames = batch // 2 if motion else 0  # cond + uncond clips
    print(f"machine: {machine()}")
    print(f"UNet: {'SD1.5 + mm_sd_v15_v2 (UNetMotionModel)' if motion else 'SD1.5'}, random seeded weights; "
          f"latent {latent}x{latent}, batch {batch}{f' ({frames} frames x cond/uncond)' if motion else ''}; "
          f"median of {runs} forwards\n")
    rows = []

    def step(name, net, dtype, note=""):
        x, t, ctx = inputs(latent, batch, device, dtype, frames=frames)
        out = []
        ms = median_ms(lambda: out.append(net(x, t, encoder_hidden_states=ctx).sample), device,
                       samples=runs, min_sample_s=0)
        rows.append([name, ms, weight_mib(net), note])
        print(f"  {name}: {ms:.0f} ms", flush=True)
        return out[-1].float()

    with torch.no_grad():
        if motion:
            from bench.quantize_time import build_unet as build_motion
            base = build_motion().to(device)
        else:
            base = build_unet().to(device)
        ref = step("fp32", base, torch.float32)
        unet = copy.deepcopy(base).to(torch.bfloat16)
        step("bf16", unet, torch.bfloat16)
        del unet
        for rest, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            for label, quantize in (("QVD modules", quantize_core), ("synthetic layers", quantize_direct)):
                unet = copy.deepcopy(base).to(dtype)  # W8A8 layers keep fp32 scales
                n = quantize(unet, latent, batch, device, dtype, frames)
                how = (f"{n} layers via qvd.quantize_model (default QVDConfig)" if quantize is quantize_core else
                       f"{n} layers via bench W8A8 (abs-max, zero point 0, no SCRI)")
                y = step(f"W8A8, {label} (rest {rest})", unet, dtype, how)
                if dtype == torch.float32:
                    rows[-1][3] += f"; rel. err vs fp32 {((y - ref).norm() / ref.norm()).item():.3f}"
                del unet
                gc.collect()
        if peers and torchao_linear(base):
            step("torchao int8dq, Linear only (rest fp32)", base, torch.float32, "peer")
        else:
            rows.append(["torchao int8dq", "not installed" if peers else "skipped (--no-peers)", "", ""])
    fp32, bf16 = rows[0][1], rows[1][1]
    out = [[r[0], f"{r[1]:.0f}" if isinstance(r[1], float) else r[1],
            f"{fp32 / r[1]:.2f}x" if isinstance(r[1], float) else "",
            f"{bf16 / r[1]:.2f}x" if isinstance(r[1], float) else "",
            f"{r[2]:.0f}" if r[2] != "" else "", r[3]] for r in rows]
    print()
    print(table(["UNet step", "median ms", "vs fp32", "vs bf16", "weights MiB", "notes"], out))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size_options(p, runs=3)
    p.add_argument("--model", choices=["sd15-motion", "sd15"], default="sd15-motion")
    p.add_argument("--no-peers", action="store_true", help="skip torchao")
    a = p.parse_args()
    apply_threads(a)
    run(torch.device(a.device), a.latent, a.batch, a.runs, a.model, not a.no_peers)


if __name__ == "__main__":
    main()
