"""CPU dispatch (qvd.kernels) vs the plain-torch reference: exact integer codes, float outputs within
dtype tolerance, on both CPU routes (oneDNN int8 ops and the torch._int_mm fallback)."""
from __future__ import annotations

import logging
import sys

import pytest
import torch

import qvd.kernels as K
from qvd.kernels import cpu
from qvd.kernels import reference as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=5e-2, rtol=2e-2),
       torch.float16: dict(atol=1e-2, rtol=2e-3)}


@pytest.fixture(params=["onednn", "int_mm", "float"])
def route(request, monkeypatch):
    if request.param == "onednn" and not cpu._onednn_ok():
        pytest.skip("oneDNN int8 ops unavailable or inexact on this CPU")
    monkeypatch.setattr(cpu, "ROUTE", request.param)
    return request.param


def _layer(g, n, *k, affine=True):
    w_q = torch.randint(-127, 128, (n, *k), generator=g, dtype=torch.int8)
    w_scale = torch.rand(n, generator=g) * 0.01 + 1e-3
    bias = torch.randn(n, generator=g)
    c = k[0]
    shift = torch.randn(c, generator=g) * 0.2 if affine else None
    inv = torch.rand(c, generator=g) + 0.5 if affine else None
    return w_q, w_scale, bias, shift, inv


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("zp,qmin,qmax", [(0, -128, 127), (5, -128, 127), (-3, -127, 127)])
@pytest.mark.parametrize("scale", [0.25, 0.0173, torch.tensor(0.031, dtype=torch.float64)])
def test_quantize_exact(dtype, zp, qmin, qmax, scale):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 33, generator=g) * 4).to(dtype)
    x[0, :8] = torch.tensor([0.125, 0.375, -0.125, -0.625, 1e5, -1e5, 0.0, 2.5]).to(dtype)  # ties, saturation
    shift, inv = torch.randn(33, generator=g), torch.rand(33, generator=g) + 0.5
    for s, i in [(None, None), (shift, None), (None, inv), (shift, inv)]:
        assert torch.equal(K.quantize_activation(x, scale, zp, qmin, qmax, s, i),
                           ref.quantize_activation(x, scale, zp, qmin, qmax, s, i))
    x4 = x.reshape(4, 16, 33).permute(0, 2, 1).reshape(4, 33, 4, 4)
    assert torch.equal(K.quantize_activation(x4, scale, zp, qmin, qmax, shift, inv, channel_dim=1),
                       ref.quantize_activation(x4, scale, zp, qmin, qmax, shift, inv, channel_dim=1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine,zp,bias", [(True, 3, True), (False, 0, False)])
def test_linear(route, dtype, affine, zp, bias):
    g = torch.Generator().manual_seed(1)
    w_q, w_scale, b, shift, inv = _layer(g, 37, 53, affine=affine)
    b = b if bias else None
    x = torch.randn(3, 7, 53, generator=g).to(dtype)
    want = ref.linear_w8a8(x, w_q, w_scale, b, 0.02, zp, -128, 127, shift, inv)
    got = K.linear_w8a8(x, K.PackedWeight(w_q, w_scale), b, 0.02, zp, -128, 127, shift, inv)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, **TOL[dtype])


def test_linear_integer_part_exact(route):
    """Unit scales, no bias: the output is the int32 accumulator (saturating inputs included)."""
    g = torch.Generator().manual_seed(2)
    w_q = torch.randint(-128, 128, (24, 200), generator=g, dtype=torch.int8)
    w_q[0] = 127
    x = torch.randint(-128, 128, (17, 200), generator=g).float()
    x[0] = 127.0
    got = K.linear_w8a8(x, K.PackedWeight(w_q, torch.ones(24)), None, 1.0, 0, -128, 127)
    assert torch.equal(got.double(), x.double() @ w_q.double().t())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0)])
def test_conv(route, dtype, k, stride, padding):
    g = torch.Generator().manual_seed(3)
    w_q, w_scale, b, shift, inv = _layer(g, 19, 13, k, k)
    x = (torch.randn(2, 13, 9, 7, generator=g) * 2).to(dtype)
    want = ref.conv2d_w8a8(x, w_q, w_scale, b, 0.03, 4, -128, 127, shift, inv, stride, padding)
    got = K.conv2d_w8a8(x, K.PackedWeight(w_q, w_scale), b, 0.03, 4, -128, 127, shift, inv, stride, padding)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, **TOL[dtype])


