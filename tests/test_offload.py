"""The work of one call of an offloaded (low-VRAM) quantized layer: the host left its tensors on the offload device
and the layer brings them to the input's device per call. Everything derived from the stored tensors (the packed
codes, ``W z``, the epilogue bias) is made once on the layer's own device; a call copies the codes and the per-channel
vectors, plus its LoRA branch, and nothing the size of the weight in float.

On a CPU the offload and compute devices coincide (the copies are free, the code path is the same); with CUDA the
same call is also measured across devices (bytes copied host to device)."""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import qvd.modules as qm
from qvd import QConv2d, QLinear, set_compute
from qvd.delta import WeightDelta
from qvd.kernels import cpu

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _layers(g):
    n, c = 192, 160
    conv = QConv2d(c, n, (3, 3), 1, 1, weight_q=torch.randint(-127, 128, (n, c, 3, 3), generator=g, dtype=torch.int8),
                   weight_scale=torch.rand(n, generator=g) * 0.01 + 1e-3, bias=torch.randn(n, generator=g),
                   act_scale=0.03, zero_point=3, w_bits=8, a_bits=8, scri_shift=torch.randn(c, generator=g),
                   scri_inv_scale=torch.rand(c, generator=g) + 0.5)
    lin = QLinear(1024, 768, weight_q=torch.randint(-127, 128, (768, 1024), generator=g, dtype=torch.int8),
                  weight_scale=torch.rand(768, generator=g) * 0.01 + 1e-3, bias=torch.randn(768, generator=g),
                  act_scale=0.03, zero_point=3, w_bits=8, a_bits=8, scri_shift=torch.randn(1024, generator=g),
                  scri_inv_scale=torch.rand(1024, generator=g) + 0.5)
    return {"conv": (conv, torch.randn(1, c, 2, 2, generator=g)), "linear": (lin, torch.randn(2, 1024, generator=g))}


def _stored_bytes(layer) -> int:
    """Codes + scales + bias + SCRI vectors: what an offloaded call may bring over."""
    return sum(p.numel() * p.element_size() for p in layer.parameters())


def _allocated(fn, device: str) -> tuple[int, int]:
    """(bytes allocated on ``device`` by ``fn``'s ops, bytes copied host to device)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    attr = "cuda_memory_usage" if device == "cuda" else "cpu_memory_usage"
    alloc = sum(max(0, getattr(e, "self_" + attr, 0)) for e in events)
    copied = sum(int(getattr(e, "device_memory_usage", 0) or 0) for e in events if "Memcpy HtoD" in e.name)
    return alloc, copied


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("with_lora", [False, True])
def test_an_offloaded_call_moves_codes_and_scales_and_derives_nothing(kind, device, with_lora, monkeypatch):
    if device == "cpu" and not cpu._onednn_ok():  # the float-GEMM integer route converts codes per call by design
        monkeypatch.setattr(cpu, "ROUTE", "int_mm")
    g = torch.Generator().manual_seed(0)
    layer, x = _layers(g)[kind]
    set_compute(layer, "int8")
    layer.comfy_cast_weights = True  # the host left it on the offload device (the CPU)
    lora = 0
    if with_lora:
        n, k = layer.weight.shape[0], layer.weight[0].numel()
        down = torch.randn(8, *layer.weight.shape[1:], generator=g) * 0.01
        layer.set_delta(WeightDelta(down, torch.randn(n, 8, generator=g) * 0.01))
        lora = layer.delta.nbytes()
        assert lora < 0.1 * n * k * 4  # a small branch beside the float weight
    x = x.to(device)
    want = layer(x)  # first call: the derived tensors are made (once) on the layer's own device
    derived = []
    monkeypatch.setattr(qm, "dequantize_weight", lambda *a: derived.append(a) or pytest.fail("dequantized per call"))
    alloc, copied = _allocated(lambda: layer(x), device)
    assert derived == []
    torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
    activations = 64 * (x.numel() + want.numel()) * 4  # im2col, codes, accumulators, output: input/output-sized
    budget = _stored_bytes(layer) + lora + activations
    weight_floats = layer.weight.numel() * 4
    assert alloc <= budget < weight_floats, (alloc, budget, weight_floats)
    if device == "cuda":
        assert copied <= _stored_bytes(layer) + lora + 4 * layer.weight.shape[0] * 4, copied


def test_derived_tensors_follow_the_stored_ones():
    """The cached epilogue bias is remade when the host replaces the bias or writes the codes (never stale)."""
    g = torch.Generator().manual_seed(1)
    layer, x = _layers(g)["linear"]
    set_compute(layer, "int8")
    y = layer(x)
    with torch.no_grad():
        layer.bias.add_(1.0)
    torch.testing.assert_close(layer(x), y + 1.0, rtol=1e-4, atol=1e-3)
    layer.bias = torch.nn.Parameter(layer.bias.detach() - 1.0, requires_grad=False)
    torch.testing.assert_close(layer(x), y, rtol=1e-4, atol=1e-3)
