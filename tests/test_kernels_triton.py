"""Triton kernels vs the plain-torch reference, run on CPU tensors by the Triton interpreter.

A private copy of ``qvd.kernels.triton_kernels`` is loaded with ``TRITON_INTERPRET=1`` so that the
dispatcher's own (compiled, CUDA) copy is untouched when these tests run on a GPU machine.
The GEMMs run at real GPU tiles (BK >= 32, the int8 mma minimum; the interpreter would accept smaller ones no
GPU compiles). Shapes are odd (not multiples of the tiles) to exercise every mask, with K spanning several tiles
and conv tiles straddling two taps.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from qvd.kernels import reference as ref

pytest.importorskip("triton")


def _load_interpreted():
    path = Path(__file__).resolve().parents[1] / "qvd" / "kernels" / "triton_kernels.py"
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location("_qvd_triton_interpreted", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    assert mod.INTERPRET
    return mod


tk = _load_interpreted()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# the interpreter's default tile and the smallest tile of each shape class
TILES = [tk.INTERP_CONFIG] + [dict(c.kwargs) for c in (tk.SHAPE_CLASSES["small_m"][0], tk.SHAPE_CLASSES["medium"][0])]
FUSED_TILES = [tk.INTERP_CONFIG] + [dict(c.kwargs) for c in (tk.FUSED_SHAPE_CLASSES["small_m"][0],
                                                             tk.FUSED_SHAPE_CLASSES["medium"][0])]
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1e-2, 5e-2)}


def _qparams(g, c, affine):
    shift = torch.randn(c, generator=g) * 0.3 if affine else None
    inv = torch.rand(c, generator=g) + 0.5 if affine else None
    return shift, inv


def _weights(g, n, *k):
    w_q = torch.randint(-127, 128, (n, *k), generator=g, dtype=torch.int8)
    w_scale = torch.rand(n, generator=g) * 0.01 + 1e-3
    bias = torch.randn(n, generator=g)
    return w_q, w_scale, bias


@pytest.mark.parametrize("zp,qmin,qmax", [(0, -128, 127), (3, -128, 127), (-7, -127, 127)])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_2d_exact(zp, qmin, qmax, affine, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(23, 37, generator=g) * 3).to(dtype)
    # exact ties and saturating values
    x[0, :6] = torch.tensor([0.25, 0.75, -0.25, -1.25, 1e4, -1e4]).to(dtype)
    shift, inv = _qparams(g, 37, affine)
    got = tk.quantize(x, 0.5 if not affine else 0.037, zp, qmin, qmax, shift, inv)
    want = ref.quantize_activation(x, 0.5 if not affine else 0.037, zp, qmin, qmax, shift, inv)
    assert got.dtype == torch.int8
    assert torch.equal(got, want)


def test_quantize_strided_and_tensor_scale():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(41, 19, generator=g).t()  # non-contiguous [19, 41]
    scale = torch.tensor(0.021, dtype=torch.float64)
    assert torch.equal(tk.quantize(x, scale, 1, -128, 127), ref.quantize_activation(x, scale, 1, -128, 127))


@pytest.mark.parametrize("channels_last", [False, True])
def test_quantize_nchw_to_nhwc(channels_last):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 13, 5, 7, generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    shift, inv = _qparams(g, 13, True)
    got = tk.quantize(x, 0.02, -2, -128, 127, shift, inv)
    want = ref.quantize_activation(x, 0.02, -2, -128, 127, shift, inv, channel_dim=1).permute(0, 2, 3, 1)
    assert got.shape == (2, 5, 7, 13) and got.is_contiguous()
    assert torch.equal(got, want)


def test_tiles_are_ones_a_gpu_compiles():
    for cfg in TILES + [dict(c.kwargs) for c in tk.CONFIGS]:
        assert cfg["BK"] >= 32 and cfg["BM"] >= 16 and cfg["BN"] >= 16, cfg
    assert all(len(cs) <= 4 for classes in (tk.SHAPE_CLASSES, tk.FUSED_SHAPE_CLASSES) for cs in classes.values())


@pytest.mark.parametrize("tile", range(len(TILES)))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_epilogue(tile, dtype, with_bias):
    g = torch.Generator().manual_seed(3)
    m, k, n = 19, 150, 71
    x_q = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    w_q, w_scale, bias = _weights(g, n, k)
    bias = bias if with_bias else None
    got = tk.linear(x_q, w_q, w_scale, bias, 0.013, dtype, config=TILES[tile])
    want = ref.int8_linear(x_q, w_q, 0.013, w_scale, bias, dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, atol=TOL[dtype][0] * 10, rtol=TOL[dtype][1])
    # integer part exact: scale 1, no bias -> the int32 accumulator itself
    acc = tk.linear(x_q, w_q, torch.ones(n), None, 1.0, torch.float32, config=TILES[tile])
    assert torch.equal(acc.double(), x_q.double() @ w_q.double().t())


def _k_major(w_q):
    """[N, C, KH, KW] -> the kernels' [N, KH*KW*C] (qvd.kernels.PackedWeight.mat)."""
    return w_q.permute(0, 2, 3, 1).reshape(w_q.shape[0], -1).contiguous()


