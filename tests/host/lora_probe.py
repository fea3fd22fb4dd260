"""Per layer: a LoRA's effect on QVD's quantized layers against its effect on the fp layers, through ComfyUI's
own LoRA loading (``load_lora_for_models``) and model loading, in-process in ComfyUI (0.3.75, 0.33).

For each adapter family of ``synthetic_models.ADAPTER_LAYERS`` (LoRA, LoCon, LoHa, LoKr), rescaled so that
every patched layer has ``||dW|| / ||W|| = 1`` at strength 1, and each strength in RATIOS: the quantized MODEL
with the adapter is loaded whole (``load_models_gpu``) and partially (``patch_model`` with a small budget:
layers left offloaded get a call-time ``LowVramPatch``); every quantized layer the adapter patches is run on
its own calibration rows, and its change is compared with fp's ``dW x`` (``dW`` from ComfyUI's
``calculate_weight`` on the fp weight). The LoRA is also applied before QVD Quantize Model and before QVD
Load Quantized. Prints one JSON line.

    python lora_probe.py CHECKPOINT PACK_DIR WORK_DIR     (cwd = the ComfyUI directory, on PYTHONPATH)
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lowvram_probe import BUDGET, SKIP, calibrated
from synthetic_models import ADAPTER_LAYERS, ADAPTER_SCALED, adapter_tensors

RATIOS = (0.003, 0.01, 0.03, 0.1, 0.3)


def layer_input(module, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the layer's real input x, what the layer itself is given) from its calibration rows: convs get each
    (kh, kw, C) row as one k x k patch, a layer whose norm does the SCRI transform the transformed x."""
    x = rows.float()
    if x.dim() == 2 and hasattr(module, "kernel_size"):
        k = module.kernel_size[0]
        x = x.view(-1, k, k, module.in_channels).permute(0, 3, 1, 2).contiguous()
    seen = x
    if getattr(module, "scri_in_norm", False) and module.scri_shift is not None:
        view = (-1,) if x.dim() == 2 else (-1, 1, 1)
        seen = (x - module.scri_shift.view(view)) * module.scri_inv_scale.view(view)
    return x, seen


