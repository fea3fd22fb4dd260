"""Damaged and edited QVD files for the file-format tests: raw byte damage, and edits written back with a
valid checksum ("re-signed": what a buggy tool or a hand edit would produce)."""
from __future__ import annotations

import copy
import json
import random

import torch
from safetensors.torch import save_file
from torch import nn

from qvd import safefile
from qvd.scri import ScriTransform


def read(path, key: str) -> tuple[dict, dict]:
    return safefile.read(path, key, ValueError, "test")


def resign(src, dst, key: str, edit_meta=None, edit_tensors=None) -> None:
    """Copy ``src`` to ``dst`` with ``edit_meta(meta)`` / ``edit_tensors(tensors)`` applied, checksum renewed."""
    tensors, meta = read(src, key)
    tensors, meta = {k: v.clone() for k, v in tensors.items()}, copy.deepcopy(meta)
    if edit_meta is not None:
        edit_meta(meta)
    if edit_tensors is not None:
        edit_tensors(tensors)
    write_text(dst, tensors, key, json.dumps(meta))


def write_text(dst, tensors: dict, key: str, text: str) -> None:
    """A file whose metadata is exactly ``text`` (valid JSON or not), with its checksum."""
    save_file(tensors, str(dst), metadata={key: text, key + "_sha256": safefile.checksum(text, tensors)})


# ---- raw damage (no checksum renewed): every case must be refused or load unchanged

def header_span(raw: bytes) -> tuple[int, int]:
    n = int.from_bytes(raw[:8], "little")
    return 8, 8 + n


def raw_mutations(raw: bytes, rng: random.Random, count: int):
    """``count`` (label, bytes) damages of a file: truncation, header length, header flips, digit edits, data
    flips, insertions and appended bytes."""
    h0, h1 = header_span(raw)
    digits = [i for i in range(h0, h1) if chr(raw[i]).isdigit()]
    kinds = ["truncate", "length", "header_flip", "digit", "data_flip", "insert", "append"]
    for i in range(count):
        kind = kinds[i % len(kinds)]
        b = bytearray(raw)
        if kind == "truncate":
            b = b[: rng.randrange(len(raw))]
        elif kind == "length":
            n = h1 - h0
            b[:8] = rng.choice([0, 1, n - 1, n + 1, n - 8, n + 8, len(raw), len(raw) - 8, 2 ** 40, 2 ** 64 - 1,
                                rng.randrange(2 ** 32)]).to_bytes(8, "little")
        elif kind == "header_flip":
            p = rng.randrange(h0, h1)
            b[p] ^= rng.randrange(1, 256)
        elif kind == "digit":
            p = rng.choice(digits)
            b[p] = ord(rng.choice([d for d in "0123456789" if ord(d) != b[p]]))
        elif kind == "data_flip":
            p = rng.randrange(h1, len(raw))
            b[p] ^= 1 << rng.randrange(8)
        elif kind == "insert":
            p = rng.randrange(len(raw))
            b[p:p] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        else:
            b += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 65)))
        yield f"{kind}#{i}", bytes(b)


# ---- re-signed edits: every case must be refused, or (where it changes only what calibration decides) load a
# model that runs and stays finite

_ODD_VALUES = [None, [], {}, [1, 2], "x", "8", True, False, 0, -1, 1, 3, 2 ** 31, 10 ** 30, 1e308, -1e308,
               float("nan"), float("inf"), 0.5, -0.0]


def _paths(node, prefix=()):
    """Every (path, value) in a JSON tree, the root excluded."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield prefix + (k,), v
        yield from _paths(v, prefix + (k,))


def _set(meta, path, value):
    node = meta
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value


def _delete(meta, path):
    node = meta
    for k in path[:-1]:
        node = node[k]
    del node[path[-1]]


def _structural(meta: dict, rng: random.Random):
    """A (label, edit) that rewires the file's structure, or None where it has nothing to rewire: two layers'
    entries swapped, or a layer's SCRI said to be folded into another norm the file lists."""
    layers, norms = sorted(meta.get("layers", {})), sorted(meta.get("norms", {}))
    if len(layers) < 2:
        return None
    a, b = rng.sample(layers, 2)
    if rng.random() < 0.5 or not norms:
        def swap(m, a=a, b=b):
            m["layers"][a], m["layers"][b] = m["layers"][b], m["layers"][a]
        return f"swap layers {a} <-> {b}", swap
    norm = rng.choice(norms)
    return f"{a}: scri norm:{norm}", lambda m, a=a, n=norm: m["layers"][a].__setitem__("scri", f"norm:{n}")


