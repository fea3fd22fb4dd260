"""The QVD nodes (category ``QVD``): thin translations of ComfyUI types into ``qvd`` calls.

ComfyUI modules are imported inside the node methods, so this file imports outside ComfyUI too.
"""
from __future__ import annotations

import logging
import os
import re
import time

from ..qvd import (Calibration, QVDConfig, QVDError, kernels, load_quantized, quantize_model, save_calibration,
                   save_quantized)
from ..qvd.calibrate import COVERAGE_POINTS
from ..qvd.identity import content_key
from ..qvd.modules import kept_float_bytes
from ..qvd.safefile import check_name
from . import patching

MODEL_FOLDER = "qvd"
EXTENSION = ".safetensors"
CALIBRATION_SUFFIX = ".calibration" + EXTENSION


def register_model_folder() -> None:
    """Register ``models/qvd`` with ComfyUI's folder_paths (no-op outside ComfyUI)."""
    try:
        import folder_paths
    except ImportError:
        return
    path = os.path.join(folder_paths.models_dir, MODEL_FOLDER)
    folder_paths.add_model_folder_path(MODEL_FOLDER, path)
    paths, _ = folder_paths.folder_names_and_paths[MODEL_FOLDER]
    folder_paths.folder_names_and_paths[MODEL_FOLDER] = (paths, {EXTENSION})


def _new_file(name: str, suffix: str, what: str) -> str:
    """Path of a new file under models/qvd, checked before anything runs or is written: a plain name the
    file system can hold, not taken, and ``.calibration`` only on calibration files."""
    import folder_paths

    stem = name.strip()
    for end in (suffix, EXTENSION):
        if stem.endswith(end):
            stem = stem[: -len(end)]
            break
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._ -]*", stem or ""):
        raise QVDError(f"{what} name {name[:60]!r} is not a plain file name: use letters, digits, '.', '_', '-'")
    if stem.endswith(".calibration"):
        raise QVDError(f"{what} name {name[:60]!r} ends in '.calibration', the mark QVD gives calibration files: "
                       f"choose another name")
    folder = folder_paths.get_folder_paths(MODEL_FOLDER)[0]
    path = os.path.join(folder, stem + suffix)
    check_name(path)
    os.makedirs(folder, exist_ok=True)
    if os.path.exists(path):
        raise QVDError(f"{path} already exists and is never overwritten: choose another {what} name")
    return path


def _existing_file(name: str) -> str:
    import folder_paths

    path = folder_paths.get_full_path(MODEL_FOLDER, name)
    if path is None:
        raise QVDError(f"{name} is not in models/{MODEL_FOLDER}: refresh the node list or pick another file")
    return path


COMPUTE_INPUT = (list(kernels.COMPUTE), {"default": "auto", "tooltip":
                 "How the quantized layers compute. auto: per layer shape, whichever of int8 and weight-only measures "
                 "faster on this device at first use (the console log says what it chose). int8: the W8A8 integer "
                 "kernels. weight-only: int8 weights dequantized into the model's float type and float math on "
                 "unquantized activations (the route for devices without int8 kernels: Apple MPS, ROCm, Intel XPU)."})


def _compute_line(compute: str) -> str:
    """The report's line on the compute route, for the device ComfyUI runs the model on."""
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    kernels.fixed_route(compute, device)  # refuses int8 where there are no int8 kernels, before any work
    reason = kernels.int8_unavailable(device)
    if reason:
        return f"compute: weight-only on {device} ({reason})"
    skips = compute == "auto" and kernels.auto_skips_int8(device)
    if skips:
        return f"compute: auto on {device}: weight-only ({skips})"
    if compute == "auto":
        return (f"compute: auto on {device}: int8 kernels where they measure faster than weight-only, per layer shape "
                f"at first use (logged)")
    return f"compute: {compute} on {device}"


def _kept(result) -> str:
    """What the weight-only route keeps beside the int8 codes (in the size ComfyUI is told)."""
    kept = kept_float_bytes(result.modules.values())
    return f"; its float weights kept in memory: {kept / 2**20:,.0f} MiB" if kept else ""


def _skip_patterns(text: str) -> tuple[str, ...]:
    return tuple(p for p in re.split(r"[\s,]+", text) if p)


