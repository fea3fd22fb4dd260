"""Triton kernels for CUDA tensors (semantics: ``reference.py``).

- ``quantize``: static activation quantization (SCRI shift / inv_scale, IEEE division by the scale,
  round-half-even, zero point, clamp) to int8, from any strided 2-D ``[M, K]`` or NCHW input; conv
  inputs are written channels-last (NHWC) for the implicit-GEMM conv.
- ``linear``: int8 GEMM, int32 accumulate, epilogue ``acc * act_scale * w_scale[n] + bias[n]`` stored
  in the output dtype (fp16 / bf16 / fp32).
- ``conv2d``: int8 implicit-GEMM conv on NHWC codes, one flat K loop over (tap, channel); padded pixels
  read the per-channel code of 0.0.
- ``hiditq_encode`` / ``hiditq_decode``: nearest-level codes (binary search) and their look-up.

Both GEMMs read the weight K-major, ``[N, K]`` (``qvd.kernels.PackedWeight``). Tiles: at most 4 candidates
per shape class (``shape_class``: M bucket, N, arch), timed once per key and kept in Triton's cache dir.

Under ``TRITON_INTERPRET=1`` (set before triton is imported) the same kernels run on CPU tensors with one
real GPU tile (``INTERP_CONFIG``, or the caller's ``config``) instead of autotuning; that is how the tests
check them. The kernels use only core ``tl`` builtins (``tl.full``, not the ``triton.language.standard``
helpers such as ``tl.zeros`` / ``tl.cdiv``), so they also interpret when triton was imported before the
variable was set.
"""
from __future__ import annotations

import logging
import os
import time

import torch
import triton
import triton.language as tl

log = logging.getLogger("qvd")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _cfg(bm, bn, bk, stages, warps):
    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_stages=stages, num_warps=warps)


# Candidate tiles per shape class (int8 mma needs BK >= 32). Each class holds <= 4, so a new shape costs at
# most 4 compiles + timings. Every tile compiles without register spills and within the shared memory of
# sm_86 / sm_89 (99 KB) for the archs its class serves (bench/compile_kernels.py checks both).
SHAPE_CLASSES = {
    "small_m": [_cfg(16, 64, 128, 4, 4), _cfg(16, 128, 128, 4, 4), _cfg(32, 64, 128, 4, 4), _cfg(32, 128, 64, 4, 4)],
    "medium": [_cfg(64, 64, 128, 4, 4), _cfg(64, 128, 64, 4, 4), _cfg(128, 64, 64, 4, 4), _cfg(32, 128, 64, 4, 4)],
    "large": [_cfg(128, 128, 64, 3, 8), _cfg(128, 128, 128, 3, 8), _cfg(64, 128, 64, 4, 4), _cfg(128, 64, 64, 4, 4)],
    "large_sm90": [_cfg(128, 128, 64, 4, 8), _cfg(128, 256, 64, 3, 8), _cfg(128, 128, 128, 3, 8),
                   _cfg(64, 128, 64, 4, 4)],
}
CONFIGS = list({str(c): c for cs in SHAPE_CLASSES.values() for c in cs}.values())  # every tile any class uses
# The interpreter runs one real tile (a GPU compiles it too); tests may pass others via ``config``.
INTERP_CONFIG = {"BM": 32, "BN": 64, "BK": 64, "GROUP_M": 8}
GPU_Q_BLOCK, GPU_LUT_BLOCK = (64, 64), 1024  # elementwise blocks (smaller under the interpreter)
_Q_BLOCK = GPU_Q_BLOCK if not INTERPRET else (16, 16)
_LUT_BLOCK = GPU_LUT_BLOCK if not INTERPRET else 64


def shape_class(m_bucket: int, n: int, arch: int) -> str:
    """The rule that picks the candidate tiles: by rows (M bucket), output channels N and GPU arch."""
    if m_bucket <= 32:
        return "small_m"
    if m_bucket <= 512 or n <= 64:
        return "medium"
    return "large_sm90" if arch >= 90 else "large"


