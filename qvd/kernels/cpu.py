"""Torch routes (CPU, and CUDA when Triton is unavailable); semantics: ``reference.py``.

CPU routes, all exact (the int32 accumulator of the reference, bit for bit):
- ``onednn``: oneDNN's int8 ops (``torch.ops.onednn.qlinear_pointwise`` / ``qconv2d_pointwise``: u8 activations x s8
  weights, int32 accumulate, ``acc * x_scale * w_scale + bias`` epilogue in the kernel);
- ``int_mm``: ``torch._int_mm`` (conv: NHWC int8 im2col from strided views) plus a separate epilogue;
- ``float``: the same integer codes as fp32 through the float GEMM / conv (MKL, oneDNN fp32), split along K into
  chunks of at most ``EXACT_TERMS`` products, so every partial sum is an integer below 2**24 and exact in fp32
  whatever the summation order; chunks are added in float64. On CPUs without VNNI (AVX2: many desktop, AMD Zen 2/3
  and laptop CPUs), where oneDNN int8 is inexact and ``_int_mm`` is many times slower than fp32, this is the fast one.
None wins everywhere (docs/benchmarks.md), so by default (``QVD_CPU_ROUTE=auto``) the first call of each shape times
them (``candidates``: ``float`` only where oneDNN int8 is inexact; ``qvd.kernels.decide``) and keeps the fastest;
``QVD_CPU_ROUTE=onednn`` / ``int_mm`` / ``float`` pins one. For oneDNN codes are stored +128 as uint8 with oneDNN
zero point 128, so the int32 accumulator is over the raw codes exactly as in the reference (the code zero point is
folded into the effective bias). int8 (s8) activations are avoided: oneDNN runs them on a reference path, 10-1000x
slower.
oneDNN's prepacked weights are kept on the layer's ``PackedWeight``. Before first use a probe checks that the
oneDNN route is exact (no int16 saturation on CPUs without VNNI); otherwise ``torch._int_mm`` is used.
On CUDA (Triton unavailable) the epilogue stays on the device: no host sync per layer.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

log = logging.getLogger("qvd")

_ONEDNN_OK: bool | None = None
ROUTES = ("auto", "onednn", "int_mm", "float")
ROUTE = os.environ.get("QVD_CPU_ROUTE", "auto")
# |activation code| <= 128 and |weight code| <= 128: a product is at most 2**14, a sum of 2**10 of them below 2**24
EXACT_TERMS = 1 << 10


def candidates(routes: dict) -> dict:
    """The CPU routes (name -> fn) to time among ``routes``, or the one ``QVD_CPU_ROUTE`` pins (``int_mm`` where the
    pinned one is left out): oneDNN only where its int8 is exact, and then (VNNI) not the float GEMM, never faster."""
    if ROUTE not in ROUTES:
        raise ValueError(f"QVD_CPU_ROUTE={ROUTE!r}: use one of {ROUTES}")
    if not _onednn_ok():
        routes = {k: v for k, v in routes.items() if k != "onednn"}
    elif ROUTE == "auto":
        routes = {k: v for k, v in routes.items() if k != "float"}
    if ROUTE == "auto":
        return routes
    name = ROUTE if ROUTE in routes else "int_mm"
    return {name: routes[name]}


def float_mm_exact(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ w.T`` for integer-valued fp32 ``a [M, K]`` and int8 codes ``w [N, K]`` (|values| <= 128): fp32
    GEMMs over K chunks of ``EXACT_TERMS``, summed in float64 (returned fp32 when one chunk, else float64)."""
    k = a.shape[1]
    wf = w.float()
    if k <= EXACT_TERMS:
        return a @ wf.t()
    acc = None
    for s in range(0, k, EXACT_TERMS):
        part = (a[:, s:s + EXACT_TERMS] @ wf[:, s:s + EXACT_TERMS].t()).double()
        acc = part if acc is None else acc.add_(part)
    return acc


