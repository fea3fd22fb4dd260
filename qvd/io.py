"""The QVD file formats: a quantized model and a calibration, each one verified ``.safetensors`` file.

Both are written and read through ``safefile`` (atomic write; a SHA-256 over the metadata and every
tensor's name, dtype, shape and bytes, checked before anything is parsed). Reading then checks the
metadata and every tensor against the schema below, then recomputes from the user's model everything the
model determines (``verify.py``: codes, weight scales, biases, folded norms, geometry), all before a module is
built. Any defect raises ``QuantizedFileError`` / ``CalibrationFileError`` / ``ModelMismatchError`` naming the
file, the field or layer, and what was expected.

Quantized model: metadata key ``qvd``, format ``qvd-w8a8`` version 3. Tensors per quantized layer ``<name>``:
``.weight`` (int8 codes of ``W * s``, the weight's shape), ``.weight_scale`` (F32 [out], > 0), ``.bias`` (F32
[out], exactly when the model's layer has one); W8A8 layers ``.act_scale`` (F32 [B], > 0: one per timestep bucket)
and, with SCRI,
``.scri_shift`` / ``.scri_inv_scale`` (F32 [in]); temporal layers ``.levels`` (F32, increasing HiDi-TQ table).
Per norm that absorbed SCRI: ``<norm>.weight`` / ``<norm>.bias`` (F32 [C]). Metadata: ``format``,
``format_version``, ``config`` (``QVDConfig``), ``timestep_edges`` (the B - 1 increasing inner edges of the
timestep buckets, ``qvd/timesteps.py``), ``signatures`` (layer -> [kind, weight shape]) and their
``fingerprint``, optional ``calibrated`` (the calibration's ``timesteps`` and ``layers`` count, optional
``patches``: the host's attention patches applied while it ran, ``coverage``, ``settings`` and ``roles`` as in a
calibration file), ``layers``
(``kind``, ``in``, ``out``, ``w_bits``; W8A8: ``a_bits``, ``zero_point`` (B integers),
``scri`` = "none" | "kernel" | "norm:<norm>"; convs: ``kernel``, ``stride``, ``padding``), ``norms`` (norm ->
type name) and the per-layer ``report`` (``REPORT_FIELDS``; ``weight_dtype``: the precision the source model
held the layer's weight at; ``norm_dtype``: its folded norm's, where SCRI is folded into one). Version 2 (one
bucket: ``.act_scale`` F32 [], ``zero_point`` an integer, no ``timestep_edges``) is read as one bucket.

Calibration: metadata key ``qvd_calibration``, format ``qvd-calibration`` version 5. Tensors per layer:
``<name>::ch_min`` / ``::ch_max`` (F32 [C]), ``::rows`` (F32 [R, D], D = in features or C * kh * kw),
``::row_times`` (I64 [R]: each row's index into the layer's ``times``), ``::ch_min_at`` / ``::ch_max_at`` (F32 [S, C]:
the range at each of its ``times``), ``::temporal`` (F32 [T, in], temporal layers). Metadata: ``layers``
(``signature``, ``temporal``, ``calls``, ``times`` (the S timesteps it ran at; null: unknown),
``temporal_timesteps``, optional ``conditioning_only``), ``timesteps``, ``norm_groups`` (norm -> consuming layers),
``roles`` (``first`` / ``last`` -> module names, ``Calibration.roles``), ``fingerprint``, optional ``patches``
(``Calibration.patches``), ``coverage`` (the timesteps of ``timesteps`` that coverage calls added) and ``settings``
(what was sampled: name -> short string or number).
"""
from __future__ import annotations

import math
import os

import torch
from torch import nn

from . import safefile
from .calibrate import ROLES, Calibration, LayerStats
from .config import QVDConfig, matches
from .errors import CalibrationFileError, QuantizedFileError, QVDError
from .identity import fingerprint, install
from .modules import HiDiTQLinear, QConv2d, QLinear
from .quantize import QuantizeResult
from .quantizers import act_qrange, weight_qmax
from .scri import folded_norm
from .timesteps import TimestepClock, follow_timesteps
from .verify import DTYPES, FoldWiring, check_against_model, follow_folds

