"""Where a quantized layer's tensors live when a host moves it, keeps a device copy of it or copies the model around it.

A host's unload moves a layer back to its offload device (``.to``): nothing derived on the old device (packed codes,
epilogue biases, pad codes, a kept float weight, its LoRA branch) may stay reachable from it, or the memory the host
counts as freed stays allocated. ``make_resident`` / ``release`` keep a device copy while the stored tensors stay
home: released, the layer holds exactly its stored tensors again. ``meta`` stands for the accelerator (tensors move,
no memory is used)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from qvd import QConv2d, QLinear, set_compute
from qvd.delta import WeightDelta
from qvd.kernels import cpu
from qvd.modules import make_resident, release, resident_bytes
from qvd.scri import ScriTransform, folded_norm

ROOT = Path(__file__).resolve().parents[1]


def _layers(g):
    n, c = 48, 40
    kw = dict(weight_scale=torch.rand(n, generator=g) * 0.01 + 1e-3, bias=torch.randn(n, generator=g), act_scale=0.03,
              zero_point=3, w_bits=8, a_bits=8, scri_shift=torch.randn(c, generator=g),
              scri_inv_scale=torch.rand(c, generator=g) + 0.5)
    conv = QConv2d(c, n, (3, 3), 2, 1, weight_q=torch.randint(-127, 128, (n, c, 3, 3), generator=g, dtype=torch.int8),
                   **kw)
    lin = QLinear(c, n, weight_q=torch.randint(-127, 128, (n, c), generator=g, dtype=torch.int8), **kw)
    return {"conv": (conv, torch.randn(2, c, 6, 6, generator=g)), "linear": (lin, torch.randn(3, c, generator=g))}


def _tensors(obj, seen=None) -> list[torch.Tensor]:
    """Every tensor reachable from ``obj`` through attributes, containers and caches."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None), torch.device, torch.dtype)):
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        items = list(obj.keys()) + list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        items = list(obj)
    elif hasattr(obj, "__dict__"):
        items = list(vars(obj).values())
    else:
        return []
    return [t for item in items for t in _tensors(item, seen)]


def _used(layer, x) -> None:
    """Fill every cache a host's sampling fills: the integer route, the weight-only route and a LoRA branch."""
    g = torch.Generator().manual_seed(1)
    n = layer.weight.shape[0]
    down = torch.randn(4, *layer.weight.shape[1:], generator=g) * 0.01
    layer.set_delta(WeightDelta(down=down, up=torch.randn(n, 4, generator=g) * 0.01, source=("lora",)))
    with torch.no_grad():
        for route in ("int8", "weight-only"):
            set_compute(layer, route)
            layer(x)
    layer.prepare(torch.device("cpu"), torch.float32)


@pytest.fixture(autouse=True)
def _exact_cpu_route(monkeypatch):
    if not cpu._onednn_ok():
        monkeypatch.setattr(cpu, "ROUTE", "int_mm")


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_after_the_host_moves_a_layer_nothing_of_the_old_device_stays_reachable(kind):
    layer, x = _layers(torch.Generator().manual_seed(0))[kind]
    _used(layer, x)
    assert len(layer._cache) >= 3  # packed codes, epilogue bias, pad codes / weight terms, float weight
    layer.to("meta")
    left = [tuple(t.shape) for t in _tensors(layer) if t.device.type == "cpu"]
    assert not left, f"CPU tensors still reachable after .to('meta'): {left}"
    assert layer.delta.device.type == "meta"


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_a_resident_copy_leaves_the_stored_tensors_home_and_release_gives_them_back(kind):
    layer, x = _layers(torch.Generator().manual_seed(0))[kind]
    _used(layer, x)
    layer.set_delta(None)  # a host sets the branch after placing the layer (a meta copy cannot come back)
    stored = dict(layer.named_parameters())
    nbytes = sum(p.numel() * p.element_size() for p in stored.values())
    assert make_resident(layer, "meta") == nbytes == resident_bytes(layer)
    assert {p.device.type for p in layer.parameters()} == {"meta"}
    assert layer.weight.is_contiguous(memory_format=torch.channels_last) == (kind == "conv")
    assert not layer._cache  # nothing CPU-derived kept for the device copy
    assert make_resident(layer, "meta") == nbytes  # again: nothing more
    assert release(layer) == nbytes and resident_bytes(layer) == 0
    assert all(p is stored[n] for n, p in layer.named_parameters())  # the very stored tensors, nothing copied back
    assert not [t for t in _tensors(layer) if t.device.type == "meta"]
    assert release(layer) == 0
    with torch.no_grad():
        set_compute(layer, "int8")
        assert torch.equal(layer(x), layer(x))