@pytest.mark.parametrize("tile", range(len(TILES)))
@pytest.mark.parametrize("c,stride", [(11, 1), (37, 2)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_implicit_gemm(tile, c, stride, dtype):
    g = torch.Generator().manual_seed(4 + stride)
    nb, h, w, n = 2, 7, 6, 13
    x = (torch.randn(nb, c, h, w, generator=g) * 2).to(dtype)
    w_q, w_scale, bias = _weights(g, n, c, 3, 3)
    shift, inv = _qparams(g, c, True)
    zp = 5  # zero is not code 0: the padded pixels must carry per-channel codes
    scale = 0.03
    q = tk.quantize(x, scale, zp, -128, 127, shift, inv)
    pad = ref.quantize_activation(torch.zeros(c), scale, zp, -128, 127, shift, inv)
    got = tk.conv2d(q, pad, _k_major(w_q), 3, 3, w_scale, bias, scale, stride, 1, dtype, config=TILES[tile])
    want = ref.conv2d_w8a8(x, w_q, w_scale, bias, scale, zp, -128, 127, shift, inv, stride, 1)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, atol=TOL[dtype][0] * 10, rtol=TOL[dtype][1])
    # integer part exact
    acc = tk.conv2d(q, pad, _k_major(w_q), 3, 3, torch.ones(n), None, 1.0, stride, 1, torch.float32,
                    config=TILES[tile])
    xp = torch.nn.functional.pad(x.float(), (1,) * 4)
    q_ref = ref.quantize_activation(xp, scale, zp, -128, 127, shift, inv, channel_dim=1)
    assert torch.equal(acc.double(), torch.nn.functional.conv2d(q_ref.double(), w_q.double(), stride=stride))


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_1x1_no_padding(stride):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 70, 5, 5, generator=g)
    w_q, w_scale, bias = _weights(g, 17, 70, 1, 1)
    q = tk.quantize(x, 0.02, 0, -128, 127)
    pad = torch.zeros(70, dtype=torch.int8)
    got = tk.conv2d(q, pad, _k_major(w_q), 1, 1, w_scale, bias, 0.02, stride, 0, torch.float32)
    want = ref.conv2d_w8a8(x, w_q, w_scale, bias, 0.02, 0, -128, 127, stride=stride)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_levels", [1, 2, 17, 256])
def test_hiditq_roundtrip(n_levels):
    g = torch.Generator().manual_seed(8)
    levels = torch.sort(torch.randn(n_levels, generator=g) * 2).values
    x = torch.randn(3, 50, generator=g) * 2
    if n_levels > 1:
        x[0, :3] = (levels[1:4] + levels[:3]) * 0.5 if n_levels > 3 else levels[0]  # exact ties
    codes = tk.hiditq_encode(x, levels)
    want = ref.hiditq_encode(x, levels)
    assert codes.dtype == torch.uint8 and torch.equal(codes, want)
    assert torch.equal(tk.hiditq_decode(codes, levels), ref.hiditq_decode(codes, levels))


def test_hiditq_too_many_levels():
    with pytest.raises(ValueError, match="at most 256 levels"):
        tk.hiditq_encode(torch.zeros(3), torch.arange(300.0))


