"""ComfyUI glue: one module tree over a MODEL and its AnimateDiff motion models, calibration by real
sampling, and quantized layers installed as object patches on clones (the input MODEL is never mutated).

The UNet and motion modules are shared by every MODEL made from one checkpoint, and under ComfyUI's default
caching they hold whatever the MODEL loaded last left in them (its LoRA merged, its object patches). Nodes read
them through ``own_view``: for a moment the modules this MODEL's object patches put there, holding the checkpoint's
own weights (from ComfyUI's backup, where the loaded MODEL merged a patch), with nothing loaded, moved or unpatched.
Layer names are those of the ejected model (ADE inserts motion modules into UNet blocks at patch time,
shifting indices), so every tree walk happens inside ``ejected(model)``. Names in the tree are
``motion_<i>.<path>`` for the i-th motion model in ``additional_models["ADE"]`` and
``diffusion_model.<path>`` for the UNet, which is also the ComfyUI object-patch key of a UNet layer.

ControlNets (core ComfyUI's, applied to the conditioning QVD Calibrate samples) are calibrated in the same run as
``controlnet_<content key>.<path>``; a quantized ControlNet is a copy of the ControlNet object whose model is a new
module tree sharing the original's float tensors, with the quantized layers in it (``quantize_controlnet``); its
files name the layers ``controlnet.<path>``.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import uuid
from dataclasses import dataclass

import torch
from torch import nn

from ..qvd import Calibrator, QuantizeResult, QVDConfig, QVDError, kernels, set_compute
from ..qvd.calibrate import coverage_timesteps
from ..qvd.identity import content_key, install as install_modules
from ..qvd.modules import kept_float_bytes
from ..qvd.scri import folded_source, stand_for
from ..qvd.timesteps import follow_timesteps, timestep_argument
from ..qvd.verify import follow_folds
from . import loading, weight_patches

ADE_KEY = "ADE"
ATTACHMENT = "qvd"
UNET = "diffusion_model"
CONTROLNET = "controlnet"


@dataclass
class QVDAttachment:
    """What a quantized MODEL carries for QVD Save Quantized: the result it was patched with."""
    result: QuantizeResult


def motion_patchers(model) -> list:
    return list(model.get_additional_models_with_key(ADE_KEY))


@contextlib.contextmanager
def ejected(model):
    """Model with ADE's motion-module injections removed: its own and those of every patcher of the same network
    that ComfyUI keeps loaded (under the default cache the quantized MODEL that sampled last stays loaded with its
    motion modules in the shared UNet; its sampling's cleanup already cleared ``current_patcher``)."""
    import comfy.model_management

    loaded = [lm.model for lm in comfy.model_management.current_loaded_models if lm.model is not None]
    current = getattr(model.model, "current_patcher", None)
    with contextlib.ExitStack() as stack:
        seen = set()
        for patcher in (*loaded, current, model):
            if patcher is None or id(patcher) in seen or patcher.model is not model.model:
                continue
            seen.add(id(patcher))
            if patcher.is_injected:
                stack.enter_context(patcher.use_ejected())
        yield


def model_tree(model) -> nn.ModuleDict:
    """``ModuleDict`` (no copies) over the UNet and the motion models; call inside ``ejected``."""
    motions = {f"motion_{i}": p.model for i, p in enumerate(motion_patchers(model))}
    unet = model.model.diffusion_model
    motion_ids = {id(m) for mm in motions.values() for m in mm.modules()}
    if any(id(m) in motion_ids for m in unet.modules()):
        raise QVDError("the UNet still holds injected motion modules; run the QVD node on the MODEL output of "
                       "ADE's Use Evolved Sampling / Apply AnimateDiff node, not on a patched copy")
    return nn.ModuleDict({UNET: unet, **motions})


@contextlib.contextmanager
def own_view(model):
    """Inside: the shared modules of ``model`` and its motion models (ejected) as ``model``'s object patches make
    them, holding the checkpoint's weights (what a loaded MODEL merged a weight patch into reads its backup: the
    original tensor, on the offload device). Nothing is loaded, copied or unpatched; on exit every module and tensor
    is put back, so the MODEL ComfyUI has loaded stays loaded as it was. Backups and object-patch backups are shared
    by all clones of one model (ComfyUI's ``clone``), so any MODEL sees what the loaded one changed."""
    with ejected(model), contextlib.ExitStack() as stack:
        for patcher in (model, *motion_patchers(model)):
            stack.enter_context(_viewed(patcher))
        yield


@contextlib.contextmanager
def _viewed(patcher):
    import comfy.utils

    root, swapped = patcher.model, []

    def swap(key, value):
        swapped.append((key, comfy.utils.set_attr(root, key, value)))

    try:
        for key, bk in list(patcher.backup.items()):  # weights first: the backup belongs to the modules in place now
            swap(key, torch.nn.Parameter(bk.weight, requires_grad=False))
        for key, buf in list(getattr(patcher, "backup_buffers", {}).items()):
            swap(key, buf)
        originals = patcher.object_patches_backup
        for key in {*originals, *patcher.object_patches}:
            want = patcher.object_patches.get(key, originals.get(key))
            if comfy.utils.get_attr(root, key) is not want:
                swap(key, want)
        yield
    finally:
        for key, value in reversed(swapped):
            comfy.utils.set_attr(root, key, value)


def control_model(control_net) -> nn.Module | None:
    """The module tree of a core ComfyUI ControlNet (None for other control kinds: T2I adapters, ControlLoRA
    before its first run)."""
    model = getattr(control_net, "control_model", None)
    return model if isinstance(model, nn.Module) else None


def controlnets_in(*conditionings) -> dict[str, object]:
    """The ControlNets applied to ``conditionings`` (each one's chain of earlier ControlNets too), keyed
    ``controlnet_<content key>``: two ControlNets of one architecture get different keys."""
    found = {}
    for cond in conditionings:
        for _, extra in cond:
            c = extra.get("control")
            while c is not None:
                model = control_model(c)
                if model is not None:
                    found.setdefault(f"{CONTROLNET}_{content_key(model)}", c)
                c = getattr(c, "previous_controlnet", None)
    return found


def calibrate(model, config: QVDConfig, seeds, sample_fn, controlnets: dict[str, object] | None = None,
              cover_fn=None, coverage: int = 0):
    """Run ``sample_fn(clone, seed)`` for each seed with Calibrator hooks on a clone and on ``controlnets`` (from
    ``controlnets_in``; their layers are named under their keys); then, for timestep coverage, ``cover_fn(clone, i,
    sigmas)`` (one sampler step over ``sigmas`` = [sigma, 0]: one model call at sigma) at each of
    ``coverage_timesteps`` over the model's noise schedule (``coverage`` points) that the sampler did not come near.
    The timesteps those calls added are the calibration's ``coverage``.

    A DIFFUSION_MODEL wrapper on the clone and a pre-hook on each ControlNet record each call's timestep. The hooks
    are removed on exit, also when sampling raises (e.g. the user cancels), so the shared modules are left untouched.
    """
    import comfy.patcher_extension

    clone = model.clone()
    with contextlib.ExitStack() as hooked:
        with own_view(clone):  # the hooks go on the modules this MODEL runs, whatever is loaded now
            tree = model_tree(clone)
            tree.update({key: control_model(c) for key, c in (controlnets or {}).items()})
            if any(getattr(m, "qvd_quantized", False) for m in tree.modules()):
                raise QVDError("this MODEL or ControlNet is already quantized: calibrate with the full-precision ones "
                               "(before QVD Quantize Model / QVD Load Quantized / QVD Quantize ControlNet)")
            calibrator = hooked.enter_context(Calibrator(tree, config))

        def control_timestep(module, args, kwargs):
            t = timestep_argument(module, args, kwargs)
            if t is not None:
                calibrator.set_timestep(t)

        for c in (controlnets or {}).values():  # a ControlNet runs before the diffusion model in each step
            hooked.callback(control_model(c).register_forward_pre_hook(control_timestep, with_kwargs=True).remove)

        def record_timestep(executor, *args, **kwargs):
            t = timestep_argument(executor.class_obj, args, kwargs, position=1)
            if t is not None:
                calibrator.set_timestep(t)
            return executor(*args, **kwargs)

        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "qvd_calibrate",
                                   record_timestep)
        for seed in seeds:
            sample_fn(clone, seed)
        sampled = set(calibrator.timesteps)
        if cover_fn is not None and coverage > 0:
            ms = clone.get_model_object("model_sampling")
            ends = [float(ms.timestep(torch.as_tensor(s, dtype=torch.float32))) for s in (ms.sigma_min, ms.sigma_max)]
            for i, t in enumerate(coverage_timesteps(sampled, min(ends), max(ends), coverage)):
                sigma = ms.sigma(torch.tensor(t, dtype=torch.float32))
                cover_fn(clone, i, torch.stack([sigma, torch.zeros_like(sigma)]))
    calibration = calibrator.result()
    calibration.patches = attention_patches(clone.model_options)
    calibration.coverage = sorted(set(calibration.timesteps) - sampled, reverse=True)
    return calibration