def meta_edits(meta: dict, rng: random.Random, count: int):
    """``count`` (label, edit) pairs on the metadata: odd values, nudged numbers, deleted / added / renamed
    fields, structural rewiring. The sample leans to the layer entries, where the loader takes the most from
    the file."""
    paths = list(_paths(meta))
    for i in range(count):
        path, value = rng.choice(paths)
        op = rng.choice(["odd", "odd", "nudge", "delete", "add", "rename", "structure"])
        structural = _structural(meta, rng) if op == "structure" else None
        if structural is not None:
            yield structural
        elif op == "nudge" and type(value) in (int, float):
            new = value + rng.choice([1, -1, 2, 100]) if type(value) is int else value * rng.choice([0, -1, 2, 1e6])
            yield f"nudge {path}", lambda m, p=path, v=new: _set(m, p, v)
        elif op == "delete" and isinstance(path[-1], str):
            yield f"delete {path}", lambda m, p=path: _delete(m, p)
        elif op == "add" and isinstance(value, dict):
            yield f"add {path}", lambda m, p=path: _set(m, p + ("zz_extra",), 1)
        elif op == "rename" and isinstance(path[-1], str):
            def rename(m, p=path):
                node = m
                for k in p[:-1]:
                    node = node[k]
                node[p[-1] + "_x"] = node.pop(p[-1])
            yield f"rename {path}", rename
        else:
            odd = rng.choice(_ODD_VALUES)
            yield f"set {path} = {odd!r}", lambda m, p=path, v=odd: _set(m, p, copy.deepcopy(v))


def tensor_edits(tensors: dict, rng: random.Random, count: int):
    """``count`` (label, edit) pairs on the tensors: dtype, shape, name, values (odd ones, and one value nudged
    by one code or 0.1 %), two tensors of one shape swapped, missing and extra tensors."""
    names = sorted(tensors)
    dtypes = [torch.float32, torch.float16, torch.int32, torch.int8, torch.uint8, torch.float64, torch.bool]
    for i in range(count):
        name = rng.choice(names)
        t = tensors[name]
        op = rng.choice(["dtype", "shape", "rename", "delete", "extra", "nan", "negative", "zero", "extreme",
                         "nudge", "nudge", "swap"])
        twins = [n for n in names if n != name and tensors[n].shape == t.shape and tensors[n].dtype == t.dtype
                 and not torch.equal(tensors[n], t)]
        if op == "swap" and twins:
            other = rng.choice(twins)
            yield f"{name} <-> {other}", lambda ts, a=name, b=other: ts.update({a: ts[b], b: ts[a]})
        elif op == "nudge" and t.numel() and t.dtype in (torch.int8, torch.float32):
            j = rng.randrange(t.numel())

            def nudge(ts, n=name, j=j):
                v = ts[n].clone()
                flat = v.reshape(-1)
                if v.dtype == torch.int8:
                    flat[j] += 1 if int(flat[j]) < 0 else -1
                else:
                    flat[j] = flat[j] * 1.001 if float(flat[j]) != 0 else 1e-3
                ts[n] = v
            yield f"{name}[{j}] nudged", nudge
        elif op == "dtype":
            d = rng.choice([d for d in dtypes if d != t.dtype])
            yield f"{name} as {d}", lambda ts, n=name, d=d: ts.__setitem__(n, ts[n].to(d))
        elif op == "shape":
            yield f"{name} reshaped", lambda ts, n=name: ts.__setitem__(
                n, rng.choice([ts[n].reshape(-1), ts[n].unsqueeze(0), ts[n].reshape(-1)[:-1] if ts[n].numel() > 1
                               else ts[n].reshape(-1).repeat(2)]).clone())
        elif op == "rename":
            yield f"{name} renamed", lambda ts, n=name: ts.__setitem__(n + "_x", ts.pop(n))
        elif op == "delete":
            yield f"{name} deleted", lambda ts, n=name: ts.pop(n)
        elif op == "extra":
            yield f"extra beside {name}", lambda ts, n=name: ts.__setitem__(n.rsplit(".", 1)[0] + ".extra",
                                                                            torch.zeros(3))
        else:
            def values(ts, n=name, op=op):
                v = ts[n].clone()
                flat = v.reshape(-1)
                if flat.numel() == 0:
                    return
                j = rng.randrange(flat.numel())
                if op == "nan":
                    flat[j] = float("nan") if v.is_floating_point() else -128 if v.dtype == torch.int8 else 0
                elif op == "negative":
                    flat[j] = -abs(flat[j]) - 1 if v.dtype != torch.bool else False
                elif op == "zero":
                    flat.zero_()
                else:
                    flat[j] = torch.finfo(v.dtype).max if v.is_floating_point() else torch.iinfo(v.dtype).min \
                        if v.dtype != torch.bool else True
                ts[n] = v
            yield f"{name} {op}", values


