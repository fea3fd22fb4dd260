"""``quantize_model``: calibration statistics -> quantized layers, in two steps: ``plan``, then ``build``.

``plan`` decides every layer with one of these handlers (in this order) and fits its quantizer:

- ``float``: kept in full precision, with the reason (the first and last layers calibration found, ``keep_float``;
  never ran in calibration; a conv the kernels do not run: grouped, dilated, non-zero or uneven padding);
- ``hiditq``: a temporal Linear (the time embedding / projection calibration found): HiDi-TQ activation levels
  searched by K (HTDQ);
- ``scri-norm``: the layers fed by one LayerNorm / GroupNorm whose output reaches nothing else share one SCRI alpha,
  chosen by their summed output error; the transform is folded into that norm (``uniform`` if no alpha helps);
- ``scri-kernel`` / ``uniform``: every other layer takes the SCRI alpha from ``cfg.scri_alphas``, or none
  (``uniform``), with the lowest W8A8 output error on its rows; the quantize kernel does the transform.

Weights are per-output-channel symmetric, activations static per tensor (range by ``act_range``), one quantizer per
timestep bucket (``qvd/timesteps.py``: the calibrated timesteps in ``cfg.timestep_buckets`` intervals, each the
whole layer's range narrowed to its own calls' range, ``_Rows.fit``; the SCRI transform and the weights are shared). ``build`` makes the modules (and the
folded norm copies) and the clock that picks their bucket; the per-layer report comes from the plan.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .calibrate import Calibration, LayerStats
from .config import QVDConfig, matches
from .errors import CalibrationError
from .htdq import HiDiTQFit, k_metric, search_hiditq
from .identity import check_layers, find_layers, fingerprint, install, layer_signature
from .modules import HiDiTQLinear, QConv2d, QLinear
from .quantizers import activation_range, affine_params, dequantize_weight, fake_quant, quantize_weight, round_to_grid_
from .safefile import DTYPE_NAMES
from .scri import ScriTransform, foldable_norm
from .timesteps import TimestepClock, bucket_edges, bucket_of, follow_timesteps


@dataclass
class QuantizeResult:
    """Replacement modules (name relative to the root -> module), the per-layer report, what the calibration
    covered (``calibrated``: its timesteps and layer count, and the host's attention patches applied while it ran when
    known; empty when unknown), the clock of the W8A8 layers' timestep buckets (``clock.edges``) and, for a loaded
    file, the proof its SCRI folds still owe on the model's calls (``verify.FoldWiring``; None when made here)."""
    modules: dict[str, nn.Module]
    report: list[dict]
    config: QVDConfig
    signatures: dict[str, list] = field(default_factory=dict)
    calibrated: dict = field(default_factory=dict)
    clock: TimestepClock = field(default_factory=TimestepClock)
    wiring: object | None = None  # verify.FoldWiring (a layer above this one)

    def __post_init__(self):
        for m in self.modules.values():
            if hasattr(m, "act_scale"):
                m.clock = self.clock

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.signatures)

    def set_timestep(self, t) -> None:
        """The timestep of the coming model calls, for callers whose model forward takes none (see
        ``follow_timesteps``, which ``apply=True`` installs)."""
        self.clock.set(t)


@dataclass
class Fit:
    """One layer's W8A8 quantizer for one SCRI choice, and its errors on the calibration rows."""
    err: float                    # ||y_q - y||^2 / ||y||^2 on the search channels
    err_channels: int             # how many output channels ``err`` measured
    alpha: float | None           # SCRI alpha (None: no SCRI)
    scri: ScriTransform | None
    weight_q: torch.Tensor | None  # int8 codes of W * s, the module's weight layout (set by _Rows.finish)
    weight_scale: torch.Tensor | None
    act_scales: tuple[float, ...]  # per timestep bucket
    zero_points: tuple[int, ...]
    w_err: float                  # ||W_hat - W|| / ||W|| in the layer's own input domain (set by finish)