class QVDCalibrate:
    """Sample the model on the given prompts and record the activation statistics QVD needs."""

    @classmethod
    def INPUT_TYPES(cls):
        import comfy.samplers

        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to calibrate (with its AnimateDiff motion models)."}),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "latent_image": ("LATENT", {"tooltip": "Latent batch (frames) sampled during calibration."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
                "steps": ("INT", {"default": 10, "min": 1, "max": 1000}),
                "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
                "sampler_name": (comfy.samplers.KSampler.SAMPLERS,),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS,),
                "calibration_seeds": ("INT", {"default": 1, "min": 1, "max": 64,
                                              "tooltip": "Number of sampling runs (seed, seed+1, ...)."}),
            },
            "optional": {
                "save_name": ("STRING", {"default": "", "tooltip": "If set, also save the calibration as "
                                         "models/qvd/<name>.calibration.safetensors (never overwritten)."}),
                "timestep_coverage": ("INT", {
                    "default": COVERAGE_POINTS, "min": 0, "max": 100,
                    "tooltip": "Points spread over the model's whole noise schedule: at each one the sampler did not "
                               "come near, one extra model call on a sampled latent noised to it, so the file also "
                               "suits other step counts and samplers. 0: only the timesteps sampled."}),
            },
        }

    RETURN_TYPES = ("QVD_CALIBRATION",)
    RETURN_NAMES = ("calibration",)
    FUNCTION = "calibrate"
    OUTPUT_NODE = True
    CATEGORY = "QVD"
    DESCRIPTION = ("Runs real sampling with QVD observers on the UNet, the motion models and the ControlNets applied "
                   "to the conditioning; outputs the statistics.")

    def calibrate(self, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler,
                  calibration_seeds, save_name="", timestep_coverage=COVERAGE_POINTS):
        import comfy.sample
        import comfy.samplers
        import comfy.utils

        path = _new_file(save_name, CALIBRATION_SUFFIX, "calibration") if save_name.strip() else None
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        mask, index = latent_image.get("noise_mask"), latent_image.get("batch_index")
        pbar = comfy.utils.ProgressBar(steps * calibration_seeds + timestep_coverage)
        sampled = []  # (seed, the latent it sampled)

        def sample(clone, s):
            logging.info("QVD Calibrate: sampling seed %d (%d steps)", s, steps)
            noise = comfy.sample.prepare_noise(latent, s, index)
            sampled.append((s, comfy.sample.sample(clone, noise, steps, cfg, sampler_name, scheduler, positive,
                                                   negative, latent, noise_mask=mask, seed=s, disable_pbar=True,
                                                   callback=lambda *_: pbar.update(1))))

        def cover(clone, i, sigmas):  # one Euler step from sigma: one model call on a sampled latent noised to it
            s, x0 = sampled[i % len(sampled)]
            comfy.sample.sample_custom(clone, comfy.sample.prepare_noise(x0, s + 1 + i, index), cfg,
                                       comfy.samplers.sampler_object("euler"), sigmas, positive, negative, x0,
                                       noise_mask=mask, seed=s + 1 + i, disable_pbar=True)
            pbar.update(1)

        start = time.monotonic()
        controlnets = patching.controlnets_in(positive, negative)
        calibration = patching.calibrate(model, QVDConfig(), range(seed, seed + calibration_seeds), sample,
                                         controlnets, cover, timestep_coverage)
        calibration.settings = {"sampler": sampler_name, "scheduler": scheduler, "steps": steps, "cfg": cfg,
                                "seeds": calibration_seeds, "latent": " x ".join(map(str, latent.shape))}
        pbar.update_absolute(steps * calibration_seeds + timestep_coverage)
        logging.info("QVD Calibrate: %d layers in %.1f s (%d timestep(s) sampled, %d added for coverage)",
                     len(calibration.layers), time.monotonic() - start,
                     len(calibration.timesteps) - len(calibration.coverage), len(calibration.coverage))
        if path is not None:
            save_calibration(path, calibration)
        in_cn = sum(n.startswith(patching.CONTROLNET) for n in calibration.layers)
        in_cns = f" ({in_cn} in {len(controlnets)} ControlNet(s))" if in_cn else ""
        text = (f"{len(calibration.layers)} layers{in_cns}, {len(calibration.timesteps)} timesteps "
                f"({len(calibration.coverage)} added for coverage)")
        return {"ui": {"text": [text + (f", saved {os.path.basename(path)}" if path else "")]},
                "result": (calibration,)}