def test_conv_integer_part_exact_with_pad_codes(route):
    """zp != 0 and a SCRI shift: padded pixels must carry each channel's code of 0.0."""
    g = torch.Generator().manual_seed(4)
    w_q, _, _, shift, _ = _layer(g, 8, 6, 3, 3)
    x = torch.randn(1, 6, 5, 5, generator=g)
    got = K.conv2d_w8a8(x, K.PackedWeight(w_q, torch.ones(8)), None, 0.05, -9, -128, 127, shift, None, 1, 1)
    q = ref.quantize_activation(torch.nn.functional.pad(x, (1,) * 4), 0.05, -9, -128, 127, shift, None, channel_dim=1)
    want = torch.nn.functional.conv2d(q.double(), w_q.double()) * 0.05
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
    assert torch.equal(torch.round(got.double() / 0.05), torch.nn.functional.conv2d(q.double(), w_q.double()))


@pytest.mark.parametrize("conv", [False, True])
def test_layer_packs_its_weight_once_as_a_view_and_again_after_a_change(route, conv):
    from qvd.modules import QConv2d, QLinear
    g = torch.Generator().manual_seed(5)
    shape = (16, 8, 3, 3) if conv else (16, 32)
    w_q, w_scale, b, _, _ = _layer(g, *shape, affine=False)
    kw = dict(weight_q=w_q, weight_scale=w_scale, bias=b, act_scale=0.02, zero_point=2, w_bits=8, a_bits=8)
    layer = QConv2d(8, 16, (3, 3), 1, 1, **kw) if conv else QLinear(32, 16, **kw)
    x = torch.randn(2, 8, 5, 5, generator=g) if conv else torch.randn(5, 32, generator=g)
    want = (lambda: ref.conv2d_w8a8(x, layer.weight, w_scale, layer.epilogue_bias(), 0.02, 2, -128, 127,
                                    padding=1)) if conv else \
        (lambda: ref.linear_w8a8(x, layer.weight, w_scale, layer.epilogue_bias(), 0.02, 2, -128, 127))
    torch.testing.assert_close(layer(x), want(), **TOL[torch.float32])
    packed = layer.packed_weight(layer.weight)
    assert packed is layer.packed_weight(layer.weight)  # module state, built once
    assert packed.mat.data_ptr() == layer.weight.data_ptr()  # the K-major matrix is a view of the stored codes
    with torch.no_grad():
        layer.weight.neg_()  # an in-place change must not reuse the old packing (or oneDNN's copy of it)
    assert layer.packed_weight(layer.weight) is not packed
    torch.testing.assert_close(layer(x), want(), **TOL[torch.float32])


def test_hiditq():
    levels = torch.tensor([-2.0, -0.5, 0.0, 0.25, 3.0])
    x = torch.tensor([[-5.0, -1.25, -0.25, 0.125, 1.0, 9.0, 1.625]])
    codes = K.hiditq_encode(x, levels)
    assert torch.equal(codes, ref.hiditq_encode(x, levels))
    assert codes.tolist() == [[0, 0, 1, 2, 3, 4, 3]]  # ties go to the lower level
    assert torch.equal(K.hiditq_decode(codes, levels), levels[codes.long()])
    with pytest.raises(ValueError, match="1..256 levels"):
        K.hiditq_encode(x, torch.arange(300.0))


def test_bad_inputs_are_named():
    w_q = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="8"):
        K.linear_w8a8(torch.randn(2, 7), K.PackedWeight(w_q, torch.ones(4)), None, 1.0, 0, -128, 127)
    with pytest.raises(TypeError, match="int8"):
        K.PackedWeight(w_q.float(), torch.ones(4))
    with pytest.raises(ValueError, match="4-D"):
        K.conv2d_w8a8(torch.randn(2, 8), K.PackedWeight(torch.zeros(4, 8, 3, 3, dtype=torch.int8), torch.ones(4)), None,
                      1.0, 0, -128, 127)


def test_missing_triton_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(K, "_TRITON", None)
    monkeypatch.setitem(sys.modules, "qvd.kernels.triton_kernels", None)  # import now raises ImportError
    with caplog.at_level(logging.WARNING, logger="qvd"):
        assert not K.triton_available()
        assert not K.triton_available()
    assert len([r for r in caplog.records if "Triton kernels unavailable" in r.message]) == 1


