"""A quantized file checked against the user's own model: every value the model determines is recomputed from it.

A checksum only proves that a file is what its writer wrote; anyone can write a new one. So before a module is
built, ``check_against_model`` recomputes from the model, in absolute terms, what quantization derives from it:

- layers: names, kinds and weight shapes; a conv's stride, padding, dilation, groups and padding mode;
- weight scales: within what the model's own weight allows for the file's clipping search (``minmax``: the
  channel's ``max |W s| / qmax``; ``mse``: between the search's smallest clip and that);
- int8 codes: the model's weight (``W s`` with SCRI) rounded on the file's scales, exactly up to ties;
- biases: the model's own (the SCRI fold ``b + W z`` is recomputed at run time from it);
- folded norms: the model's norm with the file's own SCRI transform folded in (a LayerNorm feeding Linears, a
  GroupNorm 1x1 convs, of the same width and in the same block), all of its layers taking one transform; which norm
  feeds which layer is then proven on the model's own calls (``FoldWiring``): the first call that runs a folded layer
  fed by anything but its named norm stops before it gives an output.

Where the model holds a tensor at another precision than the file's source (``weight_dtype`` / ``norm_dtype`` in its
report), the model's tensor is rounded to the source's precision and must then match exactly, or, where the model
holds fewer bits than the source, match within the model's own rounding (``held``): the slack comes from the model,
never from the file. What the model cannot determine (activation scales and zero points, SCRI shift and scale,
HiDi-TQ levels, bit widths) comes from whoever calibrated the file: checked for consistency (``io.py``) and bounded by
what a calibration of a model computing in the host's dtype gives (``_check_bounds``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from . import callgraph
from .config import QVDConfig
from .errors import ModelMismatchError, QuantizedFileError
from .identity import check_layers, layer_signature
from .quantize import norm_group_folds
from .quantizers import MSE_SMALLEST_CLIP, RANGE_FLOOR, act_qrange, dequantize_weight, weight_qmax
from .safefile import DTYPES as _FILE_DTYPES
from .scri import ScriTransform, folded_source, stand_for

DTYPES = {k: v for k, v in _FILE_DTYPES.items() if v.is_floating_point}  # a layer's source weight_dtype
_ARITHMETIC = 2.0 ** -20  # relative slack for fp32 recomputation (an inverse stored as 1 / s, summation order)


@dataclass(frozen=True)
class Held:
    """How a model tensor compares with the one a file was made from (``held``): rounded to the file's source precision
    (``round_to``, None: as it is), then equal within ``rel`` (relative) and ``tiny`` (absolute)."""
    round_to: torch.dtype | None
    rel: float
    tiny: float

    def source(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (the model's) as the file's source held it, as fp32 on the CPU."""
        t = t.detach().cpu()
        return (t if self.round_to is None else t.to(self.round_to)).float()


def held(file_dtype: str | None, model_dtype: torch.dtype, known: bool = True) -> Held:
    """The comparison for a file made at ``file_dtype`` (its report's ``weight_dtype`` / ``norm_dtype``; None: the
    model's own) of a model holding the tensor at ``model_dtype``; what it allows comes from the model:

    - the model holds every value the source could (fp32 held; fp16 or bf16 claimed): the model's tensor rounded to
      the claimed precision must give the file's values exactly (a claim of a coarser source buys no slack: it only
      names the rounding to redo);
    - the model lost some of what the source held (fp16 or bf16 loaded from an fp32 file, bf16 held for an fp16 one,
      fp16's narrower range for a bf16 one): within the coarser of the two roundings, the information the model no
      longer has (and the source's rounding of its subnormals).

    ``known=False`` (a file from before ``norm_dtype`` was recorded, compared on a norm): the claim is the layers'
    precision, not the norm's, so the two are compared within the coarser rounding whichever it is."""
    src = DTYPES.get(file_dtype, model_dtype)
    if src == model_dtype:
        return Held(None, 0.0, 0.0)
    mine, theirs = torch.finfo(model_dtype), torch.finfo(src)
    if known and mine.eps < theirs.eps and mine.smallest_normal <= theirs.smallest_normal:
        return Held(src, 0.0, 0.0)
    return Held(src if mine.eps < theirs.eps else None, max(mine.eps, theirs.eps),
                max(mine.eps * mine.smallest_normal, theirs.eps * theirs.smallest_normal))


