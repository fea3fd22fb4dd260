"""``quantize_model``: turn calibration statistics into quantized layers (the one entry point).

Per layer: weights per-output-channel symmetric; activations static per tensor (range by ``act_range``).
With SCRI, alpha is chosen per layer from ``cfg.scri_alphas`` (and "no SCRI") by the layer's W8A8 output
error on its calibration rows; layers fed by the same LayerNorm / GroupNorm share one alpha, chosen by
their summed error, and the transform is folded into that norm. Temporal layers use HiDi-TQ (HTDQ).
The first and last convolutions stay in float (``cfg.keep_float``: 0.02 % of the MACs, the most sensitive).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .calibrate import Calibration, check_layers, find_layers, fingerprint, layer_signature
from .config import QVDConfig, matches
from .errors import CalibrationError
from .htdq import k_metric, search_hiditq
from .modules import HiDiTQLinear, QConv2d, QLinear
from .quantizers import activation_qparams, dequantize_weight, fake_quant, quantize_weight
from .scri import fold_into_norm, fold_into_weight, foldable_norm, scri_params


@dataclass
class QuantizeResult:
    """Replacement modules (name relative to the root -> module) and the per-layer report."""
    modules: dict[str, nn.Module]
    report: list[dict]
    config: QVDConfig
    signatures: dict[str, list] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.signatures)


@dataclass
class _Fit:
    err: float
    alpha: float | None
    z: torch.Tensor | None
    s: torch.Tensor | None
    weight_q: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None
    act_scale: float
    zero_point: int
    w_err: float


@dataclass
class _Layer:
    """One layer's float weight and calibration rows, in the rows layout ((kh, kw, C) for convs)."""
    w: torch.Tensor          # [N, D]
    b: torch.Tensor | None
    rows: torch.Tensor       # [R, D]
    ch: torch.Tensor         # [D] input channel of each column
    y: torch.Tensor          # [R, N] float output on the rows
    shape: tuple             # the module's weight shape

    @classmethod
    def of(cls, module: nn.Module, stats) -> "_Layer":
        w = module.weight.detach().float().cpu()
        w2 = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1) if w.dim() == 4 else w
        b = None if module.bias is None else module.bias.detach().float().cpu()
        rows = stats.rows.float().cpu()
        y = rows @ w2.t() + (0 if b is None else b)
        return cls(w2, b, rows, torch.arange(w2.shape[1]) % w.shape[1], y, tuple(w.shape))

    def to_module_layout(self, w2: torch.Tensor) -> torch.Tensor:
        if len(self.shape) == 2:
            return w2
        n, c, kh, kw = self.shape
        return w2.view(n, kh, kw, c).permute(0, 3, 1, 2).contiguous()


def _fit(layer: _Layer, stats, cfg: QVDConfig, w_bits: int, a_bits: int, alpha: float | None) -> _Fit:
    """Quantize one layer for one SCRI choice and measure its output error on the calibration rows."""
    if alpha is None:
        z, s, wt, xt, s_d = None, None, layer.w, layer.rows, 1.0
        lo, hi = float(stats.ch_min.min()), float(stats.ch_max.max())
    else:
        z, s = scri_params(stats.ch_min.float().cpu(), stats.ch_max.float().cpu(), alpha, cfg.scri_max_gain)
        s_d, z_d = s[layer.ch], z[layer.ch]
        wt = fold_into_weight(layer.w, None, z_d, s_d)[0]
        xt = (layer.rows - z_d) / s_d
        lo = float(((stats.ch_min.cpu() - z) / s).min())
        hi = float(((stats.ch_max.cpu() - z) / s).max())
    wq, ws = quantize_weight(wt, w_bits, cfg.weight_clip)
    w_hat = dequantize_weight(wq, ws)
    bt = layer.b
    if z is not None:  # bias correction from the quantized weight, as QLinear / QConv2d compute it
        bt = fold_into_weight(w_hat / s_d, layer.b, z_d, torch.ones_like(s_d))[1]
    act_scale, zp = activation_qparams(xt, a_bits, cfg.act_range, lo, hi, cfg.percentile)
    yq = fake_quant(xt, act_scale, zp, a_bits) @ w_hat.t() + (0 if bt is None else bt)
    err = float((yq - layer.y).pow(2).sum() / layer.y.pow(2).sum().clamp_min(1e-30))
    w_err = float((w_hat / s_d - layer.w).norm() / layer.w.norm().clamp_min(1e-30))
    return _Fit(err, alpha, z, s, layer.to_module_layout(wq), ws, layer.b, act_scale, zp, w_err)