def test_triton_failure_switches_that_kernel_off_and_python_errors_propagate(monkeypatch, caplog):
    """A kernel error (Triton, CUDA launch) switches the kernels of that call off on that device, whatever the shape
    (one log line, the torch route from then on); CUDA out-of-memory and Python errors are the user's to see."""
    calls = []

    class FlakyTriton:
        fail_with = None

        @staticmethod
        def _bucket(m):
            return 16

        @staticmethod
        def units_per_launch(x, out_unit, w_k):
            return x.shape[0]

        def quantize(self, x, *a):
            calls.append(("quantize", tuple(x.shape)))
            if self.fail_with is not None:
                raise self.fail_with
            return ref.quantize_activation(x, *a)

        def linear_fused(self, x, w_k, w_scale, bias, act_scale, *a, out):
            calls.append(("linear_fused", tuple(x.shape)))
            if self.fail_with is not None:
                raise self.fail_with
            return out.copy_(ref.linear_w8a8(x, w_k, w_scale, bias, act_scale, *a))

        def linear(self, q, w_k, w_scale, bias, act_scale, dtype, out):
            return out.copy_(ref.int8_linear(q, w_k, act_scale, w_scale, bias, dtype))

    flaky = FlakyTriton()
    monkeypatch.setattr(K, "_TRITON", flaky)
    monkeypatch.setattr(K, "_TRITON_DEVICES", ("cpu",))
    monkeypatch.setattr(K, "_OFF", set())
    monkeypatch.setattr(K, "_CHECKED", {("quantize", "cpu"), ("linear", "cpu"), ("linear_fused", "cpu")})
    monkeypatch.setattr(K, "_CHOSEN", {})
    g = torch.Generator().manual_seed(13)
    w_q, w_scale, b, _, _ = _layer(g, 8, 16, affine=False)
    w = K.PackedWeight(w_q, w_scale)
    run = lambda m: K.linear_w8a8(torch.randn(m, 16, generator=g), w, b, 0.02, 0, -128, 127)  # noqa: E731
    for error in (torch.cuda.OutOfMemoryError("CUDA out of memory"), TypeError("a bug in the launch code")):
        flaky.fail_with = error
        with pytest.raises(type(error)):
            run(3)
    assert not K._OFF
    flaky.fail_with = RuntimeError("CUDA error: no kernel image is available for execution on the device")
    with caplog.at_level(logging.WARNING, logger="qvd"):
        for m in (3, 3, 5):
            x = torch.randn(m, 16, generator=g)
            torch.testing.assert_close(K.linear_w8a8(x, w, b, 0.02, 0, -128, 127),
                                       ref.linear_w8a8(x, w_q, w_scale, b, 0.02, 0, -128, 127), **TOL[torch.float32])
    # each variant tried once after the kernel error (the fused kernel, then the quantize + GEMM pair): shape 5 never
    # reaches Triton
    assert calls == [("linear_fused", (3, 16))] * 3 + [("quantize", (3, 16))]
    assert K._OFF == {("quantize", "cpu", "cpu"), ("linear", "cpu", "cpu"), ("linear_fused", "cpu", "cpu")}
    assert len([r for r in caplog.records if "failed on cpu" in r.message]) == 2


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels compiled)")


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 37, 300])
def test_cuda_triton_linear(dtype, m):
    g = torch.Generator().manual_seed(10)
    w_q, w_scale, b, shift, inv = _layer(g, 200, 96)
    x = torch.randn(m, 96, generator=g).to(dtype)
    want = ref.linear_w8a8(x, w_q, w_scale, b, 0.02, 3, -128, 127, shift, inv)
    args = [t.cuda() for t in (x, w_q, w_scale, b)]
    got = K.linear_w8a8(args[0], K.PackedWeight(args[1], args[2]), args[3], 0.02, 3, -128, 127, shift.cuda(),
                        inv.cuda())
    assert K.triton_available(), "Triton fell back to the torch route on this GPU"
    torch.testing.assert_close(got.cpu(), want, **TOL[dtype])
    q = K._TRITON.quantize(args[0], 0.02, 3, -128, 127, shift.cuda(), inv.cuda())
    assert torch.equal(q.cpu(), ref.quantize_activation(x, 0.02, 3, -128, 127, shift, inv))


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride", [1, 2])
def test_cuda_triton_conv(dtype, stride):
    g = torch.Generator().manual_seed(11)
    w_q, w_scale, b, shift, inv = _layer(g, 96, 72, 3, 3)
    x = (torch.randn(2, 72, 13, 11, generator=g) * 2).to(dtype)
    want = ref.conv2d_w8a8(x, w_q, w_scale, b, 0.03, 4, -128, 127, shift, inv, stride, 1)
    got = K.conv2d_w8a8(x.cuda(), K.PackedWeight(w_q.cuda(), w_scale.cuda()), b.cuda(), torch.tensor(0.03).cuda(), 4,
                        -128, 127, shift.cuda(), inv.cuda(), stride, 1)
    assert K.triton_available(), "Triton fell back to the torch route on this GPU"
    torch.testing.assert_close(got.cpu(), want, **TOL[dtype])