def _dispatch_to(monkeypatch, module):
    """Route the dispatcher's 'Triton devices' to the CPU, with ``module`` as its Triton kernels, state reset."""
    import qvd.kernels as K
    monkeypatch.setattr(K, "_TRITON_DEVICES", ("cpu",))
    monkeypatch.setattr(K, "_TRITON", module)
    for name in ("_OFF", "_CHECKED"):
        monkeypatch.setattr(K, name, set())
    monkeypatch.setattr(K, "_CHOSEN", {})
    return K


class _Wrapped:
    """The interpreted kernels with some of them replaced."""

    def __init__(self, **replaced):
        self.replaced = replaced

    def __getattr__(self, name):
        return self.replaced.get(name, getattr(tk, name))


def _off_by_one_percent(fn):
    return lambda *a, **kw: fn(*a, **kw) * 1.01


@pytest.mark.parametrize("wrong", [(), ("linear",), ("linear", "linear_fused")])
def test_self_check_trusts_the_kernels_once_per_arch_and_switches_off_one_that_disagrees(monkeypatch, caplog, wrong):
    """The dispatcher checks each Triton kernel against the reference the first time it runs on an arch (here the
    interpreted kernels on the CPU): agreeing kernels are trusted from then on; a kernel whose output is off by 1 %
    is switched off with one log line and its calls take the other variant (fused / separate), or the torch route
    when both are off: exact either way."""
    import logging

    K = _dispatch_to(monkeypatch, _Wrapped(**{n: _off_by_one_percent(getattr(tk, n)) for n in wrong}))
    g = torch.Generator().manual_seed(21)
    w_q, w_scale, bias = _weights(g, 24, 40)
    x = torch.randn(9, 40, generator=g)
    want = ref.linear_w8a8(x, w_q, w_scale, bias, 0.03, 0, -128, 127)
    with caplog.at_level(logging.WARNING, logger="qvd"):
        for _ in range(2):
            torch.testing.assert_close(K.linear_w8a8(x, K.PackedWeight(w_q, w_scale), bias, 0.03, 0, -128, 127),
                                       want, atol=1e-4, rtol=1e-4)
    assert K._OFF == {(n, "cpu", "cpu") for n in wrong}
    assert len([r for r in caplog.records if "disagrees with the reference" in r.message]) == len(wrong)
    assert K._CHECKED == {(n, "cpu") for n in ("quantize", "linear", "linear_fused") if n not in wrong}
    if len(wrong) == 2:
        assert not K.variants_chosen()  # nothing ran on Triton: the torch route did


@pytest.mark.parametrize("slow", ["linear_fused", "conv2d_fused", "quantize"])
def test_the_faster_variant_is_kept_per_shape_class(monkeypatch, slow):
    """The first call of a shape class times the fused kernel and the separate quantize + GEMM pair and keeps the
    faster for every later call of that class (another M in the same bucket reuses it); both give the same result."""
    import time

    calls = []

    def slowed(*a, **kw):
        calls.append(slow)
        time.sleep(0.3)
        return getattr(tk, slow)(*a, **kw)

    K = _dispatch_to(monkeypatch, _Wrapped(**{slow: slowed}))
    g = torch.Generator().manual_seed(22)
    if slow != "conv2d_fused":
        w_q, w_scale, bias = _weights(g, 24, 40)
        run = lambda m: K.linear_w8a8(torch.randn(m, 40, generator=g), K.PackedWeight(w_q, w_scale), bias, 0.03, 0,
                                      -128, 127)  # noqa: E731
    else:
        w_q, w_scale, bias = _weights(g, 8, 6, 3, 3)
        wp = K.PackedWeight(w_q.contiguous(memory_format=torch.channels_last), w_scale)
        run = lambda m: K.conv2d_w8a8(torch.randn(1, 6, m, 5, generator=g), wp, bias, 0.03, 0, -128, 127,
                                      padding=1)  # noqa: E731
    run(7)
    chosen = list(K.variants_chosen().values())
    assert chosen == ["separate" if slow.endswith("fused") else "fused"]
    calls.clear()
    run(8)  # another size in the same M bucket: no new timing, the kept variant only
    assert not calls and len(K.variants_chosen()) == 1


@pytest.mark.parametrize("name", ["quantize", "linear", "conv2d", "linear_fused", "conv2d_fused", "hiditq_encode",
                                  "hiditq_decode"])
