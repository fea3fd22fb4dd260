"""Model identity: which layers QVD quantizes, what must match between a model and a QVD file, and
installing replacement modules by name."""
from __future__ import annotations

import hashlib
import json

from torch import nn

from .config import QVDConfig, matches
from .errors import ModelMismatchError


def is_quantizable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d)) and not getattr(module, "qvd_quantized", False)


def find_layers(root: nn.Module, cfg: QVDConfig) -> dict[str, nn.Module]:
    """Linear / Conv2d layers under ``root`` that QVD quantizes (``cfg.skip`` excluded)."""
    return {n: m for n, m in root.named_modules() if n and is_quantizable(m) and not matches(n, cfg.skip)}


def layer_signature(module: nn.Module) -> list:
    """What must match between calibration, quantized file and model: type and weight shape."""
    kind = "linear" if isinstance(module, nn.Linear) else "conv"
    return [kind, list(module.weight.shape)]


def fingerprint(layers: dict[str, list]) -> str:
    return hashlib.sha256(json.dumps(layers, sort_keys=True).encode()).hexdigest()[:16]


def content_key(root: nn.Module, values: int = 8) -> str:
    """A short key for the weights of ``root``: names, shapes and the first ``values`` weight values of each Linear /
    Conv2d (two trained models of one architecture, e.g. two ControlNets, differ there; reading it copies a few
    numbers per layer)."""
    parts = [[n, list(m.weight.shape), m.weight.detach().flatten()[:values].double().cpu().tolist()]
             for n, m in root.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]


def check_layers(expected: dict[str, list], model_layers: dict[str, list], what: str) -> None:
    """Raise ModelMismatchError naming the first differences between two name -> signature maps."""
    missing = sorted(set(expected) - set(model_layers))
    wrong = sorted(n for n in set(expected) & set(model_layers) if expected[n] != model_layers[n])
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} layer(s) absent from the model, e.g. {missing[:3]}")
        if wrong:
            n = wrong[0]
            parts.append(f"{len(wrong)} layer(s) with other shapes, e.g. {n}: {expected[n]} vs {model_layers[n]}")
        raise ModelMismatchError(f"{what} was made from a different model ({'; '.join(parts)}). "
                                 f"Use the model it was made from, or calibrate / quantize this model anew.")


def install(root: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Replace submodules of ``root`` by name."""
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, child, module)