def test_a_folded_norm_is_a_fresh_module_of_the_norms_class_without_the_hosts_state():
    g = torch.Generator().manual_seed(0)
    norm = nn.GroupNorm(4, 32)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(32, generator=g) + 0.5)
        norm.bias.copy_(torch.randn(32, generator=g))
    norm._v = object()  # what a host's loader attaches (ComfyUI's dynamic VRAM: a cast-buffer slot)
    norm.register_forward_hook(lambda *a: None)
    scri = ScriTransform(torch.randn(32, generator=g), torch.rand(32, generator=g) + 0.5)
    folded = scri.fold_norm(norm)
    assert type(folded) is nn.GroupNorm and (folded.num_groups, folded.num_channels, folded.eps) == (4, 32, norm.eps)
    assert not hasattr(folded, "_v") and len(folded._forward_hooks) == 1  # only its own output hook
    x = torch.randn(2, 32, 5, 5, generator=g)
    torch.testing.assert_close(folded(x), scri.apply(norm(x).transpose(1, -1)).transpose(1, -1), rtol=1e-5,
                               atol=1e-5)
    again = folded_norm(norm, folded.weight, folded.bias, scri)
    assert again.weight is not folded.weight and torch.equal(again.weight, folded.weight)


@pytest.fixture(scope="module")
def patching():
    spec = importlib.util.spec_from_file_location("qvd_pack_residency", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield sys.modules[f"{spec.name}.nodes.patching"]
    finally:
        for name in [n for n in sys.modules if n == spec.name or n.startswith(spec.name + ".")]:
            del sys.modules[name]


def test_a_copied_controlnet_tree_moves_without_moving_the_original(patching):
    original = nn.Sequential(nn.Conv2d(4, 8, 3), nn.GroupNorm(2, 8), nn.Linear(8, 8))
    original[0].comfy_cast_weights = True  # state a host's loader left on the original's layers
    original[0]._v = ("slot",)
    copy = patching._structure_copy(original, torch.device("cpu"))
    stored = {n: (p, p.data_ptr()) for n, p in original.named_parameters()}
    assert all(copy.get_parameter(n).data_ptr() == ptr for n, (_, ptr) in stored.items())  # no tensor copied
    assert not hasattr(copy[0], "_v") and "comfy_cast_weights" not in vars(copy[0])
    copy.to("meta")
    assert all(original.get_parameter(n) is p and p.device.type == "cpu" and p.data_ptr() == ptr
               for n, (p, ptr) in stored.items())
    assert {p.device.type for p in copy.parameters()} == {"meta"}


def test_a_controlnet_copy_holds_its_tensors_on_the_offload_device_whatever_the_original_is_loaded_on(patching):
    """A ControlNet quantized while the original is loaded (it calibrated in the same prompt): the copy's float layers
    are on the offload device (``meta`` stands for it here), not views of the original's loaded tensors, which the
    original's unload would leave allocated for the copy."""
    original = nn.Sequential(nn.Conv2d(4, 8, 3), nn.GroupNorm(2, 8))
    original.register_buffer("table", torch.arange(4.0))
    copy = patching._structure_copy(original, torch.device("meta"))
    assert {t.device.type for t in [*copy.parameters(), *copy.buffers()]} == {"meta"}
    assert {t.device.type for t in [*original.parameters(), *original.buffers()]} == {"cpu"}