def test_self_check_passes_for_every_interpreted_kernel(name):
    import qvd.kernels as K

    assert K._self_check(name, tk, torch.device("cpu")) is None


@pytest.mark.parametrize("tile", range(len(FUSED_TILES)))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine,zp", [(False, 0), (True, 3)])
def test_fused_linear_quantizes_the_a_tile_as_the_two_pass_pair_does(tile, dtype, affine, zp):
    """``linear_fused`` reads the float input (strided here) and quantizes each A tile as it loads it: the same codes,
    so the same int32 accumulator as ``quantize`` + ``linear``, and the reference's output."""
    g = torch.Generator().manual_seed(11)
    m, k, n = 19, 150, 71
    x = (torch.randn(k, m, generator=g) * 3).to(dtype).t()  # K-strided rows
    x[0, :4] = torch.tensor([0.0, 1e4, -1e4, 0.5]).to(dtype)  # saturating values and a tie
    w_q, w_scale, bias = _weights(g, n, k)
    shift, inv = _qparams(g, k, affine)
    scale = 0.04 if affine else 0.5
    got = tk.linear_fused(x, w_q, w_scale, bias, scale, zp, -128, 127, shift, inv, config=FUSED_TILES[tile])
    want = ref.linear_w8a8(x, w_q, w_scale, bias, scale, zp, -128, 127, shift, inv)
    assert got.dtype == dtype and got.shape == (m, n)
    torch.testing.assert_close(got, want, atol=TOL[dtype][0] * 10, rtol=TOL[dtype][1])
    pair = tk.linear(tk.quantize(x, scale, zp, -128, 127, shift, inv), w_q, w_scale, bias, scale, dtype,
                     config=TILES[tile])
    assert torch.equal(got, pair)
    xf = x.float()  # the integer part exactly: scale 1, no bias, fp32 out
    acc = tk.linear_fused(xf, w_q, torch.ones(n), None, 1.0, zp, -128, 127, shift,
                          None if inv is None else inv / scale, config=FUSED_TILES[tile])
    q_ref = ref.quantize_activation(xf, 1.0, zp, -128, 127, shift, None if inv is None else inv / scale)
    assert torch.equal(acc.double(), q_ref.double() @ w_q.double().t())


