"""The one dispatch point for QVD's integer kernels.

``linear_w8a8`` / ``conv2d_w8a8`` quantize a float input with a static scale (and optional SCRI
per-channel affine), run an int8 x int8 -> int32 GEMM / convolution and apply the fused
``acc * act_scale * w_scale + bias`` epilogue. Semantics are defined by ``reference.py``.

Weights travel as a ``PackedWeight``: the int8 codes in the one layout every route reads (K-major
``[N, K]``, ``k = (tap, channel)`` for convs), built once by the layer and kept as its state.

Every time-it-once choice goes through ``decide``: at the first call of a key (shapes, strides, stride / padding,
dtype, device) each candidate runs once (compile, tune, pack, self-check), then once timed, and the fastest is kept
as a ``Decision`` for every later call of that key.

Compute routes (a layer's ``compute``: ``auto`` / ``int8`` / ``weight-only``, ``run_route``): ``int8`` is the W8A8
kernels below; ``weight-only`` dequantizes the codes into the activation dtype (``dequantize``) and runs the
float op on the unquantized input (activations are not rounded). ``auto`` decides between the two per layer shape
and device (``decisions``); devices with no int8 kernels here (Apple MPS, ROCm, Intel XPU, DirectML),
``QVD_INT8=off`` and CPUs without VNNI (``auto_skips_int8``) get ``weight-only``.

Integer routes: CUDA tensors -> Triton (``triton_kernels.py``: GEMM / implicit-GEMM conv with the epilogue
in-kernel, after a separate quantize pass or with the quantization fused into the A-tile load; ``decide`` keeps the
faster per shape class and device, ``variants_chosen``). A GEMM / conv beyond the kernels' 32-bit offsets is split into
launches of fewer rows (linear) or images (conv), bit for bit the same; a conv whose single image is too big takes the
torch route. Each Triton kernel is checked against ``reference.py`` on a small problem the first time it runs on a GPU
arch (``_self_check``); a kernel that disagrees, or that fails with a CUDA / Triton / compile error, is switched off
for that GPU (device and arch) with one log line, and its calls take the other variant or the torch route
(``cpu.py``: cuBLAS ``_int_mm``). If Triton is missing: one log line and the torch route for everything. CUDA
out-of-memory, Python errors and interrupts propagate. CPU -> ``cpu.py`` (oneDNN int8 ops, ``torch._int_mm`` or
integer codes in fp32 GEMMs: the fastest exact one, or the one ``QVD_CPU_ROUTE`` pins).
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

import torch

from ..errors import QVDError
from . import cpu, reference
from .cpu import int_mm

__all__ = ["PackedWeight", "linear_w8a8", "conv2d_w8a8", "dequantize", "run_route",
           "int8_unavailable", "decisions", "COMPUTE", "quantize_activation", "hiditq_encode", "hiditq_decode",
           "int_mm", "reference", "triton_available"]

log = logging.getLogger("qvd")
_TRITON = None  # the triton_kernels module, False once unavailable
_OFF: set[tuple] = set()  # (kernel, device, arch) switched off (self-check mismatch or a kernel error): torch route
_CHECKED: set[tuple] = set()  # (kernel, arch) that passed the self-check
_TRITON_DEVICES = ("cuda",)  # tensors on these devices go to Triton


class PackedWeight:
    """int8 weight codes ``[N, K]`` K-major (a conv's ``[N, C, KH, KW]`` in channels-last order, ``k = (kh * KW
    + kw) * C + c``), fp32 per-output-channel scales, and route-specific packings made on first use (oneDNN)."""

    def __init__(self, w_q: torch.Tensor, w_scale: torch.Tensor):
        if w_q.dtype != torch.int8:
            raise TypeError(f"weights must be int8 codes, got {w_q.dtype}; quantize the layer first")
        if w_q.dim() not in (2, 4):
            raise ValueError(f"weights must be [N, K] or [N, C, KH, KW], got shape {tuple(w_q.shape)}")
        self.shape = tuple(w_q.shape)
        w = w_q.detach()
        self.mat = (w.permute(0, 2, 3, 1) if w.dim() == 4 else w).reshape(self.shape[0], -1).contiguous()
        self.scale = w_scale.detach().to(w.device, torch.float32).contiguous()
        self.packed: dict = {}  # route-specific copies, e.g. oneDNN's, keyed by the route

    def __getstate__(self):  # copies and pickles leave the route-specific packings behind (rebuilt on use)
        return {**self.__dict__, "packed": {}}

    @property
    def device(self) -> torch.device:
        return self.mat.device

    @property
    def channels(self) -> int:
        return self.shape[1]

    def conv_view(self) -> torch.Tensor:
        """The conv weight ``[N, C, KH, KW]`` as a channels-last view of ``mat`` (no copy)."""
        n, c, kh, kw = self.shape
        return self.mat.view(n, kh, kw, c).permute(0, 3, 1, 2)


def _triton():
    global _TRITON
    if _TRITON is None:
        try:
            from . import triton_kernels
            _TRITON = triton_kernels
        except Exception as e:  # ImportError, or a triton install that cannot initialise
            _TRITON = False
            log.warning("qvd: Triton kernels unavailable (%s: %s); using the torch int8 route",
                        type(e).__name__, e)
    return _TRITON


def triton_available() -> bool:
    """True when CUDA tensors will run on the Triton kernels."""
    return bool(_triton())


def _arch(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm_{major}{minor}"
    return device.type


def _kernel_error(e: BaseException) -> bool:
    """A failure of the kernel itself (Triton compile / resources / PTX, a CUDA launch error), not of Python code."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return False
    if type(e).__module__.startswith("triton"):
        return True
    accel = getattr(torch, "AcceleratorError", ())
    return isinstance(e, accel) or (type(e) is RuntimeError and ("CUDA" in str(e) or "PTX" in str(e)))