def attention_patches(model_options: dict) -> list[str]:
    """Names of the attention patches in ``model_options`` (IPAdapter's cross-attention replacements, attention
    patches of hypernetworks and other node packs): ``attn2 replace input 1``, ``attn1_patch``."""
    options = model_options.get("transformer_options", {})
    names = [f"{kind} replace {' '.join(map(str, key if isinstance(key, tuple) else (key,)))}"
             for kind, table in options.get("patches_replace", {}).items() for key in table]
    names += [kind for kind, fns in options.get("patches", {}).items() if fns]
    return sorted(names)


def _warn_new_patches(result: QuantizeResult, model_options: dict, said: set) -> None:
    """One log line per sampling graph whose attention patches the calibration did not see: what they add to
    cross-attention lies outside the ranges the static scales were fit to (IPAdapter applied after QVD Quantize
    Model: docs/benchmarks.md)."""
    seen = result.calibrated.get("patches")
    new = sorted(set(attention_patches(model_options)) - set(seen)) if seen is not None else []
    if new and tuple(new) not in said:
        said.add(tuple(new))
        logging.warning("QVD: this sampling runs %d attention patch(es) the calibration never saw (%s%s), e.g. an "
                        "IPAdapter applied after QVD Quantize Model: the quantized layers after them see activations "
                        "their static scales were not fit to. For the closest output, apply them before QVD Calibrate "
                        "and calibrate with them", len(new), ", ".join(new[:3]), ", ..." if len(new) > 3 else "")


