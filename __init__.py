"""ComfyUI-QVD: W8A8 post-training quantization (QVD: HTDQ + SCRI) of AnimateDiff video diffusion models.

ComfyUI loads this file as the custom-node package; it also imports outside ComfyUI (no comfy import).
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register_model_folder

register_model_folder()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