QUANTIZE_INPUTS = {
    "calibration": ("QVD_CALIBRATION",),
    "weight_bits": ("INT", {"default": 8, "min": 4, "max": 8}),
    "activation_bits": ("INT", {"default": 8, "min": 6, "max": 8}),
    "htdq": ("BOOLEAN", {"default": True, "tooltip": "HiDi-TQ quantizer for timestep-embedding layers."}),
    "scri": ("BOOLEAN", {"default": True, "tooltip": "Per-channel shift/scale of activations (SCRI)."}),
    "skip": ("STRING", {"default": "", "multiline": True,
                        "tooltip": "Layer-name patterns kept in full precision (fnmatch, comma or newline separated), "
                                   "e.g. *.attn1.to_q"}),
}


def _quantizer(calibration, weight_bits, activation_bits, htdq, scri, skip, heads):
    """``build(tree, dtype)`` for ``patching.quantize`` / ``quantize_controlnet``: QVD's quantization of the tree's
    models from their statistics in ``calibration`` (``heads(tree)``: calibration name -> tree name of each model),
    with a progress bar."""
    import comfy.utils

    if not isinstance(calibration, Calibration):
        raise QVDError("calibration input is not a QVD calibration: connect QVD Calibrate's output")
    config = QVDConfig(w_bits=weight_bits, a_bits=activation_bits, htdq=htdq, scri=scri, skip=_skip_patterns(skip))
    bar = []

    def progress(done, total):
        if not bar:
            bar.append(comfy.utils.ProgressBar(total))
        bar[0].update_absolute(done, total)

    return lambda tree, _dtype: quantize_model(tree, calibration.subset(heads(tree)), config, apply=False,
                                               progress=progress)


class QVDQuantizeModel:
    """Quantize the model (UNet + motion models) to integer weights and activations with QVD."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), **QUANTIZE_INPUTS}, "optional": {"compute": COMPUTE_INPUT}}

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "report")
    FUNCTION = "quantize"
    CATEGORY = "QVD"
    DESCRIPTION = "Returns a quantized copy of the MODEL; the input MODEL is left unchanged."

    def quantize(self, model, calibration, weight_bits, activation_bits, htdq, scri, skip, compute="auto"):
        compute_line = _compute_line(compute)
        # every model of the calibration but its ControlNets: a calibration of another MODEL (e.g. with motion models
        # this one lacks) is refused by the layer check, not cut down to fit
        build = _quantizer(calibration, weight_bits, activation_bits, htdq, scri, skip, lambda _tree: {
            h: h for h in {n.partition(".")[0] for n in calibration.layers} if not h.startswith(patching.CONTROLNET)})
        start = time.monotonic()
        clone, result = patching.quantize(model, build, compute)
        report = describe(result) + "\n" + compute_line + _kept(result)
        logging.info("QVD Quantize Model: %d modules in %.1f s\n%s", len(result.modules), time.monotonic() - start, report)
        return {"ui": {"text": [report]}, "result": (clone, report)}


class QVDSaveQuantized:
    """Save the quantized layers of a QVD-quantized MODEL to models/qvd."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "filename": ("STRING", {"default": "qvd_w8a8"})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "QVD"

    def save(self, model, filename):
        path = _new_file(filename, EXTENSION, "file")
        with patching.result_to_save(model) as result:
            save_quantized(path, result)
        return {"ui": {"text": [f"saved {os.path.basename(path)}"]}}


