"""The pack's nodes under ComfyUI 0.33's dynamic-VRAM loader, on a CPU, in-process: one checkpoint, the graphs an
artist runs in one server, and after each what must hold (the FP MODEL's tensors bit-identical to the checkpoint's,
QVD's modules holding what quantization made, every sampled output identical to its first run). Prints one JSON line.

The loader (``ModelPatcherDynamic``, comfy-aimdo) needs CUDA only for its device parts, which are stood in:
- ``comfy_aimdo.host_buffer.HostBuffer`` (pinned host staging buffers, a native CUDA library): an empty buffer;
- ``ModelPatcherDynamic.__new__``, which hands a CPU load device the classic patcher: bypassed;
- ``ModelPatcherDynamic.partially_unload``, which asserts a GPU: its vbar part (no vbar on a CPU) left out, its backup
  part (``restore_loaded_backups``) run.
Everything else (``partially_load`` swapping object patches, ``load`` restoring the shared backups and force-loading
small weights with new ones, ``unpatch_model``, ``detach``, ``load_models_gpu``, ``free_memory``) is ComfyUI's own
code, installed as ``CoreModelPatcher`` the way ComfyUI's ``main.py`` installs it when comfy-aimdo is on.
On a host without that loader (0.3.75) ``Replay`` replays its call order on the classic patcher (lines cited there).

On a CUDA machine (``make gpu-check``, ``--device cuda``) nothing is stood in: comfy-aimdo starts as ComfyUI's
``main.py`` starts it, and the streaming scenario reads ``torch.cuda.memory_allocated``.

    python dynamic_probe.py CHECKPOINT PACK_DIR [--device cuda]    (cwd = the ComfyUI directory, on PYTHONPATH)
"""
from __future__ import annotations

import collections
import hashlib
import json
import sys
from pathlib import Path

import torch

from comfy_host import TINY
from lowvram_probe import load_pack
from synthetic_models import sd15_controlnet_state_dict


def start_dynamic_vram() -> None:
    """comfy-aimdo's start-up as ComfyUI's ``main.py`` runs it by default on NVIDIA (L96-108: ``control.init``, whose
    keyword arguments changed across comfy-aimdo versions; L300-329: ``init_devices``, then ``CoreModelPatcher``)."""
    import comfy_aimdo.control

    for kwargs in ({"simple_vram_headroom": None, "nvml_pressure": True}, {"simple_vram_headroom": None}, {}):
        try:
            comfy_aimdo.control.init(**kwargs)
            break
        except TypeError:
            continue
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher

    if not comfy_aimdo.control.init_devices(d.index for d in mm.get_all_torch_devices()):
        raise SystemExit("comfy-aimdo did not start on this GPU: ComfyUI would run without dynamic VRAM here")
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True


def dynamic_loader(device: str):
    """The dynamic-VRAM patcher class (stood in for a CPU load device: see the module docstring) and its name."""
    import comfy.model_patcher as mp

    if device == "cuda":
        start_dynamic_vram()
        return mp.ModelPatcherDynamic, "ModelPatcherDynamic (CUDA, comfy-aimdo)"
    if not hasattr(mp, "ModelPatcherDynamic"):
        return replay_class(), "replayed"
    import comfy_aimdo.host_buffer

    class HostBuffer:  # stands in for comfy-aimdo's pinned staging buffer: never used, nothing pinned
        size = 0

        def __init__(self, *_args):
            pass

        def truncate(self, *_args, **_kwargs):
            pass

    comfy_aimdo.host_buffer.HostBuffer = HostBuffer

    class CPUDynamic(mp.ModelPatcherDynamic):
        def __new__(cls, *_args, **_kwargs):
            return object.__new__(cls)

        def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
            return self.restore_loaded_backups() if memory_to_free > 0 else 0

    return CPUDynamic, "ModelPatcherDynamic"