def _per_patcher(model, modules: dict[str, nn.Module]) -> list[tuple[object, dict[str, nn.Module]]]:
    """(patcher, {name in that patcher's model: module}) for the UNet and each motion model ``modules`` touch."""
    motions = motion_patchers(model)
    groups: dict[int, dict] = {}
    for name, module in modules.items():
        head, _, rest = name.partition(".")
        if head == UNET:
            groups.setdefault(-1, {})[name] = module
        elif head.startswith("motion_") and head[7:].isdigit() and int(head[7:]) < len(motions):
            groups.setdefault(int(head[7:]), {})[rest] = module
        else:
            raise QVDError(f"quantized layer {name!r} belongs to no model in this MODEL (motion models: "
                           f"{len(motions)}); use the MODEL the calibration / file was made from")
    return [(model if i < 0 else motions[i], g) for i, g in sorted(groups.items())]


def weight_patches_on(patcher, names) -> list[str]:
    """Keys of ``patcher``'s weight patches (LoRA, ...) that belong to the modules ``names``."""
    return [k for k in patcher.patches if k.rpartition(".")[0] in names]


def quantize(model, build, compute: str = "auto") -> tuple:
    """Clone ``model`` and install ``build(tree, compute dtype) -> QuantizeResult`` (QVD Quantize Model's quantization,
    QVD Load Quantized's file), made from the checkpoint's own weights where they are (``own_view``): a file is checked
    against them (and its calibrated values against the compute dtype). The quantized layers run on the ``compute``
    route (``qvd.set_compute``) and are kept on ComfyUI's offload device, from which ComfyUI loads them like any other
    weights.

    Weight patches already on the MODEL (a LoRA before the QVD node) stay on the clone and run beside the int8
    layers exactly, like a LoRA loaded after (rounding them into the int8 weights would lose most of an ordinary
    LoRA: ``docs/lora.md``)."""
    dtype = model.model.manual_cast_dtype or model.model.get_dtype()
    with own_view(model):
        tree = model_tree(model)
        result = build(tree, dtype)
        _ready(result.modules, model.offload_device, compute, dtype)
        sizes = _quantized_sizes(model, tree, result.modules)
    return install(model.clone(), result, sizes), result