FORMAT = "qvd-w8a8"
FORMAT_VERSION = 3  # bump when the layout above changes; 3: timestep buckets
KEY = "qvd"
CALIBRATION_FORMAT = "qvd-calibration"
CALIBRATION_VERSION = 5  # 3: norm groups only where the norm output reaches nothing but the group; 4: roles;
# 5: per-timestep ranges and row timesteps (timestep buckets)
CALIBRATION_KEY = "qvd_calibration"
MAX_DIM = 1 << 24  # no layer of any diffusion model is wider
MAX_ABS = 1e6  # bound on a quantized file's scales, biases, shifts, levels and norm affines (no real one nears it)
_W8A8_FIELDS = ("weight", "weight_scale", "bias", "act_scale", "scri_shift", "scri_inv_scale")
_TEMPORAL_FIELDS = ("weight", "weight_scale", "bias", "levels")
_LAYER_FIELDS = {"temporal": ("in", "out", "w_bits"),  # metadata fields per layer kind (besides "kind")
                 "linear": ("in", "out", "w_bits", "a_bits", "zero_point", "scri"),
                 "conv": ("in", "out", "w_bits", "a_bits", "zero_point", "scri", "kernel", "stride", "padding")}
_MISSING = object()
_NUMBER = "number"
# The report's fields: a choice of strings, str, int or _NUMBER (a finite number), each also null but for the four
# required ones; fields not listed must be scalars.
REPORT_FIELDS = {"name": str, "kind": ("linear", "conv", "temporal"), "w_bits": int, "a_bits": int,
                 "handler": ("float", "hiditq", "scri-norm", "scri-kernel", "uniform"), "skipped": str,
                 "weight_dtype": tuple(DTYPES), "norm_dtype": tuple(DTYPES), "weight": str, "act_range": str, "scri_fold": str,
                 "out_err_channels": int, "timesteps": int, "out_rel_err": _NUMBER, "w_rel_err": _NUMBER,
                 "tdscore": _NUMBER, "k": _NUMBER, "hiditq_clip": _NUMBER, "hiditq_tau": _NUMBER,
                 "hiditq_neg_share": _NUMBER, "scri_alpha": _NUMBER, "conditioning": str, "role": str}


class _Said(str):
    """A description of a found value, shown as it is (not quoted)."""


def _shown(v) -> str:
    if v is _MISSING:
        return "missing"
    if isinstance(v, _Said):
        return v
    if isinstance(v, (dict, list)):
        return f"a JSON {'object' if isinstance(v, dict) else 'list'}"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


class _Schema:
    """Checks one file's metadata and tensors; a failure names the file, the field and what was expected."""

    def __init__(self, path, error: type[QVDError], tensors: dict[str, torch.Tensor], bound: float = math.inf):
        self.path, self.error, self.tensors, self.bound = os.fspath(path), error, tensors, bound
        self.used: set[str] = set()

    def fail(self, where: str, expected: str, got=_MISSING):
        raise self.error(f"{self.path}: {where} is {_shown(got)}, expected {expected}; the file is damaged or "
                         f"was edited: save or download it again")

    def obj(self, v, where: str, required: tuple, optional: tuple = ()) -> dict:
        if not isinstance(v, dict):
            self.fail(where, "a JSON object", v)
        for k in required:
            if k not in v:
                self.fail(f"{where}.{k}", "present")
        extra = sorted(set(v) - set(required) - set(optional))
        if extra:
            self.fail(f"{where} field {extra[0]!r}", f"absent (fields: {', '.join(required + optional)})", v[extra[0]])
        return v

    def map(self, v, where: str) -> dict:
        if not isinstance(v, dict):
            self.fail(where, "a JSON object", v)
        return v

    def int(self, v, where: str, lo: int, hi: int) -> int:
        if type(v) is not int or not lo <= v <= hi:
            self.fail(where, f"an integer in [{lo}, {hi}]", v)
        return v

    def num(self, v, where: str) -> float:
        if type(v) not in (int, float) or not math.isfinite(v):
            self.fail(where, "a finite number", v)
        return float(v)

    def str(self, v, where: str, choices: tuple | None = None) -> str:
        if not isinstance(v, str) or (choices is not None and v not in choices):
            self.fail(where, "one of " + ", ".join(map(repr, choices)) if choices else "a string", v)
        return v

    def bool(self, v, where: str) -> bool:
        if type(v) is not bool:
            self.fail(where, "true or false", v)
        return v

    def list(self, v, where: str, max_len: int = MAX_DIM) -> list:
        if not isinstance(v, list) or len(v) > max_len:
            self.fail(where, f"a list of at most {max_len} items", v)
        return v

    def signature(self, v, where: str) -> list:
        if len(self.list(v, where, 2)) != 2:
            self.fail(where, "[kind, weight shape]", v)
        kind, shape = v
        self.str(kind, f"{where}[0]", ("linear", "conv"))
        self.list(shape, f"{where}[1]", 4)
        if len(shape) != (2 if kind == "linear" else 4):
            self.fail(f"{where}[1]", f"the weight shape of a {kind} layer", shape)
        for i, d in enumerate(shape):
            self.int(d, f"{where}[1][{i}]", 1, MAX_DIM)
        return v

    def tensor(self, key: str, dtype: torch.dtype, shape: tuple | None = None, optional: bool = False,
               positive: bool = False) -> torch.Tensor | None:
        """The tensor ``key`` with this dtype and shape, finite, within the file kind's bound (and > 0 if
        ``positive``)."""
        t = self.tensors.get(key)
        if t is None:
            if not optional:
                self.fail(f"tensor {key!r}", "present")
            return None
        self.used.add(key)
        if t.dtype != dtype or (shape is not None and tuple(t.shape) != tuple(shape)):
            self.fail(f"tensor {key!r}", f"{safefile.DTYPE_NAMES[dtype]} {list(shape) if shape is not None else ''}",
                      _Said(f"{safefile.DTYPE_NAMES[t.dtype]} {list(t.shape)}"))
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            self.fail(f"tensor {key!r}", "finite values", _Said("a tensor with NaN / Inf"))
        if t.is_floating_point() and t.numel() and float(t.abs().max()) > self.bound:
            self.fail(f"tensor {key!r}", f"values within +-{self.bound:g}",
                      _Said(f"a value of {float(t.abs().max()):.3g}"))
        if positive and not bool((t > 0).all()):
            self.fail(f"tensor {key!r}", "positive values", _Said("a tensor with values <= 0"))
        return t

    def no_other_tensors(self) -> None:
        extra = sorted(set(self.tensors) - self.used)
        if extra:
            self.fail(f"tensor {extra[0]!r}", "absent (it belongs to no layer the file lists)", _Said("present"))