def replay_class():
    """ComfyUI 0.33's ``ModelPatcherDynamic`` call order (comfy/model_patcher.py at 783545f6) on the classic patcher:
    ``partially_load`` (L2141-2158: object patches swapped, then ``load``), ``load`` (L1853-2035: the shared backups
    restored by key path first; ComfyUI's cast ops with more than 16 KB of weights streamed, everything else
    force-loaded with a backup; buffers likewise; ON_LOAD callbacks), ``restore_loaded_backups`` (L1842-1851),
    ``unpatch_model`` (L2132-2139: object patches back, then the backups), ``partially_unload`` (L2037: its backup
    part)."""
    import comfy.model_patcher as mp
    import comfy.utils
    from comfy.patcher_extension import CallbacksMP

    backup = collections.namedtuple("Dimension", ["weight", "inplace_update"])

    def set_buffer(model, key, value):  # 0.33's comfy.utils.set_attr_buffer
        owner, _, name = key.rpartition(".")
        module = comfy.utils.get_attr(model, owner) if owner else model
        module.register_buffer(name, value, persistent=name not in module._non_persistent_buffers_set)

    class Replay(mp.ModelPatcher):
        def is_dynamic(self):
            return True

        @property
        def backup_buffers(self):  # 0.33 shares this dict between clones like ``backup``; 0.3.75 has none
            return self.model.__dict__.setdefault("replay_backup_buffers", {})

        def restore_loaded_backups(self):
            restored = self.model.model_loaded_weight_memory
            for key in list(self.backup):
                comfy.utils.set_attr_param(self.model, key, self.backup.pop(key).weight)
            for key in list(self.backup_buffers):
                set_buffer(self.model, key, self.backup_buffers.pop(key))
            self.model.model_loaded_weight_memory = 0
            return restored

        def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
            with self.use_ejected(skip_and_inject_on_exit_only=True):
                self.unpatch_model(self.offload_device, unpatch_weights=False)
                self.patch_model(load_weights=False)
                self.load(device_to)

        def _force(self, key, device_to):
            weight = comfy.utils.get_attr(self.model, key)
            if key not in self.backup:
                self.backup[key] = backup(weight, False)
            moved = weight.to(device_to, copy=True)
            comfy.utils.set_attr_param(self.model, key, moved)
            self.model.model_loaded_weight_memory += moved.numel() * moved.element_size()

        def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
            self.restore_loaded_backups()
            with self.use_ejected():
                for *_, module_mem, n, m, params in self._load_list():
                    streamed = hasattr(m, "comfy_cast_weights") and module_mem > 16 * 1024
                    if hasattr(m, "comfy_cast_weights"):
                        m.comfy_cast_weights = True
                    for param in params:
                        if not (streamed and param in ("weight", "bias")):
                            self._force(f"{n}.{param}" if n else param, device_to)
                for key, buf in self.model.named_buffers(recurse=True):
                    self.backup_buffers.setdefault(key, buf)
                    set_buffer(self.model, key, buf.to(device_to, copy=True))
                self.model.device = device_to
                self.model.current_weight_patches_uuid = self.patches_uuid
                for callback in self.get_all_callbacks(CallbacksMP.ON_LOAD):
                    callback(self, device_to, lowvram_model_memory, force_patch_weights, full_load)

        def unpatch_model(self, device_to=None, unpatch_weights=True):
            super().unpatch_model(None, unpatch_weights=False)
            if unpatch_weights:
                self.partially_unload(None, 1e32)

        def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
            return self.restore_loaded_backups() if memory_to_free > 0 else 0

    return Replay


def is_qvd(module) -> bool:
    return getattr(module, "qvd_quantized", False) or getattr(module, "qvd_scri_norm", False)


def digest(tensors: dict) -> dict:
    """name -> (dtype, shape, blake2b of the bytes): equal digests are bit-identical tensors, wherever they are."""
    out = {}
    for name, t in tensors.items():
        raw = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        out[name] = (str(t.dtype), tuple(t.shape), hashlib.blake2b(raw, digest_size=16).hexdigest())
    return out


def qvd_state(result) -> dict:
    """The tensors of QVD's modules (quantized layers, folded norms) as they are now."""
    return {f"{name}.{p}": t for name, m in result.modules.items() for p, t in m.named_parameters()}