@cuda
def test_cuda_triton_hiditq():
    levels = torch.sort(torch.randn(33)).values
    x = torch.randn(4, 1000)
    codes = K.hiditq_encode(x.cuda(), levels.cuda())
    assert torch.equal(codes.cpu(), ref.hiditq_encode(x, levels))
    assert torch.equal(K.hiditq_decode(codes, levels.cuda()).cpu(), ref.hiditq_decode(codes.cpu(), levels))


@pytest.mark.parametrize("fastest", [0, 1])
@pytest.mark.parametrize("onednn", [False, True], ids=["int_mm-float", "onednn-int_mm"])
def test_auto_route_times_both_once_and_stays_exact(monkeypatch, onednn, fastest):
    """``QVD_CPU_ROUTE=auto``: the first call of a shape runs the exact CPU routes (oneDNN and ``_int_mm`` where
    oneDNN int8 is exact, else ``_int_mm`` and the float GEMM) once, then once timed, and keeps the faster; later
    calls run it alone. Every call gives the int32 accumulator bit for bit. The clock is faked: the choice is fixed."""
    if onednn and not cpu._onednn_ok():
        pytest.skip("oneDNN int8 ops unavailable or inexact on this CPU: never a candidate here")
    if not onednn:
        monkeypatch.setattr(cpu, "_onednn_ok", lambda: False)  # the candidates of CPUs without VNNI, on every CPU
    names = ["onednn", "int_mm"] if onednn else ["int_mm", "float"]
    ms = {name: 1.0 if i == fastest else 2.0 for i, name in enumerate(names)}
    runs, timed = [], []
    real = cpu.linear_routes
    monkeypatch.setattr(cpu, "linear_routes", lambda *a: {
        name: (lambda name=name, fn=fn: runs.append(name) or fn()) for name, fn in real(*a).items()})

    def clock(fn, device):
        out = fn()
        timed.append(runs[-1])
        return ms[runs[-1]], out
    monkeypatch.setattr(K, "_timed", clock)
    monkeypatch.setattr(cpu, "ROUTE", "auto")
    monkeypatch.setattr(K, "_CHOSEN", {})
    g = torch.Generator().manual_seed(12)
    w_q = torch.randint(-128, 128, (24, 40), generator=g, dtype=torch.int8)
    x = torch.randint(-128, 128, (9, 40), generator=g).float()  # codes at scale 1: the output is the accumulator
    w = K.PackedWeight(w_q, torch.ones(24))
    want = x.double() @ w_q.double().t()
    assert torch.equal(K.linear_w8a8(x, w, None, 1.0, 0, -128, 127).double(), want)
    assert runs == names * 2 and timed == names  # each run once, then once timed
    (key, d), = K._CHOSEN.items()
    assert key == ("cpu", "linear", (9, 40), (40, 1), (24, 40), torch.float32, False, "cpu")
    assert d == K.Decision(names[fastest])
    runs.clear()
    assert torch.equal(K.linear_w8a8(x, w, None, 1.0, 0, -128, 127).double(), want)
    assert runs == [names[fastest]] and timed == names


