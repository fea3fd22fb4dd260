"""The bytes a QVD-quantized MODEL tells ComfyUI's memory planner against the bytes it holds, in-process in ComfyUI
(0.3.75, 0.33), for the MODEL and, with AnimateDiff-Evolved, its motion patcher.

ComfyUI plans loads, offloads and evictions from ``ModelPatcher.model_size()`` (cached, copied by ``clone()``) and,
after a load, from the bytes of the modules it loaded. This script quantizes the synthetic SD1.5 UNet (and the
motion model) whole with the pack's nodes, then compares for each patcher: the size it tells, the bytes its model
holds with QVD's object patches applied (every tensor of the state dict, as ComfyUI counts), and what a partial
(low-VRAM) load counts as loaded plus offloaded. Then the work of a whole load with a LoRA (and a bias patch): the
float work ComfyUI would merge and throw away (``convert_weight`` / ``set_weight`` calls on quantized layers), its
time against the load without, and the bias patch's output whole against partial; and the peak resident memory of
QVD Load Quantized (under ``inference_mode``, as ComfyUI runs it) against the file's size. Prints one JSON line.

    python size_probe.py CHECKPOINT PACK_DIR LORA [ADE_DIR MOTION_FILE]   (cwd = ComfyUI's directory, on PYTHONPATH)
"""
from __future__ import annotations

import contextlib
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from comfy_host import TINY
from lowvram_probe import SKIP, load_pack

BUDGET = 64 << 20  # bytes "usable" for weights in the partial load


def _load_ade(ade_dir: str, motion_file: str):
    """ADE's node classes, with ``motion_file``'s folder among its motion models."""
    import folder_paths
    import importlib.util

    spec = importlib.util.spec_from_file_location("ade_probe", Path(ade_dir) / "__init__.py",
                                                  submodule_search_locations=[ade_dir])
    ade = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = ade
    spec.loader.exec_module(ade)
    folder_paths.add_model_folder_path("animatediff_models", str(Path(motion_file).parent))
    return ade.NODE_CLASS_MAPPINGS


def _with_motion(ade: dict, motion_file: str, model, motion_lora=None):
    """``model`` with the motion model (and a MOTION_LORA) applied by ADE's nodes, as workflow (a) does."""
    motion = ade["ADE_LoadAnimateDiffModel"]().load_motion_model(Path(motion_file).name)[0]
    m_models = ade["ADE_ApplyAnimateDiffModelSimple"]().apply_motion_model(motion, motion_lora=motion_lora)[0]
    return ade["ADE_UseEvolvedSampling"]().use_evolved_sampling(model, "autoselect", m_models)[0]


