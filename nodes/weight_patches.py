"""ComfyUI's weight patches (LoRA and the other adapters) on QVD-quantized layers: each layer gets them as a
``qvd.delta.WeightDelta`` beside its int8 kernel; its codes are never written.

When: ``on_load`` is an ON_LOAD callback on every quantized MODEL and its motion models, so each time ComfyUI
loads one (whole, partial, or 0.33's dynamic VRAM), every quantized layer gets that MODEL's patches (or none),
bias patches as a patched copy of the float bias; a sampling run also does it just before ComfyUI plans the load
(``before_load``), so the size the MODEL tells counts the branches. ComfyUI itself never merges a patch into a
quantized layer (the layer says its weights are patched already: ``comfy_patched_weights``), so a load with a LoRA
does no float work on the int8 weights. A layer ComfyUI leaves offloaded reads the ``LowVramPatch`` queued on it at
call time (``call_time_delta``; its bias ones apply to the stored bias).

How (``delta_for``), from a layer's list of ComfyUI patches:
- additive adapters with a low-rank form become one low-rank branch (stacked along the rank): LoRA / LoCon
  (``up @ down``, LoCon's mid folded into down), LoHa without Tucker cores (``(A1 B1) * (A2 B2) = (A1 . A2)
  (B1 . B2)``, rank r1 r2), LoKr on a Linear / 1x1 conv (``kron(P1 Q1, P2 Q2) = kron(P1, P2) kron(Q1, Q2)``) and
  a plain difference that is exactly low rank (AnimateDiff-Evolved merges a motion LoRA into ``up @ down`` diffs
  before ComfyUI sees it: ``_factored`` recovers the factors and checks them), each only where its rank R makes
  ``R (K + N) < K N``; other additive ones (a LoKr on a 3x3 conv, a full-rank diff) become one dense difference,
  computed by ComfyUI's own ``calculate_weight``;
- a list with any non-additive patch (DoRA, OFT / BOFT, GLoRA, set, strength_model != 1, offsets, functions)
  becomes the exact dense difference ``calculate_weight(patches, W) - W`` on the layer's float weight ``W``
  (the dequantized codes: the weight the layer computes with).
Tensors are kept in the activation dtype (the model's compute dtype) on the layer's device. A patch whose result has
another shape than the layer's weight is refused, naming the adapter and the layer.
"""
from __future__ import annotations

import math
import weakref

import torch

from ..qvd import QVDError
from ..qvd.delta import WeightDelta
from . import loading

CALLBACK_KEY = "qvd"


def attach(patcher, base: int) -> None:
    """Give ``patcher`` (and every clone made from it) the ON_LOAD callback; ``base``: the bytes its model holds with
    QVD's layers and no weight patches."""
    from comfy.patcher_extension import CallbacksMP

    patcher.remove_callbacks_with_key(CallbacksMP.ON_LOAD, CALLBACK_KEY)
    patcher.add_callback_with_key(CallbacksMP.ON_LOAD, CALLBACK_KEY, OnLoad(base))


class OnLoad:
    """The ON_LOAD callback: ``on_load`` with the patcher's bytes without weight patches."""

    def __init__(self, base: int):
        self.base = base

    def __call__(self, patcher, device_to=None, *_args) -> None:
        on_load(patcher, self.base, device_to)


def before_load(patcher) -> None:
    """Before ComfyUI plans the load of ``patcher`` (a sampling run): its quantized layers get its weight patches now,
    so the size it tells the planner already counts their branches."""
    from comfy.patcher_extension import CallbacksMP

    for callback in patcher.get_callbacks(CallbacksMP.ON_LOAD, CALLBACK_KEY):
        callback(patcher)