def _self_check(name: str, tk, device: torch.device) -> str | None:
    """Run Triton kernel ``name`` on a small problem on ``device`` against ``reference.py``: None when it agrees,
    else what differs. Odd sizes exercise the masks; codes must be equal, float outputs within fp32 rounding."""
    g = torch.Generator().manual_seed(0)
    shift, inv = torch.randn(40, generator=g) * 0.2, torch.rand(40, generator=g) + 0.5
    x = torch.randn(37, 40, generator=g) * 3
    w_q = torch.randint(-127, 128, (24, 40), generator=g, dtype=torch.int8)
    w_scale, bias = torch.rand(24, generator=g) * 0.01 + 1e-3, torch.randn(24, generator=g)
    on = lambda *ts: [t.to(device) for t in ts]  # noqa: E731
    if name == "quantize":
        want = reference.quantize_activation(x, 0.05, 3, -128, 127, shift, inv)
        got = tk.quantize(*on(x), 0.05, 3, -128, 127, *on(shift, inv))
        return None if torch.equal(got.cpu(), want) else "activation codes differ"
    if name == "linear":
        q = reference.quantize_activation(x, 0.05, 0, -128, 127)
        want = reference.int8_linear(q, w_q, 0.05, w_scale, bias)
        got = tk.linear(*on(q, w_q, w_scale, bias), 0.05, torch.float32).cpu()
    elif name == "linear_fused":
        want = reference.linear_w8a8(x, w_q, w_scale, bias, 0.05, 3, -128, 127, shift, inv)
        got = tk.linear_fused(*on(x, w_q, w_scale, bias), 0.05, 3, -128, 127, *on(shift, inv)).cpu()
    elif name == "conv2d_fused":
        xc = torch.randn(2, 40, 5, 6, generator=g)
        wc = torch.randint(-127, 128, (24, 40, 3, 3), generator=g, dtype=torch.int8)
        want = reference.conv2d_w8a8(xc, wc, w_scale, bias, 0.05, 3, -128, 127, shift, inv, padding=1)
        w_k = PackedWeight(wc.contiguous(memory_format=torch.channels_last), w_scale).mat
        got = tk.conv2d_fused(*on(xc, w_k), 3, 3, *on(w_scale, bias), 0.05, 3, -128, 127, *on(shift, inv), 1,
                              1).cpu()
    elif name == "conv2d":
        xc = torch.randn(2, 40, 5, 6, generator=g)
        wc = torch.randint(-127, 128, (24, 40, 3, 3), generator=g, dtype=torch.int8)
        want = reference.conv2d_w8a8(xc, wc, w_scale, bias, 0.05, 0, -128, 127, padding=1)
        q = tk.quantize(*on(xc), 0.05, 0, -128, 127, None, None)
        pad = torch.zeros(40, dtype=torch.int8, device=device)
        w_k = PackedWeight(wc.contiguous(memory_format=torch.channels_last), w_scale).mat
        got = tk.conv2d(q, pad, *on(w_k), 3, 3, *on(w_scale, bias), 0.05, 1, 1, torch.float32).cpu()
    else:  # hiditq_encode / hiditq_decode
        levels = torch.sort(torch.randn(33, generator=g)).values
        codes = reference.hiditq_encode(x, levels)
        got = (tk.hiditq_encode(*on(x, levels)) if name == "hiditq_encode"
               else tk.hiditq_decode(*on(codes, levels))).cpu()
        want = codes if name == "hiditq_encode" else reference.hiditq_decode(codes, levels)
        return None if torch.equal(got, want) else "codes / levels differ"
    err = float((got.double() - want.double()).abs().max())
    return None if err <= 1e-4 * float(want.abs().max()) else f"max error {err:.3g}"