def main(checkpoint: str, pack_dir: str, lora: str, ade_dir: str | None = None, motion_file: str | None = None) -> dict:
    torch.set_num_threads(2)
    from comfy.cli_args import args
    args.cpu = True
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    import nodes

    qvd = load_pack(Path(pack_dir))
    patching = sys.modules["qvd_pack_probe.nodes.patching"]
    from qvd_pack_probe.qvd import load_quantized, save_quantized

    checkpoint_model, clip, _ = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=False)[:3]
    model = checkpoint_model
    if ade_dir:
        ade = _load_ade(ade_dir, motion_file)
        model = _with_motion(ade, motion_file, checkpoint_model)
    positive = nodes.CLIPTextEncode().encode(clip, "a red fox running")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = nodes.EmptyLatentImage().generate(64, 64, 2)[0]
    tmp = tempfile.TemporaryDirectory()
    path = str(Path(tmp.name) / "q.safetensors")
    # the MODEL already loaded (as after a sampler ran it): the QVD nodes must not unpatch or reload it
    mm.load_models_gpu([model, *patching.motion_patchers(model)])
    with _reloads(model) as reloads:
        calibration = qvd["QVDCalibrate"]().calibrate(model, positive, negative, latent, 0, 1, 5.0, "euler",
                                                      "normal", 1,
                                                      timestep_coverage=TINY["timestep_coverage"])["result"][0]
        # compute int8: the W8A8 model's own bytes (on a CPU, weight-only also keeps float weights: measured apart)
        quantized = qvd["QVDQuantizeModel"]().quantize(model, calibration, 8, 8, True, True, "", "int8")["result"][0]
        with patching.result_to_save(quantized) as result:
            save_quantized(path, result)
        with _PeakRSS() as peak, torch.inference_mode():  # as ComfyUI runs QVD Load Quantized
            loaded = patching.quantize(model, lambda tree, dtype: load_quantized(path, tree, False, dtype), "int8")[0]
    largest = max(m.weight.numel() for m in patching.attached_result(loaded).modules.values()
                  if getattr(m, "qvd_quantized", False))
    load_memory = {"file": Path(path).stat().st_size, "peak": peak.peak, "largest_layer_fp32": largest * 4}
    still_loaded = any(m.model is model for m in mm.current_loaded_models)
    mm.unload_all_models()
    cpu = torch.device("cpu")

    def held(patcher) -> int:
        """Bytes of every tensor the patcher's model holds with its object patches applied (ADE's motion modules
        ejected from the UNet: the motion patchers count them), with the float weights a weight-only compute route
        keeps on the CPU."""
        patcher.patch_model(device_to=cpu, lowvram_model_memory=0)
        try:
            with patching.ejected(patcher):
                kept = sum(m.float_weight_bytes() for m in patcher.model.modules() if hasattr(m, "float_weight_bytes"))
                return mm.module_size(patcher.model) + kept
        finally:
            patcher.unpatch_model(cpu)

    def partial(patcher) -> tuple[int, int]:
        """(loaded, offloaded) bytes of a partial load, as ComfyUI counts them."""
        patcher.patch_model(device_to=cpu, lowvram_model_memory=BUDGET)
        try:
            with patching.ejected(patcher):
                offloaded = sum(mm.module_size(m) for m in patcher.model.modules()
                                if getattr(m, "comfy_cast_weights", False))
            return int(patcher.model.model_loaded_weight_memory), offloaded
        finally:
            patcher.unpatch_model(cpu)

    facts = {"float_told": model.model_size(), "motion": [], "reloads": reloads, "still_loaded": still_loaded,
             "load_memory": load_memory}
    for label, patcher in (("quantized", quantized), ("loaded", loaded)):
        facts[label] = {"told": patcher.model_size(), "clone_told": patcher.clone().model_size(),
                        "held": held(patcher), "partial": partial(patcher)}
    for fp, q in zip(patching.motion_patchers(model), patching.motion_patchers(quantized)):
        facts["motion"].append({"float_told": fp.model_size(), "told": q.model_size(), "held": held(q)})
    facts["lora_load"] = _lora_load(quantized, lora, positive, patching)
    del quantized, loaded
    mm.unload_all_models()  # ComfyUI's loaded-model list holds the patchers
    gc.collect()
    # on a CPU weight-only keeps float weights (~4x the codes): measured alone, the int8 models freed, on the blocks
    # the tiny host tests quantize (the whole model's float copies would add ~5 GB to this process)
    weight_only = qvd["QVDQuantizeModel"]().quantize(model, calibration, 8, 8, True, True, SKIP,
                                                     "weight-only")["result"][0]
    kept = sum(m.float_weight_bytes() for n, m in patching.attached_result(weight_only).modules.items()
               if hasattr(m, "float_weight_bytes") and n.startswith(patching.UNET + "."))  # the MODEL's own layers
    facts["weight_only"] = {"told": weight_only.model_size(), "held": held(weight_only), "kept": kept}
    del weight_only
    mm.unload_all_models()
    gc.collect()
    tmp.cleanup()
    if ade_dir:
        shapes = {k: tuple(v.shape) for k, v in patching.motion_patchers(model)[0].model.state_dict().items()}
        del model
        gc.collect()
        facts["motion_lora"] = _motion_lora(qvd, patching, ade, motion_file, shapes, checkpoint_model, calibration)
    return facts


