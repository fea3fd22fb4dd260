"""The QVD file format: one ``.safetensors`` file per quantized model.

Tensors, per quantized layer ``<name>``: ``<name>.weight`` (int8 codes of ``W * s``), ``.weight_scale``,
``.bias`` (the layer's own), ``.act_scale``, optional ``.scri_shift`` / ``.scri_inv_scale`` (W8A8 layers;
applied by the quantize kernel, or by the preceding norm when ``scri_in_norm``) or ``.levels`` (HiDi-TQ
temporal layers); per norm that absorbed SCRI: ``<name>.weight`` / ``<name>.bias``.
Metadata: a single key ``"qvd"`` holding sorted JSON: ``format``, ``format_version``, ``config``, the
source model's ``fingerprint`` and layer signatures, the ``layers`` map (kind, shapes, bits, zero point,
weight error), the ``norms`` map, the per-layer ``report`` and a sha256 ``checksum`` of the tensor data.
Loading refuses: another format version, a truncated / corrupt file (parse error or checksum), and a
model whose layers differ in name / shape or whose weights are not those the file was made from.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from .calibrate import check_layers, layer_signature
from .config import QVDConfig
from .errors import ModelMismatchError, QuantizedFileError
from .modules import HiDiTQLinear, QConv2d, QLinear
from .quantize import QuantizeResult, install

FORMAT = "qvd-w8a8"
FORMAT_VERSION = 1  # bump when the layout above changes
_TENSOR_FIELDS = ("weight", "weight_scale", "bias", "act_scale", "scri_shift", "scri_inv_scale", "levels")


def atomic_save(tensors: dict, metadata: dict, path: str, overwrite: bool = False) -> None:
    """Write a safetensors file via a temp file + rename; never replace an existing file unless asked."""
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists: choose another file name (nothing was overwritten)")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".qvd-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        if not overwrite and os.path.exists(path):
            raise FileExistsError(f"{path} appeared while saving: choose another file name")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_safetensors(path: str) -> tuple[dict, dict]:
    """(tensors, metadata), with file errors turned into QuantizedFileError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise QuantizedFileError(f"{path} does not exist: check the file name / models folder")
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
        return load_file(path), metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise QuantizedFileError(f"{path} is truncated or corrupt ({e}); save or download it again") from None


def _checksum(tensors: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous().reshape(-1)
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _layer_meta(module: nn.Module) -> dict:
    if isinstance(module, HiDiTQLinear):
        return {"kind": "temporal", "in": module.in_features, "out": module.out_features, "w_bits": module.w_bits}
    meta = {"w_bits": module.w_bits, "a_bits": module.a_bits, "zero_point": module.act_zero_point,
            "scri_in_norm": module.scri_in_norm}
    if isinstance(module, QLinear):
        return {"kind": "linear", "in": module.in_features, "out": module.out_features, **meta}
    return {"kind": "conv", "in": module.in_channels, "out": module.out_channels, "kernel": list(module.kernel_size),
            "stride": module.stride, "padding": module.padding, **meta}


def save_quantized(path: str, root: nn.Module, result: QuantizeResult, overwrite: bool = False) -> None:
    """Save the quantized layers of ``result`` (made from ``root``'s fp weights) to one file, atomically."""
    tensors, layers, norms = {}, {}, {}
    w_err = {r["name"]: r.get("w_rel_err") for r in result.report}
    for name, module in result.modules.items():
        if getattr(module, "qvd_quantized", False):
            layers[name] = {**_layer_meta(module), "w_rel_err": w_err.get(name)}
            for field in _TENSOR_FIELDS:
                t = getattr(module, field, None)
                if t is not None:
                    tensors[f"{name}.{field}"] = t
        else:  # a norm that absorbed the SCRI transform
            norms[name] = type(module).__name__
            tensors[f"{name}.weight"], tensors[f"{name}.bias"] = module.weight, module.bias
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": result.config.to_dict(),
            "fingerprint": result.fingerprint, "signatures": result.signatures, "layers": layers, "norms": norms,
            "report": result.report, "checksum": _checksum(tensors)}
    atomic_save(tensors, {"qvd": json.dumps(meta, sort_keys=True)}, path, overwrite)