def _on_triton(t: torch.Tensor, names: tuple[str, ...], fn):
    """Run ``fn(triton_kernels)``, which launches the Triton kernels ``names``, for a tensor on a Triton device; None
    means 'use the torch route' (one of them is off on this device: it failed its self-check or raised a kernel error,
    which switches off every kernel of the call there; or ``fn`` declined the problem, which switches nothing off)."""
    if t.device.type not in _TRITON_DEVICES or not _triton():
        return None
    dev, arch = str(t.device), _arch(t.device)
    if any((n, dev, arch) in _OFF for n in names):
        return None
    try:
        for name in names:
            if (name, arch) in _CHECKED:
                continue
            wrong = _self_check(name, _TRITON, t.device)
            if wrong:
                _OFF.add((name, dev, arch))
                log.warning("qvd: Triton %s disagrees with the reference on %s (%s: %s); it is off there, the torch "
                            "int8 route runs instead", name, dev, arch, wrong)
                return None
            _CHECKED.add((name, arch))
        return fn(_TRITON)
    except Exception as e:
        if not _kernel_error(e):
            raise
        _OFF.update((n, dev, arch) for n in names)
        log.warning("qvd: Triton %s failed on %s (%s: %s: %s); off there from now on, the torch int8 route runs "
                    "instead", " + ".join(names), dev, arch, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None


def _triton_route(t: torch.Tensor, rows: int, key: tuple, variants: dict):
    """The output of the Triton variant ``decide`` keeps for ``t`` (``variants``: name -> (Triton kernel names,
    fn(triton_kernels))), per shape class (``key``, the M bucket of ``rows``) and device; None: the torch route (not a
    Triton device, or no variant runs)."""
    if t.device.type not in _TRITON_DEVICES or not _triton():
        return None
    key = ("triton",) + key + (_TRITON._bucket(rows), str(t.device), _arch(t.device))
    runs = {name: (lambda names=names, fn=fn: _on_triton(t, names, fn)) for name, (names, fn) in variants.items()}
    return decide(_CHOSEN, key, runs, t.device)[1]


def _in_launches(tk, x: torch.Tensor, out_shape: tuple, w_k: torch.Tensor, kernel):
    """A new ``out_shape`` tensor in x's dtype filled by ``kernel(x[i:j], out[i:j])`` over runs of x's leading
    dimension (rows, images) that each fit the GEMM kernels' 32-bit offsets (``triton_kernels.units_per_launch``): one
    launch unless the problem is that large. None (the torch route) when a single row / image does not fit."""
    step = tk.units_per_launch(x, math.prod(out_shape[1:]), w_k)
    if not step:
        return None
    out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    for i in range(0, x.shape[0], step):
        kernel(x[i:i + step], out[i:i + step])
    return out


def variants_chosen() -> dict[tuple, str]:
    """The Triton variant kept per (shape class, device, arch): ``fused`` or ``separate`` (quantize pass + GEMM)."""
    return {key[1:]: d.route for key, d in _CHOSEN.items() if key[0] == "triton"}


def _torch_route(x: torch.Tensor, key: tuple, routes: dict):
    """Run a torch route (``cpu.py``, ``routes``: name -> fn): on CUDA cuBLAS ``_int_mm``; on the CPU the one
    ``QVD_CPU_ROUTE`` pins, else the fastest ``decide`` keeps for ``key`` there."""
    if x.device.type != "cpu":
        return routes["int_mm"]()
    runs = cpu.candidates(routes)
    if len(runs) == 1:
        return next(iter(runs.values()))()
    return decide(_CHOSEN, ("cpu",) + key + (str(x.device),), runs, x.device)[1]


def _check(x, weight: PackedWeight, conv: bool, kind: str):
    if not isinstance(weight, PackedWeight):
        raise TypeError(f"{kind}: weights must be a qvd.kernels.PackedWeight, got {type(weight).__name__}")
    if conv != (len(weight.shape) == 4):
        raise ValueError(f"{kind}: got {'conv' if len(weight.shape) == 4 else 'linear'} weights {weight.shape}")
    if conv and x.dim() != 4:
        raise ValueError(f"{kind}: input must be 4-D, got shape {tuple(x.shape)}")
    if x.dim() < 1:
        raise ValueError(f"{kind}: input must have a channel dimension, got a scalar")
    if x.device != weight.device:
        raise ValueError(f"{kind}: input on {x.device} but weights on {weight.device}; move the module to the "
                         f"input's device")
    k = x.shape[1] if conv else x.shape[-1]
    if k != weight.channels:
        raise ValueError(f"{kind}: input has {k} channels, weights expect {weight.channels}")


def quantize_activation(x, act_scale, zero_point, qmin, qmax, shift=None, inv_scale=None, channel_dim=-1):
    """Static activation quantization to int8 codes (reference semantics, fewer passes)."""
    xm = x.movedim(channel_dim, -1)
    out = torch.empty(xm.shape, dtype=torch.int8, device=x.device)
    return cpu.quantize_into(out, xm, act_scale, zero_point, qmin, qmax, shift, inv_scale).movedim(-1, channel_dim)


def linear_w8a8(x, weight: PackedWeight, bias, act_scale, zero_point, qmin, qmax, shift=None, inv_scale=None):
    """W8A8 linear on ``x [..., K]``."""
    _check(x, weight, False, "linear_w8a8")
    lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
    n = weight.shape[0]
    act = (act_scale, zero_point, qmin, qmax)

    def separate(tk):
        return _in_launches(tk, x2, (x2.shape[0], n), weight.mat, lambda xs, out: tk.linear(
            tk.quantize(xs, *act, shift, inv_scale), weight.mat, weight.scale, bias, act_scale, x.dtype, out=out))

    def fused(tk):
        return _in_launches(tk, x2, (x2.shape[0], n), weight.mat, lambda xs, out: tk.linear_fused(
            xs, weight.mat, weight.scale, bias, *act, shift, inv_scale, out=out))

    key = ("linear", weight.shape, x2.stride(1) == 1, x.dtype, shift is not None)
    y = _triton_route(x, x2.shape[0], key, {"fused": (("linear_fused",), fused),
                                            "separate": (("quantize", "linear"), separate)})
    if y is None:
        y = _torch_route(x, ("linear", tuple(x2.shape), x2.stride(), weight.shape, x.dtype, shift is not None),
                         cpu.linear_routes(x2, weight, bias, *act, shift, inv_scale))
    return y.reshape(*lead, n)


def pad_codes(channels: int, act_scale, zero_point, qmin, qmax, shift=None, inv_scale=None,
              device=None) -> torch.Tensor:
    """Each input channel's code of 0.0: what a conv's zero padding reads (reference semantics), int8 ``[C]``."""
    return quantize_activation(torch.zeros(channels, device=device), act_scale, zero_point, qmin, qmax, shift,
                               inv_scale)


def conv2d_w8a8(x, weight: PackedWeight, bias, act_scale, zero_point, qmin, qmax, shift=None, inv_scale=None,
                stride: int = 1, padding: int = 0, pad: torch.Tensor | None = None):
    """W8A8 conv2d on NCHW ``x``. The output is NCHW-shaped and stored channels-last (the layout the next
    int8 conv reads fastest). ``pad``: ``pad_codes`` when the layer keeps them (made here otherwise)."""
    _check(x, weight, True, "conv2d_w8a8")
    n, c, kh, kw = weight.shape
    act = (act_scale, zero_point, qmin, qmax)
    if pad is None and padding:
        pad = pad_codes(c, *act, shift, inv_scale, x.device)
    out_h, out_w = ((size + 2 * padding - k) // stride + 1 for size, k in ((x.shape[2], kh), (x.shape[3], kw)))
    out_shape = (x.shape[0], out_h, out_w, n)  # NHWC

    def separate(tk):
        codes = pad if pad is not None else torch.zeros(c, dtype=torch.int8, device=x.device)  # unread: no padding
        y = _in_launches(tk, x, out_shape, weight.mat, lambda xs, out: tk.conv2d(
            tk.quantize(xs, *act, shift, inv_scale), codes, weight.mat, kh, kw, weight.scale, bias, act_scale, stride,
            padding, x.dtype, out=out))
        return None if y is None else y.permute(0, 3, 1, 2)

    def fused(tk):
        y = _in_launches(tk, x, out_shape, weight.mat, lambda xs, out: tk.conv2d_fused(
            xs, weight.mat, kh, kw, weight.scale, bias, *act, shift, inv_scale, stride, padding, out=out))
        return None if y is None else y.permute(0, 3, 1, 2)

    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    key = ("conv", weight.shape, stride, padding, channels_last, x.dtype, shift is not None)
    y = _triton_route(x, x.shape[0] * out_h * out_w, key, {"fused": (("conv2d_fused",), fused),
                                                           "separate": (("quantize", "conv2d"), separate)})
    if y is None:
        y = _torch_route(x, ("conv", tuple(x.shape), x.stride(), weight.shape, stride, padding, x.dtype,
                             shift is not None),
                         cpu.conv2d_routes(x, weight, bias, *act, shift, inv_scale, stride, padding, pad))
    return y


def hiditq_encode(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """uint8 index of the nearest of the sorted ``levels`` (ties go to the lower level)."""
    if not 1 <= levels.numel() <= 256:
        raise ValueError(f"hiditq_encode: uint8 codes need 1..256 levels, got {levels.numel()}")
    y = _on_triton(x, ("hiditq_encode",), lambda tk: tk.hiditq_encode(x, levels))
    return reference.hiditq_encode(x, levels) if y is None else y


def hiditq_decode(codes: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Look-up-table decode of HiDi-TQ codes."""
    y = _on_triton(codes, ("hiditq_decode",), lambda tk: tk.hiditq_decode(codes, levels))
    return reference.hiditq_decode(codes, levels) if y is None else y


def dequantize(w_q: torch.Tensor, w_scale: torch.Tensor, col_scale, dtype: torch.dtype) -> torch.Tensor:
    """The weight-only route's float weight: ``w_q * w_scale[n] * col_scale[c]`` in ``dtype``, contiguous (the
    layout of the float layer it replaces; ``col_scale``: SCRI's inverse scale, or None)."""
    view = (1,) * (w_q.dim() - 2)
    # canonical strides (a 1x1 conv's channels-last codes count as contiguous, and the float op would take another,
    # not bit-identical path for them); a channels-last weight is permuted as int8, 1 byte a code
    w = torch.empty(w_q.shape, dtype=dtype, device=w_q.device).copy_(w_q.contiguous())
    w.mul_(w_scale.to(dtype).view(-1, 1, *view))
    return w if col_scale is None else w.mul_(col_scale.to(dtype).view(1, -1, *view))


COMPUTE = ("auto", "int8", "weight-only")


@dataclass(frozen=True)
class Decision:
    """What ``decide`` kept for one key: the fastest candidate (``route``) and, for a compute route, the ms its timed
    ``int8`` and ``weight-only`` calls took (None for the kernel choices: Triton variant, CPU route)."""
    route: str
    int8_ms: float | None = None
    float_ms: float | None = None


_DECIDED: dict[tuple, Decision] = {}  # compute routes (``auto``), by layer shape and device
_CHOSEN: dict[tuple, Decision] = {}  # kernel choices: ("triton", shape class, device, arch), ("cpu", shape, device)


def decisions() -> dict[tuple, Decision]:
    """Every layer shape ``auto`` has decided, keyed ``(layer kind, input shape, ..., dtype, device)``."""
    return dict(_DECIDED)


def describe_decisions(made: list[Decision]) -> str:
    """One line on what ``auto`` chose for ``made`` (e.g. the decisions of one sampling run)."""
    n_int = sum(d.route == "int8" for d in made)
    chosen = sum(min(d.int8_ms, d.float_ms) for d in made)
    wo = sum(d.float_ms for d in made)
    return (f"int8 kernels on {n_int} of {len(made)} layer shapes, weight-only on {len(made) - n_int}; at first use "
            f"the kept routes took {chosen:.0f} ms where weight-only everywhere took {wo:.0f} ms "
            f"({chosen / max(wo, 1e-9):.2f}x)")


def int8_unavailable(device: torch.device) -> str | None:
    """Why ``device`` runs no int8 kernels (then every layer computes weight-only), or None."""
    if os.environ.get("QVD_INT8", "").strip().lower() in ("0", "off", "false", "no"):
        return "QVD_INT8=off"
    if device.type == "cpu" or (device.type == "cuda" and torch.version.hip is None):
        return None
    return f"no int8 kernels for {'ROCm' if device.type == 'cuda' else device.type} devices here"


def auto_skips_int8(device: torch.device) -> str | None:
    """Why ``auto`` runs weight-only on ``device`` without timing the integer kernels, or None. On a CPU whose oneDNN
    int8 is inexact (no VNNI: AVX2 desktops, AMD Zen 2/3, many laptops) the exact integer routes are ``_int_mm``
    (many times slower than fp32 there) and the float GEMM plus quantization (never faster than weight-only)."""
    if device.type == "cpu" and not cpu._onednn_ok():
        return "oneDNN int8 is inexact on this CPU (no VNNI): its integer routes are slower than its float GEMM"
    return None


def fixed_route(compute: str, device: torch.device) -> str | None:
    """The route ``compute`` takes on ``device`` when no timing decides it ("int8" / "weight-only"), else None."""
    if compute not in COMPUTE:
        raise ValueError(f"compute={compute!r}: use one of {COMPUTE}")
    reason = int8_unavailable(device)
    if compute == "int8" and reason:
        raise QVDError(f"compute='int8' but {reason}: choose compute 'auto' or 'weight-only'")
    if compute == "weight-only" or reason or (compute == "auto" and auto_skips_int8(device)):
        return "weight-only"
    return "int8" if compute == "int8" else None


def _timed(fn, device) -> tuple[float, object]:
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return (time.perf_counter() - t0) * 1e3, out


def decide(cache: dict, key: tuple, candidates: dict, device: torch.device) -> tuple[str | None, object]:
    """(name, output) of the candidate (name -> fn) kept in ``cache`` for ``key``. At the first call of ``key`` each
    runs once (warm-up: compile, tune, pack, self-check), then once timed on ``device``, and the fastest is kept. A
    candidate that gives None (a Triton kernel switched off, a problem it declines) is passed over, then and later,
    for the next in order; (None, None) when every one does (nothing is kept then)."""
    kept = cache.get(key)
    if kept is not None:
        for name in sorted(candidates, key=lambda n: n != kept.route):  # the kept one first
            out = candidates[name]()
            if out is not None:
                return name, out
        return None, None
    live = [name for name, fn in candidates.items() if fn() is not None]
    times, outs = {}, {}
    for name in live:
        ms, out = _timed(candidates[name], device)
        if out is not None:
            times[name], outs[name] = ms, out
    if not times:
        return None, None
    best = min(times, key=times.get)
    cache[key] = Decision(best, times.get("int8"), times.get("weight-only"))
    log.debug("qvd: %s -> %s (%s)", key, best, ", ".join(f"{n} {ms:.3f} ms" for n, ms in times.items()))
    return best, outs[best]


def run_route(compute: str, key: tuple, device: torch.device, int8_fn, float_fn) -> tuple[torch.Tensor, str]:
    """(output, route) of ``int8_fn`` or ``float_fn`` (weight-only) per ``compute``; ``auto``: the one ``decide`` keeps
    for ``key`` (everything that changes either route's work: shapes, strides, a conv's stride / padding, dtype) on
    ``device``."""
    fixed = fixed_route(compute, device)
    if fixed:
        return (int8_fn if fixed == "int8" else float_fn)(), fixed
    route, y = decide(_DECIDED, key + (str(device),), {"int8": int8_fn, "weight-only": float_fn}, device)
    return y, route