# ---------------------------------------------------------------- quantized model

def save_quantized(path: str, result: QuantizeResult, overwrite: bool = False) -> None:
    """Save the quantized layers of ``result`` to one file, atomically."""
    tensors, layers, norms = {}, {}, {}
    folds = {r["name"]: r.get("scri_fold") for r in result.report}
    for name, module in result.modules.items():
        if not getattr(module, "qvd_quantized", False):  # a norm that absorbed the SCRI transform
            norms[name] = type(module).__name__
            tensors[f"{name}.weight"], tensors[f"{name}.bias"] = module.weight.float(), module.bias.float()
            continue
        if isinstance(module, HiDiTQLinear):
            layers[name] = {"kind": "temporal", "in": module.in_features, "out": module.out_features,
                            "w_bits": module.w_bits}
        else:
            scri = "none" if module.scri_shift is None else folds[name] if module.scri_in_norm else "kernel"
            info = {"w_bits": module.w_bits, "a_bits": module.a_bits, "zero_point": list(module.zero_points),
                    "scri": scri}
            if isinstance(module, QLinear):
                info.update(kind="linear", **{"in": module.in_features, "out": module.out_features})
            else:
                info.update(kind="conv", kernel=list(module.kernel_size), stride=module.stride, padding=module.padding,
                            **{"in": module.in_channels, "out": module.out_channels})
            layers[name] = info
        for field in _W8A8_FIELDS + ("levels",):
            t = getattr(module, field, None)
            if t is not None:
                tensors[f"{name}.{field}"] = t
    if not layers:
        raise QVDError("this quantization result holds no quantized layer, so there is nothing to save: check the "
                       "skip list and that the calibration ran on this model")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": result.config.to_dict(),
            "timestep_edges": list(result.clock.edges), "fingerprint": result.fingerprint, "signatures": result.signatures, "layers": layers, "norms": norms,
            "report": result.report}
    if result.calibrated:
        meta["calibrated"] = result.calibrated
    safefile.write(path, tensors, KEY, meta, overwrite)