@dataclass
class TemporalFit:
    levels: HiDiTQFit
    weight_q: torch.Tensor
    weight_scale: torch.Tensor
    err: float
    w_err: float
    timesteps: int


@dataclass
class Decision:
    """What ``build`` makes of one layer, and why."""
    name: str
    module: nn.Module
    handler: str                  # float | hiditq | scri-norm | scri-kernel | uniform
    why: str = ""
    bits: tuple[int, int] = (32, 32)
    fit: Fit | TemporalFit | None = None
    norm: str | None = None       # scri-norm: the norm the transform is folded into
    extra: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        if self.handler == "hiditq":
            return "temporal"
        return "linear" if isinstance(self.module, nn.Linear) else "conv"

    def report(self, cfg: QVDConfig) -> dict:
        entry = {"name": self.name, "kind": self.kind, "w_bits": self.bits[0], "a_bits": self.bits[1],
                 "handler": self.handler}
        if self.handler == "float":
            return {**entry, "skipped": self.why, **{k: v for k, v in self.extra.items() if v is not None}}
        entry["weight_dtype"] = DTYPE_NAMES[self.module.weight.dtype]  # what a file is checked against (verify.py)
        f = self.fit
        entry.update(weight=cfg.weight_clip, out_rel_err=f.err, w_rel_err=f.w_err)
        if self.handler != "hiditq":
            entry["out_err_channels"] = f.err_channels
        if self.handler == "hiditq":
            lv = f.levels
            entry.update(act_range="hiditq", tdscore=lv.tdscore, k=lv.k, hiditq_clip=lv.clip, hiditq_tau=lv.tau,
                         hiditq_neg_share=lv.neg_share, timesteps=f.timesteps)
        else:
            fold = None if f.alpha is None else f"norm:{self.norm}" if self.handler == "scri-norm" else "kernel"
            entry.update(act_range=cfg.act_range, scri_alpha=f.alpha, scri_fold=fold)
        return {**entry, **{k: v for k, v in self.extra.items() if v is not None}}


@dataclass
class Plan:
    decisions: list[Decision]
    norms: dict[str, ScriTransform]   # norm name -> the transform folded into it
    config: QVDConfig
    calibrated: dict = field(default_factory=dict)  # QuantizeResult.calibrated
    edges: list[float] = field(default_factory=list)  # the timestep buckets' inner edges (``bucket_edges``)

    @property
    def report(self) -> list[dict]:
        return [d.report(self.config) for d in self.decisions]


