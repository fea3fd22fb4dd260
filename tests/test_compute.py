"""Compute routes of the W8A8 layers (``qvd.kernels.run_route``): ``weight-only`` against the float layer it stands
for, ``auto`` keeping the faster route per shape, devices without int8 kernels, and the exact float-GEMM integer
route at the worst-case sums."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import qvd.kernels as K
from qvd import QConv2d, QLinear, QVDError, set_compute
from qvd.kernels import cpu
from qvd.kernels import reference as ref
from qvd.quantizers import dequantize_weight
from unet_fixtures import TIMESTEPS, rel_err


def _qlinear(g, k=40, n=24, scri=True, in_norm=False):
    kw = dict(weight_q=torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8),
              weight_scale=torch.rand(n, generator=g) * 0.01 + 1e-3, bias=torch.randn(n, generator=g),
              act_scale=0.03, zero_point=2, w_bits=8, a_bits=8)
    if scri:
        kw.update(scri_shift=torch.randn(k, generator=g) * 0.2, scri_inv_scale=torch.rand(k, generator=g) + 0.5,
                  scri_in_norm=in_norm)
    return QLinear(k, n, **kw)


def _qconv(g, c=16, n=8, k=3, padding=1, stride=1):
    return QConv2d(c, n, (k, k), stride, padding, weight_q=torch.randint(-127, 128, (n, c, k, k), generator=g,
                                                                         dtype=torch.int8),
                   weight_scale=torch.rand(n, generator=g) * 0.01 + 1e-3, bias=torch.randn(n, generator=g),
                   act_scale=0.03, zero_point=0, w_bits=8, a_bits=8, scri_shift=torch.randn(c, generator=g) * 0.2,
                   scri_inv_scale=torch.rand(c, generator=g) + 0.5)


def _float_weight(m) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the float layer ``m`` stands for, in float64, for the input ``m`` reads."""
    w = dequantize_weight(m.weight, m.weight_scale).double()
    if m.scri_in_norm:  # the norm hands over (x - z) / s: the codes' own domain, bias b + W z
        return w, m.scri_bias().double()
    inv = m.scri_inv_scale.double()
    return w * inv.view(1, -1, *([1] * (w.dim() - 2))), m.bias.double()