def _motion_lora(qvd, patching, ade, motion_file: str, shapes: dict, checkpoint_model, calibration) -> dict:
    """A rank-8 motion LoRA in ADE's file format through ADE's own loader (ADE merges it into ``up @ down``
    differences on the motion patcher), on the quantized motion model: per patched layer, whether its branch is low
    rank, its bytes against the LoRA's factors at the branch's dtype, and its output against FP's ``dW x``."""
    import folder_paths
    from safetensors.torch import save_file

    cpu = torch.device("cpu")
    tmp = tempfile.TemporaryDirectory(ignore_cleanup_errors=True)  # removed when this function returns
    folder = Path(tmp.name)
    gen = torch.Generator().manual_seed(7)
    factors, tensors = {}, {}
    for key, shape in shapes.items():
        proj = next((p for p in ("to_q", "to_k", "to_v", "to_out.0") if key.endswith(f"attention_blocks.0.{p}.weight")
                     or key.endswith(f"attention_blocks.1.{p}.weight")), None)
        if proj is None:
            continue
        up, down = torch.randn(shape[0], 8, generator=gen) * 0.05, torch.randn(8, shape[1], generator=gen) * 0.05
        stem = key[: -len(f"{proj}.weight")] + f"processor.{proj.removesuffix('.0')}_lora"
        tensors[f"{stem}.up.weight"], tensors[f"{stem}.down.weight"] = up.half(), down.half()
        factors[key.removesuffix(".weight")] = (up.half().float(), down.half().float())
    save_file(tensors, str(folder / "motion_lora.safetensors"))
    folder_paths.add_model_folder_path("animatediff_motion_lora", str(folder))
    motion_lora = ade["ADE_AnimateDiffLoRALoader"]().load_motion_lora("motion_lora.safetensors", 0.8)[0]
    with_lora = _with_motion(ade, motion_file, checkpoint_model, motion_lora)
    quantized = qvd["QVDQuantizeModel"]().quantize(with_lora, calibration, 8, 8, True, True,
                                                  "diffusion_model.*")["result"][0]
    patcher = patching.motion_patchers(quantized)[0]
    start = time.perf_counter()
    patcher.patch_model(device_to=cpu, lowvram_model_memory=0)
    seconds = time.perf_counter() - start
    layers = []
    try:
        for name, (up, down) in factors.items():
            m = patcher.model.get_submodule(name)
            if not getattr(m, "qvd_quantized", False) or m.delta is None:
                layers.append({"name": name, "quantized": getattr(m, "qvd_quantized", False), "delta": False})
                continue
            x = torch.randn(16, m.in_features, generator=gen)
            scri = m.scri if getattr(m, "scri_in_norm", False) else None
            x_in = x if scri is None else scri.apply(x)
            got = m.delta(x_in, torch.zeros(16, m.out_features), offset=m._delta_offset(cpu))
            want = x @ (0.8 * up @ down).t()
            own = (up.numel() + down.numel()) * m.delta.up.element_size() if m.delta.up is not None else 1
            layers.append({"name": name, "quantized": True, "delta": True, "dense": m.delta.dense is not None,
                           "bytes_vs_lora": m.delta.nbytes() / own, "delta_bytes": m.delta.nbytes(),
                           "dense_bytes": m.weight.numel() * 4,
                           "cos": float(torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), 0)),
                           "norm_ratio": float(got.norm() / want.norm())})
    finally:
        patcher.unpatch_model(cpu)
    return {"layers": layers, "load_seconds": seconds, "lora_file_bytes": (folder / "motion_lora.safetensors").stat().st_size}


class _PeakRSS:
    """Inside: the process's resident memory sampled every 2 ms; ``peak``: its highest value less the value on entry
    (freed heap returned to the system first, so memory a load reuses is not hidden)."""

    def __enter__(self):
        import ctypes
        import threading

        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.base, self.peak, self._stop = self._rss(), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss() - self.base)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss() - self.base)


@contextlib.contextmanager
def _reloads(model):
    """Inside: every ``ModelPatcher.load`` and weight-restoring ``unpatch_model`` on ``model``'s UNet, listed as
    ``(call, patcher is model)``."""
    from comfy.model_patcher import ModelPatcher

    calls, load, unpatch = [], ModelPatcher.load, ModelPatcher.unpatch_model

    def counted_load(self, *a, **k):
        if self.model is model.model:
            calls.append(("load", self is model))
        return load(self, *a, **k)

    def counted_unpatch(self, device_to=None, unpatch_weights=True):
        if self.model is model.model and unpatch_weights and self.model.current_weight_patches_uuid is not None:
            calls.append(("unpatch", self is model))
        return unpatch(self, device_to, unpatch_weights)
    ModelPatcher.load, ModelPatcher.unpatch_model = counted_load, counted_unpatch
    try:
        yield calls
    finally:
        ModelPatcher.load, ModelPatcher.unpatch_model = load, unpatch


