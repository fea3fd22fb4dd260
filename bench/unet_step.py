"""Whole-UNet step benchmark: a ComfyUI-free SD1.5-shaped diffusers ``UNet2DConditionModel``.

Random seeded weights (the real SD1.5 config written out below, nothing downloaded). Times one
forward (batch = frames x cond/uncond) for fp32, bf16, W8A8 (every Linear / Conv2d on qvd's int
route, the rest of the net in fp32 or bf16) and torchao int8 dynamic on Linear layers when installed.
W8A8 layers come from the qvd core (``Calibrator`` over a couple of forwards + ``quantize_model``)
when it is importable, else from ``bench._common.W8A8`` with abs-max calibration (``--route``).

    python -m bench.unet_step [--device cpu|cuda] [--latent 16] [--batch 16] [--runs 3]
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


def inputs(latent: int, batch: int, device, dtype=torch.float32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, latent, latent, generator=g)
    ctx = torch.randn(batch, 77, 768, generator=g)
    return x.to(device, dtype), torch.tensor(500, device=device), ctx.to(device, dtype)


def _core():
    try:
        from qvd import Calibrator, QVDConfig, quantize_model
    except ImportError:
        return None
    return Calibrator, QVDConfig, quantize_model


def quantize_core(unet, latent, batch, device, dtype):
    Calibrator, QVDConfig, quantize_model = _core()
    cfg = QVDConfig(act_range="minmax")  # range search does not change step time; keeps the bench short
    x, _, ctx = inputs(latent, batch, device, dtype, seed=2)
    with Calibrator(unet, cfg) as cal:
        for t in (900, 300):
            cal.set_timestep(t)
            unet(x, torch.tensor(t, device=device), encoder_hidden_states=ctx)
    res = quantize_model(unet, cal.result(), cfg, apply=True)
    return len(res.modules)


def quantize_direct(unet, latent, batch, device, dtype):
    """Abs-max static scales from two forwards, then every Linear / Conv2d -> W8A8."""
    absmax, hooks = {}, []
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    for name, m in layers.items():
        def hook(_m, args, name=name):
            absmax[name] = max(absmax.get(name, 0.0), args[0].detach().abs().max().item())
        hooks.append(m.register_forward_pre_hook(hook))
    x, _, ctx = inputs(latent, batch, device, dtype, seed=2)
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
    """Bytes of the model's tensors (shared ones once), without derived runtime layouts
    (the W8A8 ``w_mat`` / ``w_q_t`` GEMM views and oneDNN's packed copies)."""
    seen = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.rsplit(".", 1)[-1] not in ("w_mat", "w_q_t"):
            for p in _plain(t):
                seen[(p.data_ptr(), p.dtype)] = p.numel() * p.element_size()
    return sum(seen.values()) / 2**20


def run(device, latent, batch, runs, route, peers=True):
    print(f"machine: {machine()}")
    print(f"UNet: SD1.5 config, random seeded weights; latent {latent}x{latent}, batch {batch}; "
          f"median of {runs} forwards\n")
    rows = []

    def step(name, model, dtype, note=""):
        x, t, ctx = inputs(latent, batch, device, dtype)
        out = []
        ms = median_ms(lambda: out.append(model(x, t, encoder_hidden_states=ctx).sample), device,
                       samples=runs, min_sample_s=0)
        rows.append([name, ms, weight_mib(model), note])
        print(f"  {name}: {ms:.0f} ms", flush=True)
        return out[-1].float()

    def quantized(model, dtype):
        use_core = route == "core" or (route == "auto" and _core() is not None)
        n = (quantize_core if use_core else quantize_direct)(model, latent, batch, device, dtype)
        return f"{n} layers via {'qvd.quantize_model' if use_core else 'bench W8A8 (abs-max)'}"

    with torch.no_grad():
        base = build_unet().to(device)
        ref = step("fp32", base, torch.float32)
        unet = copy.deepcopy(base).to(torch.bfloat16)
        step("bf16", unet, torch.bfloat16)
        how = quantized(unet, torch.bfloat16)  # the bf16 copy: its W8A8 layers keep fp32 scales
        step("W8A8 (rest bf16)", unet, torch.bfloat16, how)
        del unet
        gc.collect()
        unet = copy.deepcopy(base)
        how = quantized(unet, torch.float32)
        y = step("W8A8 (rest fp32)", unet, torch.float32, how)
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
    p.add_argument("--route", choices=["auto", "core", "direct"], default="auto")
    p.add_argument("--no-peers", action="store_true", help="skip torchao")
    a = p.parse_args()
    apply_threads(a)
    run(torch.device(a.device), a.latent, a.batch, a.runs, a.route, not a.no_peers)


if __name__ == "__main__":
    main()