def _check_layer(s: _Schema, name: str, info, signature: list, cfg: QVDConfig, norms: dict, buckets: int) -> None:
    where = f"layers[{name!r}]"
    kind = s.str(s.obj(info, where, ("kind",), _LAYER_FIELDS["conv"])["kind"], f"{where}.kind", tuple(_LAYER_FIELDS))
    s.obj(info, where, ("kind",) + _LAYER_FIELDS[kind])
    shape = signature[1]
    if (signature[0] == "conv") != (kind == "conv") or [s.int(info["out"], f"{where}.out", 1, MAX_DIM),
                                                        s.int(info["in"], f"{where}.in", 1, MAX_DIM)] != shape[:2]:
        s.fail(f"{where} (kind, out, in)", f"those of its signature {signature}",
               [kind, info["out"], info["in"]])
    if kind == "temporal":
        s.int(info["w_bits"], f"{where}.w_bits", cfg.w_bits, cfg.w_bits)
        if not cfg.htdq:
            s.fail(f"{where}.kind", "'linear' (the file's config uses no HiDi-TQ)", kind)
        return
    bits = (s.int(info["w_bits"], f"{where}.w_bits", 1, 8), s.int(info["a_bits"], f"{where}.a_bits", 1, 8))
    allowed = {cfg.layer_bits(name), cfg.layer_bits(name, end=True)}
    if bits not in allowed:
        s.fail(f"{where} w_bits / a_bits", " or ".join(f"{w} / {a}" for w, a in sorted(allowed))
               + " (the file's config; 8 / 8 on a first / last layer)", _Said(f"{bits[0]} / {bits[1]}"))
    a_bits = bits[1]
    zps = s.list(info["zero_point"], f"{where}.zero_point", buckets)
    if len(zps) != buckets:
        s.fail(f"{where}.zero_point", f"{buckets} integers (one per timestep bucket)", zps)
    for i, z in enumerate(zps):
        s.int(z, f"{where}.zero_point[{i}]", *act_qrange(a_bits))
    scri = s.str(info["scri"], f"{where}.scri")
    if scri not in ("none", "kernel") and not (scri.startswith("norm:") and scri[5:] in norms):
        s.fail(f"{where}.scri", "'none', 'kernel' or 'norm:<a norm the file lists>'", scri)
    if scri != "none" and not (cfg.scri and not matches(name, cfg.scri_skip)):
        s.fail(f"{where}.scri", "'none' (the file's config gives this layer no SCRI)", scri)
    if scri.startswith("norm:") and not cfg.scri_fold_norm:
        s.fail(f"{where}.scri", "'none' or 'kernel' (the file's config folds SCRI into no norm)", scri)
    if kind == "conv":
        kernel = s.list(info["kernel"], f"{where}.kernel", 2)
        if kernel != shape[2:]:
            s.fail(f"{where}.kernel", f"the weight's kernel {shape[2:]}", kernel)
        s.int(info["stride"], f"{where}.stride", 1, max(shape[2:] + [2]))
        s.int(info["padding"], f"{where}.padding", 0, max(shape[2:]) - 1)


def _upgraded(meta: dict, tensors: dict) -> dict:
    """A version 2 file's metadata and tensors as version 3 (one timestep bucket), in place; others unchanged."""
    if not isinstance(meta, dict) or type(meta.get("format_version")) is not int or meta["format_version"] != 2:
        return meta
    layers, config = meta.get("layers"), meta.get("config")
    for name, info in (layers.items() if isinstance(layers, dict) else ()):
        if isinstance(info, dict) and "zero_point" in info:
            info["zero_point"] = [info["zero_point"]]
            t = tensors.get(f"{name}.act_scale")
            if t is not None and t.dim() == 0:
                tensors[f"{name}.act_scale"] = t.reshape(1)
    if isinstance(config, dict):
        config.setdefault("timestep_buckets", 1)
    return {**meta, "format_version": FORMAT_VERSION, "timestep_edges": []}