def on_load(patcher, base: int, device_to=None) -> None:
    """ComfyUI loaded ``patcher`` (``device_to``; None: about to): every quantized layer in its model now carries
    exactly its weight patches, as branches in the activation dtype on the layer's device, and the patcher tells
    the planner ``base`` plus their bytes (``model_size()``, and the loaded bytes of this load).

    Under 0.33's dynamic-VRAM loader QVD's modules are placed by ``loading.place`` first (kept on the device or
    streamed). Under the classic loader an offloaded (low-VRAM) conv's channels-last codes, which ComfyUI's pinning
    refuses as non-contiguous, are pinned through a contiguous view of the same bytes (ComfyUI unpins them)."""
    dynamic = loading.dynamic(patcher)
    if device_to is not None and dynamic:
        loading.place(patcher, device_to)
    dtype = _activation_dtype(patcher.model)
    held = loaded = 0
    for name, module in patcher.object_patches.items():  # QVD's layers and folded norms: also before the load
        keys = (f"{name}.weight", f"{name}.bias")
        if getattr(module, "qvd_scri_norm", False) and any(k in patcher.patches for k in keys):
            raise QVDError(f"a weight patch (LoRA, ...) targets {name}, a norm into which QVD folded its SCRI input "
                           f"transform: the patch would apply to the folded weights. Quantize this model with the "
                           f"norm's consumers in QVD Quantize Model's skip list, or use a LoRA without norm weights")
        if not getattr(module, "qvd_quantized", False):
            continue
        if device_to is not None and not dynamic and module.comfy_cast_weights:
            _pin_codes(patcher, keys[0], module.weight)
        patches = patcher.patches.get(keys[0])
        module.set_delta(_cached(module, patches, keys[0], dtype) if patches else None,
                         _patched_bias(patcher, module, keys[1]))
        nbytes = 0 if module.delta is None else module.delta.nbytes()
        held += nbytes
        loaded += 0 if module.comfy_cast_weights else nbytes
    patcher.size = base + held
    if device_to is not None and not dynamic:
        if patcher.model.model_lowvram:
            patcher.model.model_loaded_weight_memory += loaded
        else:
            patcher.model.model_loaded_weight_memory = patcher.size


def _activation_dtype(model) -> torch.dtype:
    """The dtype the model computes in: ComfyUI's manual cast dtype, else its weights' (a motion model: the dtype of
    most of its float parameters outside QVD's layers)."""
    dtype = getattr(model, "manual_cast_dtype", None)
    if dtype is None and hasattr(model, "get_dtype"):
        dtype = model.get_dtype()
    if dtype is None:
        counts: dict = {}
        for m in model.modules():
            if not getattr(m, "qvd_quantized", False):
                for p in m.parameters(recurse=False):
                    if p.is_floating_point():
                        counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
        dtype = max(counts, key=counts.get) if counts else torch.float32
    return dtype


def _pin_codes(patcher, key: str, weight: torch.Tensor) -> None:
    import comfy.model_management

    if key in patcher.pinned or weight.device.type != "cpu" or weight.is_contiguous() or weight.dim() != 4:
        return
    view = torch.nn.Parameter(weight.detach().permute(0, 2, 3, 1), requires_grad=False)  # channels-last: contiguous
    if view.is_contiguous() and comfy.model_management.pin_memory(view):
        patcher.pinned.add(key)


def _patched_bias(patcher, module, key: str) -> torch.Tensor | None:
    """The layer's float bias with ``patcher``'s bias patches applied (None without any), from the stored bias: a load
    never merges patches into a quantized layer (``comfy_patched_weights``), except a forced one, whose merge
    ComfyUI undoes from its backup."""
    import comfy.lora

    patches = patcher.patches.get(key)
    if not patches or module.bias is None:
        return None
    backup = patcher.backup.get(key)
    stored = module.bias if backup is None else backup.weight
    return comfy.lora.calculate_weight(patches, stored.detach().float().clone(), key)


def call_time_delta(module, functions: list) -> WeightDelta | None:
    """The delta for the weight functions ComfyUI queued on an offloaded quantized layer (its ``LowVramPatch``)."""
    from comfy.model_patcher import LowVramPatch

    lists = []
    for f in functions:
        if not isinstance(f, LowVramPatch):
            raise QVDError(f"{type(f).__name__} is queued as a weight function on a QVD-quantized layer "
                           f"({type(module).__name__} {tuple(module.weight.shape)}): only ComfyUI's own weight patches "
                           f"(LoRA loaders) can apply to int8 layers")
        lists.append((f.key, f.patches[f.key]))
    if any(p is not lists[0][1] for _, p in lists):
        raise QVDError(f"{lists[0][0]}: several different weight patch lists are queued on one quantized layer")
    return _cached(module, lists[0][1], lists[0][0], module.delta_dtype)


