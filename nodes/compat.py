"""What differs between the ComfyUI versions the pack supports (0.3.75 and 0.33 verified), in one place.

Each difference is detected by behaviour, not by version number, so releases in between are handled too.
"""
from __future__ import annotations

import functools

import torch


@functools.cache
def lowvram_patch_converts() -> bool:
    """Whether ComfyUI's low-VRAM weight patch converts the stored weight itself (0.3.75: ``convert_func`` ->
    ``calculate_weight`` -> ``set_func``) or patches whatever the layer stores (0.33 and every release since
    0.4: ``calculate_weight`` alone, which on int8 codes would be wrong)."""
    from comfy.model_patcher import LowVramPatch

    seen = []
    patch = LowVramPatch("w", {"w": []}, convert_func=lambda w, **_: seen.append("convert") or w,
                         set_func=lambda w, **_: w)
    patch(torch.zeros(1))
    return bool(seen)
