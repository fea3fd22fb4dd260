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
- keeps QVD's layers on the device while they fit (``place``: within the weight memory ComfyUI planned for the load,
  less its inference reserve and the model's float weights), streams the others from RAM at each call, counts what
  it keeps in ``loaded_size``, frees it first when ComfyUI asks this patcher for memory (``partially_unload``), drops
  it when ComfyUI detaches the patcher (ON_DETACH: before every load of a clone of its network, the FP MODEL's
  included; a reload of the same MODEL copies its layers over again) and when another sampling run places its own
  (``sampling_run``: copies ComfyUI cannot reclaim on demand, unlike its own). The stored tensors never move: a
  device copy is dropped, never copied back.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import weakref

import torch

from ..qvd.modules import make_resident, release, resident_bytes

DETACH_KEY = "qvd"
TREE = "qvd_owns_tree"  # attachment: the patcher's model is QVD's own copy (a quantized ControlNet)
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
    """QVD's modules of ``patcher`` itself: its object patches (MODEL, motion models), or the modules of its own model
    (a quantized ControlNet's copy, marked by the ``TREE`` attachment). Never those another patcher put in a shared
    tree."""
    found = {id(m): m for m in patcher.object_patches.values() if is_qvd(m)}
    if patcher.get_attachment(TREE):
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
            self.qvd_extra_memory = extra_memory  # the weight memory ComfyUI planned for this load (``place``)
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
        held = sum(_held_on(m, self.load_device) for m in qvd_modules(self)) if dynamic(self) else 0
        return super().loaded_size() + held


def make_qvd_patcher(patcher, owns_tree: bool = False):
    """Make ``patcher`` (and every clone ComfyUI makes of it: ``clone`` builds ``self.__class__``) a ``QVDPatcher``;
    ``owns_tree``: its model is QVD's own copy (a quantized ControlNet), whose QVD modules are all its own."""
    cls = type(patcher)
    if not issubclass(cls, QVDPatcher):
        if cls not in _CLASSES:
            _CLASSES[cls] = type(f"QVD{cls.__name__}", (QVDPatcher, cls), {"__module__": __name__})
        patcher.__class__ = _CLASSES[cls]
    if owns_tree:
        patcher.set_attachments(TREE, True)
    patcher.remove_callbacks_with_key(_detach_callback_type(), DETACH_KEY)
    patcher.add_callback_with_key(_detach_callback_type(), DETACH_KEY, on_detach)
    return patcher


def _detach_callback_type():
    from comfy.patcher_extension import CallbacksMP
    return CallbacksMP.ON_DETACH


_RUN = {"token": None, "depth": 0}  # the sampling run in progress (``sampling_run``)
_PLACED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> QVD module holding a device copy


@contextlib.contextmanager
def sampling_run():
    """One sampling run of a quantized MODEL (its OUTER_SAMPLE wrapper): the QVD modules ``place`` puts on a device
    inside it (the MODEL's, its motion models', its quantized ControlNets') stay there together; a later run's
    ``place`` drops those of models it does not use (e.g. the other expert of a Wan 2.2 pair, still loaded)."""
    if _RUN["depth"] == 0:
        _RUN["token"] = object()
    _RUN["depth"] += 1
    try:
        yield
    finally:
        _RUN["depth"] -= 1
        if _RUN["depth"] == 0:
            _RUN["token"] = None