def _cached(module, patches: list, key: str, dtype: torch.dtype | None) -> WeightDelta | None:
    module.delta_dtype = dtype
    delta = module.delta
    if delta is not None and delta.same_source(tuple(patches)) and dtype in (None, delta.dtype):
        return delta
    return delta_for(module, patches, key, dtype)


def delta_for(module, patches: list, key: str, dtype: torch.dtype | None = None) -> WeightDelta | None:
    """The ``WeightDelta`` of ComfyUI ``patches`` (entries ``(strength, adapter, strength_model, offset, function)``)
    for the quantized layer ``module`` (its weight patch key ``key``), in ``dtype`` (None: the adapters'); see the
    module docstring. An additive patch that adds nothing (strength 0, or factors that are all zero: a zero-strength
    or empty motion LoRA that AnimateDiff-Evolved merged into an all-zero difference) gets no branch; None where no
    patch adds anything (the layer runs as if unpatched)."""
    import comfy.lora

    shape, device = tuple(module.weight.shape), module.weight.device
    ups, downs, dense_patches = [], [], []
    additive = all(_additive(p) for p in patches)
    for p in patches if additive else ():
        if p[0] == 0:
            continue  # strength 0 (ComfyUI's calculate_weight skips such a diff too)
        factors = _low_rank(p[1], p[0], shape, key)
        if factors is None:
            dense_patches.append(p)
        elif not _adds_nothing(*factors):
            ups.append(factors[0].to(device))
            downs.append(factors[1].to(device))
    if additive and not ups and not dense_patches:
        return None
    dtype = dtype or _dtype(patches)
    dense = None
    if not additive:
        w = module.convert_weight(module.weight)
        dense = comfy.lora.calculate_weight(patches, w.clone(), key)
    elif dense_patches:
        dense = comfy.lora.calculate_weight(dense_patches, torch.zeros(shape, device=device), key)
    if dense is not None and tuple(dense.shape) != shape:
        raise QVDError(f"{key}: {_names(patches)} gives a weight of shape {tuple(dense.shape)} for a layer of shape "
                       f"{shape}: QVD cannot apply a patch that resizes a quantized layer")
    if not additive:
        dense = dense - w
    up = torch.cat(ups, 1).to(dtype) if ups else None
    down = torch.cat(downs, 0).to(dtype) if downs else None
    return WeightDelta(down, up, None if dense is None else dense.to(dtype), tuple(patches))


def _adds_nothing(up: torch.Tensor, down: torch.Tensor) -> bool:
    """Low-rank factors whose product is zero: rank 0 (``_factored`` of an all-zero difference) or a factor of zeros
    (a branch for them would cost its GEMMs, and a rank-0 one cannot run as a conv or be SCRI-folded)."""
    return up.shape[1] == 0 or not up.any() or not down.any()


def _additive(patch) -> bool:
    """A patch whose change of the weight does not depend on the weight (so it can run as its own branch)."""
    from comfy.weight_adapter import LoHaAdapter, LoKrAdapter, LoRAAdapter

    strength, adapter, strength_model, offset, function = patch[:5]
    if strength_model != 1.0 or offset is not None or function is not None:
        return False
    if isinstance(adapter, LoRAAdapter):
        return adapter.weights[4] is None and adapter.weights[5] is None  # no DoRA, no reshape
    if isinstance(adapter, LoHaAdapter):
        return adapter.weights[7] is None
    if isinstance(adapter, LoKrAdapter):
        return adapter.weights[8] is None
    return isinstance(adapter, tuple) and (len(adapter) == 1 or adapter[0] == "diff")  # a plain difference


