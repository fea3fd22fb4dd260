"""What QVD's ON_LOAD callback does under a dynamic-VRAM patcher (ComfyUI 0.33's ``ModelPatcherDynamic``, CUDA only),
in-process in ComfyUI, without a GPU: a ModelPatcher that says ``is_dynamic()`` loads to the ``meta`` device (the
stand-in for the GPU: tensors move, no memory is used). That loader streams only ComfyUI's own ops, so the callback
must put QVD's tensors on the device itself, with backups ComfyUI restores when it frees memory, and count them.
Prints one JSON line.

    python dynamic_probe.py PACK_DIR     (cwd = the ComfyUI directory, on PYTHONPATH)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from lowvram_probe import load_pack


def main(pack_dir: str) -> dict:
    from comfy.cli_args import args
    args.cpu = True
    import comfy.model_patcher
    import comfy.utils

    load_pack(Path(pack_dir))
    weight_patches = sys.modules["qvd_pack_probe.nodes.weight_patches"]
    from qvd_pack_probe.qvd import QConv2d

    g = torch.Generator().manual_seed(0)
    layer = QConv2d(8, 16, (3, 3), 1, 1, weight_q=torch.randint(-127, 128, (16, 8, 3, 3), generator=g,
                                                                  dtype=torch.int8),
                    weight_scale=torch.rand(16, generator=g) + 0.1, bias=torch.randn(16, generator=g), act_scale=0.02,
                    zero_point=0, w_bits=8, a_bits=8)
    root = torch.nn.Module()
    root.conv = torch.nn.Conv2d(8, 16, 3, padding=1)

    class Dynamic(comfy.model_patcher.ModelPatcher):
        def is_dynamic(self):
            return True

    cpu = torch.device("cpu")
    patcher = Dynamic(root, cpu, cpu, size=1)
    patcher.add_object_patch("conv", layer)
    stored = {k: v for k, v in layer.named_parameters()}
    comfy.utils.set_attr(root, "conv", layer)  # what patch_model does before load
    layer.comfy_cast_weights = True  # as that loader leaves every module with the attribute
    root.model_loaded_weight_memory = 0
    weight_patches.on_load(patcher, 1000, torch.device("meta"))
    facts = {"devices": sorted({str(p.device) for p in layer.parameters()}),
             "channels_last": layer.weight.is_contiguous(memory_format=torch.channels_last),
             "backed_up": sorted(k.partition(".")[2] for k in patcher.backup),
             "backups_are_the_stored": all(patcher.backup[f"conv.{k}"].weight is v for k, v in stored.items()),
             "loaded_bytes": int(root.model_loaded_weight_memory),
             "stored_bytes": sum(v.numel() * v.element_size() for v in stored.values()),
             "cast_flag": bool(layer.comfy_cast_weights), "told": patcher.size}
    restore = getattr(comfy.model_patcher, "ModelPatcherDynamic", None)
    if restore is not None:  # ComfyUI >= 0.4: its own way of freeing force-loaded weights
        restore.restore_loaded_backups(patcher)
        facts["restored"] = all(getattr(layer, k) is not v and getattr(layer, k).device == cpu
                                and torch.equal(getattr(layer, k), v) for k, v in stored.items())
    return facts


if __name__ == "__main__":
    print("QVD_PROBE " + json.dumps(main(*sys.argv[1:2])), flush=True)
