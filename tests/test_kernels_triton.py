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
    assert all(len(cs) <= 4 for cs in tk.SHAPE_CLASSES.values())


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


def test_self_check_trusts_the_kernels_once_per_arch_and_switches_off_one_that_disagrees(monkeypatch, caplog):
    """The dispatcher checks each Triton kernel against the reference the first time it runs on an arch (here the
    interpreted kernels on the CPU): agreeing kernels are trusted from then on; a kernel whose output is off by 1 %
    is switched off with one log line and its calls take the torch route, still exact."""
    import logging

    import qvd.kernels as K

    class OffByOnePercent:
        def __getattr__(self, name):
            return getattr(tk, name)

        def linear(self, *args, **kwargs):
            return tk.linear(*args, **kwargs) * 1.01

    g = torch.Generator().manual_seed(21)
    w_q, w_scale, bias = _weights(g, 24, 40)
    x = torch.randn(9, 40, generator=g)
    want = ref.linear_w8a8(x, w_q, w_scale, bias, 0.03, 0, -128, 127)
    monkeypatch.setattr(K, "_TRITON_DEVICES", ("cpu",))
    for module, trusted in ((tk, True), (OffByOnePercent(), False)):
        monkeypatch.setattr(K, "_TRITON", module)
        monkeypatch.setattr(K, "_OFF", set())
        monkeypatch.setattr(K, "_CHECKED", set())
        with caplog.at_level(logging.WARNING, logger="qvd"):
            caplog.clear()
            for _ in range(2):
                torch.testing.assert_close(K.linear_w8a8(x, K.PackedWeight(w_q, w_scale), bias, 0.03, 0, -128, 127),
                                           want, atol=1e-4, rtol=1e-4)
        if trusted:
            assert K._CHECKED == {("quantize", "cpu"), ("linear", "cpu")} and not K._OFF and not caplog.records
        else:
            assert K._OFF == {("linear", "cpu")}
            assert len([r for r in caplog.records if "disagrees with the reference" in r.message]) == 1


@pytest.mark.parametrize("name", ["quantize", "linear", "conv2d", "hiditq_encode", "hiditq_decode"])
def test_self_check_passes_for_every_interpreted_kernel(name):
    import qvd.kernels as K

    assert K._self_check(name, tk, torch.device("cpu")) is None