def _ready(modules: dict[str, nn.Module], offload_device, compute: str, dtype: torch.dtype) -> None:
    """The quantized ``modules`` as ComfyUI gets them: ordinary tensors on its offload device, on the ``compute``
    route, with what that route keeps on the device ComfyUI runs them on made now rather than in the first sampling
    step (on a CPU where the route is weight-only: the float weights, in the compute ``dtype``)."""
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    for module in modules.values():
        _normal_tensors(module)
        module.to(offload_device)
        set_compute(module, compute)
        if hasattr(module, "prepare"):
            module.prepare(device, dtype)


def _quantized_sizes(model, tree: nn.ModuleDict, modules: dict[str, nn.Module]) -> dict[str, int]:
    """Bytes each patcher's model holds with ``modules`` in place of its own layers (key ``diffusion_model``: the
    MODEL's whole ``BaseModel``; ``motion_<i>``: a motion model), counted as ComfyUI counts (``module_size``: every
    tensor of the state dict) plus the float weights a weight-only route keeps (``_ready``); call inside
    ``ejected(model)``."""
    from comfy.model_management import module_size

    sizes = {key: module_size(model.model if key == UNET else m) for key, m in tree.items()}
    for name, module in modules.items():
        key = name.partition(".")[0]
        sizes[key] += module_size(module) + kept_float_bytes([module]) - module_size(tree.get_submodule(name))
    return sizes


def _normal_tensors(module: nn.Module) -> None:
    """Replace inference-mode tensors (ComfyUI runs nodes under ``torch.inference_mode``) by ordinary ones, so
    the qvd caches see in-place weight writes (``tensor._version``, which inference tensors lack)."""
    with torch.inference_mode(False):
        for m in module.modules():
            for name, p in m._parameters.items():
                if p is not None and p.is_inference():
                    m._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=False)
            for name, b in m._buffers.items():
                if b is not None and b.is_inference():
                    m._buffers[name] = b.clone()


def _sampling(result: QuantizeResult):
    """An OUTER_SAMPLE wrapper, run before ComfyUI loads the MODEL being sampled: its weight patches reach the quantized
    layers first (``weight_patches.before_load``: the size the planner reads counts them), attention patches get
    the norm outputs QVD folded SCRI into in their own domain (``_unfold_for_patches``), and attention patches the
    calibration never saw are said once (``_warn_new_patches``). After a sampling run in
    which ``auto`` chose routes for new layer shapes, one log line says what it chose and what the weight-only route
    keeps in memory."""
    norms = [m for m in result.modules.values() if getattr(m, "qvd_scri_norm", False)]
    said: set = set()

    def wrapper(executor, *args, **kwargs):
        guider = getattr(executor, "class_obj", None)
        patcher = getattr(guider, "model_patcher", None)
        if patcher is not None:
            for p in (patcher, *motion_patchers(patcher)):
                weight_patches.before_load(p)
        if isinstance(getattr(guider, "model_options", None), dict):
            _warn_new_patches(result, guider.model_options, said)
            if norms:
                _unfold_for_patches(guider.model_options, norms)  # this run's copy of the MODEL's options
        before = len(kernels.decisions())
        with loading.sampling_run(), _clipping_counted(result):
            out = executor(*args, **kwargs)
        made = list(kernels.decisions().values())[before:]
        if made:
            kept = kept_float_bytes(result.modules.values())
            logging.info("QVD compute auto: %s%s", kernels.describe_decisions(made),
                         f"; weight-only layers keep {kept / 2**20:.0f} MiB of float weights on the CPU" if kept else "")
        return out
    return wrapper


