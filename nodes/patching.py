"""ComfyUI glue: one module tree over a MODEL and its AnimateDiff motion models, calibration by real
sampling, and quantized layers installed as object patches on clones (the input MODEL is never mutated).

Layer names are those of the ejected model (ADE inserts motion modules into UNet blocks at patch time,
shifting indices), so every tree walk happens inside ``ejected(model)``. Names in the tree are
``motion_<i>.<path>`` for the i-th motion model in ``additional_models["ADE"]`` and
``diffusion_model.<path>`` for the UNet, which is also the ComfyUI object-patch key of a UNet layer.
"""
from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass

import torch
from torch import nn

from ..qvd import Calibrator, QuantizeResult, QVDConfig, QVDError

ADE_KEY = "ADE"
ATTACHMENT = "qvd"
UNET = "diffusion_model"


@dataclass
class QVDAttachment:
    """What a quantized MODEL carries for QVD Save Quantized: the result it was patched with."""
    result: QuantizeResult


def motion_patchers(model) -> list:
    return list(model.get_additional_models_with_key(ADE_KEY))


@contextlib.contextmanager
def ejected(model):
    """Model with ADE's motion-module injections removed (also those of the patcher loaded last)."""
    with contextlib.ExitStack() as stack:
        current = getattr(model.model, "current_patcher", None)
        for patcher in (current, model):
            if patcher is not None and patcher.is_injected:
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


def calibrate(model, config: QVDConfig, seeds, sample_fn):
    """Run ``sample_fn(clone, seed)`` for each seed with Calibrator hooks on a clone.

    A DIFFUSION_MODEL wrapper on the clone records each call's timestep. The hooks are removed on exit,
    also when sampling raises (e.g. the user cancels), so the shared modules are left untouched.
    """
    import comfy.patcher_extension

    clone = model.clone()
    with ejected(clone):
        calibrator = Calibrator(model_tree(clone), config)

    def record_timestep(executor, *args, **kwargs):
        t = args[1] if len(args) > 1 else kwargs.get("timesteps")
        if t is not None:
            calibrator.set_timestep(t)
        return executor(*args, **kwargs)

    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "qvd_calibrate", record_timestep)
    with calibrator:
        for seed in seeds:
            sample_fn(clone, seed)
    return calibrator.result()


def bake_weight_patches(model, names: list[str]) -> list[str]:
    """Keys of weight patches (LoRA, ...) on ``model`` that belong to layers about to be replaced."""
    owners = {f"{UNET}.{n[len(UNET) + 1:]}" for n in names if n.startswith(UNET + ".")}
    return [k for k in model.patches if k.rpartition(".")[0] in owners]


def quantize(model, quantize_fn) -> tuple:
    """Clone ``model`` and install the result of ``quantize_fn(tree) -> QuantizeResult`` as object patches.

    Weight patches already on the MODEL (LoRAs applied before quantization) are baked in first: the model
    is loaded with them (ComfyUI patches the weights), quantized from the patched weights, and the baked
    patch keys are dropped from the clone. Motion-model patchers are cloned and patched the same way.
    """
    import comfy.model_management

    clone = model.clone()
    if clone.patches:
        comfy.model_management.load_models_gpu([clone])
    with ejected(clone):
        result = quantize_fn(model_tree(clone))
    install(clone, result)
    return clone, result


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


def install(clone, result: QuantizeResult) -> None:
    """Object-patch ``result.modules`` onto ``clone`` and its (cloned) motion patchers."""
    names = list(result.modules)
    for module in result.modules.values():
        _normal_tensors(module)
    for key in bake_weight_patches(clone, names):
        clone.patches.pop(key)
    motions = motion_patchers(clone)
    patched_motions = [p.clone() for p in motions]
    for name, module in result.modules.items():
        head, _, rest = name.partition(".")
        if head == UNET:
            clone.add_object_patch(name, module)
        elif head.startswith("motion_") and int(head[len("motion_"):]) < len(patched_motions):
            patched_motions[int(head[len("motion_"):])].add_object_patch(rest, module)
        else:
            raise QVDError(f"quantized layer {name!r} belongs to no model in this MODEL (motion models: "
                           f"{len(motions)}); use the MODEL the calibration / file was made from")
    for p in patched_motions:
        p.patches_uuid = uuid.uuid4()
    if motions:
        clone.set_additional_models(ADE_KEY, patched_motions)
    clone.patches_uuid = uuid.uuid4()
    clone.set_attachments(ATTACHMENT, QVDAttachment(result))


def attached_result(model) -> QuantizeResult:
    att = model.get_attachment(ATTACHMENT)
    if att is None:
        raise QVDError("this MODEL is not quantized by QVD: connect the MODEL output of QVD Quantize Model "
                       "or QVD Load Quantized")
    return att.result