def _check_quantized(s: _Schema, meta: dict) -> tuple[QVDConfig, list[float]]:
    """Validate a quantized file's metadata and tensors (no model involved); returns its config and timestep edges."""
    s.obj(meta, "the metadata", ("format", "format_version", "config", "timestep_edges", "fingerprint", "signatures",
                                 "layers", "norms", "report"), ("calibrated",))
    s.str(meta["format"], "format", (FORMAT,))
    if meta["format_version"] != FORMAT_VERSION or type(meta["format_version"]) is not int:
        raise QuantizedFileError(f"{s.path} has format version {_shown(meta['format_version'])}; this QVD reads "
                                 f"versions 2 and {FORMAT_VERSION}: quantize the model again or update ComfyUI-QVD")
    try:
        cfg = QVDConfig.from_dict(meta["config"])
    except QVDError as e:
        s.fail("config", f"a valid QVDConfig ({e})", meta["config"])
    edges = [s.num(e, f"timestep_edges[{i}]")
             for i, e in enumerate(s.list(meta["timestep_edges"], "timestep_edges", cfg.timestep_buckets - 1))]
    if any(b <= a for a, b in zip(edges, edges[1:])):
        s.fail("timestep_edges", "increasing timesteps", meta["timestep_edges"])
    if "calibrated" in meta:
        cal = s.obj(meta["calibrated"], "calibrated", ("timesteps", "layers"),
                    ("patches", "coverage", "settings", "roles"))
        timesteps = [s.num(t, f"calibrated.timesteps[{i}]")
                     for i, t in enumerate(s.list(cal["timesteps"], "calibrated.timesteps", 1 << 16))]
        s.int(cal["layers"], "calibrated.layers", 1, MAX_DIM)
        _patches(s, cal.get("patches"), "calibrated.patches")
        _coverage(s, cal.get("coverage"), timesteps, "calibrated.coverage")
        _settings(s, cal.get("settings"), "calibrated.settings")
        _roles(s, cal.get("roles", {}), "calibrated.roles")
    sigs = s.map(meta["signatures"], "signatures")
    for n, sig in sigs.items():
        s.signature(sig, f"signatures[{n!r}]")
    if s.str(meta["fingerprint"], "fingerprint") != fingerprint(sigs):
        s.fail("fingerprint", f"the fingerprint of its signatures ({fingerprint(sigs)})", meta["fingerprint"])
    layers, norms = s.map(meta["layers"], "layers"), s.map(meta["norms"], "norms")
    if not layers or set(layers) != set(sigs):
        s.fail("the layers map", "one entry per layer in signatures (and at least one)",
               _Said(f"{len(layers)} layers for {len(sigs)} signatures"))
    for n, info in layers.items():
        _check_layer(s, n, info, sigs[n], cfg, norms, len(edges) + 1)
    used_norms = {info["scri"][5:] for info in layers.values() if info.get("scri", "").startswith("norm:")}
    for n, kind in norms.items():
        s.str(kind, f"norms[{n!r}]")
        if n not in used_norms:
            s.fail(f"norms[{n!r}]", "a norm some layer's scri names", kind)
        w = s.tensor(f"{n}.weight", torch.float32)
        if w.dim() != 1 or w.numel() < 1:
            s.fail(f"tensor '{n}.weight'", "F32 [C]", _Said(f"F32 {list(w.shape)}"))
        s.tensor(f"{n}.bias", torch.float32, tuple(w.shape))
    entries = {}
    for i, r in enumerate(s.list(meta["report"], "report")):
        _check_report_entry(s, r, f"report[{i}]")
        entries[r["name"]] = r
    for n, info in layers.items():
        r = entries.get(n)
        if r is None or r["kind"] != info["kind"] or r["w_bits"] != info["w_bits"]:
            s.fail(f"the report entry of layer {n!r}", f"kind {info['kind']!r}, w_bits {info['w_bits']}", r)
        _check_layer_tensors(s, n, info, sigs[n][1], cfg, len(edges) + 1)
    s.no_other_tensors()
    return cfg, edges


def _patches(s: _Schema, v, where: str) -> list[str] | None:
    """The optional list of attention-patch names a calibration recorded (``Calibration.patches``)."""
    if v is None:
        return None
    return [s.str(p, f"{where}[{i}]") for i, p in enumerate(s.list(v, where, 1 << 12))]


def _coverage(s: _Schema, v, timesteps: list, where: str) -> list[float]:
    """The optional list of timesteps coverage calls added (``Calibration.coverage``): each one of ``timesteps``."""
    if v is None:
        return []
    out = [s.num(t, f"{where}[{i}]") for i, t in enumerate(s.list(v, where, 1 << 16))]
    if not set(out) <= set(timesteps):
        s.fail(where, "timesteps the calibration lists", v)
    return out


def _roles(s: _Schema, v, where: str) -> dict[str, list[str]]:
    """A calibration's ``roles``: role -> module names (``Calibration.roles``)."""
    m = s.obj(v, where, (), ROLES)
    return {r: [s.str(n, f"{where}.{r}[{i}]") for i, n in enumerate(s.list(m[r], f"{where}.{r}", 1 << 16))]
            for r in ROLES if r in m}


