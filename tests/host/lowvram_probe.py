"""ComfyUI's low-VRAM (partial) load of a QVD-quantized MODEL with a LoRA, in-process in ComfyUI (0.3.75, 0.33).

A CPU server always loads models whole, so this script drives the same ModelPatcher calls ComfyUI makes
when VRAM is short: ``patch_model(lowvram_model_memory=...)`` (partial load: layers left offloaded get
``comfy_cast_weights`` and the LoRA as a call-time ``LowVramPatch``) and ``partially_unload`` (offloading
loaded layers). It runs the pack's nodes the way the server does and prints one JSON line of results.

    python lowvram_probe.py CHECKPOINT LORA PACK_DIR     (cwd = the ComfyUI directory, on PYTHONPATH)
    python lowvram_probe.py wan WAN_MODEL WAN_LORA PACK_DIR
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

from comfy_host import TINY

# Tiny settings as in comfy_host.TINY: 8x8 latent, 2 frames, 1 step; the quantized blocks carry the LoRA.
SKIP = "input_blocks.[3-9].*, input_blocks.1[01].*, output_blocks.[0-8].*"
BUDGET = 64 << 20  # bytes "usable" for weights: most of the ~3.4 GB UNet stays offloaded


def load_pack(pack_dir: Path, name: str = "qvd_pack_probe"):
    """The NODE_CLASS_MAPPINGS of the node pack in ``pack_dir``, imported as ComfyUI imports a custom-node folder."""
    spec = importlib.util.spec_from_file_location(name, pack_dir / "__init__.py",
                                                  submodule_search_locations=[str(pack_dir)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.NODE_CLASS_MAPPINGS


def calibrated(checkpoint: str, pack_dir: str) -> tuple:
    """(the pack's nodes, the checkpoint's MODEL, a positive conditioning, QVD Calibrate's result at TINY sizes)."""
    import comfy.sd
    import nodes

    qvd = load_pack(Path(pack_dir))
    model, clip, _ = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=False)[:3]
    positive = nodes.CLIPTextEncode().encode(clip, "a red fox running")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = nodes.EmptyLatentImage().generate(64, 64, 2)[0]
    calibration = qvd["QVDCalibrate"]().calibrate(model, positive, negative, latent, 0, 1, 5.0, "euler", "normal",
                                                  1, timestep_coverage=TINY["timestep_coverage"])["result"][0]
    return qvd, model, positive, calibration


def main(checkpoint: str, lora: str, pack_dir: str) -> dict:
    """The synthetic SD1.5 checkpoint at TINY sizes, its quantized blocks carrying the LoRA."""
    torch.set_num_threads(2)
    from comfy.cli_args import args
    args.cpu = True
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils

    qvd, model, positive, calibration = calibrated(checkpoint, pack_dir)
    quantized = qvd["QVDQuantizeModel"]().quantize(model, calibration, 8, 8, True, True, SKIP)["result"][0]
    with_lora = comfy.sd.load_lora_for_models(quantized, None, comfy.utils.load_torch_file(lora), 1.0, 0)[0]
    mm.unload_all_models()
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 4, 8, 8, generator=gen), torch.full((2,), 3.0), positive[0][0].repeat(2, 1, 1))
    return partial_load_facts(quantized, with_lora, inputs, BUDGET)