class _Check:
    def __init__(self, path):
        self.path = os.fspath(path)

    def unreachable(self, where: str, what: str, expected: str):
        raise QuantizedFileError(f"{self.path}: {where} {what}, expected {expected}: no calibration gives it; the file "
                                 f"is damaged or was edited: save or download it again, or quantize the model anew")

    def bound(self, tensor: str, what: str, value: float, dtype: torch.dtype) -> None:
        """``value`` (the largest magnitude of ``what`` the tensor gives) within what ``dtype`` holds."""
        big = torch.finfo(dtype).max
        if not value <= big:
            self.unreachable(f"tensor '{tensor}'", f"gives a {what} of {value:.3g}",
                             f"at most {big:.6g} where the layer computes in {str(dtype).removeprefix('torch.')}")

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
                  clip: str, scri: ScriTransform | None, how: Held) -> None:
    """Scales within what ``w`` (the model's weight, compared as ``how`` says) allows for ``clip``; codes = ``w s``
    rounded on them."""
    qmax = weight_qmax(bits)
    rel, tiny = _ARITHMETIC + how.rel, how.tiny / qmax
    rows_w, rows_q = w.reshape(w.shape[0], -1), codes.reshape(w.shape[0], -1)
    col_scale = None if scri is None else scri.scale.view(-1, *([1] * (w.dim() - 2))).expand(w.shape[1:]).reshape(1, -1)
    step = max(1, _CHUNK // rows_w.shape[1])
    for r0 in range(0, rows_w.shape[0], step):
        rows = how.source(rows_w[r0:r0 + step])
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
        tiny_codes = how.tiny / s[:, None] * (1 if col_scale is None else col_scale)  # a weight's slack, in codes
        tol = v.abs().mul_(rel).add_(0.5 + 1e-6).add_(tiny_codes)
        c.close(name, "the int8 codes (weight)", rows_q[r0:r0 + step].float(), v, tol, r0,
                None if step >= rows_w.shape[0] else codes.numel())


def check_against_model(path, meta: dict, tensors: dict[str, torch.Tensor], named: dict[str, nn.Module],
                        cfg: QVDConfig, compute_dtype: torch.dtype | None = None) -> None:
    """Refuse (``ModelMismatchError``) a file whose model-determined values are not those of ``named``'s model, and
    (``QuantizedFileError``) one whose calibrated values no calibration of it could give where it runs in
    ``compute_dtype`` (None: each layer's weight dtype; ``_check_bounds``); ``meta`` and ``tensors`` already passed the
    file's schema (``io._check_quantized``)."""
    c = _Check(path)
    if any(getattr(m, "qvd_quantized", False) for m in named.values()):
        raise QuantizedFileError("this model is already quantized: load the file onto the full-precision model")
    model_sigs = {n: layer_signature(m) for n, m in named.items() if isinstance(m, (nn.Linear, nn.Conv2d))}
    check_layers(meta["signatures"], model_sigs, f"the quantized file {os.path.basename(c.path)}")
    reports = {r["name"]: r for r in meta["report"]}
    scri = {n: ScriTransform.stored(tensors.get(f"{n}.scri_shift"), tensors.get(f"{n}.scri_inv_scale"))
            for n in meta["layers"]}
    for n, info in meta["layers"].items():
        m = named[n]
        if info["kind"] == "conv" and (m.stride, m.padding, m.dilation, m.groups, m.padding_mode) != (
                (info["stride"],) * 2, (info["padding"],) * 2, (1, 1), 1, "zeros"):
            c.mismatch(f"layer {n}", f"stride {info['stride']} and padding {info['padding']} in the file",
                       f"stride {m.stride}, padding {m.padding} (dilation {m.dilation}, groups {m.groups}) as in "
                       f"this model")
        claim = reports.get(n, {}).get("weight_dtype")  # the source's precision (the bias's too)
        how = held(claim, m.weight.dtype)
        check_weights(c, n, m.weight, tensors[f"{n}.weight"], tensors[f"{n}.weight_scale"], info["w_bits"],
                      cfg.weight_clip, scri[n], how)
        b = tensors.get(f"{n}.bias")
        if (m.bias is None) != (b is None):
            c.mismatch(f"layer {n}", "the file has " + ("a bias" if b is not None else "no bias"),
                       "no bias (this model's layer has none)" if m.bias is None else "the model's bias")
        if b is not None:
            bias_how = held(claim, m.bias.dtype)
            own = bias_how.source(m.bias)
            c.close(n, "bias", b, own, own.abs() * (_ARITHMETIC + bias_how.rel) + bias_how.tiny)
        _check_bounds(c, n, info, tensors, scri[n], _runs_in(m, compute_dtype))
    _check_norms(c, meta, tensors, named, cfg, scri, reports)
    for norm in meta["norms"]:
        for field in ("weight", "bias"):
            c.bound(f"{norm}.{field}", "the folded norm's affine", float(tensors[f"{norm}.{field}"].abs().max()),
                    _runs_in(named[norm], compute_dtype))


def _runs_in(m: nn.Module, compute_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype ``m`` computes in: the host's, else its weight's (fp32 for an 8-bit storage dtype)."""
    dtype = compute_dtype or m.weight.dtype
    return dtype if dtype.is_floating_point and dtype.itemsize >= 2 else torch.float32


def _check_bounds(c: _Check, name: str, info: dict, tensors: dict, scri: ScriTransform | None,
                  dtype: torch.dtype) -> None:
    """The calibrated values of layer ``name`` (the model cannot recompute them) within what a calibration gives and
    what the layer, computing in ``dtype``, can use without overflowing: HiDi-TQ levels (holding 0) and SCRI shifts of
    values that dtype holds, the bias ``b + W z`` a shift makes within that dtype (a larger one gives inf in fp16), and
    activation ranges no narrower than the quantizer's floor. (An activation range wider than the dtype only wastes
    codes: the quantizer works in fp32.)"""
    if info["kind"] == "temporal":
        levels = tensors[f"{name}.levels"]
        c.bound(f"{name}.levels", "HiDi-TQ level", float(levels.abs().max()), dtype)
        if not bool((levels == 0).any()):
            c.unreachable(f"tensor '{name}.levels'", "has no level 0", "every HiDi-TQ table holds 0")
        return
    qmin, qmax = act_qrange(info["a_bits"])
    narrowest = float(tensors[f"{name}.act_scale"].min()) * (qmax - qmin)
    if narrowest < RANGE_FLOOR * (1 - 1e-6):
        c.unreachable(f"tensor '{name}.act_scale'", f"covers a range of {narrowest:.3g}",
                      f"at least {RANGE_FLOOR:g}, the quantizer's floor")
    if scri is not None:
        c.bound(f"{name}.scri_shift", "SCRI shift", float(scri.shift.abs().max()), dtype)
        bias = scri.folded_bias(dequantize_weight(tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"]),
                                tensors.get(f"{name}.bias"))
        c.bound(f"{name}.scri_shift", "bias b + W z", float(bias.abs().max()), dtype)


def _check_norms(c: _Check, meta: dict, tensors: dict, named: dict[str, nn.Module], cfg: QVDConfig,
                 scri: dict[str, ScriTransform | None], reports: dict) -> None:
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
        z, s = first.shift, first.scale
        claims = {(r.get("norm_dtype", r.get("weight_dtype")), "norm_dtype" in r)
                  for m in members for r in (reports.get(m, {}),)}
        for claim, known in sorted(claims, key=str):  # one, unless the file contradicts itself: then each must hold
            how = held(claim, norm.weight.dtype, known)
            rel, tiny = _ARITHMETIC + how.rel, how.tiny
            gamma, beta = how.source(norm.weight), how.source(norm.bias)
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


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or type(m).__name__.endswith("Norm")


def _is_weighted(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) or getattr(m, "qvd_quantized", False)


# Operations after which a value standing for a folded norm's output still does (each element keeps its channel):
# the reshapes, casts and concatenations between a norm and the layers it feeds (a reference attention's bank).
_KEEPS_CHANNELS = {"view", "reshape", "flatten", "unflatten", "permute", "transpose", "contiguous", "clone", "to",
                   "float", "half", "bfloat16", "detach", "cat", "concat", "concatenate", "stack", "__getitem__",
                   "expand", "repeat", "squeeze", "unsqueeze", "movedim"}


class _FollowingFolds(callgraph.Following):
    """A followed call in which values made from a folded norm's outputs by ``_KEEPS_CHANNELS`` operations stand for
    its output too."""

    def __init__(self, wiring: "FoldWiring"):
        super().__init__(wiring._graph, lambda: wiring._layers > 0)
        self.wiring = wiring

    def followed(self, name, args, kwargs, out) -> None:
        if name not in _KEEPS_CHANNELS:
            return
        given = list(callgraph.tensors_in(args[:1] if name not in ("cat", "concat", "concatenate", "stack") else args))
        norms = {folded_source(t, self.wiring._run_norms.values()) for t in given}
        if len(norms) == 1 and None not in norms:
            norm = norms.pop()
            for t in callgraph.tensors_in(out if isinstance(out, (list, tuple)) else (out,)):
                stand_for(norm, t)


class FoldWiring:
    """Proof, on the model's own calls, that each layer whose SCRI a loaded file folds into a norm reads that norm's
    output: names, widths and blocks (``check_against_model``) cannot tell two norms of one block apart (norm2 feeding
    cross-attention, norm3 the feed-forward), the call can.

    A folded layer must read its norm's output itself, as calibration saw it (or a value made from it by reshapes,
    casts and concatenations, or given back by a host patch and folded again: ``scri.stand_for``). The first model
    call after the load is followed whole (``callgraph``: norms, weighted layers and the model's input tag what they
    give, every other torch operation passes the tags on), so a folded layer reading anything else, or a layer outside a
    norm's group reading a norm the file folds, stops the call with ``ModelMismatchError`` naming the file, the layer,
    the norm named and what feeds it, before any output. A folded layer that did not run in that call is checked when
    it runs (its input stands for its norm: proven; for another folded norm: refused; neither: the next call is
    followed). A proven layer is not looked at again; once all are, nothing is."""

    def __init__(self, path, modules: dict[str, nn.Module], folds: dict[str, str]):
        self.path = os.fspath(path)
        self.pending = dict(folds)  # folded layer -> the norm the file names
        self._folded = frozenset(folds)
        self.groups: dict[str, list[str]] = {}
        for layer, norm in sorted(folds.items()):
            self.groups.setdefault(norm, []).append(layer)
        self._norms = {n: modules[n] for n in self.groups}
        self._run_norms = self._norms  # the folded norms of the tree a followed call runs (a copy's, for a copy)
        self._follow = bool(folds)  # the next model call is followed whole
        self._root = None
        self._depth = 0  # model calls in progress (a nested call is part of the outer one's graph)
        self._layers = 0  # weighted layers' forwards in progress (their inner operations are not followed)
        self._graph = self._mode = None
        self._handles = []
        for name, m in modules.items():
            m.qvd_name = name  # the file's name: the tag of the module's output in a followed call
        self._layer_handles = {layer: modules[layer].register_forward_pre_hook(self._layer_reads(layer, norm),
                                                                               with_kwargs=True)
                               for layer, norm in folds.items()}

    def __bool__(self) -> bool:
        """Whether some folded layer is still unproven."""
        return bool(self.pending)

    @property
    def idle(self) -> bool:
        """No model call is in progress."""
        return self._depth == 0

    def begin(self, root: nn.Module, args=(), kwargs=None) -> None:
        """A model call of ``root`` (with these arguments) starts: followed whole when due."""
        if self._depth and root is self._root:  # a call of the same root cannot be nested: the last one never ended
            self._follow |= self._mode is not None  # (interrupted: hooks run ``end`` on exceptions only): close it,
            self._depth = 1  # and follow this call in its place
            self.end()
        self._depth += 1
        if self._depth > 1:
            return
        self._root = root
        if not (self.pending and self._follow):
            return
        self._follow = False
        self._graph = callgraph.Provenance()
        self._graph.start(callgraph.tensors_in((*args, *(kwargs or {}).values())))
        self._run_norms = {}
        for name, m in root.named_modules():
            label = getattr(m, "qvd_name", name)
            if _is_weighted(m):
                self._handles.append(m.register_forward_pre_hook(self._enters(label), with_kwargs=True))
                self._handles.append(m.register_forward_hook(self._gives(label, layer=True), always_call=True))
            elif _is_norm(m):
                self._handles.append(m.register_forward_hook(self._gives(label)))
                if getattr(m, "qvd_scri_norm", False) and label in self._norms:
                    self._run_norms[label] = m
        self._layers = 0
        self._mode = _FollowingFolds(self)
        self._mode.__enter__()

    def end(self) -> None:
        """The model call ends (also when it raised)."""
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth:
            return
        self._root = None
        if self._mode is None:
            return
        self._mode.__exit__(None, None, None)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._graph.stop()
        self._graph = self._mode = None
        self._run_norms = self._norms

    def _enters(self, label: str):
        def hook(_module, args, kwargs):
            if self._layers == 0 and label not in self._folded:  # a layer outside every group: reads no folded norm
                x = args[0] if args else kwargs.get("input")
                folded = sorted(self._graph.get(x) & self.groups.keys()) if torch.is_tensor(x) else []
                if folded:
                    group = self.groups[folded[0]]
                    raise ModelMismatchError(
                        f"{self.path}: layer {label} reads the output of norm {folded[0]}, into which the file folds "
                        f"the SCRI of {group[0]}{f' and {len(group) - 1} more' if len(group) > 1 else ''}, but not "
                        f"this layer's: a fold changes what every layer reading the norm sees. The file was edited: "
                        f"load it as it was saved, or quantize this model anew")
            self._layers += 1
        return hook

    def _gives(self, label: str, layer: bool = False):
        def hook(_module, _args, output):
            if layer:
                self._layers -= 1
            if self._layers == 0 and self._graph is not None:
                for t in callgraph.tensors_in((output,)):
                    self._graph.set(t, frozenset((label,)))
        return hook

    def _layer_reads(self, layer: str, norm: str):
        def hook(_module, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            if layer not in self.pending or self._layers or not torch.is_tensor(x):
                return
            fed = folded_source(x, self._run_norms.values())
            fed = None if fed is None else getattr(fed, "qvd_name", None)
            if fed == norm:
                del self.pending[layer]
                self._layer_handles.pop(layer).remove()
                return
            if fed is None and self._graph is None:  # not seen whole (a host patch's value?): follow the next call
                self._follow = True
                return
            sources = self._graph.get(x) if fed is None else frozenset((fed,))
            other = sorted(sources - {norm, callgraph.INPUT})
            reads = (f"the output of {other[0]}" if other else "the model's input" if callgraph.INPUT in sources else
                     "a value this call's graph does not lead to (computed outside torch)")
            if norm in sources and not other:
                reads = f"a value computed from norm {norm}'s output by operations a fold does not pass (an addition?)"
            raise ModelMismatchError(
                f"{self.path}: layer {layer}: the file folds its SCRI into norm {norm}, but in this model it reads "
                f"{reads}. The file was edited or made for a model wired otherwise: load it onto the model it was made "
                f"from, or quantize this model anew")
        return hook


def follow_folds(root: nn.Module, wiring: FoldWiring) -> list:
    """Forward hooks on ``root`` (each child of a ``ModuleDict`` / ``ModuleList`` root) proving ``wiring`` on its
    calls; they remove themselves once it is proven. Returns the hook handles."""
    models = list(root.children()) if isinstance(root, (nn.ModuleDict, nn.ModuleList)) else [root]
    handles = []

    def before(module, args, kwargs):
        wiring.begin(module, args, kwargs)

    def after(_module, _args, _kwargs, _output):
        wiring.end()
        if not wiring and wiring.idle:
            for h in handles:
                h.remove()
    for m in models:
        handles.append(m.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(m.register_forward_hook(after, with_kwargs=True, always_call=True))
    return handles