def _prune(configs, nargs, **_):
    arch = torch.cuda.get_device_capability(nargs["out_ptr"].device)
    cls = SHAPE_CLASSES[shape_class(nargs["M_BUCKET"], nargs["N"], arch[0] * 10 + arch[1])]
    return [c for c in configs if any(str(c) == str(k) for k in cls)]


def _tuned(kernel):
    """Autotuned on a GPU among its shape class's tiles, keyed on the M bucket, N, K and (conv) the kernel
    size and stride; timings persist in Triton's cache dir, so a restart does not tune again."""
    if INTERPRET:
        return kernel
    key = ["M_BUCKET", "N", "K"] + (["KH", "KW", "stride"] if "KH" in kernel.arg_names else [])
    return triton.autotune(configs=CONFIGS, key=key, prune_configs_by={"early_config_prune": _prune},
                           cache_results=True)(kernel)


@triton.jit
def _round_half_even(v):
    f = tl.floor(v)
    d = v - f  # exact in fp32
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _load_scale(scale_ptr, scale_val, SCALE_PTR: tl.constexpr):
    if SCALE_PTR:
        return tl.load(scale_ptr).to(tl.float32)
    return scale_val


@triton.jit
def _quant_kernel(x_ptr, out_ptr, shift_ptr, inv_scale_ptr, scale_ptr, scale_val,
                  P, C, H, W, s_n, s_c, s_h, s_w, zp, qmin, qmax,
                  HAS_SHIFT: tl.constexpr, HAS_SMOOTH: tl.constexpr, SCALE_PTR: tl.constexpr,
                  BP: tl.constexpr, BC: tl.constexpr):
    """Rows p = (n, h, w) pixels, columns c = channels; output [P, C] contiguous (NHWC)."""
    rp = tl.program_id(0) * BP + tl.arange(0, BP)
    rc = tl.program_id(1) * BC + tl.arange(0, BC)
    hw = H * W
    n = rp // hw
    h = (rp % hw) // W
    w = rp % W
    src = (n.to(tl.int64) * s_n + h * s_h + w * s_w)[:, None] + (rc * s_c)[None, :]
    mask = (rp < P)[:, None] & (rc < C)[None, :]
    v = tl.load(x_ptr + src, mask=mask, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        v = v - tl.load(shift_ptr + rc, mask=rc < C, other=0.0).to(tl.float32)[None, :]
    if HAS_SMOOTH:
        v = v * tl.load(inv_scale_ptr + rc, mask=rc < C, other=1.0).to(tl.float32)[None, :]
    v = tl.math.div_rn(v, _load_scale(scale_ptr, scale_val, SCALE_PTR))
    q = tl.minimum(tl.maximum(_round_half_even(v) + zp, qmin), qmax)
    dst = rp.to(tl.int64)[:, None] * C + rc[None, :]
    tl.store(out_ptr + dst, q.to(tl.int8), mask=mask)


@triton.jit
def _epilogue_store(acc, rm, rn, M, N, out_ptr, wscale_ptr, bias_ptr, scale_ptr, scale_val,
                    s_om, s_on, HAS_BIAS: tl.constexpr, SCALE_PTR: tl.constexpr):
    nmask = rn < N
    ws = tl.load(wscale_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * (ws * _load_scale(scale_ptr, scale_val, SCALE_PTR))[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    dst = rm[:, None] * s_om + (rn * s_on)[None, :]  # 32-bit offsets (checked by the launcher)
    tl.store(out_ptr + dst, y.to(out_ptr.dtype.element_ty), mask=(rm < M)[:, None] & nmask[None, :])


@triton.jit
def _tile_ids(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order: consecutive programs share B columns for L2 reuse."""
    pid = tl.program_id(0)
    grid_m = (M + BM - 1) // BM
    grid_n = (N + BN - 1) // BN
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    group = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group
    pid_n = (pid % width) // group
    return pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN)


@triton.jit
def _linear_kernel(a_ptr, b_ptr, out_ptr, wscale_ptr, bias_ptr, scale_ptr, scale_val,
                   M, N, K, M_BUCKET, s_am, s_bn, s_om, s_on,
                   HAS_BIAS: tl.constexpr, SCALE_PTR: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """out[M, N] = (A[M, K] @ B[N, K]^T) * act_scale * w_scale[n] + bias[n]; A, B int8, both K-contiguous
    (unit K stride: the loads vectorise and pipeline through shared memory)."""
    rm, rn = _tile_ids(M, N, BM, BN, GROUP_M)
    rk = tl.arange(0, BK)
    a_rows = rm[:, None] * s_am
    b_cols = (rn * s_bn)[None, :]
    acc = tl.full((BM, BN), 0, tl.int32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a = tl.load(a_ptr + a_rows + kk[None, :], mask=(rm < M)[:, None] & (kk < K)[None, :], other=0)
        b = tl.load(b_ptr + kk[:, None] + b_cols, mask=(kk < K)[:, None] & (rn < N)[None, :], other=0)
        acc = tl.dot(a, b, acc)
    _epilogue_store(acc, rm, rn, M, N, out_ptr, wscale_ptr, bias_ptr, scale_ptr, scale_val,
                    s_om, s_on, HAS_BIAS, SCALE_PTR)


@triton.jit
def _conv_kernel(x_ptr, pad_ptr, b_ptr, out_ptr, wscale_ptr, bias_ptr, scale_ptr, scale_val,
                 M, N, K, M_BUCKET, C, H, W, OH, OW, stride, padding, s_bn,
                 KH: tl.constexpr, KW: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SCALE_PTR: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """Implicit-GEMM conv: x NHWC int8 [Nb, H, W, C], B = weights [N, K] with k = (kh * KW + kw) * C + c;
    one flat loop over K (a tile may straddle two taps); out NHWC [M, N]."""
    rm, rn = _tile_ids(M, N, BM, BN, GROUP_M)
    rk = tl.arange(0, BK)
    ohw = OH * OW
    nb = rm // ohw
    ih0 = ((rm % ohw) // OW) * stride - padding
    iw0 = (rm % OW) * stride - padding
    img = nb * H * W * C
    row_ok = rm < M
    b_cols = (rn * s_bn)[None, :]
    acc = tl.full((BM, BN), 0, tl.int32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        k_ok = kk < K
        tap = kk // C
        cc = kk % C
        ih = ih0[:, None] + (tap // KW)[None, :]
        iw = iw0[:, None] + (tap % KW)[None, :]
        inside = row_ok[:, None] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & k_ok[None, :]
        a = tl.load(x_ptr + img[:, None] + (ih * W + iw) * C + cc[None, :], mask=inside, other=0)
        pad = tl.load(pad_ptr + cc, mask=k_ok, other=0)
        a = tl.where(inside, a, pad[None, :])
        b = tl.load(b_ptr + kk[:, None] + b_cols, mask=k_ok[:, None] & (rn < N)[None, :], other=0)
        acc = tl.dot(a, b, acc)
    _epilogue_store(acc, rm, rn, M, N, out_ptr, wscale_ptr, bias_ptr, scale_ptr, scale_val,
                    N, 1, HAS_BIAS, SCALE_PTR)


@triton.jit
def _encode_kernel(x_ptr, mid_ptr, out_ptr, numel, n_mid, STEPS: tl.constexpr, BLOCK: tl.constexpr):
    """code = number of midpoints strictly below x (== torch.bucketize(x, mid), right=False)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    idx = tl.full((BLOCK,), 0, tl.int32)
    for s in tl.static_range(STEPS):
        cand = idx + (1 << (STEPS - 1 - s))
        ok = cand <= n_mid
        m = tl.load(mid_ptr + cand - 1, mask=ok & mask, other=0.0)
        idx = tl.where(ok & (x > m), cand, idx)
    tl.store(out_ptr + offs, idx.to(tl.uint8), mask=mask)


@triton.jit
def _decode_kernel(codes_ptr, levels_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    c = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    tl.store(out_ptr + offs, tl.load(levels_ptr + c, mask=mask), mask=mask)


_linear_run = _tuned(_linear_kernel)
_conv_run = _tuned(_conv_kernel)


def _scale_args(act_scale, device):
    """(pointer tensor, python float, SCALE_PTR) for a python float or 0-d tensor scale."""
    if isinstance(act_scale, torch.Tensor):
        return act_scale.detach().to(device=device, dtype=torch.float32).reshape(1), 0.0, True
    return None, float(act_scale), False


def _channel(v, device):
    return None if v is None else v.detach().to(device=device, dtype=torch.float32).contiguous()


def quantize(x: torch.Tensor, act_scale, zero_point: int, qmin: int, qmax: int,
             shift=None, inv_scale=None) -> torch.Tensor:
    """int8 codes of a 2-D ``[M, K]`` input (same shape) or an NCHW input (returned NHWC contiguous)."""
    if x.dim() == 2:
        (m, c), (s_n, s_c) = x.shape, x.stride()
        nb, h, w, s_h, s_w, out_shape = m, 1, 1, 0, 0, (m, c)
    elif x.dim() == 4:
        nb, c, h, w = x.shape
        s_n, s_c, s_h, s_w = x.stride()
        out_shape = (nb, h, w, c)
    else:
        raise ValueError(f"quantize expects a 2-D [M, K] or 4-D NCHW tensor, got shape {tuple(x.shape)}")
    out = torch.empty(out_shape, device=x.device, dtype=torch.int8)
    p = nb * h * w
    shift, inv_scale = _channel(shift, x.device), _channel(inv_scale, x.device)
    sp, sv, is_ptr = _scale_args(act_scale, x.device)
    bp, bc = _Q_BLOCK
    grid = (triton.cdiv(p, bp), triton.cdiv(c, bc))
    _quant_kernel[grid](x, out, shift, inv_scale, sp, sv, p, c, h, w, s_n, s_c, s_h, s_w,
                        int(zero_point), int(qmin), int(qmax),
                        HAS_SHIFT=shift is not None, HAS_SMOOTH=inv_scale is not None,
                        SCALE_PTR=is_ptr, BP=bp, BC=bc)
    return out


class _FirstRuns:
    """Seconds spent on shapes seen for the first time in this process (compile + tune, or a disk-cache load);
    one log line per burst of new shapes (the first sampling, a new resolution), never per layer."""

    def __init__(self):
        self.seen, self.new, self.seconds, self.total_s = set(), 0, 0.0, 0.0

    def launch(self, key, go):
        if key in self.seen:
            if self.new:
                log.info("qvd: Triton compiled / tuned %d new kernel shapes in %.1f s (timings kept in Triton's "
                         "cache dir; a restart reuses them)", self.new, self.seconds)
                self.new, self.seconds = 0, 0.0
            return go()
        if INTERPRET:
            out = go()
        else:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = go()
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            self.new, self.seconds, self.total_s = self.new + 1, self.seconds + dt, self.total_s + dt
        self.seen.add(key)
        return out


first_runs = _FirstRuns()


def _offsets_fit(*tensors):
    """The GEMM kernels address with 32-bit offsets (64-bit ones cost registers and spill)."""
    for t in tensors:
        if t.numel() >= 2**31:
            raise ValueError(f"a tensor of {t.numel()} elements is beyond the int8 GEMM's 32-bit offsets")


def _unit_k_stride(w_k):
    if w_k.stride(1) != 1:
        raise ValueError(f"weights must be K-major [N, K] with unit K stride, got strides {w_k.stride()}")


def _mm_launch(run, key, m, n, args, kwargs, config):
    meta = {} if not INTERPRET else dict(config or INTERP_CONFIG)
    grid = lambda meta_: (triton.cdiv(m, meta_["BM"]) * triton.cdiv(n, meta_["BN"]),)  # noqa: E731
    first_runs.launch(key, lambda: run[grid](*args, **kwargs, **meta))


def _bucket(m: int) -> int:
    return 1 << max(m - 1, 0).bit_length()


def linear(q: torch.Tensor, w_k: torch.Tensor, w_scale: torch.Tensor, bias, act_scale,
           out_dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """Fused int8 GEMM + epilogue: q int8 [M, K], w_k int8 [N, K] (K-major) -> [M, N] out_dtype.

    ``config``: the tile to run under the interpreter (a GPU picks among its shape class's tiles)."""
    q = q if q.stride(1) == 1 else q.contiguous()
    _unit_k_stride(w_k)
    m, k = q.shape
    n = w_k.shape[0]
    out = torch.empty((m, n), device=q.device, dtype=out_dtype)
    _offsets_fit(q, w_k, out)
    sp, sv, is_ptr = _scale_args(act_scale, q.device)
    bias = _channel(bias, q.device)
    args = (q, w_k, out, _channel(w_scale, q.device), bias, sp, sv, m, n, k, _bucket(m),
            q.stride(0), w_k.stride(0), out.stride(0), out.stride(1))
    _mm_launch(_linear_run, ("linear", _bucket(m), n, k, out_dtype, bias is None, is_ptr), m, n, args,
               dict(HAS_BIAS=bias is not None, SCALE_PTR=is_ptr), config)
    return out


def conv2d(q_nhwc: torch.Tensor, pad_codes: torch.Tensor, w_k: torch.Tensor, kh: int, kw: int,
           w_scale: torch.Tensor, bias, act_scale, stride: int, padding: int,
           out_dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """Implicit-GEMM int8 conv: q_nhwc [Nb, H, W, C] int8 contiguous, w_k [N, kh*kw*C] (K-major, k = tap, channel).

    Returns NCHW-shaped output stored channels-last."""
    _unit_k_stride(w_k)
    nb, h, w, c = q_nhwc.shape
    n = w_k.shape[0]
    oh = (h + 2 * padding - kh) // stride + 1
    ow = (w + 2 * padding - kw) // stride + 1
    m = nb * oh * ow
    out = torch.empty((nb, oh, ow, n), device=q_nhwc.device, dtype=out_dtype)
    _offsets_fit(q_nhwc, w_k, out)
    sp, sv, is_ptr = _scale_args(act_scale, q_nhwc.device)
    bias = _channel(bias, q_nhwc.device)
    k = kh * kw * c
    args = (q_nhwc, pad_codes, w_k, out, _channel(w_scale, q_nhwc.device), bias, sp, sv,
            m, n, k, _bucket(m), c, h, w, oh, ow, stride, padding, w_k.stride(0))
    _mm_launch(_conv_run, ("conv", _bucket(m), n, k, kh, kw, stride, out_dtype, bias is None, is_ptr), m, n, args,
               dict(KH=kh, KW=kw, HAS_BIAS=bias is not None, SCALE_PTR=is_ptr), config)
    return out.permute(0, 3, 1, 2)


def hiditq_encode(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """uint8 index of the nearest sorted level, ties to the lower one (x any shape)."""
    if levels.numel() > 256:
        raise ValueError(f"HiDi-TQ codes are uint8: at most 256 levels, got {levels.numel()}")
    mid = ((levels[1:] + levels[:-1]) * 0.5).float().contiguous()
    xc = x.contiguous()
    out = torch.empty(x.shape, device=x.device, dtype=torch.uint8)
    numel = xc.numel()
    steps = max(mid.numel(), 1).bit_length()
    _encode_kernel[(triton.cdiv(numel, _LUT_BLOCK),)](xc, mid, out, numel, mid.numel(),
                                                       STEPS=steps, BLOCK=_LUT_BLOCK)
    return out


def hiditq_decode(codes: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``levels[codes]`` for uint8 codes of any shape."""
    cc = codes.contiguous()
    out = torch.empty(codes.shape, device=codes.device, dtype=levels.dtype)
    numel = cc.numel()
    _decode_kernel[(triton.cdiv(numel, _LUT_BLOCK),)](cc, levels.contiguous(), out, numel, BLOCK=_LUT_BLOCK)
    return out