def test_bad_route_is_named(monkeypatch):
    monkeypatch.setattr(cpu, "ROUTE", "fast")
    with pytest.raises(ValueError, match="QVD_CPU_ROUTE"):
        K.linear_w8a8(torch.randn(2, 8), K.PackedWeight(torch.zeros(4, 8, dtype=torch.int8), torch.ones(4)), None,
                      1.0, 0, -128, 127)


def test_one_decision_cache_times_each_candidate_once_and_passes_over_declining_ones(monkeypatch):
    """``decide`` (``run_route``'s, the Triton variants' and the CPU routes' one time-it-once choice): at the first
    call of a key each candidate runs once, then once timed, and the fastest is kept; later calls run it alone. A
    candidate giving None (a Triton kernel switched off, a problem it declines) is passed over, then and later."""
    clock = iter([3.0, 1.0, 2.0])
    monkeypatch.setattr(K, "_timed", lambda fn, device: (next(clock), fn()))
    runs, cache, cpu_dev = [], {}, torch.device("cpu")
    cands = {name: (lambda name=name: runs.append(name) or name) for name in ("a", "b", "c")}
    cands["off"] = lambda: runs.append("off")
    assert K.decide(cache, ("k",), cands, cpu_dev) == ("b", "b")
    assert runs == ["a", "b", "c", "off", "a", "b", "c"] and cache == {("k",): K.Decision("b")}
    runs.clear()
    assert K.decide(cache, ("k",), cands, cpu_dev) == ("b", "b") and runs == ["b"]
    cands["b"] = lambda: None  # the kept one is switched off since: the next in order runs
    assert K.decide(cache, ("k",), cands, cpu_dev) == ("a", "a")
    assert K.decide(cache, ("k2",), {"off": lambda: None}, cpu_dev) == (None, None) and ("k2",) not in cache


def test_timing_waits_for_the_tensors_own_gpu(monkeypatch):
    """Issue 40.6a: ``auto`` timing a layer on cuda:1 synchronizes cuda:1, not the current device."""
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    ms, out = K._timed(lambda: 7, torch.device("cuda", 1))
    assert out == 7 and ms >= 0 and synced == [torch.device("cuda", 1)] * 2


def test_a_kernel_error_switches_the_kernel_off_on_that_gpu_only(monkeypatch):
    """Issue 40.6c: a kernel error on cuda:0 switches that kernel off for (kernel, cuda:0, arch), not for every GPU of
    the arch: cuda:1 (same arch) keeps running it."""
    import types

    monkeypatch.setattr(K, "_TRITON", types.SimpleNamespace())
    monkeypatch.setattr(K, "_OFF", set())
    monkeypatch.setattr(K, "_CHECKED", {("linear_fused", "sm_86")})
    monkeypatch.setattr(K, "_arch", lambda device: "sm_86")
    on = lambda i: types.SimpleNamespace(device=torch.device("cuda", i))  # noqa: E731

    def broken(tk):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    assert K._on_triton(on(0), ("linear_fused",), broken) is None
    assert K._OFF == {("linear_fused", "cuda:0", "sm_86")}
    assert K._on_triton(on(1), ("linear_fused",), lambda tk: "ran") == "ran"
    assert K._on_triton(on(0), ("linear_fused",), lambda tk: "ran") is None


def test_auto_decides_each_stride_padding_and_layout_apart(monkeypatch):
    """Issue 40.6b: a stride-2 downsample and a stride-1 conv of the same weight and input shapes do different work
    (as do padding 0 / 1, an NCHW / channels-last input): ``auto`` times and keeps a route for each."""
    from qvd import QConv2d, set_compute

    monkeypatch.setattr(K, "auto_skips_int8", lambda device: None)  # the timing, also on CPUs that skip it
    monkeypatch.setattr(K, "_DECIDED", {})
    g = torch.Generator().manual_seed(14)
    w_q, w_scale, b, _, _ = _layer(g, 8, 6, 3, 3, affine=False)
    x = torch.randn(2, 6, 9, 9, generator=g)
    with torch.no_grad():
        for stride, padding in ((1, 1), (2, 1), (1, 0)):
            layer = QConv2d(6, 8, (3, 3), stride, padding, weight_q=w_q, weight_scale=w_scale, bias=b,
                            act_scale=0.03, zero_point=0, w_bits=8, a_bits=8)
            set_compute(layer, "auto")
            layer(x)
        layer(x.contiguous(memory_format=torch.channels_last))
    assert len(K.decisions()) == 4