def float_conv_exact(q: torch.Tensor, w: torch.Tensor, stride: int) -> torch.Tensor:
    """Exact conv of integer-valued fp32 ``q [N, C, H, W]`` (padded) with int8 codes ``w [O, C, KH, KW]``: fp32
    convolutions over input-channel chunks of at most ``EXACT_TERMS`` products each, summed in float64."""
    c, taps = w.shape[1], w.shape[2] * w.shape[3]
    step = max(1, EXACT_TERMS // taps)
    wf = w.float()
    if c <= step:
        return F.conv2d(q, wf, None, stride)
    acc = None
    for s in range(0, c, step):
        part = F.conv2d(q[:, s:s + step], wf[:, s:s + step], None, stride).double()
        acc = part if acc is None else acc.add_(part)
    return acc


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 [M, K] x int8 [K, N] -> int32 [M, N]."""
    if a.device.type == "cuda" and (a.shape[0] <= 16 or a.shape[1] % 8 or b.shape[1] % 8):
        # cuBLAS int8 GEMM needs M > 16 and K, N multiples of 8: pad with zeros (exact).
        m, k = a.shape
        n = b.shape[1]
        mp, kp, np_ = max(17, m), -(-k // 8) * 8, -(-n // 8) * 8
        a = F.pad(a, (0, kp - k, 0, mp - m))
        b = F.pad(b, (0, np_ - n, 0, kp - k))
        return torch._int_mm(a, b)[:m, :n]
    return torch._int_mm(a, b)


def quantize_into(out: torch.Tensor, x: torch.Tensor, act_scale, zero_point: int, qmin: int, qmax: int,
                  shift=None, inv_scale=None, offset: int = 0) -> torch.Tensor:
    """Write ``reference.quantize_activation(x) + offset`` into ``out`` (int8 / uint8, any strides).

    ``x`` has its channels last (any strides, any float dtype). Bit-exact with the reference: float32
    math in the same order; ``clamp`` before ``round`` is equivalent for integer bounds, and saves a pass.
    """
    if x.shape != out.shape:
        raise ValueError(f"quantize_into: out shape {tuple(out.shape)} != input shape {tuple(x.shape)}")
    v = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    src = x  # the first op reads x (any strides / dtype) and writes v: no separate copy pass
    if shift is not None:
        torch.sub(src, shift.float(), out=v)
        src = v
    if inv_scale is not None:
        torch.mul(src, inv_scale.float(), out=v)
        src = v
    # a 1-element fp32 tensor (not a scalar) makes a bf16 / fp16 x divide in fp32, like the reference
    scale = (act_scale.detach().float() if isinstance(act_scale, torch.Tensor)
             else torch.tensor(float(act_scale))).reshape(1).to(x.device)
    torch.div(src, scale, out=v)
    v.clamp_(qmin - zero_point, qmax - zero_point).round_()
    if zero_point + offset:
        v.add_(zero_point + offset)
    return out.copy_(v)


def _epilogue(acc: torch.Tensor, act_scale, w_scale: torch.Tensor, bias, out_dtype: torch.dtype):
    s = act_scale.to(acc.device, torch.float32) if isinstance(act_scale, torch.Tensor) else float(act_scale)
    y = acc.float().mul_(w_scale * s)
    if bias is not None:
        y.add_(bias)
    return y.to(out_dtype)


def _onednn_ok() -> bool:
    """One-time probe: oneDNN int8 ops present and exact at the worst-case products."""
    global _ONEDNN_OK
    if _ONEDNN_OK is None:
        try:
            w = torch.full((16, 64), 127, dtype=torch.int8)
            w[::2] = -128
            x = torch.full((8, 64), 255, dtype=torch.uint8)
            packed = torch.ops.onednn.qlinear_prepack(w, None)
            y = torch.ops.onednn.qlinear_pointwise(x, 1.0, 0, packed, torch.ones(16),
                                                   torch.zeros(16, dtype=torch.int32), None, 1.0, 0, torch.float32,
                                                   "none", [], "")
            _ONEDNN_OK = bool(torch.equal(y.double(), x.double() @ w.double().t()))
            if not _ONEDNN_OK:
                log.info("qvd: oneDNN int8 ops are inexact on this CPU; using torch._int_mm")
        except (AttributeError, RuntimeError) as e:
            log.info("qvd: oneDNN int8 ops unavailable (%s); using torch._int_mm", e)
            _ONEDNN_OK = False
    return _ONEDNN_OK


def _packed(weight, stride: int | None):
    """oneDNN's prepacked copy of ``weight`` (a ``PackedWeight``), made on first use and kept on it."""
    key = ("onednn", stride)
    if key not in weight.packed:
        if stride is None:
            weight.packed[key] = torch.ops.onednn.qlinear_prepack(weight.mat, None)
        else:
            weight.packed[key] = torch.ops.onednn.qconv_prepack(weight.conv_view(), weight.scale, 1.0, 0,
                                                                [stride] * 2, [0, 0], [1, 1], 1, None)
    return weight.packed[key]


def _onednn_dtype(out_dtype: torch.dtype, conv: bool) -> torch.dtype:
    # oneDNN int8 conv has no fp16 destination: compute fp32 and cast.
    return torch.float32 if (conv and out_dtype == torch.float16) else out_dtype


def linear_routes(x2, weight, bias, act_scale, zero_point, qmin, qmax, shift=None, inv_scale=None) -> dict:
    """The torch routes (name -> fn) of a W8A8 linear on ``x2 [M, K]``, each giving ``[M, N]`` in x2's dtype;
    ``weight`` a ``PackedWeight``. ``onednn`` / ``float`` run on the CPU only."""
    n = weight.shape[0]

    def onednn():
        q = quantize_into(torch.empty(x2.shape, dtype=torch.uint8), x2, act_scale, zero_point, qmin, qmax,
                          shift, inv_scale, offset=128)
        zeros = torch.zeros(n, dtype=torch.int32)
        b = None if bias is None else bias.float()
        return torch.ops.onednn.qlinear_pointwise(q, float(act_scale), 128, _packed(weight, None), weight.scale,
                                                  zeros, b, 1.0, 0, x2.dtype, "none", [], "")

    def int_mm_route():
        q = quantize_into(torch.empty(x2.shape, dtype=torch.int8, device=x2.device), x2, act_scale, zero_point,
                          qmin, qmax, shift, inv_scale)
        return _epilogue(int_mm(q, weight.mat.t()), act_scale, weight.scale, bias, x2.dtype)

    def float_route():
        q = quantize_into(torch.empty(x2.shape, dtype=torch.float32), x2, act_scale, zero_point, qmin, qmax,
                          shift, inv_scale)
        return _epilogue(float_mm_exact(q, weight.mat), act_scale, weight.scale, bias, x2.dtype)

    return {"onednn": onednn, "int_mm": int_mm_route, "float": float_route}


def quantize_padded_nhwc(x: torch.Tensor, act_scale, zero_point: int, qmin: int, qmax: int, shift, inv_scale,
                         padding: int, offset: int = 0, dtype: torch.dtype = torch.int8,
                         pad: torch.Tensor | None = None) -> torch.Tensor:
    """NCHW float ``x`` -> padded NHWC codes; the border holds each channel's code of 0.0 (``pad``: those int8 codes
    when the caller keeps them, else made here)."""
    n, c, h, w = x.shape
    out = torch.empty((n, h + 2 * padding, w + 2 * padding, c), dtype=dtype, device=x.device)
    p = padding
    quantize_into(out[:, p:p + h, p:p + w], x.permute(0, 2, 3, 1), act_scale, zero_point, qmin, qmax,
                  shift, inv_scale, offset)
    if p:
        if pad is None:
            pad = quantize_into(torch.empty(c, dtype=dtype, device=x.device), torch.zeros(c, device=x.device),
                                act_scale, zero_point, qmin, qmax, shift, inv_scale, offset)
        else:
            pad = (pad.to(torch.int16) + offset).to(dtype)
        out[:, :p] = pad
        out[:, h + p:] = pad
        out[:, :, :p] = pad
        out[:, :, w + p:] = pad
    return out


def conv2d_routes(x, weight, bias, act_scale, zero_point, qmin, qmax, shift=None, inv_scale=None,
                  stride: int = 1, padding: int = 0, pad: torch.Tensor | None = None) -> dict:
    """The torch routes (name -> fn) of a W8A8 conv2d on NCHW ``x``, as ``linear_routes``; ``pad``: the int8 codes of
    0.0 per channel (``qvd.kernels.pad_codes``) or None; output NCHW-shaped, stored channels-last."""
    n, c, h, w = x.shape
    cout, _, kh, kw = weight.shape

    def onednn():
        q = quantize_padded_nhwc(x, act_scale, zero_point, qmin, qmax, shift, inv_scale, padding,
                                 offset=128, dtype=torch.uint8, pad=pad)
        zeros = torch.zeros(cout, dtype=torch.int32)
        b = None if bias is None else bias.float()
        y = torch.ops.onednn.qconv2d_pointwise(q.permute(0, 3, 1, 2), float(act_scale), 128, _packed(weight, stride),
                                               weight.scale, zeros, b, [stride] * 2, [0, 0], [1, 1], 1, 1.0, 0,
                                               _onednn_dtype(x.dtype, True), "none", [], "")
        return y.to(x.dtype)

    def int_mm_route():
        q = quantize_padded_nhwc(x, act_scale, zero_point, qmin, qmax, shift, inv_scale, padding, pad=pad)
        hp, wp = h + 2 * padding, w + 2 * padding
        oh, ow = (hp - kh) // stride + 1, (wp - kw) // stride + 1
        if kh == 1 and kw == 1:
            cols = q[:, ::stride, ::stride, :].reshape(-1, c)
        else:
            sn, sh, sw, sc = q.stride()
            cols = q.as_strided((n, oh, ow, kh, kw, c), (sn, sh * stride, sw * stride, sh, sw, sc))
            cols = cols.reshape(n * oh * ow, kh * kw * c)
        acc = int_mm(cols, weight.mat.t())
        y = _epilogue(acc, act_scale, weight.scale, bias, x.dtype)
        return y.view(n, oh, ow, cout).permute(0, 3, 1, 2)

    def float_route():
        q = quantize_padded_nhwc(x, act_scale, zero_point, qmin, qmax, shift, inv_scale, padding,
                                 dtype=torch.float32, pad=pad)
        acc = float_conv_exact(q.permute(0, 3, 1, 2), weight.conv_view(), stride)
        view = (1, -1, 1, 1)
        return _epilogue(acc, act_scale, weight.scale.view(view), None if bias is None else bias.view(view), x.dtype)

    return {"onednn": onednn, "int_mm": int_mm_route, "float": float_route}
