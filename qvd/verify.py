"""A quantized file checked against the user's own model: every value the model determines is recomputed from it.

A checksum only proves that a file is what its writer wrote; anyone can write a new one. So before a module is
built, ``check_against_model`` recomputes from the model, in absolute terms, what quantization derives from it:

- layers: names, kinds and weight shapes; a conv's stride, padding, dilation, groups and padding mode;
- weight scales: within what the model's own weight allows for the file's clipping search (``minmax``: the
  channel's ``max |W s| / qmax``; ``mse``: between the search's smallest clip and that);
- int8 codes: the model's weight (``W s`` with SCRI) rounded on the file's scales, exactly up to ties;
- biases: the model's own (the SCRI fold ``b + W z`` is recomputed at run time from it);
- folded norms: the model's norm with the file's own SCRI transform folded in, each named norm feeding its layers
  (a LayerNorm feeds Linears, a GroupNorm 1x1 convs, of the same width and in the same block), all of them taking
  one transform.

Where the model is held at another precision than the file's source (``weight_dtype`` in its report, e.g. fp32
quantized, fp16 loaded) the comparisons allow that precision's rounding and nothing more. What the model cannot
determine (activation scales and zero points, SCRI shift and scale, HiDi-TQ levels, bit widths) comes from
whoever calibrated the file and is checked for range and consistency only (``io.py``).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .config import QVDConfig
from .errors import ModelMismatchError, QuantizedFileError
from .identity import check_layers, layer_signature
from .quantize import norm_group_folds
from .quantizers import MSE_SMALLEST_CLIP, weight_qmax
from .safefile import DTYPES as _FILE_DTYPES
from .scri import ScriTransform

DTYPES = {k: v for k, v in _FILE_DTYPES.items() if v.is_floating_point}  # a layer's source weight_dtype
_ARITHMETIC = 2.0 ** -20  # relative slack for fp32 recomputation (an inverse stored as 1 / s, summation order)


def precision_slack(file_dtype: str | None, model_dtype: torch.dtype) -> tuple[float, float]:
    """(relative, absolute) difference allowed between a weight the file was made from and the model's: the
    coarser precision's rounding (its spacing, and its subnormals' spacing near 0); none when the model holds the
    weight at the file's precision (the same checkpoint gives the same values)."""
    src = DTYPES.get(file_dtype, model_dtype)
    if src == model_dtype:
        return 0.0, 0.0
    coarse = max(torch.finfo(src), torch.finfo(model_dtype), key=lambda f: f.eps)
    return coarse.eps, coarse.eps * coarse.smallest_normal


class _Check:
    def __init__(self, path):
        self.path = os.fspath(path)

    def mismatch(self, where: str, what: str, expected: str):
        raise ModelMismatchError(f"{self.path}: {where}: {what}, expected {expected}. The file was edited or made from "
                                 f"a different checkpoint: load it onto the model it was made from, or quantize this "
                                 f"model anew")

    def close(self, where: str, field: str, got: torch.Tensor, want: torch.Tensor, tol: torch.Tensor,
              first_row: int = 0, total: int | None = None) -> None:
        """``got`` equals ``want`` within ``tol`` (elementwise), else name the first element that is not (``got``
        may be rows ``first_row..`` of a tensor of ``total`` values)."""
        bad = (got - want).abs_() > tol
        if bool(bad.any()):
            i = int(bad.reshape(-1).nonzero()[0])
            idx = [int(j) for j in torch.unravel_index(torch.tensor(i), got.shape)] if got.dim() else []
            if idx:
                idx[0] += first_row
            self.mismatch(f"layer {where}", f"{'at least ' if total else ''}{int(bad.sum())} of {total or got.numel()} "
                          f"values of {field} differ from this model's (e.g. at {idx}: "
                          f"{float(got.reshape(-1)[i]):.9g})", f"{float(want.reshape(-1)[i]):.9g}")


_CHUNK = 1 << 22  # values compared at a time: bounds the check's memory on the widest layers


