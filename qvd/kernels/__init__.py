"""The one dispatch point for QVD's integer kernels.

``linear_w8a8`` / ``conv2d_w8a8`` quantize a float input with a static scale (and optional SCRI
per-channel affine), run an int8 x int8 -> int32 GEMM / convolution and apply the fused
``acc * act_scale * w_scale + bias`` epilogue. Semantics are defined by ``reference.py``.

Weights travel as a ``PackedWeight``: the int8 codes in the one layout every route reads (K-major
``[N, K]``, ``k = (tap, channel)`` for convs), built once by the layer and kept as its state.

Compute routes (a layer's ``compute``: ``auto`` / ``int8`` / ``weight-only``, ``run_route``): ``int8`` is the W8A8
kernels below; ``weight-only`` dequantizes the codes into the activation dtype (``dequantize``) and runs the
float op on the unquantized input (activations are not rounded). ``auto`` times both at the first call of each shape on each device and keeps the faster; devices with no
int8 kernels here (Apple MPS, ROCm, Intel XPU, DirectML), ``QVD_INT8=off`` and CPUs without VNNI
(``auto_skips_int8``) get ``weight-only``.

Integer routes: CUDA tensors -> Triton (``triton_kernels.py``: GEMM / implicit-GEMM conv with the epilogue
in-kernel, after a separate quantize pass or with the quantization fused into the A-tile load; the first call of each
shape class times both variants and keeps the faster, ``_fastest_on_triton``). Each Triton kernel is checked against
``reference.py`` on a small problem the first time it runs on a GPU arch (``_self_check``); a kernel that disagrees,
or that fails with a CUDA / Triton / compile error, is switched off for that arch with one log line, and its calls
take the other variant or the torch route (``cpu.py``: cuBLAS ``_int_mm``). If Triton is missing: one log line and
the torch route for everything. CUDA out-of-memory, Python errors and interrupts propagate. CPU -> ``cpu.py``
(oneDNN int8 ops, ``torch._int_mm`` or integer codes in fp32 GEMMs, the fastest exact one).
"""
from __future__ import annotations