CLIPPING_SAID = 0.05  # a layer clipping more of its input than this in a sampling run is named in the log


@contextlib.contextmanager
def _clipping_counted(result: QuantizeResult):
    """Count, over one sampling run, how much of each W8A8 layer's input its static range clipped
    (``count_clipping``); ``result.last_clipping``: name -> share afterwards. Layers clipping more than
    ``CLIPPING_SAID`` are named in one log line: the run samples far from what the calibration saw (other prompts,
    timesteps, sizes, patches)."""
    layers = {n: m for n, m in result.modules.items() if hasattr(m, "count_clipping")}
    for m in layers.values():
        m.count_clipping(True)
    try:
        yield
    finally:
        shares = {n: m.count_clipping(False) for n, m in layers.items()}
        result.last_clipping = {n: s[0] for n, s in shares.items() if s is not None}
    worst = sorted(((s, n) for n, s in result.last_clipping.items() if s > CLIPPING_SAID), reverse=True)
    if worst:
        ts = result.calibrated.get("timesteps") or []
        logging.warning("QVD: %d quantized layer(s) clipped more than %.0f %% of their inputs in this sampling run "
                        "(%s): it samples far from what the calibration saw%s. Calibrate with this graph (its prompts, "
                        "steps, size and add-ons) for the closest output", len(worst), 100 * CLIPPING_SAID,
                        ", ".join(f"{n} {100 * s:.1f} %" for s, n in worst[:3]),
                        f" (timesteps {max(ts):g} .. {min(ts):g})" if ts else "")


NORM_READERS = ("attn1_patch", "attn2_patch")  # ComfyUI's transformer block hands these its norm1 / norm2 output


def _unfold_for_patches(model_options: dict, norms: list) -> None:
    """Wrap the attention patches of a sampling run's ``model_options`` (a hypernetwork, IPAdapter-style or any other
    ``attn1_patch`` / ``attn2_patch``) so they see what they would without QVD (``_Unfolded``)."""
    options = model_options.get("transformer_options", {})
    patches = options.get("patches", {})
    kinds = [k for k in NORM_READERS if patches.get(k) and not isinstance(patches[k][0], _Unfolded)]
    if kinds:
        model_options["transformer_options"] = {**options, "patches": {
            **patches, **{k: [_Unfolded(tuple(patches[k]), norms)] for k in kinds}}}


class _Unfolded:
    """ComfyUI attention patches ``(n, context, value, extra_options) -> (n, context, value)`` run on the values they
    would see without QVD: an argument that is the output of a norm QVD folded SCRI into, ``(x - z) / s``, is handed
    over as ``x`` (``ScriTransform.unapply``), and what the patches return in its place goes back to ``(x - z) / s``
    for the folded layers that read it (the very tensor they were handed goes back as the folded original). Other
    arguments (the text context of cross-attention) pass unchanged."""

    def __init__(self, patches: tuple, norms: list):
        self.patches, self.norms = patches, norms

    def __call__(self, n, context, value, extra_options):
        norm = folded_source(n, self.norms)
        scri = None if norm is None else norm.qvd_scri
        given = (n, context, value)
        folded = [scri is not None and t is n for t in given]
        plain = scri.unapply(n).to(n.dtype) if scri is not None else None
        args = tuple(plain if f else t for t, f in zip(given, folded))
        for patch in self.patches:
            args = patch(*args, extra_options)
        # a value the patches passed through goes back as it came, bit for bit (no float round trip through x)
        out = tuple(g if f and t is plain else scri.apply(t).to(t.dtype) if f else t
                    for t, f, g in zip(args, folded, given))
        for t, f in zip(out, folded):
            if f:
                stand_for(norm, t)  # what the folded layers read in the norm's output's place
        return out