def model_affine(model: nn.Module):
    """name -> (weight, bias) of ``model``'s norm of that name (``swap_folds``)."""
    named = dict(model.named_modules())
    return lambda name: (named[name].weight, named[name].bias)


def swap_folds(affine, layer_a: str, layer_b: str):
    """A re-signed rewiring: the norm-folded layers ``layer_a`` and ``layer_b`` (each the only layer its norm feeds)
    name each other's norm, and each norm's folded affine is recomputed from the model's (``affine(norm name) ->
    (weight, bias)``) with the transform of the layer now naming it, so every value agrees with the model and with the
    layer's own transform."""
    def edit(meta, tensors):
        a, b = meta["layers"][layer_a], meta["layers"][layer_b]
        a["scri"], b["scri"] = b["scri"], a["scri"]
        for layer, info in ((layer_a, a), (layer_b, b)):
            norm = info["scri"][5:]
            s = ScriTransform.stored(tensors[f"{layer}.scri_shift"], tensors[f"{layer}.scri_inv_scale"])
            gamma, beta = (t.detach().float() for t in affine(norm))
            tensors[f"{norm}.weight"], tensors[f"{norm}.bias"] = gamma / s.scale, (beta - s.shift) / s.scale
    return edit


def _block(name: str) -> str:
    """A layer's transformer block / motion module / resnet (the name up to its last two parts)."""
    return name.rsplit(".", 2)[0]


def rewirings(model: nn.Module, meta: dict, tensors: dict, rng: random.Random, count: int):
    """``count`` (label, edit(meta, tensors)) re-signed rewirings whose every value agrees with ``model``: two single-layer
    norm folds swapped within a block and across blocks (``swap_folds``), two layers of one signature swapping names,
    a layer given another layer's SCRI transform with its codes made again for it from the model's weight, a layer
    leaving its norm's group (``unfold``) and a Linear folded into an unfolded norm of its block and width
    (``fold_into``: one that does not feed it, or feeds it through an addition)."""
    layers = meta["layers"]
    single = [n for n, i in sorted(layers.items()) if i.get("scri", "").startswith("norm:")
              and sum(j.get("scri") == i["scri"] for j in layers.values()) == 1]
    width = {n: meta["signatures"][n][1][1] for n in layers}
    pairs = [(a, b) for a in single for b in single if a < b and width[a] == width[b]]
    same_block = [p for p in pairs if _block(p[0]) == _block(p[1])]
    across = [p for p in pairs if _block(p[0]) != _block(p[1])]
    twins = [(a, b) for a in sorted(layers) for b in sorted(layers) if a < b
             and meta["signatures"][a] == meta["signatures"][b] and layers[a]["kind"] == layers[b]["kind"]]
    kernel = [n for n, i in sorted(layers.items()) if i.get("scri") == "kernel"]
    moves = [(a, b) for a in kernel for b in sorted(layers) if a != b and width[a] == width[b]
             and layers[b].get("scri") in ("kernel", "none")]
    grouped = [n for n, i in sorted(layers.items()) if i.get("scri", "").startswith("norm:") and n not in single]
    named = dict(model.named_modules())
    free_norms = [n for n, m in named.items() if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and n not in meta["norms"]
                  and getattr(m, "weight", None) is not None]
    refolds = [(layer, norm) for layer, i in sorted(layers.items()) if i.get("scri") in ("kernel", "none")
               and i["kind"] == "linear" for norm in free_norms
               if layer.startswith(_block(norm) + ".") and named[norm].weight.numel() == width[layer]]
    kinds = [(k, v) for k, v in (("swap folds in a block", same_block), ("swap folds across blocks", across),
                                 ("swap names", twins), ("move a transform", moves), ("leave a group", grouped),
                                 ("fold into an unfolded norm", refolds)) if v]
    for _ in range(count):
        kind, choices = rng.choice(kinds)
        if kind == "leave a group":
            layer = rng.choice(choices)
            yield f"{kind}: {layer}", unfold(model, layer)
            continue
        a, b = rng.choice(choices)
        label = f"{kind}: {a} <-> {b}"
        if kind == "fold into an unfolded norm":
            yield label, fold_into(model, [a], b)
        elif kind.startswith("swap folds"):
            yield label, swap_folds(model_affine(model), a, b)
        elif kind == "swap names":
            yield label, lambda m, t, a=a, b=b: _swap_names(m, t, a, b)
        else:
            yield label, lambda m, t, a=a, b=b: _move_transform(model, m, t, a, b)


