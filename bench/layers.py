"""Per-layer W8A8 benchmark: SD1.5 UNet and AnimateDiff motion-module Linear / Conv2d shapes, or Wan 2.1's.

Prints one markdown table measured in one run: medians (ms) for fp32, bf16, ours (qvd.kernels W8A8,
int route), torchao int8 dynamic and comfy-kitchen ``int8_linear`` (dynamic per-row activations) when importable,
the speed-up of ours over fp32 and bf16, and weight bytes. Sizes: on a GPU the real 512x512, 16-frame shapes
(latent 64x64, batch 32 = 16 frames x cond/uncond); on a CPU latent 16x16, batch 16. ``--model wan``: the Linear
shapes of Wan 2.1 1.3B and 14B blocks (``wan_shapes``) at a 480p / 720p clip's sequence length on a GPU, 1,024
tokens on a CPU.

    python -m bench.layers [--device cpu|cuda] [--samples 5] [--model sd15|wan] [--clip 480p|720p]
"""
from __future__ import annotations

import argparse
import copy
import warnings

import torch

from bench._common import W8A8, machine, median_ms, table


def shapes(latent: int, batch: int) -> list[tuple[str, str, tuple]]:
    """(name, kind, args): linear -> (tokens M, in K, out N); conv -> (batch, C_in, H, C_out, k, stride)."""
    hw = {320: latent, 640: latent // 2, 1280: latent // 4}
    rows = []
    for c in (320, 640, 1280):
        s = hw[c]
        m = batch * s * s
        rows += [(f"conv3x3 {c}->{c} @{s}x{s}", "conv", (batch, c, s, c, 3, 1)),
                 (f"attn q/k/v/out {c}->{c}", "linear", (m, c, c)),
                 (f"cross-attn k/v 768->{c} (77 tok)", "linear", (batch * 77, 768, c)),
                 (f"GEGLU ff {c}->{8 * c}", "linear", (m, c, 8 * c)),
                 (f"ff out {4 * c}->{c}", "linear", (m, 4 * c, c)),
                 (f"proj_in 1x1 conv {c}->{c} @{s}x{s}", "conv", (batch, c, s, c, 1, 1)),
                 (f"motion attn {c}->{c} (frames as tokens)", "linear", (m, c, c))]
    rows += [(f"downsample 320->320 s2 @{latent}x{latent}", "conv", (batch, 320, latent, 320, 3, 2)),
             (f"up resnet conv3x3 2560->1280 @{latent // 4}", "conv", (batch, 2560, latent // 4, 1280, 3, 1)),
             (f"mid conv3x3 1280->1280 @{latent // 8}", "conv", (batch, 1280, max(latent // 8, 1), 1280, 3, 1)),
             ("time_emb linear 1280->1280", "linear", (batch, 1280, 1280))]
    return rows


# Wan 2.1 (dim, ffn dim) per size, and the tokens of an 81-frame clip: 21 latent frames x (h / 16) x (w / 16).
WAN_SIZES = {"1.3B": (1536, 8960), "14B": (5120, 13824)}
WAN_TOKENS = {"480p": 21 * 30 * 52, "720p": 21 * 45 * 80}
WAN_TEXT_TOKENS = 512


def wan_shapes(tokens: int, batch: int = 1) -> list[tuple[str, str, tuple]]:
    """The Linear shapes of one Wan 2.1 block per size (and the text / time embeddings) at ``tokens`` per sample."""
    rows = []
    for size, (d, ffn) in WAN_SIZES.items():
        m, text = batch * tokens, batch * WAN_TEXT_TOKENS
        rows += [(f"Wan {size} self-attn q/k/v/o {d}->{d} ({tokens} tok)", "linear", (m, d, d)),
                 (f"Wan {size} ffn {d}->{ffn}", "linear", (m, d, ffn)),
                 (f"Wan {size} ffn {ffn}->{d}", "linear", (m, ffn, d)),
                 (f"Wan {size} cross-attn k/v {d}->{d} ({WAN_TEXT_TOKENS} text tok)", "linear", (text, d, d)),
                 (f"Wan {size} text embedding 4096->{d}", "linear", (text, 4096, d)),
                 (f"Wan {size} time_projection {d}->{6 * d}", "linear", (batch, d, 6 * d))]
    return rows


def build(kind: str, args: tuple, device):
    g = torch.Generator().manual_seed(0)
    if kind == "linear":
        m, k, n = args
        layer = torch.nn.Linear(k, n)
        x = torch.randn(m, k, generator=g)
    else:
        b, c, s, n, k, stride = args
        layer = torch.nn.Conv2d(c, n, k, stride, k // 2)
        x = torch.randn(b, c, s, s, generator=g)
    return layer.to(device).eval(), x.to(device)


def torchao_int8(layer: torch.nn.Linear):
    """torchao int8 dynamic-activation / int8-weight Linear, or a reason it cannot run."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        return "not installed"
    m = torch.nn.Sequential(copy.deepcopy(layer))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(m, Int8DynamicActivationInt8WeightConfig())
    return m


def kitchen_int8(layer: torch.nn.Linear, dtype):
    """comfy-kitchen ``int8_linear`` (per-row dynamic activations, tensor-wise weight), or a reason."""
    try:
        import comfy_kitchen as ck
    except ImportError:
        return "not installed"
    w = layer.weight.detach()
    ws = w.abs().max().float() / 127.0
    wq = torch.round(w / ws).clamp(-127, 127).to(torch.int8)
    b = layer.bias.detach().to(dtype)
    return lambda x: ck.int8_linear(x, wq, ws, b, out_dtype=dtype)


def run(device: torch.device, samples: int, model: str = "sd15", clip: str = "480p"):
    latent, batch = (64, 32) if device.type == "cuda" else (16, 16)
    tokens = WAN_TOKENS[clip] if device.type == "cuda" else 1024
    half = torch.bfloat16
    print(f"machine: {machine()}")
    print((f"size: latent {latent}x{latent}, batch {batch}" if model == "sd15" else
           f"size: Wan 2.1 blocks, {tokens} tokens, batch 1") + f"; times: median of {samples} ms\n")
    rows = []
    with torch.no_grad():
        for name, kind, args in (shapes(latent, batch) if model == "sd15" else wan_shapes(tokens)):
            layer, x = build(kind, args, device)
            ours = W8A8(layer, x.abs().max().item()).to(device)
            lb, xb = copy.deepcopy(layer).to(half), x.to(half)
            t32 = median_ms(lambda: layer(x), device, samples)
            t16 = median_ms(lambda: lb(xb), device, samples)
            t8 = median_ms(lambda: ours(x), device, samples)
            t8b = median_ms(lambda: ours(xb), device, samples)
            err = ((ours(x) - layer(x)).norm() / layer(x).norm()).item()
            peers = []
            if kind == "linear":
                ao = torchao_int8(layer)
                peers.append(ao if isinstance(ao, str) else f"{median_ms(lambda: ao(x), device, samples):.2f}")
                ck = kitchen_int8(layer, half)
                peers.append(ck if isinstance(ck, str) else f"{median_ms(lambda: ck(xb), device, samples):.2f}")
            else:
                peers = ["n/a (Linear only)"] * 2
            wb = layer.weight.numel()
            rows.append([name, f"{t32:.2f}", f"{t16:.2f}", f"{t8:.2f}", f"{t8b:.2f}", *peers,
                         f"{t32 / t8:.2f}x", f"{t16 / t8b:.2f}x", f"{err:.4f}",
                         f"{wb * 4 / 2**20:.2f} / {wb * 2 / 2**20:.2f} / {(wb + 4 * layer.out_channels if kind == 'conv' else wb + 4 * layer.out_features) / 2**20:.2f}"])
            print(f"  {name}: fp32 {t32:.2f} bf16 {t16:.2f} w8a8 {t8:.2f} (bf16 io {t8b:.2f}) ms", flush=True)
    print()
    print(table(["layer", "fp32 ms", "bf16 ms", "W8A8 ms (fp32 io)", "W8A8 ms (bf16 io)", "torchao int8dq ms",
                 "comfy-kitchen int8_linear ms (bf16)", "W8A8 vs fp32", "W8A8 vs bf16 (bf16 io)",
                 "W8A8 rel. err", "weight MiB fp32 / bf16 / int8"], rows))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--model", choices=("sd15", "wan"), default="sd15")
    p.add_argument("--clip", choices=tuple(WAN_TOKENS), default="480p", help="Wan clip size (GPU runs)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    run(torch.device(a.device), a.samples, a.model, a.clip)


if __name__ == "__main__":
    main()
