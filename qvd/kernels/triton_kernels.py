"""Triton kernels for CUDA tensors (semantics: ``reference.py``).

- ``quantize``: static activation quantization (SCRI shift / inv_scale, IEEE division by the scale,
  round-half-even, zero point, clamp) to int8, from any strided 2-D ``[M, K]`` or NCHW input; conv
  inputs are written channels-last (NHWC) for the implicit-GEMM conv.
- ``linear``: int8 GEMM, int32 accumulate, epilogue ``acc * act_scale * w_scale[n] + bias[n]`` stored
  in the output dtype (fp16 / bf16 / fp32).
- ``conv2d``: int8 implicit-GEMM conv on NHWC codes, one flat K loop over (tap, channel); padded pixels
  read the per-channel code of 0.0.
- ``linear_fused`` / ``conv2d_fused``: the same two kernels with ``FUSED``: the activation quantization (SCRI
  shift / inv_scale included) done on the A tile as it is loaded from the float input: no int8 copy of the
  activations is written or read back; each column block of the output quantizes its rows again (the dispatcher
  times both variants per shape class and keeps the faster: ``qvd.kernels``).
- ``hiditq_encode`` / ``hiditq_decode``: nearest-level codes (binary search) and their look-up.

All GEMMs read the weight K-major, ``[N, K]`` (``qvd.kernels.PackedWeight``). Tiles: at most 4 candidates
per shape class (``shape_class``: M bucket, N, arch; ``classes_of`` the kernel), timed once per key and kept in
Triton's cache dir. Tuning
is bounded: coarse M buckets (``M_BUCKETS``: a new resolution or frame count rarely needs new timings), a cache-flush
buffer the size of the GPU's L2 allocated once (``_bench``; Triton's own allocates 256 MB per timing), a few
timed runs per tile, and a budget (``QVD_TUNE_BUDGET_S``, 120 s a process): past it new shapes take their class's
first tile untimed. The seconds spent are logged.

The GEMM kernels address with 32-bit offsets: every tensor a launch reads or writes spans fewer than
``OFFSET_LIMIT`` elements (checked at launch); ``units_per_launch`` says how many rows / images of a larger problem
one launch may take (the dispatcher splits it). Every launch runs with the input's CUDA device current
(``_on_device``), so a tensor on cuda:1 launches on cuda:1 whatever the process's current device.

Under ``TRITON_INTERPRET=1`` (set before triton is imported) the same kernels run on CPU tensors with one
real GPU tile (``INTERP_CONFIG``, or the caller's ``config``) instead of autotuning; that is how the tests
check them. The kernels use only core ``tl`` builtins (``tl.full``, not the ``triton.language.standard``
helpers such as ``tl.zeros`` / ``tl.cdiv``), so they also interpret when triton was imported before the
variable was set.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
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
# The fused kernels hold the float A tile and its gather offsets in registers as well: their tiles are those that
# compile without spills for them (128 x 128 tiles spill in the fused conv, or overflow sm_86 / sm_89's shared memory).
FUSED_SHAPE_CLASSES = {
    "small_m": [_cfg(16, 64, 64, 4, 4), _cfg(16, 128, 128, 4, 4), _cfg(32, 64, 64, 4, 4), _cfg(32, 128, 64, 3, 8)],
    "medium": [_cfg(64, 64, 64, 3, 8), _cfg(64, 128, 64, 4, 8), _cfg(128, 64, 64, 4, 4), _cfg(64, 64, 128, 3, 8)],
    "large": [_cfg(128, 64, 64, 4, 8), _cfg(64, 128, 64, 4, 8), _cfg(128, 64, 64, 4, 4), _cfg(64, 64, 128, 3, 8)],
    "large_sm90": [_cfg(128, 128, 128, 3, 8), _cfg(128, 64, 64, 4, 8), _cfg(64, 128, 64, 4, 8),
                   _cfg(128, 64, 64, 4, 4)],
}


def classes_of(kernel: str) -> dict:
    """The candidate tiles per shape class of a GEMM kernel (``linear``, ``conv``, ``linear_fused``, ...)."""
    return FUSED_SHAPE_CLASSES if kernel.endswith("fused") else SHAPE_CLASSES


def _configs(classes: dict) -> list:
    return list({str(c): c for cs in classes.values() for c in cs}.values())  # every tile any class uses


CONFIGS = _configs(SHAPE_CLASSES) + _configs(FUSED_SHAPE_CLASSES)  # every tile any GEMM may run
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


M_BUCKETS = (16, 32, 64, 256, 512, 2048, 8192, 32768)  # rows are tuned per bucket; beyond the last, its tile
TUNE_BUDGET_S = float(os.environ.get("QVD_TUNE_BUDGET_S", "120"))
_TIMED_RUNS = (2, 10, 20.0)  # per tile: warm-up runs, at most this many timed runs, within about this many ms


def _bucket(m: int) -> int:
    """The M bucket of ``m`` rows (the tuning key's M)."""
    return next((b for b in M_BUCKETS if m <= b), M_BUCKETS[-1])


def _pruner(classes: dict):
    """The autotuner's pruning for a kernel with these tile ``classes``: its shape class's tiles, or (tuning budget
    spent) that class's first tile, which the autotuner then runs untimed and keeps nothing on disk for."""
    def prune(configs, nargs, **_):
        arch = torch.cuda.get_device_capability(nargs["out_ptr"].device)
        cls = classes[shape_class(nargs["M_BUCKET"], nargs["N"], arch[0] * 10 + arch[1])]
        if first_runs.over_budget():
            cls = cls[:1]
        own = {str(c): c for c in configs}  # the autotuner's own Config objects, in the class's order
        return [own[str(c)] for c in cls if str(c) in own]
    return prune


_FLUSH: dict[int, torch.Tensor] = {}


def _bench(kernel_call, quantiles=None):
    """The autotuner's timing of one tile (median, and ``quantiles`` when asked): a couple of warm-up runs, then up
    to ``_TIMED_RUNS`` runs, each after overwriting one L2-sized buffer (allocated once per GPU, not per timing)."""
    dev = torch.cuda.current_device()
    if dev not in _FLUSH:
        l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or 64 << 20
        _FLUSH[dev] = torch.empty(l2, dtype=torch.int8, device=dev)
    warm, most, budget_ms = _TIMED_RUNS
    for _ in range(warm):
        kernel_call()
    times = []
    while len(times) < most and (len(times) < 3 or sum(times) < budget_ms):
        _FLUSH[dev].zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        kernel_call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    t = torch.tensor(times)
    return [float(t.quantile(q)) for q in quantiles] if quantiles else float(t.median())


def _tuned(kernel, classes: dict):
    """Autotuned on a GPU among its shape class's tiles (bounded: see the module docstring), keyed on the M bucket,
    N, K and (conv) the kernel size and stride; timings persist in Triton's cache dir, so a restart does not tune
    again."""
    if INTERPRET:
        return kernel
    key = ["M_BUCKET", "N", "K"] + (["KH", "KW", "stride"] if "KH" in kernel.arg_names else [])
    bench = {"do_bench": _bench} if "do_bench" in inspect.signature(triton.autotune).parameters else {}
    return triton.autotune(configs=_configs(classes), key=key,
                           prune_configs_by={"early_config_prune": _pruner(classes)}, cache_results=True,
                           **bench)(kernel)


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
def _codes(v, shift_ptr, inv_scale_ptr, rc, c_ok, scale, zp, qmin, qmax,
           HAS_SHIFT: tl.constexpr, HAS_SMOOTH: tl.constexpr):
    """int8 activation codes of a [rows, channels] tile ``v`` (channels ``rc``), as ``reference.quantize_activation``:
    SCRI shift / inv_scale, IEEE division by the scale, round-half-even, zero point, clamp."""
    v = v.to(tl.float32)
    if HAS_SHIFT:
        v = v - tl.load(shift_ptr + rc, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SMOOTH:
        v = v * tl.load(inv_scale_ptr + rc, mask=c_ok, other=1.0).to(tl.float32)[None, :]
    v = tl.math.div_rn(v, scale)
    return tl.minimum(tl.maximum(_round_half_even(v) + zp, qmin), qmax).to(tl.int8)


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
    v = tl.load(x_ptr + src, mask=mask, other=0.0)
    q = _codes(v, shift_ptr, inv_scale_ptr, rc, rc < C, _load_scale(scale_ptr, scale_val, SCALE_PTR), zp, qmin, qmax,
               HAS_SHIFT, HAS_SMOOTH)
    dst = rp.to(tl.int64)[:, None] * C + rc[None, :]
    tl.store(out_ptr + dst, q, mask=mask)


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
def _linear_kernel(x_ptr, b_ptr, out_ptr, wscale_ptr, bias_ptr, scale_ptr, scale_val, shift_ptr, inv_scale_ptr,
                   M, N, K, M_BUCKET, s_xm, s_xk, s_bn, s_om, s_on, zp, qmin, qmax,
                   HAS_BIAS: tl.constexpr, SCALE_PTR: tl.constexpr, FUSED: tl.constexpr, HAS_SHIFT: tl.constexpr,
                   HAS_SMOOTH: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """out[M, N] = (A[M, K] @ B[N, K]^T) * act_scale * w_scale[n] + bias[n], B int8 K-contiguous (unit K stride: the
    loads vectorise and pipeline through shared memory). A: the int8 codes x [M, K]; ``FUSED``: the float input x,
    any strides, each A tile quantized as it is loaded (``_codes``)."""
    rm, rn = _tile_ids(M, N, BM, BN, GROUP_M)
    rk = tl.arange(0, BK)
    x_rows = rm[:, None] * s_xm
    row_ok = (rm < M)[:, None]
    b_cols = (rn * s_bn)[None, :]
    acc = tl.full((BM, BN), 0, tl.int32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(x_ptr + x_rows + (kk * s_xk)[None, :], mask=row_ok & k_ok[None, :], other=0)
        if FUSED:
            a = _codes(a, shift_ptr, inv_scale_ptr, kk, k_ok, _load_scale(scale_ptr, scale_val, SCALE_PTR), zp,
                       qmin, qmax, HAS_SHIFT, HAS_SMOOTH)
        b = tl.load(b_ptr + kk[:, None] + b_cols, mask=k_ok[:, None] & (rn < N)[None, :], other=0)
        acc = tl.dot(a, b, acc)
    _epilogue_store(acc, rm, rn, M, N, out_ptr, wscale_ptr, bias_ptr, scale_ptr, scale_val,
                    s_om, s_on, HAS_BIAS, SCALE_PTR)


@triton.jit
def _conv_kernel(x_ptr, pad_ptr, b_ptr, out_ptr, wscale_ptr, bias_ptr, scale_ptr, scale_val, shift_ptr, inv_scale_ptr,
                 M, N, K, M_BUCKET, C, H, W, OH, OW, stride, padding, s_xn, s_xc, s_xh, s_xw, s_bn, zp, qmin, qmax,
                 KH: tl.constexpr, KW: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SCALE_PTR: tl.constexpr, FUSED: tl.constexpr, HAS_SHIFT: tl.constexpr,
                 HAS_SMOOTH: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """Implicit-GEMM conv, B = weights [N, K] with k = (kh * KW + kw) * C + c; one flat loop over K (a tile may
    straddle two taps); out NHWC [M, N]. x: int8 codes [Nb, H, W, C] (strides ``s_x*``), padded pixels read the
    per-channel codes ``pad_ptr``; ``FUSED``: the float input (NCHW or channels-last strides), each A tile quantized
    as it is gathered, a padded pixel loading 0.0 and so getting its channel's code of 0.0 (the reference's padding)."""
    rm, rn = _tile_ids(M, N, BM, BN, GROUP_M)
    rk = tl.arange(0, BK)
    ohw = OH * OW
    ih0 = ((rm % ohw) // OW) * stride - padding
    iw0 = (rm % OW) * stride - padding
    img = (rm // ohw) * s_xn
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
        a = tl.load(x_ptr + img[:, None] + ih * s_xh + iw * s_xw + (cc * s_xc)[None, :], mask=inside, other=0)
        if FUSED:
            a = _codes(a, shift_ptr, inv_scale_ptr, cc, k_ok, _load_scale(scale_ptr, scale_val, SCALE_PTR), zp,
                       qmin, qmax, HAS_SHIFT, HAS_SMOOTH)
        else:
            a = tl.where(inside, a, tl.load(pad_ptr + cc, mask=k_ok, other=0)[None, :])
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


_linear_run = _tuned(_linear_kernel, SHAPE_CLASSES)
_conv_run = _tuned(_conv_kernel, SHAPE_CLASSES)
_linear_fused_run = _tuned(_linear_kernel, FUSED_SHAPE_CLASSES)  # the same kernels with FUSED=True
_conv_fused_run = _tuned(_conv_kernel, FUSED_SHAPE_CLASSES)


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
    with _on_device(x):
        _quant_kernel[grid](x, out, shift, inv_scale, sp, sv, p, c, h, w, s_n, s_c, s_h, s_w,
                            int(zero_point), int(qmin), int(qmax),
                            HAS_SHIFT=shift is not None, HAS_SMOOTH=inv_scale is not None,
                            SCALE_PTR=is_ptr, BP=bp, BC=bc)
    return out


class _FirstRuns:
    """Seconds spent on shapes seen for the first time in this process (compile + tune, or a disk-cache load);
    one log line per burst of new shapes (the first sampling, a new resolution), never per layer; past
    ``TUNE_BUDGET_S`` in all, new shapes are not timed (``_prune``), said once."""

    def __init__(self):
        self.seen, self.new, self.seconds, self.total_s, self.budget_said = set(), 0, 0.0, 0.0, False

    def over_budget(self) -> bool:
        if self.total_s < TUNE_BUDGET_S:
            return False
        if not self.budget_said:
            self.budget_said = True
            log.info("qvd: Triton tuning has used its %.0f s budget (QVD_TUNE_BUDGET_S) in this process: new kernel "
                     "shapes take their class's first tile untimed", TUNE_BUDGET_S)
        return True

    def launch(self, key, go):
        if key in self.seen:
            if self.new:
                log.info("qvd: Triton compiled / tuned %d new kernel shapes in %.1f s (%.1f s in this process; "
                         "timings kept in Triton's cache dir, a restart reuses them)", self.new, self.seconds,
                         self.total_s)
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


OFFSET_LIMIT = 2**31  # the GEMM kernels' 32-bit offsets (64-bit ones cost registers and spill): spans stay below


def _span(shape, strides) -> int:
    """Elements from a tensor's first to its last addressed one, inclusive."""
    return 1 + sum((n - 1) * abs(st) for n, st in zip(shape, strides))


def _offsets_fit(*tensors):
    """A launch's guard: its tensors within ``OFFSET_LIMIT`` (the dispatcher splits larger problems)."""
    for t in tensors:
        span = _span(t.shape, t.stride())
        if span >= OFFSET_LIMIT:
            raise ValueError(f"a tensor spanning {span} elements is beyond the int8 GEMM's 32-bit offsets; "
                             "split it (units_per_launch)")


def units_per_launch(x: torch.Tensor, out_unit: int, w_k: torch.Tensor) -> int:
    """How many of ``x``'s leading units (rows of a linear's ``[M, K]`` input, images of a conv's) one GEMM launch may
    take with every tensor it touches within ``OFFSET_LIMIT``: the slice of ``x`` (any strides), its int8 codes
    (contiguous), the output slice (``out_unit`` elements a unit) and the weights. 0 when not even one unit fits."""
    first = _span(x.shape[1:], x.stride()[1:])  # one unit of x
    if max(first, _span(w_k.shape, w_k.stride())) >= OFFSET_LIMIT:
        return 0
    units = max(x.shape[0], 1)
    if x.stride(0):
        units = min(units, (OFFSET_LIMIT - 1 - first) // abs(x.stride(0)) + 1)
    for per_unit in (math.prod(x.shape[1:]), out_unit):
        units = min(units, (OFFSET_LIMIT - 1) // max(per_unit, 1))
    return units


def _on_device(t: torch.Tensor):
    """Triton compiles for and launches on the current CUDA device: make it ``t``'s for the launch (without this a
    tensor on cuda:1 is read at cuda:0, an illegal address). A no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _unit_k_stride(w_k):
    if w_k.stride(1) != 1:
        raise ValueError(f"weights must be K-major [N, K] with unit K stride, got strides {w_k.stride()}")


def _mm_launch(run, key, m, n, args, kwargs, config):
    meta = {} if not INTERPRET else dict(config or INTERP_CONFIG)
    grid = lambda meta_: (triton.cdiv(m, meta_["BM"]) * triton.cdiv(n, meta_["BN"]),)  # noqa: E731
    with _on_device(args[0]):
        first_runs.launch(key, lambda: run[grid](*args, **kwargs, **meta))


_UNFUSED = dict(FUSED=False, HAS_SHIFT=False, HAS_SMOOTH=False)
_UNUSED_ACT = (0, -128, 127)  # zero point and clamp bounds the unfused kernels never read


def linear(q: torch.Tensor, w_k: torch.Tensor, w_scale: torch.Tensor, bias, act_scale,
           out_dtype: torch.dtype, config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused int8 GEMM + epilogue: q int8 [M, K], w_k int8 [N, K] (K-major) -> [M, N] out_dtype.

    ``config``: the tile to run under the interpreter (a GPU picks among its shape class's tiles); ``out``: an
    ``[M, N]`` out_dtype tensor to write (e.g. rows of a larger one), else a new one."""
    q = q if q.stride(1) == 1 else q.contiguous()
    _unit_k_stride(w_k)
    m, k = q.shape
    n = w_k.shape[0]
    out = torch.empty((m, n), device=q.device, dtype=out_dtype) if out is None else out
    _offsets_fit(q, w_k, out)
    sp, sv, is_ptr = _scale_args(act_scale, q.device)
    bias = _channel(bias, q.device)
    args = (q, w_k, out, _channel(w_scale, q.device), bias, sp, sv, None, None, m, n, k, _bucket(m),
            q.stride(0), 1, w_k.stride(0), out.stride(0), out.stride(1), *_UNUSED_ACT)
    _mm_launch(_linear_run, ("linear", _bucket(m), n, k, out_dtype, bias is None, is_ptr), m, n, args,
               dict(HAS_BIAS=bias is not None, SCALE_PTR=is_ptr, **_UNFUSED), config)
    return out


def conv2d(q_nhwc: torch.Tensor, pad_codes: torch.Tensor, w_k: torch.Tensor, kh: int, kw: int,
           w_scale: torch.Tensor, bias, act_scale, stride: int, padding: int,
           out_dtype: torch.dtype, config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Implicit-GEMM int8 conv: q_nhwc [Nb, H, W, C] int8 contiguous, w_k [N, kh*kw*C] (K-major, k = tap, channel).

    Returns NCHW-shaped output stored channels-last: ``out`` (a contiguous NHWC ``[Nb, OH, OW, N]`` tensor, e.g.
    images of a larger one) permuted, or a new one."""
    _unit_k_stride(w_k)
    q_nhwc = q_nhwc.contiguous()
    nb, h, w, c = q_nhwc.shape
    n = w_k.shape[0]
    oh = (h + 2 * padding - kh) // stride + 1
    ow = (w + 2 * padding - kw) // stride + 1
    m = nb * oh * ow
    out = torch.empty((nb, oh, ow, n), device=q_nhwc.device, dtype=out_dtype) if out is None else out
    _offsets_fit(q_nhwc, w_k, out)
    sp, sv, is_ptr = _scale_args(act_scale, q_nhwc.device)
    bias = _channel(bias, q_nhwc.device)
    k = kh * kw * c
    s_n, s_h, s_w, s_c = q_nhwc.stride()
    args = (q_nhwc, pad_codes, w_k, out, _channel(w_scale, q_nhwc.device), bias, sp, sv, None, None,
            m, n, k, _bucket(m), c, h, w, oh, ow, stride, padding, s_n, s_c, s_h, s_w, w_k.stride(0), *_UNUSED_ACT)
    _mm_launch(_conv_run, ("conv", _bucket(m), n, k, kh, kw, stride, out_dtype, bias is None, is_ptr), m, n, args,
               dict(KH=kh, KW=kw, HAS_BIAS=bias is not None, SCALE_PTR=is_ptr, **_UNFUSED), config)
    return out.permute(0, 3, 1, 2)


def _act_args(x, act_scale, zero_point, qmin, qmax, shift, inv_scale):
    """The fused kernels' activation-quantizer arguments and constexprs."""
    sp, sv, is_ptr = _scale_args(act_scale, x.device)
    shift, inv_scale = _channel(shift, x.device), _channel(inv_scale, x.device)
    return ((sp, sv, shift, inv_scale), (int(zero_point), int(qmin), int(qmax)),
            dict(SCALE_PTR=is_ptr, FUSED=True, HAS_SHIFT=shift is not None, HAS_SMOOTH=inv_scale is not None))


def linear_fused(x: torch.Tensor, w_k: torch.Tensor, w_scale: torch.Tensor, bias, act_scale, zero_point: int,
                 qmin: int, qmax: int, shift=None, inv_scale=None, config: dict | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """``quantize`` + ``linear`` in one kernel: float x [M, K] (any strides) -> [M, N] in x's dtype (``out`` as
    ``linear``'s)."""
    _unit_k_stride(w_k)
    m, k = x.shape
    n = w_k.shape[0]
    out = torch.empty((m, n), device=x.device, dtype=x.dtype) if out is None else out
    _offsets_fit(x, w_k, out)
    (sp, sv, shift, inv), ints, flags = _act_args(x, act_scale, zero_point, qmin, qmax, shift, inv_scale)
    bias = _channel(bias, x.device)
    args = (x, w_k, out, _channel(w_scale, x.device), bias, sp, sv, shift, inv, m, n, k, _bucket(m),
            x.stride(0), x.stride(1), w_k.stride(0), out.stride(0), out.stride(1), *ints)
    _mm_launch(_linear_fused_run, ("linear_fused", _bucket(m), n, k, x.dtype, bias is None, *flags.values()), m, n,
               args, dict(HAS_BIAS=bias is not None, **flags), config)
    return out


def conv2d_fused(x: torch.Tensor, w_k: torch.Tensor, kh: int, kw: int, w_scale: torch.Tensor, bias, act_scale,
                 zero_point: int, qmin: int, qmax: int, shift, inv_scale, stride: int, padding: int,
                 config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``quantize`` + ``conv2d`` in one kernel: float NCHW x (any strides) -> NCHW-shaped output in x's dtype,
    stored channels-last (``out`` as ``conv2d``'s)."""
    _unit_k_stride(w_k)
    nb, c, h, w = x.shape
    n = w_k.shape[0]
    oh = (h + 2 * padding - kh) // stride + 1
    ow = (w + 2 * padding - kw) // stride + 1
    m = nb * oh * ow
    out = torch.empty((nb, oh, ow, n), device=x.device, dtype=x.dtype) if out is None else out
    _offsets_fit(x, w_k, out)
    (sp, sv, shift, inv), ints, flags = _act_args(x, act_scale, zero_point, qmin, qmax, shift, inv_scale)
    bias = _channel(bias, x.device)
    k = kh * kw * c
    args = (x, None, w_k, out, _channel(w_scale, x.device), bias, sp, sv, shift, inv, m, n, k, _bucket(m), c, h, w,
            oh, ow, stride, padding, *x.stride(), w_k.stride(0), *ints)
    _mm_launch(_conv_fused_run, ("conv_fused", _bucket(m), n, k, kh, kw, stride, x.dtype, bias is None,
                                 *flags.values()), m, n, args, dict(KH=kh, KW=kw, HAS_BIAS=bias is not None, **flags),
               config)
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
    with _on_device(x):
        _encode_kernel[(triton.cdiv(numel, _LUT_BLOCK),)](xc, mid, out, numel, mid.numel(),
                                                           STEPS=steps, BLOCK=_LUT_BLOCK)
    return out


def hiditq_decode(codes: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``levels[codes]`` for uint8 codes of any shape."""
    cc = codes.contiguous()
    out = torch.empty(codes.shape, device=codes.device, dtype=levels.dtype)
    numel = cc.numel()
    with _on_device(codes):
        _decode_kernel[(triton.cdiv(numel, _LUT_BLOCK),)](cc, levels.contiguous(), out, numel, BLOCK=_LUT_BLOCK)
    return out