def main(checkpoint: str, pack_dir: str, device: str = "cpu") -> dict:
    torch.set_num_threads(2)
    from comfy.cli_args import args
    args.cpu = device == "cpu"
    dynamic, loader = dynamic_loader(device)
    import comfy.controlnet
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import nodes

    comfy.model_patcher.CoreModelPatcher = dynamic  # what main.py does when comfy-aimdo is on
    qvd = load_pack(Path(pack_dir))
    patching = sys.modules["qvd_pack_probe.nodes.patching"]
    model, clip, _ = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=False)[:3]
    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):  # 0.3.75 builds the classic one: rebuild it
        model = dynamic(model.model, model.load_device, model.offload_device)
    control = comfy.controlnet.load_controlnet_state_dict(sd15_controlnet_state_dict())
    if not isinstance(control.control_model_wrapped, dynamic):
        w = control.control_model_wrapped
        control.control_model_wrapped = dynamic(w.model, w.load_device, w.offload_device)
    positive = nodes.CLIPTextEncode().encode(clip, "a red fox running")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = nodes.EmptyLatentImage().generate(TINY["width"], TINY["height"], TINY["batch_size"])[0]
    hint = torch.rand(TINY["batch_size"], TINY["height"], TINY["width"], 3, generator=torch.Generator().manual_seed(3))
    with_cn = nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control, hint, 1.0, 0.0, 1.0)[:2]
    checkpoint_digest = digest(model.model.state_dict())
    control_digest = digest(control.control_model.state_dict())
    facts: dict = {"loader": loader, "patcher": type(model).__name__, "checks": []}

    def sample(m, conds=(positive, negative)) -> torch.Tensor:
        return nodes.common_ksampler(m, 7, TINY["steps"], 5.0, "euler", "normal", *conds, latent)[0]["samples"]

    first: dict = {}
    made: dict = {}

    def check(step: str, outputs: dict) -> None:
        """After ``step``: the FP model and ControlNet as loaded (the network's tensors outside the paths a loaded
        quantized MODEL's layers hold now), QVD's modules as made, outputs as their first run."""
        swapped = tuple(f"{n}." for n, m in model.model.named_modules() if is_qvd(m))
        fp_now = digest(model.model.state_dict())
        entry = {"step": step,
                 "fp_changed": sorted(k for k in checkpoint_digest.keys() | fp_now.keys()
                                      if not k.startswith(swapped) and checkpoint_digest.get(k) != fp_now.get(k))[:5],
                 "quantized_in_place": len(swapped),
                 "controlnet_changed": sorted(k for k, v in digest(control.control_model.state_dict()).items()
                                              if control_digest.get(k) != v)[:5],
                 "qvd_changed": sorted(k for name, result in made.items()
                                       for k, v in digest(qvd_state(result)).items()
                                       if made_digest[name].get(k) != v)[:5],
                 "outputs_differ": []}
        for name, out in outputs.items():
            first.setdefault(name, out)
            if not torch.equal(first[name], out):
                entry["outputs_differ"].append(name)
        facts["checks"].append(entry)
        print("QVD_PROBE_SO_FAR " + json.dumps(facts), flush=True)  # where a probe that dies got to

    made_digest: dict = {}

    def keep(name: str, quantized) -> None:
        made[name] = patching.attached_result(quantized)
        made_digest[name] = digest(qvd_state(made[name]))

    fp = sample(model)
    check("FP sampled", {"fp": fp})
    # one prompt: QVD Calibrate -> QVD Quantize Model -> KSampler (the calibration clone loads first)
    calibration = qvd["QVDCalibrate"]().calibrate(model, *with_cn, latent, 0, 1, 5.0, "euler", "normal", 1,
                                                  timestep_coverage=TINY["timestep_coverage"])["result"][0]
    quantized = qvd["QVDQuantizeModel"]().quantize(model, calibration, 8, 8, True, True, TINY["skip"],
                                                   "int8")["result"][0]
    keep("q", quantized)
    check("Calibrate -> Quantize -> KSampler", {"q": sample(quantized)})
    facts["patcher_quantized"] = type(quantized).__name__
    for i in range(2):  # FP, then quantized, then FP, then quantized in one server
        check(f"FP again ({i + 1})", {"fp": sample(model)})
        check(f"quantized again ({i + 1})", {"q": sample(quantized)})
    # a second quantized MODEL of the same checkpoint (other settings), sampled in turn with the first
    other = qvd["QVDQuantizeModel"]().quantize(model, calibration, 8, 8, False, True, TINY["skip"],
                                               "int8")["result"][0]
    keep("q_other", other)
    for i in range(2):
        check(f"second quantized MODEL ({i + 1})", {"q_other": sample(other)})
        check(f"first quantized MODEL between ({i + 1})", {"q": sample(quantized)})
    # UNet + quantized ControlNet, then ComfyUI's own memory freeing: a partial unload, then eviction of everything
    q_control = qvd["QVDQuantizeControlNet"]().quantize(control, calibration, 8, 8, True, True, "",
                                                        "int8")["result"][0]
    made["cn"] = patching.controlnet_result(q_control)
    made_digest["cn"] = digest(qvd_state(made["cn"]))
    q_cn = nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, q_control, hint, 1.0, 0.0, 1.0)[:2]
    check("quantized MODEL + quantized ControlNet", {"q_cn": sample(quantized, q_cn)})
    check("FP MODEL + FP ControlNet", {"fp_cn": sample(model, with_cn)})
    check("quantized MODEL + quantized ControlNet again", {"q_cn": sample(quantized, q_cn)})
    loaded = {type(lm.model.model).__name__: lm for lm in mm.current_loaded_models}
    facts["loaded_before_freeing"] = sorted(loaded)
    freed = {name: lm.model.partially_unload(lm.model.offload_device, 1 << 20) for name, lm in loaded.items()}
    facts["partially_unloaded"] = {k: int(v) for k, v in freed.items()}
    check("after a partial unload", {"q_cn": sample(quantized, q_cn)})
    mm.unload_all_models()
    facts["after_unloading"] = {"backups": len(model.backup), "quantized_in_place": sum(
        is_qvd(m) for m in model.model.modules())}
    check("after every model was unloaded", {"q_cn": sample(quantized, q_cn), "fp": sample(model)})
    facts["streaming"] = streaming(quantized, other, sys.modules["qvd_pack_probe.nodes.loading"], device)
    check("after the streaming load on another device", {"q": sample(quantized), "fp": sample(model)})
    return facts


