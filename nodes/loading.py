"""How ComfyUI loads and frees QVD's modules: the patcher class of every quantized MODEL, motion model and ControlNet.

ComfyUI's classic loader (0.3.75; 0.33 without dynamic VRAM) loads, offloads and unloads QVD's layers like its own
modules (``module.to``, ``comfy_cast_weights``: an offloaded layer's forward copies its stored tensors to the input's
device at each call), and restores its backups before it swaps object patches back.

0.33's dynamic-VRAM loader (``ModelPatcherDynamic``, comfy-aimdo, the default on NVIDIA) streams only ComfyUI's own
ops. It force-loads other tensors with backups kept in one dict shared by every clone of a model, and restores them
by key path into whatever module holds that path when the next clone loads (``ModelPatcherDynamic.partially_load``
swaps the object patches, then ``load`` calls ``restore_loaded_backups``). Left to it, a quantized layer's int8 codes
would be written into the FP model's float Linear, and the FP model's norm weights into QVD's SCRI-folded norm
copies. Under that loader a ``QVDPatcher`` therefore:

- leaves QVD's modules (quantized layers, folded norms) out of ComfyUI's load list (``_load_list``): ComfyUI never
  moves, casts, backs up or patches them;
- restores the shared backups before its own object patches go in (``partially_load``), while the modules they were
  taken from still hold their paths;
- keeps QVD's modules on the device while they fit (``place``: the free memory less ComfyUI's inference reserve and
  the model's own float weights), streams the others from pinned memory at each call, counts what it keeps in
  ``loaded_size``, and frees it first when ComfyUI frees memory (``partially_unload``) and when it detaches the
  patcher (ON_DETACH). The stored tensors never move: a device copy is dropped, never copied back.
"""
from __future__ import annotations

import logging

import torch

from ..qvd.modules import make_resident, release, resident_bytes

DETACH_KEY = "qvd"
_CLASSES: dict[type, type] = {}


# What ComfyUI's loaders attach to the modules they load (comfy/model_patcher.py, comfy/ops.py, comfy/pinned_memory.py,
# 0.3.75 and 0.33): a copy of a loaded module must start without it (class defaults apply again).
HOST_STATE = ("comfy_cast_weights", "prev_comfy_cast_weights", "comfy_patched_weights", "weight_function",
              "bias_function", "weight_lowvram_function", "bias_lowvram_function", "seed_key", "_v", "_v_signature",
              "_v_weight", "_v_bias", "_v_block", "_prefetch", "_pin_state", "_pins",
              # on a patcher's root model
              "dynamic_vbars", "dynamic_pins", "dynamic_patchers", "model_loaded_weight_memory", "lowvram_patch_counter",
              "model_lowvram", "current_weight_patches_uuid", "model_offload_buffer_memory", "current_patcher")


def fresh(module) -> None:
    """Remove from ``module`` (itself, not its children) the state ComfyUI's loaders attached to it (``HOST_STATE``)."""
    for name in HOST_STATE:
        module.__dict__.pop(name, None)


def dynamic(patcher) -> bool:
    """Whether ``patcher`` is 0.33's dynamic-VRAM loader (0.3.75's patchers have no ``is_dynamic``)."""
    return getattr(patcher, "is_dynamic", lambda: False)()


def is_qvd(module) -> bool:
    """A module QVD made: a quantized layer or a norm with a SCRI transform folded in."""
    return getattr(module, "qvd_quantized", False) or getattr(module, "qvd_scri_norm", False)


def qvd_modules(patcher) -> list[torch.nn.Module]:
    """QVD's modules ``patcher`` runs: its object patches (MODEL, motion models) and those in its own model (a
    quantized ControlNet's copy)."""
    found = {id(m): m for m in patcher.object_patches.values() if is_qvd(m)}
    found.update((id(m), m) for m in patcher.model.modules() if is_qvd(m))
    return list(found.values())


class QVDPatcher:
    """Mixed into the class of a patcher that runs QVD's modules (``make_qvd_patcher``); see the module docstring. Every
    override changes ComfyUI's behaviour only under its dynamic-VRAM loader."""

    def _load_list(self, *args, **kwargs):
        loading = super()._load_list(*args, **kwargs)
        if not dynamic(self):
            return loading
        return [entry for entry in loading if not is_qvd(entry[-2])]  # (..., name, module, params)

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        if dynamic(self):
            with self.use_ejected():  # the tree state ComfyUI's own load() restores in
                self.restore_loaded_backups()
        return super().partially_load(device_to, extra_memory, force_patch_weights=force_patch_weights)

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        if not dynamic(self):
            return super().partially_unload(device_to, memory_to_free, force_patch_weights=force_patch_weights)
        freed = free(self, memory_to_free)
        if freed < memory_to_free:
            freed += super().partially_unload(device_to, memory_to_free - freed,
                                              force_patch_weights=force_patch_weights)
        return freed

    def loaded_size(self):
        held = sum(resident_bytes(m) for m in qvd_modules(self)) if dynamic(self) else 0
        return super().loaded_size() + held