def _structure_copy(module: nn.Module, offload_device, memo: dict | None = None) -> nn.Module:
    """A new module tree over the same tensors on ``offload_device`` (none is copied there; one a loaded original holds
    on its load device is copied to it) with its own modules, parameter objects (a host moving the copy's parameters,
    ``param.data = ...``, leaves the original's where they are), hook dicts and none of the state ComfyUI's loaders
    attached to the original's modules (``loading.fresh``): layers can be replaced in it and it can be loaded and freed
    without touching ``module``."""
    memo = {} if memo is None else memo
    if id(module) not in memo:
        new = copy.copy(module)
        new.__dict__ = {k: copy.copy(v) if isinstance(v, dict) else v for k, v in module.__dict__.items()}
        new._parameters = {k: None if p is None else nn.Parameter(p.data.to(offload_device),
                                                                  requires_grad=p.requires_grad)
                           for k, p in module._parameters.items()}
        new._buffers = {k: None if b is None else b.to(offload_device) for k, b in module._buffers.items()}
        loading.fresh(new)
        memo[id(module)] = new
        for name, child in module._modules.items():
            new._modules[name] = None if child is None else _structure_copy(child, offload_device, memo)
    return memo[id(module)]


def quantize_controlnet(control_net, build, compute: str = "auto") -> tuple:
    """A copy of ``control_net`` running the quantized layers ``build(tree, compute dtype) -> QuantizeResult`` makes for
    the tree ``{"controlnet": its model}``, on the ``compute`` route; ``control_net`` and its model are left unchanged
    (the copy's model shares their float tensors). Its patcher tells ComfyUI's planner the bytes the copy holds."""
    import comfy.model_management

    base = control_model(control_net)
    if base is None:
        raise QVDError(f"{type(control_net).__name__} is not a ControlNet QVD can quantize: use a ControlNet from "
                       f"ComfyUI's ControlNet loader (T2I adapters and ControlLoRA stay as they are)")
    if any(getattr(m, "qvd_quantized", False) for m in base.modules()):
        raise QVDError("this ControlNet is already quantized: connect the ControlNet from its loader")
    wrapped = control_net.control_model_wrapped
    dtype = control_net.manual_cast_dtype or getattr(base, "dtype", None) or torch.float32
    with _viewed(wrapped):  # the ControlNet's stored tensors, where a dynamic-VRAM load replaced small ones
        result = build(nn.ModuleDict({CONTROLNET: base}), dtype)
        model = _structure_copy(base, wrapped.offload_device)
    _ready(result.modules, wrapped.offload_device, compute, dtype)
    install_modules(model, {name.partition(".")[2]: m for name, m in result.modules.items()})
    follow_timesteps(model, result.clock)  # the copy's own hooks: the ControlNet's call gives its timesteps
    if result.wiring is not None:
        follow_folds(model, result.wiring)  # a loaded file's SCRI folds, proven on the copy's first call
    model.qvd_result = result  # QVD Save Quantized ControlNet reads it (copies of the ControlNet share the model)
    out = control_net.copy()
    out.control_model = model
    size = comfy.model_management.module_size(model) + kept_float_bytes(result.modules.values())
    out.control_model_wrapped = loading.make_qvd_patcher(type(wrapped)(model, load_device=wrapped.load_device,
                                                                       offload_device=wrapped.offload_device,
                                                                       size=size), owns_tree=True)
    weight_patches.attach(out.control_model_wrapped, size)
    return out, result


def controlnet_result(control_net) -> QuantizeResult:
    result = getattr(control_model(control_net), "qvd_result", None)
    if result is None:
        raise QVDError("this ControlNet is not quantized by QVD: connect the output of QVD Quantize ControlNet or "
                       "QVD Load Quantized ControlNet")
    return result


def _refuse_float_save(*_args, **_kwargs):
    raise QVDError("this MODEL is quantized by QVD: ComfyUI's checkpoint / model save would write its int8 codes "
                   "under float weight names. Save it with QVD Save Quantized (load it with QVD Load Quantized), or "
                   "save the MODEL from before QVD Quantize Model")