def place(patcher, device) -> None:
    """Under the dynamic loader, called when ComfyUI loads ``patcher`` to ``device``: QVD's device copies that no model
    of this sampling run holds are dropped first; then ``patcher``'s quantized layers, smallest first, get a device
    copy while they fit its ``budget`` (folded norms, a few KB, always); the others stream from their stored tensors
    in RAM at each call."""
    run = _RUN["token"]
    modules = sorted(qvd_modules(patcher), key=_stored_bytes)
    own = {id(m) for m in modules}
    for m in list(_PLACED.values()) if run is not None else ():  # outside a quantized MODEL's run (quantized
        if id(m) not in own and m.__dict__.get("qvd_run") is not run and _held_on(m, device):  # ControlNets on an
            release(m)  # FP MODEL) nothing is dropped: they sample together
    left = budget(patcher, device, modules)
    kept = streamed = 0
    for m in modules:
        if getattr(m, "qvd_quantized", False):  # what a classic load may have left: QVD's forward does the copying
            m.comfy_cast_weights, m.weight_function, m.bias_function = False, [], []
        else:  # a folded norm, a ComfyUI op: it casts its weights to the input's dtype, as the loader has every op do
            m.comfy_cast_weights = True
        size = _stored_bytes(m)
        if size <= left or not getattr(m, "qvd_quantized", False):
            left -= size
            kept += make_resident(m, device)
            m.qvd_run = run
            _PLACED[id(m)] = m
        else:
            release(m)
            streamed += size
    if streamed:
        logging.info("QVD: %.0f MiB of quantized weights kept on %s, %.0f MiB streamed from RAM at each call (they do "
                     "not fit beside what ComfyUI needs)", kept / 2**20, device, streamed / 2**20)


def budget(patcher, device, modules) -> int:
    """Bytes ``patcher``'s QVD ``modules`` may keep on ``device``: ComfyUI's free memory (0.33: its own reclaimable cast
    buffers included) plus what they hold there already, less its minimum inference reserve and the model's float
    weights (which its loader streams beside them), and within the weight memory ComfyUI planned for this load (the
    sampling's own memory already set aside)."""
    import comfy.model_management as mm

    free_memory = getattr(patcher, "get_free_memory", mm.get_free_memory)(device)
    held = sum(_held_on(m, device) for m in modules)
    floats = max(0, patcher.model_size() - sum(_stored_bytes(m) for m in modules))
    room = free_memory + held - mm.minimum_inference_memory()
    planned = patcher.__dict__.get("qvd_extra_memory")
    if planned is not None and planned < 1e30:  # 1e32: no limit (LoadedModel.model_load); below 0: short of memory
        # ComfyUI planned with its torch-free memory; the patcher's free memory adds what comfy-aimdo can reclaim
        reclaimable = max(0, free_memory - mm.get_free_memory(device))
        room = min(room, max(planned, 0) + reclaimable + held)
    return int(room - floats)


def free(patcher, memory_to_free: float) -> int:
    """Drop the device copies of ``patcher``'s QVD modules, largest first, until ``memory_to_free`` bytes are freed;
    returns the bytes freed."""
    freed = 0
    for m in sorted(qvd_modules(patcher), key=resident_bytes, reverse=True):
        if freed >= memory_to_free or not resident_bytes(m):
            break
        freed += release(m)
    return freed


def on_detach(patcher, unpatch_all=True) -> None:
    """ComfyUI detached ``patcher``: it evicts it, it loads a clone of its network (another MODEL of the checkpoint, or
    this one again: ``load_models_gpu`` detaches every loaded clone first), or the patcher is garbage collected. Under
    the dynamic loader the device copies of its QVD modules go, but for those a patcher still loaded shares (a clone
    with a LoRA): the next load swaps its modules out of the tree without unloading them, and copies ComfyUI does not
    see would squeeze the next model (a reload of the same MODEL places them again)."""
    if not dynamic(patcher):
        return
    mm = sys.modules.get("comfy.model_management")  # not imported here: this also runs from ``__del__`` at exit
    loaded = [lm.model for lm in mm.current_loaded_models] if mm is not None else []
    in_use = {id(m) for p in loaded if p is not None and p is not patcher and isinstance(p, QVDPatcher)
              for m in qvd_modules(p)}
    for m in qvd_modules(patcher):
        if id(m) not in in_use:
            release(m)


def _held_on(module, device) -> int:
    """Bytes of ``module``'s device copies on ``device``."""
    return resident_bytes(module) if any(p.device == torch.device(device) for p in module.parameters()) else 0


def _stored_bytes(module) -> int:
    home = module.__dict__.get("qvd_home", {})
    return sum(home.get(n, p).numel() * home.get(n, p).element_size() for n, p in module._parameters.items()
               if p is not None)