def _settings(s: _Schema, v, where: str) -> dict:
    """The optional map of what a calibration sampled (``Calibration.settings``): name -> short string / number."""
    if v is None:
        return {}
    m = s.map(v, where)
    if len(m) > 64:
        s.fail(where, "at most 64 entries", _Said(f"{len(m)} entries"))
    for k, x in m.items():
        if len(k) > 64:
            s.fail(where, "names of at most 64 characters", k)
        if isinstance(x, str):
            if len(x) > 256:
                s.fail(f"{where}[{k!r}]", "a string of at most 256 characters", _Said(f"{len(x)} characters"))
        else:
            s.num(x, f"{where}[{k!r}]")
    return dict(m)


def _check_report_entry(s: _Schema, r, where: str) -> None:
    s.obj(r, where, ("name", "kind", "w_bits", "a_bits"), tuple(s.map(r, where)))
    for k, v in r.items():
        kind = REPORT_FIELDS.get(k)
        if v is None and k not in ("name", "kind", "w_bits", "a_bits"):
            continue
        if kind is _NUMBER:
            s.num(v, f"{where}.{k}")
        elif kind is str or isinstance(kind, tuple):
            s.str(v, f"{where}.{k}", kind if isinstance(kind, tuple) else None)
        elif kind is int:
            s.int(v, f"{where}.{k}", 0, MAX_DIM)
        elif not (v is None or isinstance(v, (str, bool, int, float))):
            s.fail(f"{where}.{k}", "a number, string, boolean or null", v)


def _check_layer_tensors(s: _Schema, name: str, info: dict, shape: list, cfg: QVDConfig, buckets: int) -> None:
    out, inp = shape[0], shape[1]
    w = s.tensor(f"{name}.weight", torch.int8, shape)
    qmax = weight_qmax(info["w_bits"])
    if int(w.min()) < -qmax or int(w.max()) > qmax:
        s.fail(f"tensor '{name}.weight'", f"codes in [-{qmax}, {qmax}] ({info['w_bits']}-bit)",
               _Said(f"codes in [{int(w.min())}, {int(w.max())}]"))
    s.tensor(f"{name}.weight_scale", torch.float32, (out,), positive=True)
    s.tensor(f"{name}.bias", torch.float32, (out,), optional=True)
    if info["kind"] == "temporal":
        levels = s.tensor(f"{name}.levels", torch.float32)
        if levels.dim() != 1 or not 2 <= levels.numel() <= 2 ** cfg.a_bits - 1 or not bool((levels.diff() > 0).all()):
            s.fail(f"tensor '{name}.levels'", f"2 to {2 ** cfg.a_bits - 1} increasing levels",
                   _Said(f"{levels.numel()} levels"))
        return
    s.tensor(f"{name}.act_scale", torch.float32, (buckets,), positive=True)
    with_scri = info["scri"] != "none"
    s.tensor(f"{name}.scri_shift", torch.float32, (inp,), optional=not with_scri)
    inv = s.tensor(f"{name}.scri_inv_scale", torch.float32, (inp,), optional=not with_scri)
    if inv is not None and not bool(((inv >= 1) & (inv <= cfg.scri_max_gain * (1 + 1e-6))).all()):
        s.fail(f"tensor '{name}.scri_inv_scale'", f"SCRI gains in [1, scri_max_gain = {cfg.scri_max_gain:g}]",
               _Said(f"gains in [{float(inv.min()):.3g}, {float(inv.max()):.3g}]"))
    if not with_scri and (f"{name}.scri_shift" in s.tensors or f"{name}.scri_inv_scale" in s.tensors):
        s.fail(f"tensors '{name}.scri_*'", "absent (the layer's scri is 'none')", _Said("present"))


def _build(info: dict, t: dict) -> nn.Module:
    if info["kind"] == "temporal":
        return HiDiTQLinear(info["in"], info["out"], t["weight"], t["weight_scale"], t["bias"], t["levels"],
                            info["w_bits"])
    kw = dict(weight_q=t["weight"], weight_scale=t["weight_scale"], bias=t["bias"], act_scale=t["act_scale"],
              zero_point=info["zero_point"], w_bits=info["w_bits"], a_bits=info["a_bits"],
              scri_shift=t["scri_shift"], scri_inv_scale=t["scri_inv_scale"],
              scri_in_norm=info["scri"].startswith("norm:"))
    if info["kind"] == "linear":
        return QLinear(info["in"], info["out"], **kw)
    return QConv2d(info["in"], info["out"], info["kernel"], info["stride"], info["padding"], **kw)