def _candidates(cfg: QVDConfig, names: list[str]) -> list:
    """SCRI alphas to try for layers sharing one input (None = no SCRI)."""
    allowed = cfg.scri and not any(matches(n, cfg.scri_skip) for n in names)
    return [None] + (list(cfg.scri_alphas) if allowed else [])


def _build(name: str, module: nn.Module, fit: _Fit, w_bits: int, a_bits: int, scri_in_norm: bool) -> nn.Module:
    scri = {}
    if fit.z is not None:
        scri = {"scri_shift": fit.z, "scri_inv_scale": 1.0 / fit.s, "scri_in_norm": scri_in_norm}
    kw = dict(weight_q=fit.weight_q, weight_scale=fit.weight_scale, bias=fit.bias, act_scale=fit.act_scale,
              act_zero_point=fit.zero_point, w_bits=w_bits, a_bits=a_bits, **scri)
    if isinstance(module, nn.Linear):
        q = QLinear(module.in_features, module.out_features, **kw)
    else:
        q = QConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride[0],
                    module.padding[0], **kw)
    return q.to(module.weight.device)


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return (module.groups == 1 and module.dilation == (1, 1) and len(set(module.stride)) == 1
            and isinstance(module.padding, tuple) and len(set(module.padding)) == 1
            and module.padding_mode == "zeros")


def _report(name, kind, w_bits, a_bits, cfg, fit: _Fit | None = None, fold=None, **extra) -> dict:
    entry = {"name": name, "kind": kind, "w_bits": w_bits, "a_bits": a_bits,
             "weight": cfg.weight_clip, "act_range": cfg.act_range}
    if fit is not None:
        entry.update(scri_alpha=fit.alpha, scri_fold=fold if fit.alpha is not None else None,
                     out_rel_err=fit.err, w_rel_err=fit.w_err)
    entry.update(extra)
    return entry


def _quantize_temporal(name, module, calibration, cfg, stats):
    f = calibration.temporal_features(name) if stats.temporal_vectors else stats.rows.float()
    w = module.weight.detach().float().cpu()
    b = None if module.bias is None else module.bias.detach().float().cpu()
    wq, ws = quantize_weight(w, cfg.w_bits, cfg.weight_clip)
    w_err = float((dequantize_weight(wq, ws) - w).norm() / w.norm().clamp_min(1e-30))
    fit = search_hiditq(f, cfg.a_bits, cfg.htdq_lambda, cfg.htdq_window)
    q = HiDiTQLinear(module.in_features, module.out_features, wq, ws, b, fit.levels, cfg.w_bits)
    with torch.no_grad():
        y = f @ w.t() + (0 if b is None else b)
        err = float((q(f) - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30))
    entry = {"name": name, "kind": "temporal", "w_bits": cfg.w_bits, "a_bits": cfg.a_bits,
             "weight": cfg.weight_clip, "act_range": "hiditq", "out_rel_err": err, "w_rel_err": w_err,
             "tdscore": fit.tdscore, "k": fit.k, "hiditq_clip": fit.clip, "hiditq_tau": fit.tau,
             "hiditq_neg_share": fit.neg_share, "timesteps": int(f.shape[0])}
    return q.to(module.weight.device), entry


def _temporal_uniform_tdscore(calibration, name, fit: _Fit, cfg) -> float | None:
    """TDScore of a temporal layer quantized with the uniform quantizer (for the ablation report)."""
    if not calibration.layers[name].temporal_vectors:
        return None
    f = calibration.temporal_features(name)
    z, s = (0.0, 1.0) if fit.z is None else (fit.z, fit.s)  # the quantizer sees SCRI's (f - z) / s
    f_hat = fake_quant((f - z) / s, fit.act_scale, fit.zero_point, cfg.a_bits) * s + z
    return k_metric(f, f_hat, cfg.htdq_lambda, cfg.htdq_window)[2]


