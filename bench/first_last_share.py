"""Share of an SD1.5 UNet's multiply-accumulates in its first and last convolutions (kept in float by QVD).

Counted with torch's FlopCounterMode on the meta device (no weights, no compute): diffusers
UNet2DConditionModel with SD1.5's configuration at 512x512 (latent 64x64), one conditional + one
unconditional sample.

    python -m bench.first_last_share
"""
from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode


def share(latent: int = 64) -> tuple[float, float]:
    """(total GMAC, first + last conv MMAC) of one SD1.5 UNet call on a batch of 2."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=latent, cross_attention_dim=768, attention_head_dim=8)
        x, t, ctx = torch.randn(2, 4, latent, latent), torch.tensor([500, 500]), torch.randn(2, 77, 768)
        with FlopCounterMode(display=False) as counter:
            unet(x, t, encoder_hidden_states=ctx)
    per_module = counter.get_flop_counts()
    first_last = sum(sum(per_module[f"UNet2DConditionModel.{n}"].values()) for n in ("conv_in", "conv_out"))
    return counter.get_total_flops() / 2e9, first_last / 2e6


if __name__ == "__main__":
    total, first_last = share()
    print(f"SD1.5 UNet, 512x512, batch 2: {total:.1f} GMAC; conv_in + conv_out {first_last:.1f} MMAC "
          f"= {first_last / total / 10:.4f} % of the MACs")