def load_quantized(path: str, root: nn.Module, apply: bool = True,
                   compute_dtype: torch.dtype | None = None) -> QuantizeResult:
    """Rebuild the quantized layers stored in ``path`` for the fp model ``root``, after verifying the file (format
    2 or 3). ``apply=True`` installs them and makes ``root``'s calls set their timestep bucket (``follow_timesteps``)
    and prove the file's SCRI folds (``follow_folds``: the first call that runs a folded layer fed by another norm
    raises ``ModelMismatchError``); hosts installing them otherwise run ``result.wiring`` around their calls.
    ``compute_dtype``: the dtype the host runs the model in (None: each layer's weight dtype), which bounds the file's
    calibrated values (``verify.check_against_model``)."""
    tensors, meta = safefile.read(path, KEY, QuantizedFileError, "QVD quantized model")
    meta = _upgraded(meta, tensors)
    s = _Schema(path, QuantizedFileError, tensors, MAX_ABS)
    cfg, edges = _check_quantized(s, meta)
    named = dict(root.named_modules())
    check_against_model(path, meta, tensors, named, cfg, compute_dtype)
    modules = {}
    for name, info in meta["layers"].items():
        fields = _TEMPORAL_FIELDS if info["kind"] == "temporal" else _W8A8_FIELDS
        q = _build(info, {f: tensors.get(f"{name}.{f}") for f in fields})
        modules[name] = q.to(named[name].weight.device)
    for name in meta["norms"]:  # one transform for all the layers a norm feeds (checked): any of them has it
        scri = next(modules[n].scri for n, info in meta["layers"].items() if info.get("scri") == f"norm:{name}")
        modules[name] = folded_norm(named[name], tensors[f"{name}.weight"], tensors[f"{name}.bias"], scri)
    folds = {n: info["scri"][5:] for n, info in meta["layers"].items() if info.get("scri", "").startswith("norm:")}
    result = QuantizeResult(modules, meta["report"], cfg, meta["signatures"], meta.get("calibrated", {}),
                            TimestepClock(edges), FoldWiring(path, modules, folds))
    if apply:
        install(root, modules)
        follow_timesteps(root, result.clock)
        follow_folds(root, result.wiring)
    return result


# ---------------------------------------------------------------- calibration

def save_calibration(path: str, calibration: Calibration, overwrite: bool = False) -> None:
    """Save a calibration (statistics, temporal features, timesteps, norm groups) to one file, atomically."""
    tensors, layers = {}, {}
    for n, st in calibration.layers.items():
        tensors[f"{n}::ch_min"], tensors[f"{n}::ch_max"] = st.ch_min.float(), st.ch_max.float()
        tensors[f"{n}::rows"] = st.rows.float()
        tensors[f"{n}::row_times"] = st.row_times.long()
        tensors[f"{n}::ch_min_at"] = torch.stack([mn for mn, _ in st.ranges_at]).float()
        tensors[f"{n}::ch_max_at"] = torch.stack([mx for _, mx in st.ranges_at]).float()
        ts = sorted(st.temporal_vectors)
        if ts:
            tensors[f"{n}::temporal"] = torch.stack([st.temporal_vectors[t] for t in ts]).float()
        layers[n] = {"signature": st.signature, "temporal": st.temporal, "calls": st.calls, "times": list(st.times),
                     "temporal_timesteps": ts}
        if st.conditioning_only:
            layers[n]["conditioning_only"] = True
    meta = {"format": CALIBRATION_FORMAT, "format_version": CALIBRATION_VERSION, "layers": layers,
            "timesteps": calibration.timesteps, "norm_groups": calibration.norm_groups, "roles": calibration.roles,
            "fingerprint": calibration.fingerprint}
    if calibration.patches is not None:
        meta["patches"] = list(calibration.patches)
    if calibration.coverage:
        meta["coverage"] = list(calibration.coverage)
    if calibration.settings:
        meta["settings"] = dict(calibration.settings)
    safefile.write(path, tensors, CALIBRATION_KEY, meta, overwrite)