def fp_effect(module, x: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    if dw.dim() == 2:
        return F.linear(x, dw)
    return F.conv2d(x, dw, None, module.stride, module.padding)


def change_against_fp(name: str, module, calibration, base: torch.Tensor, fp_weight: torch.Tensor,
                      fp_patcher) -> tuple[float, float]:
    """(cosine, magnitude ratio) of a patched quantized layer's change on its calibration rows (its output less
    ``base``, the unpatched output) against FP's ``dW x`` (``dW`` from ComfyUI's ``calculate_weight`` of the patches
    ``fp_patcher`` holds for the layer)."""
    import comfy.lora

    x, seen = layer_input(module, calibration.layers[name].rows)
    key = f"{name}.weight"
    dw = comfy.lora.calculate_weight(fp_patcher.patches[key], fp_weight.clone(), key) - fp_weight
    want, got = fp_effect(module, x, dw), module(seen) - base
    return float(F.cosine_similarity(got.flatten(), want.flatten(), 0)), float(got.norm() / want.norm())


def main(checkpoint: str, pack_dir: str, work_dir: str) -> dict:
    start = time.time()
    torch.set_num_threads(2)
    from comfy.cli_args import args
    args.cpu = True
    import comfy.lora
    import comfy.model_management as mm
    import comfy.sd
    from comfy.weight_adapter import LoRAAdapter

    qvd, model, _, calibration = calibrated(checkpoint, pack_dir)
    pack = sys.modules["qvd_pack_probe"]
    patching = sys.modules["qvd_pack_probe.nodes.patching"]
    quantize = lambda m: qvd["QVDQuantizeModel"]().quantize(m, calibration, 8, 8, True, True, SKIP)["result"][0]
    quantized = quantize(model)
    fp_weights = {n: m.weight.detach().float().clone() for n, m in model.model.named_modules()
                  if isinstance(getattr(m, "weight", None), torch.Tensor)}
    cpu = torch.device("cpu")
    facts = {"ratios": list(RATIOS), "results": [], "codes_unchanged": True}

    def quantized_layers(patcher) -> dict:
        return {n: m for n, m in patcher.model.named_modules() if getattr(m, "qvd_quantized", False)}

    # Each quantized layer's output on its calibration rows without any patch, and its codes.
    mm.load_models_gpu([quantized])
    layers = quantized_layers(quantized)
    codes = {n: m.weight.clone() for n, m in layers.items()}
    lora_layers = {f"diffusion_model.{n}" for n in ADAPTER_LAYERS["lora"]}
    facts["lora_scri_in_norm"] = sum(bool(getattr(m, "scri_in_norm", False)) for n, m in layers.items()
                                     if n in lora_layers)
    with torch.inference_mode():
        base = {n: m(layer_input(m, calibration.layers[n].rows)[1]) for n, m in layers.items()}

    def normalised(kind: str) -> dict:
        """The adapter with each layer's ||dW|| / ||W|| = 1 at strength 1 (ComfyUI's own formulas)."""
        sd = adapter_tensors(checkpoint, kind)
        fp = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0)[0]
        for name in ADAPTER_LAYERS[kind]:
            key = f"diffusion_model.{name}.weight"
            w = fp_weights[key[:-7]]
            dw = comfy.lora.calculate_weight(fp.patches[key], torch.zeros_like(w), key)
            sd[f"lora_unet_{name.replace('.', '_')}.{ADAPTER_SCALED[kind]}"] *= float(w.norm() / dw.norm())
        return sd

    def measure(patcher, fp_patcher, kind: str, path: str, ratio: float) -> None:
        """Every patched quantized layer of the loaded ``patcher`` against fp's dW x."""
        worst_cos, mags, offloaded = 1.0, [], 0
        names = [n for n in quantized_layers(patcher) if f"{n}.weight" in patcher.patches]
        with torch.inference_mode():
            for n in names:
                m = patcher.model.get_submodule(n)
                offloaded += bool(m.comfy_cast_weights and m.weight_function)
                cos, mag = change_against_fp(n, m, calibration, base[n], fp_weights[n], fp_patcher)
                worst_cos = min(worst_cos, cos)
                mags.append(mag)
                facts["codes_unchanged"] &= torch.equal(m.weight, codes[n])
        facts["results"].append({"kind": kind, "path": path, "ratio": ratio, "layers": len(names),
                                 "offloaded_with_patch": offloaded, "worst_cos": worst_cos,
                                 "min_mag": min(mags) if mags else None, "max_mag": max(mags) if mags else None})

    facts["setup_seconds"] = time.time() - start
    t0 = time.time()
    for kind in ADAPTER_LAYERS:
        sd = normalised(kind)
        for ratio in RATIOS:
            fp = comfy.sd.load_lora_for_models(model, None, sd, ratio, 0)[0]
            q = comfy.sd.load_lora_for_models(quantized, None, sd, ratio, 0)[0]
            mm.load_models_gpu([q])
            measure(q, fp, kind, "whole", ratio)
            mm.unload_all_models()
            q.patch_model(device_to=cpu, lowvram_model_memory=BUDGET)
            measure(q, fp, kind, "partial", ratio)
            q.unpatch_model(cpu)
    # Two adapters stacked on the same layers (a LoRA and a LoHa at their own strengths).
    lora, loha = normalised("lora"), normalised("loha")
    fp = comfy.sd.load_lora_for_models(comfy.sd.load_lora_for_models(model, None, lora, 0.03, 0)[0], None, loha, 0.01,
                                       0)[0]
    q = comfy.sd.load_lora_for_models(comfy.sd.load_lora_for_models(quantized, None, lora, 0.03, 0)[0], None, loha,
                                      0.01, 0)[0]
    mm.load_models_gpu([q])
    measure(q, fp, "lora+loha", "whole", 0.03)
    mm.unload_all_models()
    facts["adapter_seconds"] = time.time() - t0
    print("QVD_PROBE_PARTIAL " + json.dumps(facts), flush=True)

    # A LoRA applied before QVD Quantize Model and before QVD Load Quantized rides on the same int8 codes.
    sd = normalised("lora")
    path = Path(work_dir) / "probe.qvd.safetensors"
    pack.qvd.save_quantized(path, patching.attached_result(quantized))
    for ratio in (0.01, 0.1):
        fp = comfy.sd.load_lora_for_models(model, None, sd, ratio, 0)[0]
        for where, q in (("before_quantize", quantize(fp)),
                         ("before_load", patching.quantize(fp, lambda tree, _dtype: pack.qvd.load_quantized(
                             path, tree, apply=False))[0])):
            mm.load_models_gpu([q])
            measure(q, fp, "lora", where, ratio)
    mm.load_models_gpu([quantized])
    with torch.inference_mode():
        facts["restored"] = all(torch.equal(m(layer_input(m, calibration.layers[n].rows)[1]), base[n])
                                for n, m in quantized_layers(quantized).items())

    # Refused, never silently lost: another node's weight function on a quantized layer, a patch on a norm that
    # absorbed SCRI, a patch that resizes a layer.
    def refusal(fn) -> str:
        try:
            fn()
        except pack.qvd.QVDError as e:
            return str(e)
        return ""

    name, layer = next(iter(quantized_layers(quantized).items()))
    layer.comfy_cast_weights, layer.weight_function = True, [lambda w: w]
    with torch.inference_mode():
        facts["refused_function"] = refusal(lambda: layer(layer_input(layer, calibration.layers[name].rows)[1]))
    layer.comfy_cast_weights, layer.weight_function = False, []
    mm.unload_all_models()
    norm, folded = next((n, m) for n, m in patching.attached_result(quantized).modules.items()
                        if getattr(m, "qvd_scri_norm", False))
    width = folded.weight.shape[0]
    n_out, *rest = layer.weight.shape
    resize = LoRAAdapter(set(), (torch.ones(n_out + 1, 1), torch.ones(1, math.prod(rest)), None, None, None,
                                 [n_out + 1, *rest]))  # a LoRA that grows the layer by one output (ComfyUI pads)
    for what, key, patch in (("norm", f"{norm}.weight", ("diff", (torch.zeros(width),))),
                             ("resize", f"{name}.weight", resize)):
        patched = quantized.clone()
        patched.add_patches({key: patch}, 1.0)
        facts[f"refused_{what}"] = refusal(lambda: mm.load_models_gpu([patched]))
        mm.unload_all_models()
    return facts


if __name__ == "__main__":
    print("QVD_PROBE " + json.dumps(main(*sys.argv[1:4])), flush=True)