class QVDLoadQuantized:
    """Apply a saved QVD file to the MODEL it was made from (and its motion models)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "qvd_name": (cls.file_names(),)},
                "optional": {"compute": COMPUTE_INPUT}}

    @staticmethod
    def file_names() -> list[str]:
        """The quantized files in models/qvd (calibration files left out)."""
        import folder_paths

        return [n for n in folder_paths.get_filename_list(MODEL_FOLDER) if not n.endswith(CALIBRATION_SUFFIX)]

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "report")
    FUNCTION = "load"
    CATEGORY = "QVD"

    def load(self, model, qvd_name, compute="auto"):
        compute_line = _compute_line(compute)
        path = _existing_file(qvd_name)
        clone, result = patching.quantize(model, lambda tree, dtype: load_quantized(path, tree, False, dtype), compute)
        report = describe(result, recorded=True) + "\n" + compute_line + _kept(result)
        return {"ui": {"text": [report]}, "result": (clone, report)}


class QVDQuantizeControlNet:
    """Quantize a ControlNet calibrated by QVD Calibrate (it was applied to the conditioning QVD Calibrate sampled)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"control_net": ("CONTROL_NET",), **QUANTIZE_INPUTS},
                "optional": {"compute": COMPUTE_INPUT}}

    RETURN_TYPES = ("CONTROL_NET", "STRING")
    RETURN_NAMES = ("control_net", "report")
    FUNCTION = "quantize"
    CATEGORY = "QVD"
    DESCRIPTION = ("Returns a quantized copy of the ControlNet (apply it with Apply ControlNet as usual); the input "
                   "ControlNet is left unchanged.")

    def quantize(self, control_net, calibration, weight_bits, activation_bits, htdq, scri, skip, compute="auto"):
        compute_line = _compute_line(compute)
        model = patching.control_model(control_net)
        key = f"{patching.CONTROLNET}_{content_key(model)}" if model is not None else None
        if isinstance(calibration, Calibration) and model is not None and not any(
                n.startswith(key + ".") for n in calibration.layers):
            raise QVDError("this ControlNet was not in the graph the calibration sampled: apply it (Apply ControlNet) "
                           "to the conditioning connected to QVD Calibrate, calibrate, then quantize it from that "
                           "calibration")
        build = _quantizer(calibration, weight_bits, activation_bits, htdq, scri, skip,
                           lambda tree: {key: patching.CONTROLNET})
        out, result = patching.quantize_controlnet(control_net, build, compute)
        report = describe(result) + "\n" + compute_line + _kept(result)
        logging.info("QVD Quantize ControlNet: %d modules\n%s", len(result.modules), report)
        return {"ui": {"text": [report]}, "result": (out, report)}


class QVDSaveQuantizedControlNet:
    """Save the quantized layers of a QVD-quantized ControlNet to models/qvd."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"control_net": ("CONTROL_NET",), "filename": ("STRING", {"default": "qvd_controlnet"})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "QVD"

    def save(self, control_net, filename):
        result = patching.controlnet_result(control_net)
        path = _new_file(filename, EXTENSION, "file")
        save_quantized(path, result)
        return {"ui": {"text": [f"saved {os.path.basename(path)}"]}}


class QVDLoadQuantizedControlNet:
    """Apply a saved QVD ControlNet file to the ControlNet it was made from."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"control_net": ("CONTROL_NET",), "qvd_name": (QVDLoadQuantized.file_names(),)},
                "optional": {"compute": COMPUTE_INPUT}}

    RETURN_TYPES = ("CONTROL_NET", "STRING")
    RETURN_NAMES = ("control_net", "report")
    FUNCTION = "load"
    CATEGORY = "QVD"

    def load(self, control_net, qvd_name, compute="auto"):
        compute_line = _compute_line(compute)
        path = _existing_file(qvd_name)
        out, result = patching.quantize_controlnet(control_net,
                                                   lambda tree, dtype: load_quantized(path, tree, False, dtype),
                                                   compute)
        report = describe(result, recorded=True) + "\n" + compute_line + _kept(result)
        return {"ui": {"text": [report]}, "result": (out, report)}


def describe(result, recorded: bool = False) -> str:
    """The node's report: ``summarize`` of the layers, then what the calibration covered and the precision the
    quantized weights were taken at (a file's values checked against this model: ``qvd/verify.py``; its errors
    ``recorded`` when it was made, not measured here)."""
    lines = [summarize(result.report, recorded)]
    ts = result.calibrated.get("timesteps") or []
    patches = result.calibrated.get("patches")
    covered = result.calibrated.get("coverage") or []
    settings = result.calibrated.get("settings") or {}
    if ts:
        lines.append(f"calibrated at {len(ts)} timestep(s), t = {max(ts):g} .. {min(ts):g}, on "
                     f"{result.calibrated['layers']} layers"
                     + (f", with {len(patches)} attention patch(es) applied (e.g. {patches[0]})" if patches else ""))
    if covered or settings:
        order = ("sampler", "scheduler", "steps", "cfg", "seeds", "latent")  # files keep their keys sorted
        keys = [k for k in order if k in settings] + sorted(set(settings) - set(order))
        how = ", ".join(f"{k} {settings[k]:g}" if isinstance(settings[k], (int, float)) else f"{k} {settings[k]}"
                        for k in keys)
        lines.append((f"sampled with {how}; " if how else "")
                     + f"{len(covered)} of the timesteps added to cover the noise schedule"
                     + ("" if covered else " (a file of the sampled timesteps only: other step counts / samplers see "
                                           "activations it was not fit to)"))
    edges = result.clock.edges
    if edges:
        lines.append(f"{len(edges) + 1} activation scales per W8A8 layer, one per timestep interval (edges "
                     f"{', '.join(f'{e:g}' for e in edges)}), picked from each model call's timestep")
    cond = [r["name"] for r in result.report if r.get("conditioning")]
    if cond:
        lines.append(f"conditioning path (input the same at every calibrated timestep, e.g. {cond[0]}): {len(cond)} "
                     f"layers without prompt-specific SCRI")
    temporal = [r for r in result.report if r.get("kind") == "temporal" or r.get("tdscore") is not None]
    if temporal:
        found = sorted({"config pattern" if "config pattern" in r.get("role", "") else "observed" for r in temporal})
        lines.append(f"temporal (one input vector per sample that changes with the timestep; {', '.join(found)}): "
                     f"{len(temporal)} layers, e.g. {temporal[-1]['name']}, "
                     f"{sum(r['handler'] == 'hiditq' for r in temporal)} on HiDi-TQ")
    lines.extend(_ends(result))
    dtypes = sorted({r["weight_dtype"] for r in result.report if r.get("weight_dtype")})
    if dtypes:
        lines.append(f"weights quantized from {' / '.join(dtypes)}")
    return "\n".join(lines)