def _low_rank(adapter, strength: float, shape: tuple, key: str):
    """(up [N, R], down [R, *shape[1:]]) in float32 with every scale folded into ``up``, or None where the adapter
    has no low-rank form here or it would cost more than a dense delta."""
    from comfy.weight_adapter import LoHaAdapter, LoKrAdapter, LoRAAdapter

    n, k = shape[0], math.prod(shape[1:])
    if isinstance(adapter, LoRAAdapter):
        up, down, alpha, mid = adapter.weights[:4]
        rank = down.shape[0]
        up, down = up.float().flatten(1), down.float()
        if mid is not None:  # LoCon's k x k core, folded into down as ComfyUI does
            mid = mid.float()
            final = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
            down = torch.mm(down.transpose(0, 1).flatten(1), mid.transpose(0, 1).flatten(1)).reshape(final)
            down = down.transpose(0, 1)
        scale = 1.0 if alpha is None else float(alpha) / rank
    elif isinstance(adapter, LoHaAdapter):
        w1a, w1b, alpha, w2a, w2b, t1 = adapter.weights[:6]
        if t1 is not None:
            return None
        r1, r2 = w1b.shape[0], w2b.shape[0]
        up = (w1a.float()[:, :, None] * w2a.float()[:, None, :]).reshape(w1a.shape[0], r1 * r2)
        down = (w1b.float()[:, None, :] * w2b.float()[None, :, :]).reshape(r1 * r2, -1)
        scale = 1.0 if alpha is None else float(alpha) / r1
    elif isinstance(adapter, LoKrAdapter):
        w1, w2, alpha, w1a, w1b, w2a, w2b, t2 = adapter.weights[:8]
        if t2 is not None or (w2 is not None and w2.dim() != 2) or (len(shape) == 4 and shape[2:] != (1, 1)):
            return None
        p1, q1 = _factors(w1, w1a, w1b)
        p2, q2 = _factors(w2, w2a, w2b)
        up, down = torch.kron(p1, p2), torch.kron(q1, q2)
        dim = w2b.shape[0] if w2 is None else w1b.shape[0] if w1 is None else None
        scale = 1.0 if alpha is None or dim is None else float(alpha) / dim
    elif _plain_diff(adapter) is not None:
        diff = _plain_diff(adapter)
        if tuple(diff.shape) != shape:
            return None
        factors = _factored_once(diff, n, k)
        if factors is None:
            return None
        up, down = factors
        scale = 1.0
    else:
        return None
    if up.shape[0] != n or down.numel() != up.shape[1] * k:
        raise QVDError(f"{key}: {type(adapter).__name__} of rank {up.shape[1]} has shapes {tuple(up.shape)} x "
                       f"{tuple(down.shape)}, which do not make this layer's weight {shape}")
    rank = up.shape[1]
    if rank * (k + n) >= k * n:
        return None
    return up * (strength * scale), down.reshape(rank, *shape[1:])


def _plain_diff(adapter) -> torch.Tensor | None:
    """The tensor of a plain difference patch: ``(diff,)`` (AnimateDiff-Evolved's) or ``("diff", (diff, ...))``."""
    if isinstance(adapter, tuple) and len(adapter) == 1 and isinstance(adapter[0], torch.Tensor):
        return adapter[0]
    if isinstance(adapter, tuple) and len(adapter) == 2 and isinstance(adapter[0], str) and adapter[0] == "diff" \
            and isinstance(adapter[1], (tuple, list)) and adapter[1] and isinstance(adapter[1][0], torch.Tensor):
        return adapter[1][0]
    return None


_FACTORED: dict[int, tuple] = {}  # id of a plain difference -> (weak reference to it, its _factored result)
_EXACT = 1e-5  # the tolerance of _factored's own float32 work: the least relative error a factorization is held to