def _lora_load(quantized, lora: str, positive, patching) -> dict:
    """A whole load of ``quantized`` with a LoRA and a bias patch: float work on quantized layers, seconds against
    the load without (medians of alternated loads), and the output whole vs partial vs without the patches."""
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    from qvd_pack_probe.qvd import HiDiTQLinear, QConv2d, QLinear

    cpu = torch.device("cpu")
    with_lora = comfy.sd.load_lora_for_models(quantized, None, comfy.utils.load_torch_file(lora), 1.0, 0)[0]
    key, layer = next((k, m) for k, m in quantized.object_patches.items()
                      if isinstance(m, QLinear) and m.bias is not None and f"{k}.weight" in with_lora.patches)
    gen = torch.Generator().manual_seed(3)
    with_lora.add_patches({f"{key}.bias": ("diff", (0.05 * torch.randn(layer.bias.shape, generator=gen),))})
    calls = {"convert_weight": 0, "set_weight": 0}
    originals = {(cls, f): getattr(cls, f) for cls in (QLinear, QConv2d, HiDiTQLinear) for f in calls}

    def counting(cls, f):
        def call(self, *a, **k):
            calls[f] += 1
            return originals[(cls, f)](self, *a, **k)
        return call
    for cls, f in originals:
        setattr(cls, f, counting(cls, f))
    gen = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, 4, 8, 8, generator=gen), torch.full((2,), 3.0)
    context = positive[0][0].repeat(2, 1, 1)

    def load(patcher, budget=0, run=False):
        start = time.perf_counter()
        patcher.patch_model(device_to=cpu, lowvram_model_memory=budget)
        seconds = time.perf_counter() - start
        try:
            if run:
                with torch.inference_mode():
                    return patcher.model.apply_model(x, sigma, c_crossattn=context).float().clone()
            return seconds
        finally:
            patcher.unpatch_model(cpu)
    try:
        times = {"plain": [], "lora": []}
        for _ in range(3):
            times["plain"].append(load(quantized))
            times["lora"].append(load(with_lora))
        float_work = dict(calls)
        whole, partial, plain = load(with_lora, run=True), load(with_lora, BUDGET, run=True), load(quantized, run=True)
        fresh = with_lora.clone()  # told before its first load: what a sampling run's planner reads
        sys.modules["qvd_pack_probe.nodes.weight_patches"].before_load(fresh)
        told_before = fresh.model_size()
        with_lora.patch_model(device_to=cpu, lowvram_model_memory=0)
        branches = [m.delta for m in with_lora.object_patches.values() if getattr(m, "delta", None) is not None]
        deltas = sum(d.nbytes() for d in branches)
        with patching.ejected(with_lora):
            held = mm.module_size(with_lora.model) + deltas
        sizes = {"told_before_load": told_before, "told": with_lora.model_size(), "held": held,
                 "loaded": int(with_lora.model.model_loaded_weight_memory), "plain_told": quantized.model_size(),
                 "delta_dtypes": sorted({str(d.dtype) for d in branches}),
                 "model_dtype": str(with_lora.model.manual_cast_dtype or with_lora.model.get_dtype())}
        with_lora.unpatch_model(cpu)
    finally:
        for (cls, f), fn in originals.items():
            setattr(cls, f, fn)
    rel = lambda a, b: float((a - b).norm() / b.norm())
    return {"float_work_calls": float_work, "seconds": {k: statistics.median(v) for k, v in times.items()},
            "patched_layers": sum(k.endswith(".weight") for k in with_lora.patches), "delta_bytes": deltas,
            "with_lora": sizes,
            "lora_file_bytes": Path(lora).stat().st_size,
            "whole_vs_partial": rel(whole, partial), "patch_effect": rel(whole, plain),
            "plain_again_equal": bool(torch.equal(plain, load(quantized, run=True)))}


if __name__ == "__main__":
    print("QVD_PROBE " + json.dumps(main(*sys.argv[1:6])), flush=True)