def quantize_model(root: nn.Module, calibration: Calibration, config: QVDConfig | None = None,
                   apply: bool = True) -> QuantizeResult:
    """Quantize every calibrated Linear / Conv2d under ``root``.

    Returns the replacement modules (including folded norm copies) and a per-layer report (``out_rel_err``
    and ``w_rel_err``: ``||y_q - y||^2 / ||y||^2`` of the layer output on its calibration rows, and the
    relative L2 error of the weights; ``tdscore`` for temporal layers). With
    ``apply=True`` they are installed in ``root``; with ``apply=False`` ``root`` is left untouched (hosts
    such as ComfyUI install them as object patches).
    """
    cfg = config or QVDConfig()
    if not isinstance(calibration, Calibration):
        raise CalibrationError("quantize_model needs a Calibration (run a Calibrator over the model first)")
    every_layer = find_layers(root, QVDConfig())  # skipped layers still count as the model's own
    targets = find_layers(root, cfg)
    layers = {n: m for n, m in targets.items() if not matches(n, cfg.keep_float)}
    check_layers(calibration.signatures, {n: layer_signature(m) for n, m in every_layer.items()}, "the calibration")
    named = dict(root.named_modules())
    modules, report, done = {}, [], set()

    if cfg.scri and cfg.scri_fold_norm:
        for norm_name, consumers in calibration.norm_groups.items():
            norm = named.get(norm_name)
            group = [n for n in consumers if n in layers]
            if not group or norm is None or not foldable_norm(norm) or len(group) != len(consumers):
                continue
            mods = [layers[n] for n in group]
            if any(cfg.is_temporal(n) for n in group) or not all(_supported(m) for m in mods):
                continue
            if isinstance(norm, nn.LayerNorm) and not all(isinstance(m, nn.Linear) for m in mods):
                continue
            if isinstance(norm, nn.GroupNorm) and not all(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
                                                          and m.padding == (0, 0) for m in mods):
                continue
            bits = [cfg.layer_bits(n) for n in group]
            best = None
            data = [_Layer.of(m, calibration.layers[n]) for n, m in zip(group, mods)]
            for alpha in _candidates(cfg, group):
                fits = [_fit(d, calibration.layers[n], cfg, *bw, alpha) for n, d, bw in zip(group, data, bits)]
                total = sum(f.err for f in fits)
                if best is None or total < best[0]:
                    best = (total, fits)
            fits = best[1]
            for n, m, bw, f in zip(group, mods, bits, fits):
                modules[n] = _build(n, m, f, *bw, scri_in_norm=True)
                report.append(_report(n, "linear" if isinstance(m, nn.Linear) else "conv", *bw, cfg, f,
                                      fold=f"norm:{norm_name}"))
                done.add(n)
            if fits[0].alpha is not None:
                modules[norm_name] = fold_into_norm(norm, fits[0].z.to(norm.weight.device),
                                                    fits[0].s.to(norm.weight.device))

    report += [{"name": n, "kind": "linear" if isinstance(m, nn.Linear) else "conv", "w_bits": 32, "a_bits": 32,
                "skipped": "first / last layer kept in float (keep_float)"}
               for n, m in targets.items() if n not in layers]
    for name, module in layers.items():
        if name in done:
            continue
        stats = calibration.layers.get(name)
        kind = "linear" if isinstance(module, nn.Linear) else "conv"
        if stats is None:
            report.append({"name": name, "kind": kind, "w_bits": 32, "a_bits": 32, "skipped": "never ran in calibration"})
            continue
        if not _supported(module):
            report.append({"name": name, "kind": kind, "w_bits": 32, "a_bits": 32,
                           "skipped": "grouped / dilated / non-zero-padded conv"})
            continue
        if cfg.htdq and cfg.is_temporal(name) and isinstance(module, nn.Linear):
            modules[name], entry = _quantize_temporal(name, module, calibration, cfg, stats)
            report.append(entry)
            continue
        bw = cfg.layer_bits(name)
        data = _Layer.of(module, stats)
        fit = min((_fit(data, stats, cfg, *bw, a) for a in _candidates(cfg, [name])), key=lambda f: f.err)
        modules[name] = _build(name, module, fit, *bw, scri_in_norm=False)
        extra = {}
        if cfg.is_temporal(name):
            extra["tdscore"] = _temporal_uniform_tdscore(calibration, name, fit, cfg)
        report.append(_report(name, kind, *bw, cfg, fit, fold="kernel", **extra))

    if apply:
        install(root, modules)
    signatures = {n: layer_signature(layers[n]) for n in modules if n in layers}
    return QuantizeResult(modules, report, cfg, signatures)


def install(root: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Replace submodules of ``root`` by name."""
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, child, module)