@pytest.mark.parametrize("scri,in_norm", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_only_linear_is_the_float_layer(scri, in_norm, dtype):
    g = torch.Generator().manual_seed(1)
    m = _qlinear(g, scri=scri, in_norm=in_norm)
    set_compute(m, "weight-only")
    x = torch.randn(5, 7, 40, generator=g).to(dtype)
    w, b = _float_weight(m) if scri else (dequantize_weight(m.weight, m.weight_scale).double(), m.bias.double())
    want = F.linear(x.double(), w, b)
    y = m(x)
    assert y.dtype == dtype and y.shape == want.shape
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=3e-2)
    torch.testing.assert_close(y.double(), want, **tol)


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (1, 0)])
def test_weight_only_conv_is_the_float_layer_with_zero_padding(stride, padding):
    g = torch.Generator().manual_seed(2)
    m = _qconv(g, padding=padding, stride=stride)
    set_compute(m, "weight-only")
    x = torch.randn(2, 16, 9, 9, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = _float_weight(m)
    torch.testing.assert_close(m(x).double(), F.conv2d(x.double(), w, b, stride, padding), atol=1e-4, rtol=1e-4)


def test_weight_only_unet_is_closer_to_fp_than_w8a8(unet, inputs, quantized):
    """Weight-only rounds weights alone: on the test UNet it is nearer the float model than W8A8 at every timestep."""
    q, _ = quantized
    wo = copy.deepcopy(q)
    set_compute(wo, "weight-only")
    for t in TIMESTEPS:
        fp = inputs.run(unet, t)
        e_wo, e_int = rel_err(inputs.run(wo, t), fp), rel_err(inputs.run(q, t), fp)
        assert e_wo < e_int and e_wo < 0.02, (t, e_wo, e_int)


def _fake_clock(monkeypatch, int8_ms: float, float_ms: float) -> list:
    """``run_route``'s timer reports ``int8_ms`` for the int8 call and ``float_ms`` for the weight-only call."""
    calls = []

    def timed(fn, device):
        calls.append(fn)
        return (int8_ms if len(calls) % 2 else float_ms), fn()
    monkeypatch.setattr(K, "_timed", timed)
    monkeypatch.setattr(K, "_DECIDED", {})
    return calls


@pytest.mark.parametrize("int8_ms,float_ms,route", [(1.0, 2.0, "int8"), (3.0, 2.0, "weight-only")])
def test_auto_keeps_the_faster_route_per_shape(monkeypatch, int8_ms, float_ms, route):
    monkeypatch.setattr(K, "auto_skips_int8", lambda device: None)  # the timing, also on CPUs that skip it
    g = torch.Generator().manual_seed(3)
    a = _qlinear(g)
    set_compute(a, "auto")
    b = copy.deepcopy(a)  # another layer of the same shape: one decision for both
    x = torch.randn(6, 40, generator=g)
    want = {}
    for compute in ("int8", "weight-only"):
        ref_layer = copy.deepcopy(a)
        set_compute(ref_layer, compute)
        want[compute] = ref_layer(x)
    calls = _fake_clock(monkeypatch, int8_ms, float_ms)
    for layer in (a, a, b):
        assert torch.equal(layer(x), want[route])
    assert len(calls) == 2  # timed once, at the first call of the shape
    (key, d), = K.decisions().items()
    assert d.route == route and key[1] == (6, 40) and key[-1] == "cpu"
    # the weight-only route keeps its float weight on the CPU only where it was chosen
    assert a.float_weight_bytes() == (24 * 40 * 4 if route == "weight-only" else 0)
    line = K.describe_decisions([d])
    assert ("int8 kernels on 1 of 1" if route == "int8" else "weight-only on 1") in line


def test_auto_runs_weight_only_untimed_where_onednn_int8_is_inexact(monkeypatch):
    """On a CPU without VNNI (AVX2) the exact integer routes are slower than its float GEMM: ``auto`` runs weight-only
    there without timing, and says why; ``int8`` still runs the (exact) integer kernels."""
    monkeypatch.setattr(cpu, "_onednn_ok", lambda: False)
    monkeypatch.setattr(K, "_DECIDED", {})
    g = torch.Generator().manual_seed(7)
    m, x = _qlinear(g), torch.randn(3, 40, generator=g)
    set_compute(m, "weight-only")
    want = m(x)
    set_compute(m, "auto")
    assert torch.equal(m(x), want) and not K.decisions()
    assert "no VNNI" in K.auto_skips_int8(torch.device("cpu"))
    set_compute(m, "int8")
    assert not torch.equal(m(x), want)


def test_devices_without_int8_kernels_run_weight_only(monkeypatch):
    g = torch.Generator().manual_seed(4)
    m = _qlinear(g)
    x = torch.randn(3, 40, generator=g)
    set_compute(m, "weight-only")
    want = m(x)
    monkeypatch.setattr(K, "_DECIDED", {})
    monkeypatch.setenv("QVD_INT8", "off")
    set_compute(m, "auto")
    assert torch.equal(m(x), want) and not K.decisions()
    set_compute(m, "int8")
    with pytest.raises(QVDError, match="QVD_INT8=off.*'auto' or 'weight-only'"):
        m(x)
    monkeypatch.delenv("QVD_INT8")
    assert K.int8_unavailable(torch.device("cpu")) is None
    for dev in ("mps", "xpu", "privateuseone"):
        assert dev in K.int8_unavailable(torch.device(dev))


@pytest.mark.parametrize("compute", ["int8", "weight-only"])
def test_an_input_that_needs_a_gradient_is_refused_with_the_fix(monkeypatch, compute):
    """A plain-torch model called without torch.no_grad(): its float layers' parameters make the quantized layer's
    input need a gradient, which the integer kernels cannot give. Every route says so (not the kernels' autograd
    error), and the same call under no_grad runs. It sets what it depends on: autograd on for the refused call, the
    int8 kernels available (no ``QVD_INT8=off``), the default CPU route."""
    monkeypatch.delenv("QVD_INT8", raising=False)
    monkeypatch.setattr(cpu, "ROUTE", "auto")
    g = torch.Generator().manual_seed(6)
    for layer, x in ((_qlinear(g), torch.randn(3, 40, generator=g)),
                     (_qconv(g), torch.randn(1, 16, 6, 6, generator=g))):
        set_compute(layer, compute)
        upstream = torch.nn.Parameter(torch.ones(()))
        with torch.enable_grad(), pytest.raises(QVDError, match=r"torch\.no_grad\(\) or torch\.inference_mode\(\)"):
            layer(x * upstream)
        with torch.no_grad():
            assert torch.isfinite(layer(x * upstream)).all()


def test_bad_compute_is_named():
    with pytest.raises(ValueError, match="compute='fast'"):
        set_compute(_qlinear(torch.Generator().manual_seed(5)), "fast")


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_float_gemm_integer_route_is_exact_at_the_worst_case_sums(monkeypatch, kind):
    """Every code at the clamp: |sum| = K * 127 * 128 far beyond fp32's 2**24, yet the K-split float route equals
    int32 accumulation bit for bit (and the reference)."""
    k = 3 * cpu.EXACT_TERMS + 5
    if kind == "linear":
        w_q = torch.full((8, k), -127, dtype=torch.int8)
        x = torch.full((4, k), -50.0)
    else:
        k = 1000  # 9 * 1000 products per output
        w_q = torch.full((8, k, 3, 3), 127, dtype=torch.int8)
        x = torch.full((1, k, 5, 5), 50.0)
    scale = torch.full((8,), 1e-3)
    args = (None, 0.01, 0, -128, 127)
    outs = {}
    for route in ("int_mm", "float"):
        monkeypatch.setattr(cpu, "ROUTE", route)
        pw = K.PackedWeight(w_q if kind == "linear" else w_q.contiguous(memory_format=torch.channels_last), scale)
        outs[route] = K.linear_w8a8(x, pw, *args) if kind == "linear" else K.conv2d_w8a8(x, pw, *args, padding=1)
    assert torch.equal(outs["float"], outs["int_mm"])
    want = (ref.linear_w8a8(x, w_q, scale, *args) if kind == "linear"
            else ref.conv2d_w8a8(x, w_q, scale, *args, padding=1))
    torch.testing.assert_close(outs["float"], want, atol=0, rtol=1e-6)


def test_weight_only_output_does_not_depend_on_how_the_codes_are_strided():
    """A 1x1 conv's channels-last codes also count as contiguous: quantized in memory, loaded from a file, both give
    the float op the same canonical weight, so a saved and reloaded model samples bit-identically."""
    g = torch.Generator().manual_seed(6)
    m = _qconv(g, c=32, n=32, k=1, padding=0)
    other = copy.deepcopy(m)
    cl = torch.empty_strided((32, 32, 1, 1), (32, 1, 32, 32), dtype=torch.int8).copy_(m.weight)  # as quantizing gives
    other.weight = torch.nn.Parameter(cl, requires_grad=False)
    assert m.weight.stride() != other.weight.stride() and torch.equal(m.weight, other.weight)
    set_compute(m, "weight-only"), set_compute(other, "weight-only")
    x = torch.randn(4, 32, 8, 8, generator=g)
    assert torch.equal(m(x), other(x))


def test_a_padded_conv_keeps_its_pad_codes_and_remakes_them_when_its_quantizer_changes(monkeypatch):
    """The codes the zero padding reads (each channel's code of 0.0: with a SCRI shift, not 0) are made once per
    activation quantizer, not per call; the integer route reads them and stays exact against the reference."""
    g = torch.Generator().manual_seed(31)
    m = _qconv(g)
    x = torch.randn(2, 16, 6, 5, generator=g)
    made = []
    real = K.pad_codes
    monkeypatch.setattr(K, "pad_codes", lambda *a, **kw: made.append(1) or real(*a, **kw))
    for _ in range(3):
        y = m(x)
    assert len(made) == 1
    want_pad = ref.quantize_activation(torch.zeros(16), m.act_scale, 0, -128, 127, m.scri_shift, m.scri_inv_scale)
    assert torch.equal(m.pad_codes(), want_pad) and want_pad.abs().sum() > 0
    want = ref.conv2d_w8a8(x, m.weight, m.weight_scale, m.epilogue_bias(), m.act_scale, 0, -128, 127,
                           m.scri_shift, m.scri_inv_scale, 1, 1)
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        m.act_scale.mul_(2)  # a new quantizer (in place): new codes
    m(x)
    assert len(made) == 2
    assert _qconv(g, padding=0).pad_codes() is None


def test_clipping_is_counted_on_the_integer_route_only_while_asked(monkeypatch):
    """``count_clipping``: every CLIP_CHECK_EVERY-th call of the integer route, the share of input elements whose code
    the static range clamps (SCRI applied first); nothing is counted unless asked or on the weight-only route."""
    import qvd.modules as M

    g = torch.Generator().manual_seed(41)
    m = _qlinear(g)
    x = torch.randn(64, 40, generator=g)
    x[:8] *= 1000  # 8 of 64 rows far beyond any calibrated range
    v = (x - m.scri_shift) * m.scri_inv_scale / m.act_scale + m.zero_point
    want = float(((v < -128.5) | (v > 127.5)).float().mean())
    assert m.count_clipping(False) is None
    m(x)
    assert m.clipping is None
    m.count_clipping(True)
    for _ in range(M.CLIP_CHECK_EVERY + 1):  # two checks
        m(x)
    share, n = m.count_clipping(False)
    assert n == 2 * x.numel() and abs(share - want) < 1e-6 and 0.1 < share < 0.2
    m.compute = "weight-only"
    m.count_clipping(True)
    m(x)
    assert m.count_clipping(False) is None


def test_a_large_input_is_counted_on_a_strided_view_with_every_channel():
    import qvd.modules as M

    x = torch.randn(4, 64, 96, 96)
    v = M._strided_sample(x, 1)
    assert v.shape[1] == 64 and v.numel() <= M.CLIP_CHECK_ELEMENTS and v.data_ptr() == x.data_ptr()
    assert M._strided_sample(torch.randn(3, 5), 1).shape == (3, 5)
    t = torch.randn(2, 9000, 320)
    assert M._strided_sample(t, 2).shape[2] == 320 and M._strided_sample(t, 2).numel() <= M.CLIP_CHECK_ELEMENTS