def _swap_names(meta, tensors, a: str, b: str) -> None:
    """Layers ``a`` and ``b`` (one signature) swap their entries and tensors."""
    meta["layers"][a], meta["layers"][b] = meta["layers"][b], meta["layers"][a]
    ours = [k for k in tensors if k.rpartition(".")[0] in (a, b)]
    moved = {(b if k.rpartition(".")[0] == a else a) + "." + k.rpartition(".")[2]: tensors.pop(k) for k in ours}
    tensors.update(moved)


def _move_transform(model: nn.Module, meta, tensors, a: str, b: str) -> None:
    """Layer ``b`` takes ``a``'s kernel SCRI transform, its codes and scales made again from the model's weight."""
    from qvd.quantizers import quantize_weight

    s = ScriTransform.stored(tensors[f"{a}.scri_shift"], tensors[f"{a}.scri_inv_scale"])
    w = dict(model.named_modules())[b].weight.detach().float()
    codes, scale = quantize_weight(s.fold_weight(w), meta["layers"][b]["w_bits"])
    tensors[f"{b}.weight"], tensors[f"{b}.weight_scale"] = codes, scale
    tensors[f"{b}.scri_shift"], tensors[f"{b}.scri_inv_scale"] = s.shift.clone(), s.inv_scale.clone()
    meta["layers"][b]["scri"] = "kernel"


def fold_into(model: nn.Module, layers: list[str], norm: str):
    """A re-signed rewiring: ``layers`` (quantized, W8A8) say their SCRI is folded into ``norm``, all taking the first
    one's transform (its kernel SCRI, or shift 0 and gains 1), codes and scales made again for it from ``model``'s
    weights and the norm's folded affine from the model's norm: every value agrees with the model."""
    from qvd.quantizers import quantize_weight

    named = dict(model.named_modules())

    def edit(meta, tensors):
        first = layers[0]
        shift = tensors.get(f"{first}.scri_shift")
        width = meta["signatures"][first][1][1]
        s = ScriTransform.stored(torch.zeros(width) if shift is None else shift,
                                 torch.ones(width) if shift is None else tensors[f"{first}.scri_inv_scale"])
        for layer in layers:
            w = named[layer].weight.detach().float()
            tensors[f"{layer}.weight"], tensors[f"{layer}.weight_scale"] = quantize_weight(
                s.fold_weight(w), meta["layers"][layer]["w_bits"])
            tensors[f"{layer}.scri_shift"], tensors[f"{layer}.scri_inv_scale"] = s.shift.clone(), s.inv_scale.clone()
            meta["layers"][layer]["scri"] = f"norm:{norm}"
        gamma, beta = named[norm].weight.detach().float(), named[norm].bias.detach().float()
        tensors[f"{norm}.weight"], tensors[f"{norm}.bias"] = gamma / s.scale, (beta - s.shift) / s.scale
        meta["norms"][norm] = type(named[norm]).__name__
    return edit


def unfold(model: nn.Module, layer: str):
    """A re-signed rewiring: ``layer`` leaves its norm's group (SCRI none, codes made again from ``model``'s weight),
    the rest of the group keeping the fold."""
    from qvd.quantizers import quantize_weight

    def edit(meta, tensors):
        w = model.get_submodule(layer).weight.detach().float()
        tensors[f"{layer}.weight"], tensors[f"{layer}.weight_scale"] = quantize_weight(w, meta["layers"][layer]["w_bits"])
        del tensors[f"{layer}.scri_shift"], tensors[f"{layer}.scri_inv_scale"]
        meta["layers"][layer]["scri"] = "none"
    return edit
