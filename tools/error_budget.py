"""Where QVD's W8A8 error comes from on TinyVDM, and what it would take to halve naive min-max's.

Run by ``tools.ablation`` (same calibration, clips and seeds); every figure is printed in docs/results.md:

1. Weights vs activations: QVD simulated in float with both rounded, with only its weight rounding, then only
   its activation rounding (the other in float; the temporal layers keep HiDi-TQ in every row).
2. Error scaling: seeded Gaussian noise of std sigma on the input of one layer of the FP model (the last
   ResNet's 1x1 shortcut, whose output joins the residual stream just before the final norm and conv_out):
   clip PSNR against sigma.
   The exponent ``gamma`` of ``clip MSE ~ sigma^gamma`` says how much a layer's error power must fall for the
   clip MSE to halve: ``2^(2 / gamma)`` times.
3. Per-layer error power of naive min-max over QVD (the quantize reports, on the calibration rows).
4. Ranges that follow the input: QVD with each call's range MSE-searched on that call's own input.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from qvd import QVDConfig
from qvd.identity import find_layers, install
from qvd.modules import QConv2d, QLinear
from qvd.quantizers import activation_qparams, dequantize_weight, fake_quant
from qvd_demo import evaluate as E

SIGMAS = (0.0025, 0.005, 0.01, 0.02)
SPLITS = (("both", "QVD, weights and activations rounded (as run)", "quant", "static"),
          ("weights", "QVD, weight rounding only (activations float)", "quant", "float"),
          ("activations", "QVD, activation rounding only (weights float)", "float", "static"),
          ("per_call", "QVD, each call's activation range MSE-searched on its own input", "quant",
           "per-call"))


class Simulated(nn.Module):
    """A QLinear / QConv2d simulated in float with its SCRI transform and bias, choosing what is rounded:
    ``weights`` "quant" (its int8 codes) or "float" (``float_weight`` in the SCRI domain); ``acts`` "static"
    (its calibrated range), "per-call" (a range MSE-searched on each call's input) or "float"."""

    def __init__(self, q: QLinear | QConv2d, float_weight: torch.Tensor, weights: str, acts: str):
        super().__init__()
        if weights not in ("quant", "float") or acts not in ("static", "per-call", "float"):
            raise ValueError(f"weights={weights!r} / acts={acts!r}: use quant|float and static|per-call|float")
        self.q, self.acts = q, acts
        scri, w = q.scri, float_weight.float()
        if weights == "quant":
            self.weight, self.bias = dequantize_weight(q.weight, q.weight_scale), q.scri_bias()  # W s, b + W z
        elif scri is None:
            self.weight, self.bias = w, q.bias
        else:
            self.weight, self.bias = scri.fold_weight(w), scri.fold_bias(w, q.bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        q, x = self.q, input.float()
        conv = isinstance(q, QConv2d)
        if conv and q.padding:
            x = F.pad(x, (q.padding,) * 4)  # zero padding in the real domain, as the kernels do
        if q.scri_shift is not None and not q.scri_in_norm:  # as the quantize kernel does: times the stored 1 / s
            view = (1, -1, 1, 1) if conv else (-1,)
            x = (x - q.scri_shift.view(view)) * q.scri_inv_scale.view(view)
        if self.acts == "static":
            x = fake_quant(x, float(q.act_scale_now("cpu")), q.zero_point, q.a_bits)
        elif self.acts == "per-call":
            x = fake_quant(x, *activation_qparams(x, q.a_bits, "mse", float(x.min()), float(x.max())), q.a_bits)
        y = F.conv2d(x, self.weight, self.bias, q.stride) if conv else F.linear(x, self.weight, self.bias)
        return y.to(input.dtype)


def simulated_copy(fp: nn.Module, quantized: nn.Module, weights: str, acts: str) -> nn.Module:
    """A deep copy of ``quantized`` whose W8A8 layers are ``Simulated`` (float weights taken from ``fp``)."""
    out = copy.deepcopy(quantized)
    named_fp = dict(fp.named_modules())
    install(out, {n: Simulated(m, named_fp[n].weight.detach(), weights, acts) for n, m in out.named_modules()
                  if isinstance(m, (QLinear, QConv2d))})
    return out


def quantized_only(fp: nn.Module, cal, cfg, inside, mode: str = "int") -> nn.Module:
    """A copy of ``fp`` quantized with ``cfg`` in the layers named in ``inside`` only (the rest float); its
    W8A8 layers in ``mode`` (``evaluate.quantized_copy``)."""
    others = tuple(n for n in find_layers(fp, QVDConfig()) if n not in inside)
    return E.quantized_copy(fp, cal, dataclasses.replace(cfg, skip=others), mode)[0]


def last_shortcut(model: nn.Module) -> str:
    """Name of the last ResNet 1x1 shortcut conv (the one nearest the output)."""
    names = [n for n, m in model.named_modules() if n.endswith("conv_shortcut") and isinstance(m, nn.Conv2d)]
    if not names:
        raise ValueError("the model has no ResNet conv_shortcut layer")
    return names[-1]


def noisy_copy(fp: nn.Module, layer: str, sigma: float, seed: int = 0) -> nn.Module:
    """A deep copy of ``fp`` with seeded Gaussian noise of std ``sigma`` added to ``layer``'s input."""
    out = copy.deepcopy(fp)
    g = torch.Generator().manual_seed(seed)
    out.get_submodule(layer).register_forward_pre_hook(
        lambda _, args: (args[0] + sigma * torch.randn(args[0].shape, generator=g).to(args[0]),) + args[1:])
    return out


def error_budget(fp, cal, conds, reference, steps: int, guidance: float, configs: dict, log=print,
                 mode: str = "int") -> dict:
    """The four measurements of the module docstring. ``configs``: {"naive": QVDConfig, "qvd": QVDConfig};
    ``mode``: the W8A8 layers' ("int" kernels or "fake" float simulation)."""
    ev = lambda m: E.evaluate(fp, m, n=len(conds), steps=steps, guidance=guidance, conds=conds,
                              reference=reference)["psnr_db"]
    quant, reports = {}, {}
    for key in ("naive", "qvd"):
        quant[key], res = E.quantized_copy(fp, cal, configs[key], mode)
        reports[key] = {r["name"]: r["out_rel_err"] for r in res.report if "out_rel_err" in r}
    out = {"splits": {}, "noise": {}}
    for key, label, w, a in SPLITS:
        out["splits"][key] = {"label": label, "psnr_db": ev(simulated_copy(fp, quant["qvd"], w, a))}
        log(f"budget {key:11s} {out['splits'][key]['psnr_db']:6.2f} dB")
    layer = last_shortcut(fp)
    for sigma in SIGMAS:
        out["noise"][sigma] = ev(noisy_copy(fp, layer, sigma))
        log(f"budget noise {sigma:g} on {layer}: {out['noise'][sigma]:6.2f} dB")
    names = [n for n in reports["qvd"] if n in reports["naive"] and reports["qvd"][n] > 0]
    ratios = [reports["naive"][n] / reports["qvd"][n] for n in names]
    out.update(layer=layer, layers=len(names), power_ratio_median=statistics.median(ratios),
               power_ratio_layer=reports["naive"][layer] / reports["qvd"][layer],
               input_std=float(cal.layers[layer].rows.std()), input_spread=channel_spread(cal.layers[layer]))
    alone = {key: ev(quantized_only(fp, cal, configs[key], [layer], mode)) for key in ("naive", "qvd")}
    out["layer_alone"] = alone
    log(f"budget {layer} alone: naive {alone['naive']:.2f} dB, QVD {alone['qvd']:.2f} dB")
    return out


def channel_spread(stats) -> float:
    """Largest over median input-channel half-range of a layer (calibration extremes)."""
    r = (stats.ch_max - stats.ch_min).float() * 0.5
    return float(r.max() / r.median().clamp_min(1e-12))


def mse_ratio(psnr_db: float, ref_db: float) -> float:
    """Error of a configuration over a reference's (MSE ratio, from their PSNRs)."""
    return 10 ** ((ref_db - psnr_db) / 10)


def gamma(noise: dict) -> float:
    """Exponent of clip MSE ~ sigma^gamma between the two smallest sigmas."""
    (s0, p0), (s1, p1) = sorted(noise.items())[:2]
    return (p0 - p1) / (10 * math.log10(s1 / s0))


def render(budget: dict, naive_db: float | None = None, qvd_db: float | None = None) -> list[str]:
    """The markdown section for docs/results.md."""
    b = budget
    sp, noise, g = b["splits"], b["noise"], gamma(b["noise"])
    need = 2 ** (2 / g)
    lines = [
        "Measured by `tools/error_budget.py` on the same calibration and clips. The first table runs QVD's layers "
        "as float simulations that round exactly what the row says (the temporal layers keep HiDi-TQ in every "
        "row).", "",
        "| QVD W8A8, simulated in float | PSNR vs FP (dB) |", "|---|---:|"]
    lines += [f"| {v['label']} | {v['psnr_db']:.2f} |" for v in sp.values()]
    lines += ["", f"Gaussian noise of std sigma added to the input of `{b['layer']}` in the FP model (its input's "
              f"std on the calibration rows: {b['input_std']:.2f}):", "",
              "| sigma | " + " | ".join(f"{s:g}" for s in noise) + " |",
              "|---|" + "---:|" * len(noise),
              "| PSNR vs FP (dB) | " + " | ".join(f"{p:.2f}" for p in noise.values()) + " |", ""]
    psnrs = list(noise.values())
    steps = [f"{hi - lo:.2f}" for hi, lo in zip(psnrs, psnrs[1:])]
    w_db, a_db = sp["weights"]["psnr_db"], sp["activations"]["psnr_db"]
    lines.append(f"- {'Activation' if a_db < w_db else 'Weight'} rounding holds most of the error: weights alone "
                 f"{w_db:.2f} dB, activations alone {a_db:.2f} dB.")
    lines.append(
        f"- Each doubling of sigma costs {', '.join(steps)} dB, where a clip error growing with the noise power "
        f"would cost 6.02: clip MSE ~ sigma^{g:.2f} at small sigma (likely the hard-edged shapes: an edge "
        f"displaced by d costs in proportion to d, not d^2). If every layer behaves like this one, halving the "
        f"clip MSE takes a layer error power {need:.1f}x smaller, where QVD's is {b['power_ratio_median']:.2f}x "
        f"smaller than naive min-max's (median over {b['layers']} layers, calibration rows) and "
        f"{b['power_ratio_layer']:.2f}x at `{b['layer']}`.")
    alone = b["layer_alone"]
    lines.append(
        f"- That one layer quantized alone: naive {alone['naive']:.2f} dB, QVD {alone['qvd']:.2f} dB "
        f"({mse_ratio(alone['qvd'], alone['naive']):.2f}x naive's MSE). Its input channels span even ranges "
        f"(largest over median half-range {b['input_spread']:.1f}), so SCRI has little to integrate there.")
    if naive_db is not None:
        dyn, static = sp["per_call"]["psnr_db"], sp["both"]["psnr_db"]
        lines.append(
            f"- Ranges that follow every call's own input (MSE-searched per call: per timestep, per batch; a "
            f"run-time reduction static scales avoid) reach {dyn:.2f} dB ({mse_ratio(dyn, naive_db):.2f}x naive "
            f"min-max's MSE), against {static:.2f} dB ({mse_ratio(static, naive_db):.2f}x) for QVD's static "
            f"ranges simulated the same way" + (
                f" ({qvd_db:.2f} dB on the integer kernels: the same codes, accumulated in another order, which "
                f"sampling amplifies to {abs(qvd_db - static):.2f} dB; read these rows to that precision)."
                if qvd_db is not None else "."))
    return lines