def check_weights(c: _Check, name: str, w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bits: int,
                  clip: str, scri: ScriTransform | None, slack: tuple[float, float]) -> None:
    """Scales within what ``w`` (the model's weight) allows for ``clip``; codes = ``w s`` rounded on them."""
    qmax = weight_qmax(bits)
    rel, tiny = _ARITHMETIC + slack[0], slack[1] / qmax
    rows_w, rows_q = w.reshape(w.shape[0], -1), codes.reshape(w.shape[0], -1)
    col_scale = None if scri is None else scri.scale.view(-1, *([1] * (w.dim() - 2))).expand(w.shape[1:]).reshape(1, -1)
    step = max(1, _CHUNK // rows_w.shape[1])
    for r0 in range(0, rows_w.shape[0], step):
        rows = rows_w[r0:r0 + step].float().cpu()
        if col_scale is not None:
            rows = rows * col_scale
        s = scale[r0:r0 + step]
        hi = torch.maximum(-rows.amin(1), rows.amax(1)).clamp_min(1e-12) / qmax  # the quantizer's min-max scale
        lo = hi * (MSE_SMALLEST_CLIP if clip == "mse" else 1.0)
        bad = (s > hi * (1 + rel) + tiny) | (s < lo * (1 - rel) - tiny)
        if bool(bad.any()):
            n = int(bad.nonzero()[0])
            c.mismatch(f"layer {name}", f"weight_scale of output channel {r0 + n} is {float(s[n]):.9g}",
                       f"{float(hi[n]):.9g}" + (f" or down to {float(lo[n]):.9g} (the MSE clip search's range)"
                                                if clip == "mse" else " (max |W| / qmax of this model's weight)"))
        v = (rows / s[:, None]).clamp_(-qmax, qmax)  # never in place: ``rows`` may be the model's own weight
        # a code is the rounding of v; a value within the slack of a midpoint may round either way
        tol = v.abs().mul_(rel).add_(0.5 + 1e-6).add_(slack[1] / s[:, None])
        c.close(name, "the int8 codes (weight)", rows_q[r0:r0 + step].float(), v, tol, r0,
                None if step >= rows_w.shape[0] else codes.numel())


def check_against_model(path, meta: dict, tensors: dict[str, torch.Tensor], named: dict[str, nn.Module],
                        cfg: QVDConfig) -> None:
    """Refuse (``ModelMismatchError``) a file whose model-determined values are not those of ``named``'s model;
    ``meta`` and ``tensors`` already passed the file's schema (``io._check_quantized``)."""
    c = _Check(path)
    if any(getattr(m, "qvd_quantized", False) for m in named.values()):
        raise QuantizedFileError("this model is already quantized: load the file onto the full-precision model")
    model_sigs = {n: layer_signature(m) for n, m in named.items() if isinstance(m, (nn.Linear, nn.Conv2d))}
    check_layers(meta["signatures"], model_sigs, f"the quantized file {os.path.basename(c.path)}")
    dtypes = {r["name"]: r.get("weight_dtype") for r in meta["report"]}
    scri = {n: ScriTransform.stored(tensors.get(f"{n}.scri_shift"), tensors.get(f"{n}.scri_inv_scale"))
            for n in meta["layers"]}
    for n, info in meta["layers"].items():
        m = named[n]
        if info["kind"] == "conv" and (m.stride, m.padding, m.dilation, m.groups, m.padding_mode) != (
                (info["stride"],) * 2, (info["padding"],) * 2, (1, 1), 1, "zeros"):
            c.mismatch(f"layer {n}", f"stride {info['stride']} and padding {info['padding']} in the file",
                       f"stride {m.stride}, padding {m.padding} (dilation {m.dilation}, groups {m.groups}) as in "
                       f"this model")
        slack = precision_slack(dtypes.get(n), m.weight.dtype)
        check_weights(c, n, m.weight.detach(), tensors[f"{n}.weight"], tensors[f"{n}.weight_scale"], info["w_bits"],
                      cfg.weight_clip, scri[n], slack)
        b = tensors.get(f"{n}.bias")
        if (m.bias is None) != (b is None):
            c.mismatch(f"layer {n}", "the file has " + ("a bias" if b is not None else "no bias"),
                       "no bias (this model's layer has none)" if m.bias is None else "the model's bias")
        if b is not None:
            own = m.bias.detach().float().cpu()
            c.close(n, "bias", b, own, own.abs() * (_ARITHMETIC + slack[0]) + slack[1])
    _check_norms(c, meta, tensors, named, cfg, scri, dtypes)


def _check_norms(c: _Check, meta: dict, tensors: dict, named: dict[str, nn.Module], cfg: QVDConfig,
                 scri: dict[str, ScriTransform | None], dtypes: dict) -> None:
    """Each folded norm is the model's norm feeding the layers that name it, folded with their one transform."""
    groups: dict[str, list[str]] = {}
    for n, info in meta["layers"].items():
        if info.get("scri", "none").startswith("norm:"):
            groups.setdefault(info["scri"][5:], []).append(n)
    for norm_name, members in groups.items():
        norm = named.get(norm_name)
        if norm is None or type(norm).__name__ != meta["norms"][norm_name]:
            c.mismatch(f"norm {norm_name}", f"a {meta['norms'][norm_name]} in the file",
                       f"a norm of that type in this model (found {type(norm).__name__ if norm else 'none'})")
        block = _enclosing_block(named, norm_name)
        width = norm.weight.numel() if getattr(norm, "weight", None) is not None else 0
        wrong = [m for m in members if block and not m.startswith(block + ".")] or [
            m for m in members if _input_width(named[m]) != width]
        if wrong or not norm_group_folds(norm, members, {m: named[m] for m in members}):
            bad = (wrong or members)[0]
            c.mismatch(f"layer {bad}", f"its SCRI is folded into norm {norm_name} ({type(norm).__name__}, "
                       f"{width} channels{', in block ' + block if block else ''})",
                       f"the norm that feeds it: a LayerNorm before Linears or a GroupNorm before 1x1 convs, of its "
                       f"input width ({_input_width(named[bad])}), in its own block")
        first = scri[members[0]]
        for m in members[1:]:
            if not (torch.equal(scri[m].shift, first.shift) and torch.equal(scri[m].scale, first.scale)):
                c.mismatch(f"layer {m}", f"a SCRI transform other than {members[0]}'s, both read from norm {norm_name}",
                           "one transform for every layer a norm feeds")
        rel, tiny = max(precision_slack(dtypes.get(m), norm.weight.dtype) for m in members)
        rel += _ARITHMETIC
        gamma, beta = norm.weight.detach().float().cpu(), norm.bias.detach().float().cpu()
        z, s = first.shift, first.scale
        c.close(f"{norm_name} (norm)", "the folded weight", tensors[f"{norm_name}.weight"], gamma / s,
                (gamma.abs() * rel + tiny) / s)
        c.close(f"{norm_name} (norm)", "the folded bias", tensors[f"{norm_name}.bias"], (beta - z) / s,
                ((beta.abs() + z.abs()) * rel + tiny) / s)


def _input_width(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def _enclosing_block(named: dict[str, nn.Module], name: str) -> str:
    """The nearest ancestor of ``name`` that is a block of its own, not a list / sequence / dict of modules."""
    parent = name.rpartition(".")[0]
    while parent and isinstance(named.get(parent), (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
        parent = parent.rpartition(".")[0]
    return parent