def _ends(result) -> list[str]:
    """The first / last layers the calibration found (from its call graph), and what became of each."""
    handled = {r["name"]: "float" if "skipped" in r else f"W{r['w_bits']}A{r['a_bits']}" for r in result.report}
    lines = []
    for role, what in (("first", "reading the model's input"), ("last", "giving the model's output")):
        names = (result.calibrated.get("roles") or {}).get(role) or []
        if names:
            lines.append(f"{role} layers ({what}, from the calibrated call graph): " + ", ".join(
                f"{n} ({handled.get(n, 'not a Linear / Conv2d: runs as the model has it')})" for n in names[:6])
                + (f" and {len(names) - 6} more" if len(names) > 6 else ""))
    return lines


def summarize(report: list[dict], recorded: bool = False) -> str:
    """One line per (model, layer kind, bit widths): layer count, how many each handler took (for layers kept in
    float: why) and the mean relative output error (``recorded``: as a file recorded it when it was made)."""
    groups: dict[tuple, list] = {}
    for r in report:
        head = r["name"].partition(".")[0]
        tree = "unet" if head == patching.UNET else "controlnet" if head == patching.CONTROLNET else "motion"
        bits = "fp" if "skipped" in r else f"W{r['w_bits']}A{r['a_bits']}"
        groups.setdefault((tree, r["kind"], bits), []).append(r)
    lines = []
    for (tree, kind, bits), rows in sorted(groups.items()):
        how: dict[str, int] = {}
        for r in rows:
            key = r.get("skipped") or r.get("handler", "")
            how[key] = how.get(key, 0) + 1
        known = [r["out_rel_err"] for r in rows if r.get("out_rel_err") is not None]
        err = (f", mean rel. output error {sum(known) / len(known):.2e}"
               + (" (recorded in the file when it was made)" if recorded else "")) if known else ""
        lines.append(f"{tree} {kind}: {len(rows)} x {bits} ({', '.join(f'{k} {v}' for k, v in how.items())}){err}")
    return "\n".join(lines)


NODE_CLASS_MAPPINGS = {
    "QVDCalibrate": QVDCalibrate,
    "QVDQuantizeModel": QVDQuantizeModel,
    "QVDSaveQuantized": QVDSaveQuantized,
    "QVDLoadQuantized": QVDLoadQuantized,
    "QVDQuantizeControlNet": QVDQuantizeControlNet,
    "QVDSaveQuantizedControlNet": QVDSaveQuantizedControlNet,
    "QVDLoadQuantizedControlNet": QVDLoadQuantizedControlNet,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "QVDCalibrate": "QVD Calibrate",
    "QVDQuantizeModel": "QVD Quantize Model",
    "QVDSaveQuantized": "QVD Save Quantized",
    "QVDLoadQuantized": "QVD Load Quantized",
    "QVDQuantizeControlNet": "QVD Quantize ControlNet",
    "QVDSaveQuantizedControlNet": "QVD Save Quantized ControlNet",
    "QVDLoadQuantizedControlNet": "QVD Load Quantized ControlNet",
}