def wan_calibrated(model_path: str, pack_dir: str, frames: int = 9, steps: int = 2) -> tuple:
    """(the pack's nodes, a Wan diffusion model as Load Diffusion Model loads it, a positive and a negative
    conditioning of umt5's shape (seeded), QVD Calibrate's result at 64 px and ``frames`` video frames)."""
    import comfy.sd

    qvd = load_pack(Path(pack_dir))
    model = comfy.sd.load_diffusion_model(model_path)
    gen = torch.Generator().manual_seed(0)
    positive, negative = ([[torch.randn(1, 24, 4096, generator=gen) * 0.2, {}]] for _ in range(2))
    latent = {"samples": torch.zeros(1, 16, (frames - 1) // 4 + 1, 8, 8)}
    calibration = qvd["QVDCalibrate"]().calibrate(model, positive, negative, latent, 0, steps, 5.0, "euler", "simple",
                                                  1, timestep_coverage=TINY["timestep_coverage"])["result"][0]
    return qvd, model, positive, negative, calibration


def wan_main(model_path: str, lora: str, pack_dir: str) -> dict:
    """A synthetic Wan 2.1 diffusion model (``UNETLoader``'s load), the whole model quantized, a Wan LoRA."""
    torch.set_num_threads(2)
    from comfy.cli_args import args
    args.cpu = True
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils

    qvd, model, positive, _, calibration = wan_calibrated(model_path, pack_dir)
    gen = torch.Generator().manual_seed(1)
    quantized = qvd["QVDQuantizeModel"]().quantize(model, calibration, 8, 8, True, True, "")["result"][0]
    lora_sd = comfy.utils.load_torch_file(lora)
    with_lora = comfy.sd.load_lora_for_models(quantized, None, lora_sd, 1.0, 0)[0]
    budget = 1 << 20  # the toy model is 13 MB in fp32
    per_layer = lora_per_layer(model, quantized, with_lora, comfy.sd.load_lora_for_models(model, None, lora_sd, 1.0,
                                                                                          0)[0], calibration, budget)
    mm.unload_all_models()
    inputs = (torch.randn(1, 16, 3, 8, 8, generator=gen), torch.full((1,), 0.7), positive[0][0])
    return {**partial_load_facts(quantized, with_lora, inputs, budget), **per_layer}


def lora_per_layer(model, quantized, with_lora, fp_with_lora, calibration, budget: int) -> dict:
    """Each quantized layer the LoRA patches, run on its calibration rows, loaded whole and partially: its change
    against FP's ``dW x`` (``dW`` from ComfyUI's ``calculate_weight``), the worst cosine and the magnitudes."""
    import comfy.model_management as mm
    from lora_probe import change_against_fp, layer_input

    layers = lambda p: {n: m for n, m in p.model.named_modules() if getattr(m, "qvd_quantized", False)}
    fp_weights = {n: m.weight.detach().float().clone() for n, m in model.model.named_modules()
                  if isinstance(getattr(m, "weight", None), torch.Tensor)}
    mm.load_models_gpu([quantized])
    with torch.inference_mode():
        base = {n: m(layer_input(m, calibration.layers[n].rows)[1]) for n, m in layers(quantized).items()}
    mm.unload_all_models()
    out = {}
    for path in ("whole", "partial"):
        if path == "whole":
            mm.load_models_gpu([with_lora])
        else:
            with_lora.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=budget)
        cos, mags = [], []
        with torch.inference_mode():
            for n, m in layers(with_lora).items():
                if f"{n}.weight" in with_lora.patches:
                    c, mag = change_against_fp(n, m, calibration, base[n], fp_weights[n], fp_with_lora)
                    cos.append(c)
                    mags.append(mag)
        out[f"per_layer_{path}"] = {"layers": len(cos), "worst_cos": min(cos), "min_mag": min(mags),
                                    "max_mag": max(mags)}
        if path == "whole":
            mm.unload_all_models()
        else:
            with_lora.unpatch_model(torch.device("cpu"))
    return out


def partial_load_facts(quantized, with_lora, inputs: tuple, budget: int) -> dict:
    """Whole, partial (``budget`` bytes) and partially unloaded loads of ``with_lora`` (the quantized MODEL with a LoRA)
    and of ``quantized`` again, one model call each on ``inputs`` = (x, sigma, text context): outputs and facts."""
    import comfy.model_management as mm

    x, sigma, context = inputs
    cpu = torch.device("cpu")

    def output(patcher) -> torch.Tensor:
        with torch.inference_mode():
            return patcher.model.apply_model(x, sigma, c_crossattn=context).float().clone()

    def quantized_layers(patcher) -> list:
        return [m for m in patcher.model.diffusion_model.modules() if getattr(m, "qvd_quantized", False)]

    out = {}
    for name, patcher in (("q", quantized), ("q_lora", with_lora)):
        patcher.patch_model(device_to=cpu, lowvram_model_memory=0)  # whole
        out[name] = output(patcher)
        patcher.unpatch_model(cpu)
    offered, pin = [], mm.pin_memory  # what is offered for pinning (a CPU pins nothing: recorded, refused)
    mm.pin_memory = lambda t: offered.append((t.data_ptr(), t.is_contiguous())) and False
    try:
        with_lora.patch_model(device_to=cpu, lowvram_model_memory=budget)  # partial
    finally:
        mm.pin_memory = pin
    layers = quantized_layers(with_lora)
    offloaded = [m for m in layers if m.comfy_cast_weights]
    codes = [m.weight for m in offloaded if m.weight.dim() == 4 and m.weight.shape[2:] != (1, 1)]
    facts_pin = {"offloaded_3x3_codes": len(codes),
                 "pinnable_3x3_codes": sum((w.data_ptr(), True) in offered for w in codes)}
    out["q_lora_lowvram"] = output(with_lora)
    facts = {"quantized_layers": len(layers), "offloaded": len(offloaded),
             "offloaded_with_lora": sum(bool(m.weight_function) for m in offloaded),
             "model_lowvram": bool(with_lora.model.model_lowvram), **facts_pin}
    with_lora.unpatch_model(cpu)
    facts["flags_cleared"] = not any(m.comfy_cast_weights or m.weight_function for m in quantized_layers(with_lora))
    with_lora.patch_model(device_to=cpu, lowvram_model_memory=0)  # whole, then offload loaded layers
    facts["freed_bytes"] = with_lora.partially_unload(cpu, memory_to_free=1 << 40)
    facts["offloaded_after_unload"] = sum(m.comfy_cast_weights for m in quantized_layers(with_lora))
    out["q_lora_unloaded"] = output(with_lora)
    with_lora.unpatch_model(cpu)
    quantized.patch_model(device_to=cpu, lowvram_model_memory=0)  # the same layers, LoRA gone
    out["q_after"] = output(quantized)
    quantized.unpatch_model(cpu)

    ref = out["q_lora"]
    rel = lambda a, b: float((a - b).norm() / b.norm())
    facts.update({
        "lora_effect": rel(out["q_lora"], out["q"]),
        "lowvram_vs_whole": rel(out["q_lora_lowvram"], ref),
        "unloaded_vs_whole": rel(out["q_lora_unloaded"], ref),
        "lowvram_equal": bool(torch.equal(out["q_lora_lowvram"], ref)),
        "unloaded_equal": bool(torch.equal(out["q_lora_unloaded"], ref)),
        "quantized_restored": bool(torch.equal(out["q_after"], out["q"])),
        "finite": bool(all(torch.isfinite(t).all() for t in out.values())),
    })
    return facts


if __name__ == "__main__":
    run = wan_main if sys.argv[1] == "wan" else main
    print("QVD_PROBE " + json.dumps(run(*sys.argv[2:5] if sys.argv[1] == "wan" else sys.argv[1:4])), flush=True)