def _verify_weights(name: str, fp_module: nn.Module, q: nn.Module, recorded: float | None) -> None:
    """Refuse a file whose dequantized weights are not those of ``fp_module`` (another checkpoint)."""
    if recorded is None:
        return
    w = fp_module.weight.detach().float().cpu()
    deq = q.weight.float().cpu() * q.weight_scale.float().cpu().view(-1, *([1] * (w.dim() - 1)))
    inv = getattr(q, "scri_inv_scale", None)
    if inv is not None:  # SCRI: the stored weight is W * s
        deq = deq * inv.float().cpu().view(1, -1, *([1] * (w.dim() - 2)))
    err = float((deq - w).norm() / w.norm().clamp_min(1e-30))
    if err > 2 * recorded + 2e-3:
        raise ModelMismatchError(
            f"layer {name}: the file's weights differ from this model's ({err:.3g} vs {recorded:.3g} relative "
            f"error when quantized): the file was made from a different checkpoint. Load it onto the model it was "
            f"made from, or quantize this model anew")


def load_quantized(path: str, root: nn.Module, apply: bool = True, verify_weights: bool = True) -> QuantizeResult:
    """Rebuild the quantized layers stored in ``path`` for the fp model ``root``."""
    tensors, metadata = read_safetensors(path)
    try:
        meta = json.loads(metadata["qvd"])
    except (KeyError, ValueError):
        raise QuantizedFileError(f"{path} is not a QVD quantized model (no 'qvd' header): pick a file saved by "
                                 f"QVD Save Quantized / qvd.save_quantized") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise QuantizedFileError(f"{path} has format {meta.get('format')} version {meta.get('format_version')}; "
                                 f"this QVD reads {FORMAT} version {FORMAT_VERSION}: quantize the model again "
                                 f"or update ComfyUI-QVD")
    if _checksum(tensors) != meta.get("checksum"):
        raise QuantizedFileError(f"{path} is corrupt (tensor checksum mismatch); save or download it again")
    named = dict(root.named_modules())
    if any(getattr(m, "qvd_quantized", False) for m in named.values()):
        raise QuantizedFileError("this model is already quantized: load the file onto the full-precision model")
    model_sigs = {n: layer_signature(m) for n, m in named.items() if isinstance(m, (nn.Linear, nn.Conv2d))}
    check_layers(meta["signatures"], model_sigs, f"the quantized file {os.path.basename(path)}")
    modules = {}
    for name, info in meta["layers"].items():
        t = {f: tensors.get(f"{name}.{f}") for f in _TENSOR_FIELDS}
        if info["kind"] == "temporal":
            q = HiDiTQLinear(info["in"], info["out"], t["weight"], t["weight_scale"], t["bias"], t["levels"],
                             info["w_bits"])
        else:
            kw = dict(weight_q=t["weight"], weight_scale=t["weight_scale"], bias=t["bias"],
                      act_scale=float(t["act_scale"]), act_zero_point=info["zero_point"], w_bits=info["w_bits"],
                      a_bits=info["a_bits"], scri_shift=t["scri_shift"], scri_inv_scale=t["scri_inv_scale"],
                      scri_in_norm=info["scri_in_norm"])
            if info["kind"] == "linear":
                q = QLinear(info["in"], info["out"], **kw)
            else:
                q = QConv2d(info["in"], info["out"], info["kernel"], info["stride"], info["padding"], **kw)
        if verify_weights:
            _verify_weights(name, named[name], q, info.get("w_rel_err"))
        modules[name] = q.to(named[name].weight.device)
    for name in meta["norms"]:
        if name not in named:
            raise ModelMismatchError(f"norm {name} of {path} is absent from this model: wrong model")
        norm = copy.deepcopy(named[name])
        with torch.no_grad():
            norm.weight.copy_(tensors[f"{name}.weight"])
            norm.bias.copy_(tensors[f"{name}.bias"])
        modules[name] = norm
    if apply:
        install(root, modules)
    return QuantizeResult(modules, meta["report"], QVDConfig.from_dict(meta["config"]), meta["signatures"])