class _Rows:
    """One layer's float weight ``[N, D]`` and calibration rows ``[R, D]`` in the rows layout (``kh, kw, C`` for a
    conv, like the calibration's patches), and per timestep bucket (``edges``) its rows and input range: a bucket in
    which the layer never ran (a ControlNet that stops early) takes the whole calibration's.

    The SCRI alpha search, and the output error it reports, measure a seeded subset of ``cfg.search_channels``
    output channels (every channel when the layer has no more; 0: always every channel). Codes and scales are per
    output channel, so the subset's are exactly the whole layer's; ``finish`` quantizes the whole layer."""

    def __init__(self, module: nn.Module, stats: LayerStats, cfg: QVDConfig, bits: tuple[int, int],
                 edges: list[float]):
        self.cfg, self.bits = cfg, bits
        w = module.weight.detach().float().cpu()
        self.shape = tuple(w.shape)
        self.w = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1) if w.dim() == 4 else w  # [N, D]
        self.channel = torch.arange(self.w.shape[1]) % w.shape[1]  # input channel of each column
        self.rows = stats.rows.float().cpu()
        self.ch_min, self.ch_max = stats.ch_min.float().cpu(), stats.ch_max.float().cpu()
        self.row_bucket, self.buckets = None, []  # per bucket: (ch_min, ch_max) of its calls
        if edges:
            row_bucket, ranges = stats.bucket_view(lambda t: bucket_of(t, edges))
            self.buckets = [ranges.get(b, (self.ch_min, self.ch_max)) for b in range(len(edges) + 1)]
            self.row_bucket = row_bucket.clamp_min(0)  # rows of an unknown timestep: measured in bucket 0
        b = None if module.bias is None else module.bias.detach().float().cpu()
        n_out, self.sub = self.w.shape[0], None
        if cfg.search_channels and n_out > cfg.search_channels:
            gen = torch.Generator().manual_seed(cfg.seed)
            self.sub = torch.randperm(n_out, generator=gen)[: cfg.search_channels].sort().values
        self.w_sub = self.w if self.sub is None else self.w[self.sub]
        self.b_sub = b if self.sub is None or b is None else b[self.sub]
        self.y_sub = self._output(self.rows, self.w_sub, self.b_sub)
        self.buf = torch.empty_like(self.w_sub)  # one work tensor: fresh weight-sized tensors are slow to allocate

    @staticmethod
    def _output(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        y = x @ w.t()
        return y if b is None else y.add_(b)

    def _grid(self, w: torch.Tensor, out: torch.Tensor, cols: ScriTransform | None) -> torch.Tensor:
        """Fill ``out`` with the integer codes of ``w s`` (as floats); returns their per-row scale."""
        if cols is None:
            out.copy_(w)
        else:
            torch.mul(w, cols.scale.view(1, -1), out=out)  # cols.fold_weight, without a new tensor
        return round_to_grid_(out, self.bits[0], self.cfg.weight_clip)

    def _error(self, fit: "Fit", w: torch.Tensor, out: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor,
               xt: torch.Tensor, cols: ScriTransform | None) -> tuple[float, torch.Tensor]:
        """(``||y_q - y||^2 / ||y||^2``, the dequantized weight ``W_hat s`` in ``out``) for the rows of ``w``."""
        ws = self._grid(w, out, cols)
        w_hat = out.mul_(ws[:, None])
        if cols is not None:
            b = cols.folded_bias(w_hat, b)  # the bias QLinear / QConv2d compute
        yq = self._output(self._fake_quant(xt, fit), w_hat, b)
        return float((yq - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30)), ws

    def _fake_quant(self, xt: torch.Tensor, fit: "Fit") -> torch.Tensor:
        """The rows quantized as the layer runs them: each with its timestep bucket's quantizer."""
        if self.row_bucket is None:
            return fake_quant(xt, fit.act_scales[0], fit.zero_points[0], self.bits[1])
        return _bucket_fake_quant(xt, fit, self.row_bucket, self.bits[1])

    def _transform(self, alpha: float | None):
        """(SCRI transform, its per-column form, transformed rows, the transformed input range of a channel range)."""
        if alpha is None:
            return None, None, self.rows, lambda mn, mx: (float(mn.min()), float(mx.max()))
        scri = ScriTransform.from_range(self.ch_min, self.ch_max, alpha, self.cfg.scri_max_gain)
        cols = scri.columns(self.channel)
        return scri, cols, cols.apply(self.rows), lambda mn, mx: (float(scri.apply(mn).min()),
                                                                   float(scri.apply(mx).max()))

    def fit(self, alpha: float | None) -> Fit:
        """The activation quantizers (one per timestep bucket) for one SCRI choice and their output error on the
        search channels (``finish`` adds the whole layer's codes).

        The range search (``act_range``) runs on all the rows; each bucket then covers that range narrowed to its
        own exact input range, so it clips nothing its timesteps showed that one scale would not (measured worse:
        a search on one bucket's share of the rows, a few dozen, which misses the tails it clips; the bucket's range
        shrunk by the whole range's clip factor, which clips timesteps between the calibrated ones)."""
        scri, cols, xt, span = self._transform(alpha)
        lo, hi = span(self.ch_min, self.ch_max)
        clip_lo, clip_hi = activation_range(xt, self.bits[1], self.cfg.act_range, lo, hi, self.cfg.percentile)
        if not self.buckets:
            params = [affine_params(clip_lo, clip_hi, self.bits[1])]
        else:
            params = [affine_params(max(clip_lo, b_lo), min(clip_hi, b_hi), self.bits[1])
                      for b_lo, b_hi in (span(mn, mx) for mn, mx in self.buckets)]
        fit = Fit(float("nan"), self.w_sub.shape[0], alpha, scri, None, None, tuple(p[0] for p in params),
                  tuple(p[1] for p in params), float("nan"))
        err, _ = self._error(fit, self.w_sub, self.buf, self.b_sub, self.y_sub, xt, cols)
        return dataclasses.replace(fit, err=err)

    def finish(self, fit: Fit) -> Fit:
        """The chosen fit on the whole layer: int8 codes (module layout), scales and the weight error."""
        cols = None if fit.scri is None else fit.scri.columns(self.channel)
        out = self.buf if self.sub is None else torch.empty_like(self.w)
        ws = self._grid(self.w, out, cols)
        codes = out.to(torch.int8)
        w_real = out.mul_(ws[:, None])  # dequantize_weight(codes, ws), in place
        if cols is not None:
            w_real.div_(cols.scale.view(1, -1))  # cols.unfold_weight, in place
        w_err = float(w_real.sub_(self.w).norm() / self.w.norm().clamp_min(1e-30))
        if len(self.shape) == 4:
            n, c, kh, kw = self.shape
            codes = codes.view(n, kh, kw, c).permute(0, 3, 1, 2)  # channels-last, as QConv2d keeps them
        return dataclasses.replace(fit, weight_q=codes, weight_scale=ws, w_err=w_err)


CONDITIONING = "input the same at every calibrated timestep (conditioning path): no prompt-specific SCRI"
ROLE_TEMPORAL = ("temporal: one input vector per sample (broadcast over its tokens / frames) that changes with the "
                 "timestep")
ROLE_FIRST = "first: reads the model's input"
ROLE_LAST = "last: its output is the model's output"


def _role(name: str, calibration: Calibration, cfg: QVDConfig) -> str | None:
    """The layer's role and how it was found (observed in calibration, or a config pattern)."""
    stats = calibration.layers.get(name)
    if stats is not None and stats.temporal:
        return ROLE_TEMPORAL + (" (config pattern)" if cfg.is_temporal(name) else " (observed in calibration)")
    for role, text in (("first", ROLE_FIRST), ("last", ROLE_LAST)):
        if name in calibration.roles[role]:
            return text + " (calibrated call graph)"
    return None


def _is_end(name: str, calibration: Calibration) -> bool:
    return name in calibration.roles["first"] or name in calibration.roles["last"]


def _alphas(cfg: QVDConfig, names: list[str], calibration: Calibration) -> list:
    """SCRI alphas to try for layers sharing one input (None = no SCRI). None only for ``cfg.scri_skip`` and for
    the conditioning path (``LayerStats.conditioning_only``): a shift / scale fit to the calibration's prompts would
    be wrong for others."""
    allowed = cfg.scri and not any(matches(n, cfg.scri_skip) or calibration.layers[n].conditioning_only
                                   for n in names)
    return [None] + (list(cfg.scri_alphas) if allowed else [])


def _kernel_runs(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return (module.groups == 1 and module.dilation == (1, 1) and len(set(module.stride)) == 1
            and isinstance(module.padding, tuple) and len(set(module.padding)) == 1
            and module.padding_mode == "zeros")


# ------------------------------------------------------------------ the handlers

def _float_reason(name: str, module: nn.Module, calibration: Calibration, cfg: QVDConfig) -> str | None:
    if name not in calibration.layers:
        return "never ran in calibration"
    if cfg.keep_ends_float and _is_end(name, calibration):
        return "first / last layer kept in float (keep_ends_float)"
    if matches(name, cfg.keep_float):
        return "kept in float (keep_float)"
    if not _kernel_runs(module):
        return "grouped / dilated / non-zero-padded conv"
    return None


def _plan_hiditq(name: str, module: nn.Module, calibration: Calibration, cfg: QVDConfig) -> Decision:
    stats = calibration.layers[name]
    f = calibration.temporal_features(name) if stats.temporal_vectors else stats.rows.float()
    w = module.weight.detach().float().cpu()
    b = None if module.bias is None else module.bias.detach().float().cpu()
    wq, ws = quantize_weight(w, cfg.w_bits, cfg.weight_clip)
    w_hat = dequantize_weight(wq, ws)
    levels = search_hiditq(f, cfg.a_bits, cfg.htdq_lambda, cfg.htdq_window)
    y = f @ w.t() + (0 if b is None else b)
    yq = HiDiTQLinear.compute(f, levels.levels, wq.float(), ws, b)
    err = float((yq - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30))
    w_err = float((w_hat - w).norm() / w.norm().clamp_min(1e-30))
    fit = TemporalFit(levels, wq, ws, err, w_err, int(f.shape[0]))
    return Decision(name, module, "hiditq", "temporal layer (HTDQ)", (cfg.w_bits, cfg.a_bits), fit,
                    extra={"role": _role(name, calibration, cfg)})


def _bucket_fake_quant(x: torch.Tensor, fit: Fit, bucket: torch.Tensor, bits: int) -> torch.Tensor:
    """Rows ``x`` quantized each with the quantizer of its timestep bucket (``bucket``: one index per row)."""
    scale = torch.tensor(fit.act_scales)[bucket, None]
    zp = torch.tensor(fit.zero_points, dtype=torch.float32)[bucket, None]
    return fake_quant(x, scale, zp, bits)


def _uniform_tdscore(calibration: Calibration, name: str, fit: Fit, cfg: QVDConfig,
                     edges: list[float]) -> float | None:
    """TDScore of a temporal layer quantized with the uniform quantizer, each timestep's features with its bucket's
    (for the ablation report)."""
    vec = calibration.layers[name].temporal_vectors
    if not vec:
        return None
    f = calibration.temporal_features(name)
    b = torch.tensor([bucket_of(t, edges) for t in sorted(vec, reverse=True)])  # temporal_features' row order
    if fit.scri is None:
        f_hat = _bucket_fake_quant(f, fit, b, cfg.a_bits)
    else:  # the quantizer sees SCRI's (f - z) / s
        f_hat = fit.scri.unapply(_bucket_fake_quant(fit.scri.apply(f), fit, b, cfg.a_bits))
    return k_metric(f, f_hat, cfg.htdq_lambda, cfg.htdq_window)[2]


def _extra(name: str, calibration: Calibration, cfg: QVDConfig) -> dict:
    """A quantized layer's report notes: its role, and why it has no SCRI if it is on the conditioning path."""
    extra = {"role": _role(name, calibration, cfg)}
    if calibration.layers[name].conditioning_only:
        extra["conditioning"] = CONDITIONING
    return extra


def _plan_layer(name: str, module: nn.Module, calibration: Calibration, cfg: QVDConfig,
                edges: list[float]) -> Decision:
    bits = cfg.layer_bits(name, _is_end(name, calibration))
    rows = _Rows(module, calibration.layers[name], cfg, bits, edges)
    fit = rows.finish(min((rows.fit(a) for a in _alphas(cfg, [name], calibration)), key=lambda f: f.err))
    extra = _extra(name, calibration, cfg)
    if calibration.layers[name].temporal:
        extra["tdscore"] = _uniform_tdscore(calibration, name, fit, cfg, edges)
    handler, why = ("uniform", "no SCRI alpha lowers the output error") if fit.alpha is None else \
        ("scri-kernel", "lowest output error; the quantize kernel does the transform")
    return Decision(name, module, handler, why, bits, fit, extra=extra)


def norm_group_folds(norm: nn.Module | None, names: list[str], layers: dict[str, nn.Module],
                     temporal=frozenset()) -> bool:
    """Whether SCRI folds exactly into ``norm`` for its consumers ``names`` (all of them quantized here, none of them
    in ``temporal``)."""
    if norm is None or not foldable_norm(norm) or not names or not all(n in layers for n in names):
        return False
    mods = [layers[n] for n in names]
    if any(n in temporal for n in names) or not all(_kernel_runs(m) for m in mods):
        return False
    if isinstance(norm, nn.LayerNorm):
        return all(isinstance(m, nn.Linear) for m in mods)
    return all(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.padding == (0, 0) for m in mods)


def _plan_norm_group(norm_name: str, names: list[str], layers: dict[str, nn.Module], calibration: Calibration,
                     cfg: QVDConfig, edges: list[float]) -> tuple[list[Decision], ScriTransform | None]:
    bits = [cfg.layer_bits(n, _is_end(n, calibration)) for n in names]
    rows = [_Rows(layers[n], calibration.layers[n], cfg, b, edges) for n, b in zip(names, bits)]
    best = None
    for alpha in _alphas(cfg, names, calibration):
        fits = [r.fit(alpha) for r in rows]
        if best is None or sum(f.err for f in fits) < sum(f.err for f in best):
            best = fits
    best = [r.finish(f) for r, f in zip(rows, best)]
    if best[0].alpha is None:
        return [Decision(n, layers[n], "uniform", f"no SCRI alpha lowers the error of the layers fed by {norm_name}",
                         b, f, extra=_extra(n, calibration, cfg))
                for n, b, f in zip(names, bits, best)], None
    why = f"one alpha for the layers fed by {norm_name}, folded into it"
    return [Decision(n, layers[n], "scri-norm", why, b, f, norm=norm_name, extra=_extra(n, calibration, cfg))
            for n, b, f in zip(names, bits, best)], best[0].scri


def plan(root: nn.Module, calibration: Calibration, config: QVDConfig | None = None,
         progress: Callable[[int, int], None] | None = None) -> Plan:
    """Decide and fit every Linear / Conv2d under ``root`` QVD quantizes (see module docstring); ``progress(done,
    total)`` is called as layers are decided."""
    cfg = config or QVDConfig()
    if not isinstance(calibration, Calibration):
        raise CalibrationError("quantize_model needs a Calibration (run a Calibrator over the model first)")
    every_layer = find_layers(root, QVDConfig())  # layers the user skips still count as the model's own
    check_layers(calibration.signatures, {n: layer_signature(m) for n, m in every_layer.items()}, "the calibration")
    targets = find_layers(root, cfg)
    edges = bucket_edges(calibration.timesteps, cfg.timestep_buckets)
    decided: dict[str, Decision] = {}
    report = (lambda: progress(len(decided), len(targets))) if progress else (lambda: None)
    for name, module in targets.items():
        why = _float_reason(name, module, calibration, cfg)
        if why is not None:
            decided[name] = Decision(name, module, "float", why, extra={"role": _role(name, calibration, cfg)})
        elif cfg.htdq and calibration.layers[name].temporal and isinstance(module, nn.Linear):
            decided[name] = _plan_hiditq(name, module, calibration, cfg)
            report()
    layers = {n: m for n, m in targets.items() if n not in decided}
    norms = {}
    if cfg.scri and cfg.scri_fold_norm:
        named = dict(root.named_modules())
        for norm_name, names in calibration.norm_groups.items():
            temporal = {n for n in names if n in calibration.layers and calibration.layers[n].temporal}
            if norm_group_folds(named.get(norm_name), names, layers, temporal):
                group, scri = _plan_norm_group(norm_name, names, layers, calibration, cfg, edges)
                for d in group:  # what a file's folded norm is checked against (verify.py)
                    d.extra["norm_dtype"] = DTYPE_NAMES[named[norm_name].weight.dtype] if d.norm else None
                decided.update((d.name, d) for d in group)
                if scri is not None:
                    norms[norm_name] = scri
                report()
    for name, module in layers.items():
        if name not in decided:
            decided[name] = _plan_layer(name, module, calibration, cfg, edges)
            report()
    calibrated = {"timesteps": list(calibration.timesteps), "layers": len(calibration.layers)}
    if calibration.patches is not None:
        calibrated["patches"] = list(calibration.patches)
    if calibration.coverage:
        calibrated["coverage"] = list(calibration.coverage)
    if calibration.settings:
        calibrated["settings"] = dict(calibration.settings)
    if any(calibration.roles.values()):
        calibrated["roles"] = {r: list(v) for r, v in calibration.roles.items()}
    return Plan([decided[n] for n in targets], norms, cfg, calibrated, edges)


def _module(d: Decision) -> nn.Module:
    f, m = d.fit, d.module
    if d.handler == "hiditq":
        q = HiDiTQLinear(m.in_features, m.out_features, f.weight_q, f.weight_scale,
                         None if m.bias is None else m.bias.detach().float().cpu(), f.levels.levels, d.bits[0])
        return q.to(m.weight.device)
    scri = {}
    if f.scri is not None:
        scri = {"scri_shift": f.scri.shift, "scri_inv_scale": f.scri.inv_scale, "scri_in_norm": d.norm is not None}
    kw = dict(weight_q=f.weight_q, weight_scale=f.weight_scale,
              bias=None if m.bias is None else m.bias.detach().float().cpu(), act_scale=f.act_scales,
              zero_point=f.zero_points, w_bits=d.bits[0], a_bits=d.bits[1], **scri)
    if isinstance(m, nn.Linear):
        q = QLinear(m.in_features, m.out_features, **kw)
    else:
        q = QConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride[0], m.padding[0], **kw)
    return q.to(m.weight.device)


def build(root: nn.Module, p: Plan) -> QuantizeResult:
    """The plan's quantized modules (and folded norm copies), without installing them."""
    modules = {d.name: _module(d) for d in p.decisions if d.handler != "float"}
    named = dict(root.named_modules())
    for norm_name, scri in p.norms.items():
        modules[norm_name] = scri.fold_norm(named[norm_name])
    signatures = {d.name: layer_signature(d.module) for d in p.decisions if d.handler != "float"}
    return QuantizeResult(modules, p.report, p.config, signatures, p.calibrated, TimestepClock(p.edges))


def quantize_model(root: nn.Module, calibration: Calibration, config: QVDConfig | None = None,
                   apply: bool = True, progress: Callable[[int, int], None] | None = None) -> QuantizeResult:
    """Quantize every calibrated Linear / Conv2d under ``root``: ``build(root, plan(root, calibration, config))``.

    The report has one entry per layer: its handler, ``out_rel_err`` and ``w_rel_err`` (``||y_q - y||^2 / ||y||^2``
    of the layer output on its calibration rows, and the relative L2 error of the weights), ``tdscore`` for temporal
    layers, ``skipped`` (why) for layers kept in float. With ``apply=True`` the modules are installed in ``root``;
    with ``apply=False`` ``root`` is left untouched (hosts such as ComfyUI install them as object patches and set
    ``result.clock`` themselves). ``apply=True`` also makes ``root``'s calls set the clock (``follow_timesteps``).
    ``progress(done, total)``: see ``plan``.
    """
    result = build(root, plan(root, calibration, config, progress))
    if apply:
        install(root, result.modules)
        follow_timesteps(root, result.clock)
    return result
