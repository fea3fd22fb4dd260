"""Helpers shared by the core tests: a small real AnimateDiff-architecture UNet (diffusers
UNetMotionModel), seeded inputs, and the relative error used in assertions."""
import torch

FRAMES = 8
TIMESTEPS = (999, 800, 600, 400, 200, 50)


def build_unet(seed: int = 0):
    from diffusers import UNetMotionModel
    torch.manual_seed(seed)
    return UNetMotionModel(
        block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"),
        cross_attention_dim=32, norm_num_groups=8, num_attention_heads=2, motion_num_attention_heads=2,
        motion_max_seq_length=32, sample_size=16, in_channels=4, out_channels=4).eval()


class Inputs:
    """Seeded latents (one per sampler timestep) and a per-frame text context."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.context = torch.randn(1, 7, 32, generator=g).repeat_interleave(FRAMES, 0)
        self.latents = {t: torch.randn(1, 4, FRAMES, 16, 16, generator=g) for t in TIMESTEPS}

    def run(self, model, t):
        with torch.no_grad():
            return model(self.latents[t], torch.tensor([t]), encoder_hidden_states=self.context).sample


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())