def make_qvd_patcher(patcher):
    """Make ``patcher`` (and every clone ComfyUI makes of it: ``clone`` builds ``self.__class__``) a ``QVDPatcher``."""
    cls = type(patcher)
    if not issubclass(cls, QVDPatcher):
        if cls not in _CLASSES:
            _CLASSES[cls] = type(f"QVD{cls.__name__}", (QVDPatcher, cls), {"__module__": __name__})
        patcher.__class__ = _CLASSES[cls]
    patcher.remove_callbacks_with_key(_detach_callback_type(), DETACH_KEY)
    patcher.add_callback_with_key(_detach_callback_type(), DETACH_KEY, on_detach)
    return patcher


def _detach_callback_type():
    from comfy.patcher_extension import CallbacksMP
    return CallbacksMP.ON_DETACH


def place(patcher, device) -> None:
    """Under the dynamic loader, called when ComfyUI loads ``patcher`` to ``device``: QVD's layers, smallest first, get
    a device copy while it fits ``budget`` (folded norms, a few KB, always); the others stream from their stored
    tensors, pinned."""
    modules = sorted(qvd_modules(patcher), key=_stored_bytes)
    left = budget(patcher, device, modules)
    kept = streamed = 0
    for m in modules:
        if getattr(m, "qvd_quantized", False):  # what a classic load may have left: QVD's forward does the copying
            m.comfy_cast_weights, m.weight_function, m.bias_function = False, [], []
        else:  # a folded norm, a ComfyUI op: it casts its weights to the input's dtype, as the loader has every op do
            m.comfy_cast_weights = True
        size = _stored_bytes(m)
        if size <= left or torch.device(device).type == "cpu" or not getattr(m, "qvd_quantized", False):
            left -= size - resident_bytes(m)
            kept += make_resident(m, device)
        else:
            release(m)
            streamed += size
            _pin(m)
    if streamed:
        logging.info("QVD: %.0f MiB of quantized weights kept on %s, %.0f MiB streamed from pinned memory at each "
                     "call (they do not fit beside what ComfyUI needs)", kept / 2**20, device, streamed / 2**20)


def budget(patcher, device, modules) -> int:
    """Bytes QVD's ``modules`` may keep on ``device``: ComfyUI's free memory (0.33: its own, reclaimable cast buffers
    included) plus what they hold there already, less its minimum inference reserve and the model's float weights
    that its loader keeps or streams beside them."""
    import comfy.model_management as mm

    free_memory = getattr(patcher, "get_free_memory", mm.get_free_memory)(device)
    held = sum(resident_bytes(m) for m in modules)
    floats = max(0, patcher.model_size() - sum(_stored_bytes(m) for m in modules))
    return int(free_memory + held - mm.minimum_inference_memory() - floats)


def free(patcher, memory_to_free: float) -> int:
    """Drop QVD's device copies of ``patcher``'s modules, largest first, until ``memory_to_free`` bytes are freed;
    returns the bytes freed."""
    freed = 0
    for m in sorted(qvd_modules(patcher), key=resident_bytes, reverse=True):
        if freed >= memory_to_free or not resident_bytes(m):
            break
        freed += release(m)
    return freed


def on_detach(patcher, unpatch_all=True) -> None:
    """ComfyUI detached ``patcher`` (evicted it, or loads another clone of its model): under the dynamic loader, QVD's
    device copies and pins go, since the next clone's load swaps the modules out of the tree without unloading them."""
    if dynamic(patcher):
        free(patcher, float("inf"))
        for m in qvd_modules(patcher):
            _unpin(m)


def _stored_bytes(module) -> int:
    home = module.__dict__.get("qvd_home", {})
    return sum(home.get(n, p).numel() * home.get(n, p).element_size() for n, p in module._parameters.items()
               if p is not None)


def _pin(module) -> None:
    """Pin a streamed module's stored codes (through a contiguous view: a conv's codes are channels-last)."""
    import comfy.model_management as mm

    w = module._parameters.get("weight")
    if w is None or w.device.type != "cpu" or "qvd_pinned" in module.__dict__:
        return
    view = w.detach().permute(0, 2, 3, 1) if w.dim() == 4 and not w.is_contiguous() else w.detach()
    if view.is_contiguous() and mm.pin_memory(view):
        module.qvd_pinned = view


def _unpin(module) -> None:
    import comfy.model_management as mm

    view = module.__dict__.pop("qvd_pinned", None)
    if view is not None:
        mm.unpin_memory(view)