def install(clone, result: QuantizeResult, sizes: dict[str, int]):
    """Object-patch ``result.modules`` onto ``clone`` and its (cloned) motion patchers; returns ``clone``.

    Each patcher tells ComfyUI's memory planner the bytes its model holds quantized (``sizes``, from
    ``_quantized_sizes``: its ``model_size()``, which clones copy), not the float size it was cloned with.
    Every patcher gets the ON_LOAD callback that hands the quantized layers their weight patches as side branches
    (``weight_patches``). A loaded file's SCRI folds are proven on the first calls (``_prove_folds``). ComfyUI's own
    model-saving nodes are refused on the result (they would save int8 codes as float weights)."""
    for module in result.modules.values():
        if getattr(module, "qvd_quantized", False):
            module.read_host_patches = weight_patches.call_time_delta
    motions = motion_patchers(clone)
    patched_motions = [p.clone() for p in motions]
    for patcher, group in _per_patcher(clone, result.modules):
        target = clone if patcher is clone else patched_motions[motions.index(patcher)]
        for name, module in group.items():
            target.add_object_patch(name, module)
    for p, key in zip((clone, *patched_motions), (UNET, *(f"motion_{i}" for i in range(len(patched_motions))))):
        loading.make_qvd_patcher(p)
        weight_patches.attach(p, sizes[key])
    import comfy.patcher_extension
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "qvd_compute", _sampling(result))
    if result.clock.buckets > 1:
        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "qvd_timestep",
                                   _follow_timestep(result.clock))
    if result.wiring is not None:
        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "qvd_wiring",
                                   _prove_folds(result.wiring))
    for i, p in enumerate(patched_motions):
        p.patches_uuid = uuid.uuid4()
        p.size = sizes[f"motion_{i}"]
    if motions:
        clone.set_additional_models(ADE_KEY, patched_motions)
    clone.add_object_patch("state_dict_for_saving", _refuse_float_save)
    clone.patches_uuid = uuid.uuid4()
    clone.size = sizes[UNET]
    clone.set_attachments(ATTACHMENT, QVDAttachment(result))
    return clone


def _follow_timestep(clock):
    """A DIFFUSION_MODEL wrapper setting ``clock`` (the quantized layers' timestep bucket) from each call's timesteps
    (the UNet's and the motion modules' layers run inside that call)."""
    def wrapper(executor, *args, **kwargs):
        t = timestep_argument(executor.class_obj, args, kwargs, position=1)
        if t is not None:
            clock.set(t)
        return executor(*args, **kwargs)
    return wrapper


def _prove_folds(wiring):
    """A DIFFUSION_MODEL wrapper following the calls (the UNet's and the motion modules' layers run inside them) while
    a loaded file's SCRI folds are unproven (``verify.FoldWiring``): a fold the model's wiring contradicts stops the
    first call that runs it, with the file and layers named."""
    def wrapper(executor, *args, **kwargs):
        if not wiring:
            return executor(*args, **kwargs)
        try:
            wiring.begin(executor.class_obj, args, kwargs)
            return executor(*args, **kwargs)
        finally:
            wiring.end()
    return wrapper


def attached_result(model) -> QuantizeResult:
    att = model.get_attachment(ATTACHMENT)
    if att is None:
        raise QVDError("this MODEL is not quantized by QVD: connect the MODEL output of QVD Quantize Model "
                       "or QVD Load Quantized")
    return att.result


@contextlib.contextmanager
def result_to_save(model):
    """Inside: the quantized layers of ``model``, for QVD Save Quantized, seen through ``own_view`` (a bias patch that
    a loaded MODEL sharing these layers merged is not in them). Refused when weight patches (a LoRA, before or after
    quantization) sit on them, since a file holds the quantized checkpoint alone."""
    result = attached_result(model)
    patched = [k for p, group in _per_patcher(model, result.modules) for k in weight_patches_on(p, group)]
    if patched:
        raise QVDError(f"this MODEL carries weight patches (LoRA, ...) on {len(patched)} quantized layer(s), e.g. "
                       f"{patched[0]}: a QVD file holds the quantized checkpoint alone, and the LoRA would be "
                       f"missing from it. Save a MODEL quantized without the LoRA (put the LoRA loader after QVD "
                       f"Quantize Model and take QVD Save Quantized's input from before it), and load the LoRA after "
                       f"QVD Load Quantized")
    with own_view(model):
        yield result