def _tolerance(dtype: torch.dtype) -> float:
    """The relative (Frobenius) error to which factors must reproduce a plain difference stored in ``dtype``.

    A product ``up @ down`` rounded to ``dtype`` is off by at most u = eps / 2 of each element, so by at most
    u ||D|| in Frobenius norm, per rounding (a float32 accumulation adds nothing at this scale); 2 eps = 4 u allows
    four roundings (the product, its strength scale, a sum with another LoRA, a cast), so a low-rank difference
    stored in fp16 (2 eps ~ 2e-3) or bf16 (~ 1.6e-2) factors, while one that is not low rank stays far outside (its
    best rank-R error is a large share of it: about 30 % for a Gaussian one at the largest R that pays). float32 /
    float64: ``_EXACT``. Capped at bf16's (fp8 and coarser: a difference that rounding blurs that much stays dense)."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return max(_EXACT, 2 * min(eps, torch.finfo(torch.bfloat16).eps))


def _factored_once(diff: torch.Tensor, n: int, k: int):
    """``_factored`` of a difference tensor (to its dtype's ``_tolerance``), computed once while it lives: every load
    of every MODEL holding it (the motion patchers of one ADE graph, loaded again for each prompt) reuses the
    factors."""
    hit = _FACTORED.get(id(diff))
    if hit is None or hit[0]() is not diff:
        hit = (weakref.ref(diff), _factored(diff.float().reshape(n, k), _tolerance(diff.dtype)))
        _FACTORED[id(diff)] = hit
        weakref.finalize(diff, _FACTORED.pop, id(diff), None)
    return hit[1]


def _factored(d: torch.Tensor, tol: float = _EXACT) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(up [N, R], down [R, K])`` with ``||d - up @ down|| <= tol ||d||`` (Frobenius) and the smallest such R, when
    that R pays (``R (K + N) < K N``); else None. An all-zero ``d`` has rank 0 (``up`` [N, 0], ``down`` [0, K]).

    An adaptive seeded range finder: the part of ``d`` outside the basis found so far, times a Gaussian of the next
    width, is orthonormalized and appended to the basis, until the part left outside is within ``tol`` (the basis
    spans d's numerical range: a low-rank ``d`` stops at the first width, 64) or the basis is as wide as a rank that
    no longer pays (refused). Each QR takes only the new columns, so the widths tried cost no more QR than the last
    one. The SVD of the projection gives the smallest rank within ``tol``; the factors are then checked on ``d``."""
    n, k = d.shape
    pays = (n * k) // (n + k)
    norm = float(d.norm())
    if norm == 0:
        return d.new_zeros(n, 0), d.new_zeros(0, k)
    if pays < 2:  # rank 1 does not pay either
        return None
    bound = (tol * norm) ** 2
    gen = torch.Generator(device=d.device).manual_seed(0)
    q, b, rest = d.new_zeros(n, 0), d.new_zeros(0, k), d  # d = q b + rest, q orthonormal, rest orthogonal to q
    width = min(64, pays)
    while True:
        y = rest @ torch.randn(k, width - q.shape[1], generator=gen, device=d.device)
        y = y - q @ (q.t() @ y)  # orthogonal to q in exact arithmetic already: keep it so in float32
        new = torch.linalg.qr(y).Q
        part = new.t() @ rest
        q, b, rest = torch.cat([q, new], 1), torch.cat([b, part], 0), rest - new @ part
        left = float(rest.norm()) ** 2
        if left <= bound:
            break
        if width >= pays:
            return None
        width = min(4 * width, pays)
    u, sv, vh = torch.linalg.svd(b, full_matrices=False)
    dropped = (sv.flip(0) ** 2).cumsum(0).flip(0)  # dropped[i]: what keeping only the first i values leaves out
    r = int((left + dropped > bound).sum())  # the fewest values that keep the error within tol
    if r >= pays:
        return None
    up, down = q @ (u[:, :r] * sv[:r]), vh[:r]
    return (up, down) if float((d - up @ down).norm()) <= tol * norm else None


def _factors(full, a, b) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, Q)`` with ``P @ Q`` the LoKr factor (given whole as ``full`` or as ``a @ b``), of the smaller rank."""
    if full is None:
        return a.float(), b.float()
    full = full.float()
    rows, cols = full.shape
    if cols <= rows:
        return full, torch.eye(cols)
    return torch.eye(rows), full


def _dtype(patches) -> torch.dtype:
    """The adapters' own floating dtype (float32 where they differ)."""
    dtypes = {t.dtype for p in patches for t in _tensors(p[1]) if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _tensors(item) -> list:
    if isinstance(item, torch.Tensor):
        return [item]
    item = getattr(item, "weights", item)
    return [t for x in item for t in _tensors(x)] if isinstance(item, (tuple, list)) else []


def _names(patches) -> str:
    return ", ".join(sorted({type(p[1]).__name__ if not isinstance(p[1], tuple) else "diff patch" for p in patches}))