def load_calibration(path: str) -> Calibration:
    """Read a calibration file, verified: checksum, schema and every statistic's shape and values."""
    tensors, meta = safefile.read(path, CALIBRATION_KEY, CalibrationFileError, "QVD calibration")
    s = _Schema(path, CalibrationFileError, tensors)
    s.obj(meta, "the metadata", ("format", "format_version", "layers", "timesteps", "norm_groups", "roles",
                                 "fingerprint"), ("patches", "coverage", "settings"))
    s.str(meta["format"], "format", (CALIBRATION_FORMAT,))
    if meta["format_version"] != CALIBRATION_VERSION or type(meta["format_version"]) is not int:
        raise CalibrationFileError(f"{s.path} has calibration format version {_shown(meta['format_version'])}; "
                                   f"this QVD reads version {CALIBRATION_VERSION}: calibrate again")
    timesteps = [s.num(t, f"timesteps[{i}]") for i, t in enumerate(s.list(meta["timesteps"], "timesteps"))]
    layers = {}
    for n, info in s.map(meta["layers"], "layers").items():
        where = f"layers[{n!r}]"
        s.obj(info, where, ("signature", "temporal", "calls", "times", "temporal_timesteps"), ("conditioning_only",))
        kind, shape = s.signature(info["signature"], f"{where}.signature")
        c = shape[1]
        d = c if kind == "linear" else c * shape[2] * shape[3]
        ch_min = s.tensor(f"{n}::ch_min", torch.float32, (c,))
        ch_max = s.tensor(f"{n}::ch_max", torch.float32, (c,))
        if not bool((ch_min <= ch_max).all()):
            s.fail(f"tensor '{n}::ch_min'", f"at most '{n}::ch_max' in every channel", _Said("larger somewhere"))
        rows = s.tensor(f"{n}::rows", torch.float32)
        if rows.dim() != 2 or rows.shape[1] != d or rows.shape[0] < 1:
            s.fail(f"tensor '{n}::rows'", f"F32 [R, {d}] with R >= 1", _Said(f"F32 {list(rows.shape)}"))
        times = [None if t is None else s.num(t, f"{where}.times[{i}]")
                 for i, t in enumerate(s.list(info["times"], f"{where}.times", 1 << 16))]
        if not times or len(set(times)) != len(times):
            s.fail(f"{where}.times", "distinct timesteps (null: unknown), at least one", info["times"])
        row_times = s.tensor(f"{n}::row_times", torch.int64, (rows.shape[0],))
        if int(row_times.min()) < 0 or int(row_times.max()) >= len(times):
            s.fail(f"tensor '{n}::row_times'", f"indices into its {len(times)} times", _Said("indices out of range"))
        mins = s.tensor(f"{n}::ch_min_at", torch.float32, (len(times), c))
        maxs = s.tensor(f"{n}::ch_max_at", torch.float32, (len(times), c))
        if not (bool((mins <= maxs).all()) and torch.equal(mins.amin(0), ch_min) and torch.equal(maxs.amax(0), ch_max)):
            s.fail(f"tensors '{n}::ch_min_at' / '{n}::ch_max_at'", "ranges whose union is ch_min / ch_max",
                   _Said("other ranges"))
        ts = [s.num(t, f"{where}.temporal_timesteps[{i}]")
              for i, t in enumerate(s.list(info["temporal_timesteps"], f"{where}.temporal_timesteps"))]
        if len(set(ts)) != len(ts) or (ts and not s.bool(info["temporal"], f"{where}.temporal")):
            s.fail(f"{where}.temporal_timesteps", "distinct timesteps, on temporal layers only", ts)
        feats = s.tensor(f"{n}::temporal", torch.float32, (len(ts), c), optional=not ts)
        layers[n] = LayerStats.restore(n, info["signature"], s.bool(info["temporal"], f"{where}.temporal"),
                                       s.int(info["calls"], f"{where}.calls", 1, 1 << 62), ch_min, ch_max, rows,
                                       dict(zip(ts, feats)) if ts else {}, times, row_times,
                                       list(zip(mins, maxs)),
                                       s.bool(info.get("conditioning_only", False), f"{where}.conditioning_only"))
    if not layers:
        s.fail("layers", "at least one layer", meta["layers"])
    groups = s.map(meta["norm_groups"], "norm_groups")
    for norm, members in groups.items():
        for i, m in enumerate(s.list(members, f"norm_groups[{norm!r}]")):
            if not isinstance(m, str) or m not in layers:
                s.fail(f"norm_groups[{norm!r}][{i}]", "a layer of the file", m)
    calibration = Calibration(layers, timesteps, groups, _patches(s, meta.get("patches"), "patches"),
                              _coverage(s, meta.get("coverage"), timesteps, "coverage"),
                              _settings(s, meta.get("settings"), "settings"), _roles(s, meta["roles"], "roles"))
    if s.str(meta["fingerprint"], "fingerprint") != calibration.fingerprint:
        s.fail("fingerprint", f"the fingerprint of its layers ({calibration.fingerprint})", meta["fingerprint"])
    s.no_other_tensors()
    return calibration
