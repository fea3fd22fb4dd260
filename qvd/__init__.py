"""QVD: post-training quantization for video diffusion models (plain torch, no ComfyUI import)."""