def streaming(quantized, other, loading, device: str) -> dict:
    """The quantized MODEL loaded by the dynamic loader with a budget that holds half of its quantized layers: which
    stay on the device, which stream, what the loader is told; loaded again with a quarter; a clone of it garbage
    collected meanwhile; another quantized MODEL placed by a later sampling run; what ComfyUI's partial unload and
    detach give back. On a CPU the device is ``meta`` (tensors move, no memory is used; comfy-aimdo's arena stood in),
    so this runs last: ComfyUI's own modules keep the stand-in's cast slots afterwards. On a GPU, also the memory
    allocated."""
    import gc

    import comfy.model_management as mm

    class VBAR:  # stands in for comfy-aimdo's virtual VRAM arena (CUDA): slots are (arena, offset, size)
        def __init__(self, *_args):
            pass

        def alloc(self, size):
            return (None, 0, size)

        def prioritize(self):
            pass

        def loaded_size(self):
            return 0

        def free_memory(self, _size):
            return 0

    mm.unload_all_models()
    buffers = {n: b for n, b in quantized.model.named_buffers()}
    if device == "cpu" and "comfy_aimdo.model_vbar" in sys.modules:  # the 0.33 loader's own arena; the replay has none
        sys.modules["comfy_aimdo.model_vbar"].ModelVBAR = VBAR

    free_now = {}  # what the device has free, as the patcher (comfy-aimdo) and ComfyUI's planner see it
    real_free = mm.get_free_memory
    if device == "cpu":  # ``meta`` has no allocator statistics: the planner's view stood in (nothing reclaimable)
        mm.get_free_memory = lambda dev=None, torch_free_too=False: (  # noqa: E731
            real_free(dev, torch_free_too) if dev is None or torch.device(dev).type != "meta"
            else (free_now["bytes"], 0) if torch_free_too else free_now["bytes"])

    def give(p, free_bytes: int) -> None:
        free_now["bytes"] = free_bytes
        p.get_free_memory = lambda _device: free_bytes

    def on_target(patcher, share: float):
        p = patcher.clone()
        if device == "cpu":
            p.load_device = torch.device("meta")
            if hasattr(p, "register_load_device"):
                p.register_load_device(p.load_device)
        qvd_bytes = sum(loading._stored_bytes(x) for x in loading.qvd_modules(p))
        give(p, mm.minimum_inference_memory() + p.model_size() - qvd_bytes + int(share * qvd_bytes))
        return p, qvd_bytes

    def load(p):  # what load_models_gpu does for one model (model_management.py: LoadedModel.model_load, then
        lm = mm.LoadedModel(p)  # current_loaded_models.insert), without its free_memory for the device
        lm.model_load()
        mm.current_loaded_models.insert(0, lm)

    m, qvd_bytes = on_target(quantized, 0.5)
    target = m.load_device
    allocated = (lambda: torch.cuda.memory_allocated(target)) if target.type == "cuda" else (lambda: 0)
    held = lambda p: sum(loading.resident_bytes(x) for x in loading.qvd_modules(p))  # noqa: E731
    layers = [x for x in loading.qvd_modules(m) if getattr(x, "qvd_quantized", False)]
    stored = {id(x): dict(x.named_parameters()) for x in layers}
    before = allocated()
    with loading.sampling_run():
        load(m)
    on_device = [x for x in layers if x.weight.device == target]
    facts = {"device": str(target), "budget": qvd_bytes // 2, "quantized_bytes": qvd_bytes, "held": held(m),
             "layers": len(layers), "resident_layers": len(on_device),
             "loaded_size_counts_them": m.loaded_size() >= held(m) > 0,
             "streamed_stay_home": all(p.device.type == "cpu" for x in layers if x not in on_device
                                       for p in x.parameters()), "allocated_loaded": allocated() - before}
    give(m, mm.minimum_inference_memory() + m.model_size() - qvd_bytes - facts["held"]
         + qvd_bytes // 4)  # what the copies hold is not free
    with loading.sampling_run():
        # loaded again with a quarter free (no detach between: the held copies count once), with the extra memory
        m.partially_load(target, 1e32)  # LoadedModel.model_load passes when ComfyUI sets no limit (0 -> 1e32)
    facts["held_reloaded_with_a_quarter"] = held(m)
    sibling = quantized.clone()
    del sibling
    gc.collect()
    facts["held_after_a_clone_was_collected"] = held(m)
    facts["partially_unloaded"] = int(m.partially_unload(target, held(m) // 2))
    facts["held_after_partial_unload"] = held(m)
    o, _ = on_target(other, 1.0)
    with loading.sampling_run():  # a later sampling of another quantized MODEL
        load(o)
    facts["held_after_another_run_placed"] = {"first": held(m), "other": held(o)}
    for i in range(len(mm.current_loaded_models) - 1, -1, -1):  # free_memory(1e30, target) (model_management.py):
        if mm.current_loaded_models[i].device == target and mm.current_loaded_models[i].model_unload():  # each model
            mm.current_loaded_models.pop(i)  # on the device unloaded (detached), then dropped from the loaded list
    facts["held_after_detach"] = held(m) + held(o)
    facts["allocated_after_detach"] = allocated() - before
    facts["stored_tensors_back"] = all(p is stored[id(x)][n] for x in layers for n, p in x.named_parameters())
    facts["device_tensors_reachable_after_detach"] = sum(t.device == target for x in loading.qvd_modules(m)
                                                          for t in reachable_tensors(x))
    mm.get_free_memory = real_free
    if device == "cpu":  # the loader leaves the model's own buffers (the schedule's sigmas) on the load device: a GPU
        for name, b in buffers.items():  # computes there, ``meta`` holds no data; put back for the checks after this
            owner, _, leaf = name.rpartition(".")
            quantized.model.get_submodule(owner)._buffers[leaf] = b
    return facts


def reachable_tensors(obj, seen=None) -> list:
    """Every tensor reachable from ``obj`` through attributes, containers and caches (a module's derived state)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None), torch.device, torch.dtype)):
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        items = [*obj.keys(), *obj.values()]
    elif isinstance(obj, (list, tuple, set)):
        items = list(obj)
    elif isinstance(obj, torch.nn.Module) or hasattr(obj, "__dict__") and type(obj).__module__.startswith("qvd"):
        items = list(vars(obj).values())
    else:
        return []
    return [t for item in items for t in reachable_tensors(item, seen)]


if __name__ == "__main__":
    device = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cpu"
    print("QVD_PROBE " + json.dumps(main(*sys.argv[1:3], device=device)), flush=True)