import logging
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
_OFF: set[tuple] = set()  # (kernel, arch) switched off (self-check mismatch or a kernel error): torch route
_CHECKED: set[tuple] = set()  # (kernel, arch) that passed the self-check
_VARIANT: dict[tuple, str] = {}  # (shape class, arch) -> the faster Triton variant ("fused" / "separate")
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
    means 'use the torch route' (one of them is off on this arch: it failed its self-check or raised a kernel
    error, which switches off every kernel of the call)."""
    if t.device.type not in _TRITON_DEVICES or not _triton():
        return None
    arch = _arch(t.device)
    if any((n, arch) in _OFF for n in names):
        return None
    try:
        for name in names:
            if (name, arch) in _CHECKED:
                continue
            wrong = _self_check(name, _TRITON, t.device)
            if wrong:
                _OFF.add((name, arch))
                log.warning("qvd: Triton %s disagrees with the reference on %s (%s); it is off, the torch int8 route "
                            "runs instead", name, arch, wrong)
                return None
            _CHECKED.add((name, arch))
        return fn(_TRITON)
    except Exception as e:
        if not _kernel_error(e):
            raise
        _OFF.update((n, arch) for n in names)
        log.warning("qvd: Triton %s failed on %s (%s: %s); off from now on, the torch int8 route runs instead",
                    " + ".join(names), arch, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None


def _fastest_on_triton(t: torch.Tensor, rows: int, key: tuple, variants: dict):
    """Run the faster of ``variants`` (name -> (Triton kernel names, fn(triton_kernels))) for ``t``; None: the torch
    route (every variant is off on this arch). The first call of a shape class (``key``, the M bucket of ``rows``, the
    arch) runs each variant once to compile / tune / self-check it, times each once more and keeps the faster."""
    if t.device.type not in _TRITON_DEVICES or not _triton():
        return None
    key = key + (_TRITON._bucket(rows), _arch(t.device))
    if key not in _VARIANT:
        times = {}
        for name, (names, fn) in variants.items():
            if _on_triton(t, names, fn) is not None:
                times[name], _ = _timed(lambda: _on_triton(t, names, fn), t.device)
        if not times:
            return None
        _VARIANT[key] = min(times, key=times.get)
        log.debug("qvd: Triton %s -> %s (%s)", key, _VARIANT[key],
                  ", ".join(f"{n} {ms:.3f} ms" for n, ms in times.items()))
    first = _VARIANT[key]
    for name in [first] + [n for n in variants if n != first]:  # the other variant if the kept one was switched off
        y = _on_triton(t, *variants[name])
        if y is not None:
            return y
    return None


def variants_chosen() -> dict[tuple, str]:
    """The Triton variant kept per (shape class, arch): ``fused`` or ``separate`` (quantize pass + GEMM)."""
    return dict(_VARIANT)


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
    act = (act_scale, zero_point, qmin, qmax)

    def separate(tk):
        q = tk.quantize(x2, *act, shift, inv_scale)
        return tk.linear(q, weight.mat, weight.scale, bias, act_scale, x.dtype)

    def fused(tk):
        return tk.linear_fused(x2, weight.mat, weight.scale, bias, *act, shift, inv_scale)

    key = ("linear", weight.shape, x.dtype, shift is not None)
    y = _fastest_on_triton(x, x2.shape[0], key, {"fused": (("linear_fused",), fused),
                                                 "separate": (("quantize", "linear"), separate)})
    if y is None:
        return cpu.linear_w8a8(x, weight, bias, act_scale, zero_point, qmin, qmax, shift, inv_scale)
    return y.reshape(*lead, weight.shape[0])


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
    _, c, kh, kw = weight.shape
    act = (act_scale, zero_point, qmin, qmax)
    if pad is None and padding:
        pad = pad_codes(c, *act, shift, inv_scale, x.device)

    def separate(tk):
        q = tk.quantize(x, *act, shift, inv_scale)
        codes = pad if pad is not None else torch.zeros(c, dtype=torch.int8, device=x.device)  # unread: no padding
        return tk.conv2d(q, codes, weight.mat, kh, kw, weight.scale, bias, act_scale, stride, padding, x.dtype)

    def fused(tk):
        return tk.conv2d_fused(x, weight.mat, kh, kw, weight.scale, bias, *act, shift, inv_scale, stride, padding)

    out_h, out_w = ((size + 2 * padding - k) // stride + 1 for size, k in ((x.shape[2], kh), (x.shape[3], kw)))
    rows = x.shape[0] * out_h * out_w
    key = ("conv", weight.shape, stride, padding, x.dtype, shift is not None)
    y = _fastest_on_triton(x, rows, key, {"fused": (("conv2d_fused",), fused),
                                          "separate": (("quantize", "conv2d"), separate)})
    if y is None:
        y = cpu.conv2d_w8a8(x, weight, bias, act_scale, zero_point, qmin, qmax, shift, inv_scale, stride, padding,
                            pad)
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
    """The route ``auto`` keeps for one layer shape on one device, and the times it measured (ms)."""
    route: str
    int8_ms: float | None = None
    float_ms: float | None = None


_DECIDED: dict[tuple, Decision] = {}


def decisions() -> dict[tuple, Decision]:
    """Every shape ``auto`` has decided, keyed ``(kind, input shape, weight shape, ..., dtype, device)``."""
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


def _timed(fn, device) -> tuple[float, torch.Tensor]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return (time.perf_counter() - t0) * 1e3, out


def run_route(compute: str, key: tuple, device: torch.device, int8_fn, float_fn) -> tuple[torch.Tensor, str]:
    """(output, route) of ``int8_fn`` or ``float_fn`` (weight-only) per ``compute``; ``auto`` times both (after a
    warm-up call each) at the first call of ``key`` on ``device`` and keeps the faster for every later call."""
    fixed = fixed_route(compute, device)
    if fixed:
        return (int8_fn if fixed == "int8" else float_fn)(), fixed
    key = key + (str(device),)
    hit = _DECIDED.get(key)
    if hit is not None:
        return (int8_fn if hit.route == "int8" else float_fn)(), hit.route
    int8_fn(), float_fn()  # warm-up: kernel tuning, oneDNN packing, the CPU route's own choice
    t_int, y_int = _timed(int8_fn, device)
    t_float, y_float = _timed(float_fn, device)
    route = "int8" if t_int <= t_float else "weight-only"
    _DECIDED[key] = Decision(route, t_int, t_float)
    log.debug("qvd: %s -> %s (int8 %.2f ms, weight-only %.2f ms)", key, route, t_int, t_float)
    return (y_int if route == "int8" else y_float), route