@pytest.mark.parametrize("tile", range(len(FUSED_TILES)))
@pytest.mark.parametrize("c,stride,ks", [(11, 1, 3), (37, 2, 3), (70, 1, 1), (24, 2, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_conv_pads_with_the_code_of_zero(tile, c, stride, ks, dtype, channels_last):
    """``conv2d_fused`` gathers the A tile from the float NCHW input and quantizes it: padded pixels load 0.0 and get
    each channel's code of 0.0 (zero point and SCRI shift make it non-zero), as the reference pads."""
    g = torch.Generator().manual_seed(12 + c)
    nb, h, w, n = 2, 7, 6, 13
    x = (torch.randn(nb, c, h, w, generator=g) * 2).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w_q, w_scale, bias = _weights(g, n, c, ks, ks)
    shift, inv = _qparams(g, c, True)
    pad = ks // 2
    got = tk.conv2d_fused(x, _k_major(w_q), ks, ks, w_scale, bias, 0.03, 5, -128, 127, shift, inv, stride, pad,
                          config=FUSED_TILES[tile])
    want = ref.conv2d_w8a8(x, w_q, w_scale, bias, 0.03, 5, -128, 127, shift, inv, stride, pad)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, atol=TOL[dtype][0] * 10, rtol=TOL[dtype][1])
    codes = tk.quantize(x, 0.03, 5, -128, 127, shift, inv)
    pad_codes = ref.quantize_activation(torch.zeros(c), 0.03, 5, -128, 127, shift, inv)
    pair = tk.conv2d(codes, pad_codes, _k_major(w_q), ks, ks, w_scale, bias, 0.03, stride, pad, dtype,
                     config=TILES[tile])
    assert torch.equal(got, pair)


def test_tuning_is_bounded(monkeypatch, caplog):
    """Rows are tuned per coarse M bucket (a new resolution / frame count mostly reuses timings; beyond the last
    bucket, always); once the process has spent its tuning budget, new shapes get their class's first tile untimed,
    said once in the log."""
    import logging

    assert [tk._bucket(m) for m in (1, 16, 17, 33, 100, 300, 600, 5000, 20000, 10**6)] == \
        [16, 16, 32, 64, 256, 512, 2048, 8192, 32768, 32768]
    assert len({tk._bucket(m) for m in range(1, 300_000, 7)}) == len(tk.M_BUCKETS)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (8, 6))
    monkeypatch.setattr(tk, "first_runs", tk._FirstRuns())
    for classes in (tk.SHAPE_CLASSES, tk.FUSED_SHAPE_CLASSES):
        prune = tk._pruner(classes)
        nargs = {"out_ptr": torch.empty(1), "M_BUCKET": tk._bucket(131072), "N": 1280}
        assert [str(c) for c in prune(tk.CONFIGS, nargs)] == [str(c) for c in classes["large"]]
        tk.first_runs.total_s = tk.TUNE_BUDGET_S + 1
        with caplog.at_level(logging.INFO, logger="qvd"):
            assert [str(c) for c in prune(tk.CONFIGS, nargs)] == [str(classes["large"][0])]
        tk.first_runs.total_s = 0.0
    assert len([r for r in caplog.records if "budget" in r.message]) == 1


def _rows_per_call(monkeypatch, *names) -> list:
    """The leading size (rows, images) of each call of the interpreted kernel wrappers ``names``."""
    rows = []
    for name in names:
        real = getattr(tk, name)
        monkeypatch.setattr(tk, name, lambda *a, _real=real, **kw: rows.append(a[0].shape[0]) or _real(*a, **kw))
    return rows


def test_a_linear_beyond_the_32_bit_offsets_runs_in_launches_that_fit(monkeypatch):
    """Issue 40.5: the GEMMs address with 32-bit offsets; a linear whose input or output spans 2**31+ elements (a Wan
    14B FFN at ~155k rows) raised the launcher's ValueError, which is no kernel error: the call crashed. The dispatcher
    splits it into launches of fewer rows, each within the limit (lowered here to 4096 elements), bit for bit the one-
    launch result and the reference's integer part, both variants, strided rows included; nothing is switched off."""
    K = _dispatch_to(monkeypatch, tk)
    g = torch.Generator().manual_seed(30)
    m, k, n = 300, 40, 24
    w_q, w_scale, bias = _weights(g, n, k)
    shift, inv = _qparams(g, k, True)
    x = (torch.randn(m, k + 9, generator=g) * 40)[:, 5:5 + k]  # rows 49 elements apart
    scaled, unit = K.PackedWeight(w_q, w_scale), K.PackedWeight(w_q, torch.ones(n))
    run = lambda w, b, s: K.linear_w8a8(x, w, b, s, 2, -128, 127, shift, inv)  # noqa: E731
    whole = run(scaled, bias, 0.03)  # one launch (and the self-checks) at the real limit
    monkeypatch.setattr(tk, "OFFSET_LIMIT", 4096)
    with pytest.raises(ValueError, match="32-bit offsets"):  # the whole problem in one launch is beyond the limit
        tk.linear_fused(x, w_q, w_scale, bias, 0.03, 2, -128, 127, shift, inv)
    rows = _rows_per_call(monkeypatch, "linear", "linear_fused")
    monkeypatch.setattr(K, "_CHOSEN", {})  # decide again: both variants run (warm-up, timing) at the lowered limit
    assert torch.equal(run(scaled, bias, 0.03), whole)
    step = tk.units_per_launch(x, n, w_q)
    assert step == (4096 - 1 - k) // 49 + 1 and rows and max(rows) == step and sum(rows) == 4 * m
    assert torch.equal(run(unit, None, 1.0), ref.linear_w8a8(x, w_q, torch.ones(n), None, 1.0, 2, -128, 127, shift,
                                                               inv))
    assert not K._OFF and len(K.variants_chosen()) == 1


def test_a_conv_beyond_the_32_bit_offsets_runs_in_launches_of_fewer_images(monkeypatch):
    """Issue 40.5 for convs: split into launches of fewer images, bit for bit the reference's integer part; a conv
    whose single image is beyond the limit takes the torch route (exact too) and switches nothing off: at the real
    limit the same layer runs on Triton again."""
    K = _dispatch_to(monkeypatch, tk)
    g = torch.Generator().manual_seed(31)
    nb, c, h, w, n = 5, 6, 7, 7, 8
    x = torch.randn(nb, c, h, w, generator=g) * 40
    w_q, _, _ = _weights(g, n, c, 3, 3)
    shift, _ = _qparams(g, c, True)
    wp = K.PackedWeight(w_q.contiguous(memory_format=torch.channels_last), torch.ones(n))
    run = lambda: K.conv2d_w8a8(x, wp, None, 1.0, 3, -128, 127, shift, None, 1, 1)  # noqa: E731
    want = ref.conv2d_w8a8(x, w_q, torch.ones(n), None, 1.0, 3, -128, 127, shift, None, 1, 1)
    assert torch.equal(run(), want)  # one launch, self-checks done at the real limit
    images = _rows_per_call(monkeypatch, "conv2d", "conv2d_fused")
    monkeypatch.setattr(tk, "OFFSET_LIMIT", 1000)  # an image: 294 input, 392 output elements: 2 a launch
    monkeypatch.setattr(K, "_CHOSEN", {})
    assert torch.equal(run(), want)
    assert images == [2, 2, 1] * 4  # both variants, warm-up and timed
    images.clear()
    monkeypatch.setattr(tk, "OFFSET_LIMIT", 300)  # one image's output alone is beyond it
    assert torch.equal(run(), want) and not images and not K._OFF
    monkeypatch.setattr(tk, "OFFSET_LIMIT", 2**31)
    assert torch.equal(run(), want) and images == [nb]


def test_every_launch_runs_with_its_tensors_device_current(monkeypatch):
    """Issue 40.6a: Triton launches on the current CUDA device, so a tensor on cuda:1 must make cuda:1 current for the
    launch (else cuda:0 reads cuda:1's addresses: an illegal address). Every kernel launches inside ``_on_device`` of
    its input, which enters ``torch.cuda.device`` for CUDA tensors and nothing for CPU ones (the interpreter)."""
    import contextlib
    import types

    entered = []

    class Recorder:
        def __init__(self, device):
            entered.append(device)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    with tk._on_device(types.SimpleNamespace(device=torch.device("cuda", 1))):
        pass
    with tk._on_device(torch.zeros(1)):
        pass
    assert entered == [torch.device("cuda", 1)]

    guard, launched = [], []

    @contextlib.contextmanager
    def on_device(t):
        guard.append(t.device)
        yield
        guard.pop()

    class Spy:
        def __init__(self, name):
            self.name, self.kernel = name, getattr(tk, name)

        def __getitem__(self, grid):
            def launch(*a, **kw):
                launched.append((self.name, guard[-1] if guard else None))
                return self.kernel[grid](*a, **kw)
            return launch

    kernels = ("_quant_kernel", "_linear_run", "_conv_run", "_linear_fused_run", "_conv_fused_run", "_encode_kernel",
               "_decode_kernel")
    monkeypatch.setattr(tk, "_on_device", on_device)
    for name in kernels:
        monkeypatch.setattr(tk, name, Spy(name))
    g = torch.Generator().manual_seed(32)
    x, levels = torch.randn(5, 40, generator=g), torch.sort(torch.randn(9, generator=g)).values
    w_q, w_scale, bias = _weights(g, 8, 40)
    xc, (wc, _, _) = torch.randn(1, 6, 4, 4, generator=g), _weights(g, 8, 6, 3, 3)
    tk.linear(tk.quantize(x, 0.03, 0, -128, 127), w_q, w_scale, bias, 0.03, torch.float32)
    tk.linear_fused(x, w_q, w_scale, bias, 0.03, 0, -128, 127)
    tk.conv2d(tk.quantize(xc, 0.03, 0, -128, 127), torch.zeros(6, dtype=torch.int8), _k_major(wc), 3, 3, w_scale,
              bias, 0.03, 1, 1, torch.float32)
    tk.conv2d_fused(xc, _k_major(wc), 3, 3, w_scale, bias, 0.03, 0, -128, 127, None, None, 1, 1)
    tk.hiditq_decode(tk.hiditq_encode(x, levels), levels)
    assert sorted(name for name, _ in launched) == sorted(kernels + ("_quant_kernel",))
    assert all(device == torch.device("cpu") for _, device in launched)
