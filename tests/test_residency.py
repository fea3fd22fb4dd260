"""Where a quantized layer's tensors live when a host moves it, keeps a device copy of it or copies the model around it.

A host's unload moves a layer back to its offload device (``.to``): nothing derived on the old device (packed codes,
epilogue biases, pad codes, a kept float weight, its LoRA branch) may stay reachable from it, or the memory the host
counts as freed stays allocated. ``make_resident`` / ``release`` keep a device copy while the stored tensors stay
home: released, the layer holds exactly its stored tensors again. ``meta`` stands for the accelerator (tensors move,
no memory is used)."""
from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from qvd import QConv2d, QLinear, set_compute
from qvd.delta import WeightDelta
from qvd.kernels import cpu
from qvd.modules import make_resident, release, resident_bytes
from qvd.scri import ScriTransform, folded_norm



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
def patching(pack):
    return sys.modules[f"{pack.__name__}.nodes.patching"]


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


class _Patcher:
    """What ``nodes/loading.py`` reads of a ComfyUI 0.33 dynamic patcher: its object patches (QVD's layers), its
    sizes, its free-memory view (comfy-aimdo's reclaimable memory included) and the load's planned weight memory."""

    def __init__(self, layers, free: int, planned=None):
        self.object_patches = {f"layer{i}": m for i, m in enumerate(layers)}
        self.free, self.load_device = free, torch.device("meta")
        if planned is not None:
            self.qvd_extra_memory = planned
        self.model = nn.Module()

    def is_dynamic(self):
        return True

    def get_attachment(self, _key):
        return None

    def model_size(self):  # QVD's layers only: no float weights beside them
        return 0

    def get_free_memory(self, _device):
        return self.free


@pytest.fixture
def loading(patching, monkeypatch):
    """nodes/loading.py with ``comfy.model_management`` stood in: torch-free memory, an inference reserve of 1000
    bytes, no model loaded."""
    mm = types.SimpleNamespace(torch_free=0, minimum_inference_memory=lambda: 1000, current_loaded_models=[])
    mm.get_free_memory = lambda _device: mm.torch_free
    monkeypatch.setitem(sys.modules, "comfy", types.ModuleType("comfy"))
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    module = sys.modules[patching.__name__.rpartition(".")[0] + ".loading"]
    module.mm_stub = mm
    yield module
    for p in list(module._PLACED.values()):
        release(p)


def _quantized(n: int) -> list:
    g = torch.Generator().manual_seed(5)
    return [_layers(g)["linear"][0] for _ in range(n)]


@pytest.mark.parametrize("planned, reclaimable, kept", [
    (None, 0, 4), (1e32, 0, 4),  # no limit set (LoadedModel.model_load: 0 -> 1e32): all fit in the free memory
    (-5e6, 0, 0),  # ComfyUI short of memory (extra_memory < 0): nothing beyond what is held (here none)
    (2.5, 0, 2), (2.5, 1, 3),  # within the plan, plus what comfy-aimdo can reclaim beyond torch's free memory
])
def test_place_keeps_what_fits_the_load_comfyui_planned(loading, planned, reclaimable, kept):
    layers = _quantized(4)
    size = loading._stored_bytes(layers[0])
    planned = planned * size if planned is not None and abs(planned) < 100 else planned
    patcher = _Patcher(layers, free=1000 + 10 * size, planned=planned)
    loading.mm_stub.torch_free = patcher.free - reclaimable * size
    loading.place(patcher, "meta")
    assert sum(m.weight.device.type == "meta" for m in layers) == kept
    assert sum(resident_bytes(m) for m in layers) == kept * size


def test_a_later_run_drops_copies_no_model_of_it_holds_and_detach_keeps_what_a_loaded_patcher_shares(loading):
    a, b = _quantized(2), _quantized(2)
    pa, pb = (_Patcher(x, free=10 ** 9) for x in (a, b))
    with loading.sampling_run():
        loading.place(pa, "meta")
    loading.place(pb, "meta")  # outside a quantized MODEL's run (ControlNets on an FP MODEL): both stay
    assert all(resident_bytes(m) for m in a + b)
    with loading.sampling_run():  # a later run of ``b``'s model: ``a``'s copies go
        loading.place(pb, "meta")
    assert not any(resident_bytes(m) for m in a) and all(resident_bytes(m) for m in b)

    class Loaded(loading.QVDPatcher, _Patcher):
        pass
    sharing = Loaded(b[:1], free=0)  # a loaded clone (a LoRA on it) that shares ``b``'s first layer
    loading.mm_stub.current_loaded_models = [types.SimpleNamespace(model=sharing)]
    loading.on_detach(pb)
    assert resident_bytes(b[0]) and not resident_bytes(b[1])
    loading.mm_stub.current_loaded_models = []
    loading.on_detach(pb)
    assert not any(resident_bytes(m) for m in b) and all(m.weight.device.type == "cpu" for m in a + b)
