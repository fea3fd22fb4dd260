"""Weight patches that add nothing, and plain differences stored in fp16 / bf16, on QVD's quantized layers, in-process
in ComfyUI (0.3.75, 0.33), without a checkpoint: the host glue's ``delta_for`` (as a load sets it) and
``call_time_delta`` (an offloaded layer's ``LowVramPatch``) on seeded QLinear / QConv2d layers, plain and with SCRI
done in the kernel or by the preceding norm. Each case is recorded with its error, if any, so one failing case fails
its own test only. Prints one JSON line.

    python delta_probe.py PACK_DIR     (cwd = the ComfyUI directory, on PYTHONPATH)
"""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from lowvram_probe import load_pack

RANK = 4  # the LoRA mixed with an all-zero difference
LOW = 8  # the rank of the low-rank differences
WIDE = 80  # a rank the range finder reaches after growing its basis past 64 (on a 256 -> 192 Linear: pays up to 109)


def layers(gen: torch.Generator) -> dict:
    """name -> (layer, real input x, the input the layer is given): a 64 -> 96 Linear and a 32 -> 48 3x3 conv (stride
    2, padding 1), plain and with SCRI in the kernel, a Linear and a 1x1 conv whose norm does the SCRI transform."""
    from qvd_pack_probe.qvd import QConv2d, QLinear

    def common(n: int, c: int, kernel: tuple, scri: str | None) -> dict:
        kw = dict(weight_q=torch.randint(-127, 128, (n, c, *kernel), generator=gen, dtype=torch.int8),
                  weight_scale=torch.rand(n, generator=gen) * 0.01 + 0.002, bias=torch.randn(n, generator=gen),
                  act_scale=0.05, zero_point=3, w_bits=8, a_bits=8)
        if scri:
            kw.update(scri_shift=torch.randn(c, generator=gen), scri_inv_scale=torch.rand(c, generator=gen) + 0.5,
                      scri_in_norm=scri == "norm")
        return kw

    out = {}
    for scri in (None, "kernel", "norm"):
        layer = QLinear(64, 96, **common(96, 64, (), scri))
        out[f"linear{'_scri_' + scri if scri else ''}"] = (layer, torch.randn(6, 64, generator=gen))
    for scri in (None, "kernel"):
        layer = QConv2d(32, 48, (3, 3), 2, 1, **common(48, 32, (3, 3), scri))
        out[f"conv3x3{'_scri_' + scri if scri else ''}"] = (layer, torch.randn(2, 32, 9, 9, generator=gen))
    layer = QConv2d(32, 48, (1, 1), 1, 0, **common(48, 32, (1, 1), "norm"))
    out["conv1x1_scri_norm"] = (layer, torch.randn(2, 32, 5, 5, generator=gen))
    result = {}
    for name, (layer, x) in out.items():
        seen = x
        if layer.scri_in_norm:
            view = (-1,) if x.dim() == 2 else (-1, 1, 1)
            seen = (x - layer.scri_shift.view(view)) * layer.scri_inv_scale.view(view)
        result[name] = (layer, x, seen)
    return result


def effect(layer, x: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    """``dW x`` for the layer's real input."""
    return F.linear(x, dw) if dw.dim() == 2 else F.conv2d(x, dw, None, layer.stride, layer.padding)


def lora(shape: tuple, gen: torch.Generator):
    from comfy.weight_adapter import LoRAAdapter

    n, kernel = shape[0], shape[2:]
    up = torch.randn(n, RANK, *([1] * len(kernel)), generator=gen) * 0.01
    down = torch.randn(RANK, *shape[1:], generator=gen)
    return LoRAAdapter(set(), (up, down, None, None, None, None))


def patch_lists(shape: tuple, gen: torch.Generator) -> dict:
    """name -> (patches, the patches of it that add something): ComfyUI patch entries (strength, adapter,
    strength_model, offset, function)."""
    zero = (1.0, (torch.zeros(shape),), 1.0, None, None)  # AnimateDiff-Evolved's form of a merged motion LoRA
    named = (1.0, ("diff", (torch.zeros(shape),)), 1.0, None, None)
    low = (0.7, lora(shape, gen), 1.0, None, None)
    full = (1.0, (torch.randn(shape, generator=gen) * 0.01,), 1.0, None, None)  # full rank: a dense branch
    return {"zero_diff": ([zero], []), "zero_named_diff": ([named], []),
            "zero_strength_lora": ([(0.0,) + low[1:]], []),
            "zero_diff+lora": ([zero, low], [low]), "lora+zero_diff": ([low, zero], [low]),
            "zero_diff+full_diff": ([zero, full], [full])}


def zero_cases(weight_patches) -> dict:
    """Every layer with every patch list, set at load and read at call time: whether it got a branch, its rank, and
    its change of the output against the other patches' ``dW x``."""
    import comfy.lora
    from comfy.model_patcher import LowVramPatch

    gen = torch.Generator().manual_seed(0)
    facts = {}
    for lname, (layer, x, seen) in layers(gen).items():
        key = f"{lname}.weight"
        with torch.inference_mode():
            base = layer(seen)
        for pname, (patches, others) in patch_lists(tuple(layer.weight.shape), gen).items():
            want = None
            if others:
                dw = comfy.lora.calculate_weight(others, torch.zeros(layer.weight.shape), key)
                want = effect(layer, x, dw)
            for path in ("load", "call"):
                case = {}
                try:
                    layer.set_delta(None)
                    if path == "load":
                        delta = weight_patches.delta_for(layer, patches, key, torch.float32)
                        layer.set_delta(delta)
                    else:  # an offloaded layer: ComfyUI queued the list as a LowVramPatch
                        layer.delta_dtype = torch.float32
                        layer.comfy_cast_weights = True
                        layer.weight_function = [LowVramPatch(key, {key: patches})]
                        layer.read_host_patches = weight_patches.call_time_delta
                    with torch.inference_mode():
                        out, again = layer(seen), layer(seen)
                    d = layer.delta
                    case.update(branch=d is not None, rank=0 if d is None or d.up is None else d.up.shape[1],
                                dense=d is not None and d.dense is not None, unchanged=torch.equal(out, base),
                                again_equal=torch.equal(out, again))
                    if want is not None:
                        case["rel_err"] = float(((out - base) - want).norm() / want.norm())
                except Exception:
                    case["error"] = traceback.format_exc()[-1500:]
                finally:
                    layer.comfy_cast_weights, layer.weight_function = False, []
                    layer.set_delta(None)
                facts[f"{lname}/{pname}/{path}"] = case
    return facts


def on_load_case(weight_patches) -> dict:
    """A MODEL whose only weight patch on a quantized layer is an all-zero difference: the ON_LOAD callback gives it
    no branch and the MODEL tells its base size."""
    import comfy.model_patcher
    import comfy.utils

    gen = torch.Generator().manual_seed(1)
    layer, x, seen = layers(gen)["linear"]
    root = torch.nn.Module()
    root.lin = torch.nn.Linear(64, 96)
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(root, cpu, cpu, size=1)
    patcher.add_object_patch("lin", layer)
    comfy.utils.set_attr(root, "lin", layer)
    added = patcher.add_patches({"lin.weight": (torch.zeros(96, 64),)}, 1.0)
    root.model_loaded_weight_memory = 0
    with torch.inference_mode():
        base = layer(seen)
    weight_patches.on_load(patcher, 1000, None)
    with torch.inference_mode():
        out = layer(seen)
    return {"added": list(added), "branch": layer.delta is not None, "told": patcher.size,
            "unchanged": torch.equal(out, base)}


def tolerance(dtype: torch.dtype) -> float:
    """What a factorization of a difference stored in ``dtype`` is held to: 2 eps of fp16 / bf16 (four roundings of
    u = eps / 2), 1e-5 for float32."""
    return max(1e-5, 2 * torch.finfo(dtype).eps)


def dtype_cases(weight_patches) -> dict:
    """Plain differences stored in float32 / fp16 / bf16 (a product of factors rounded once to that dtype): low rank
    ones become a branch of their rank, full-rank ones and low-rank ones off by four times the tolerance stay dense;
    each branch's change of the output against the difference's own ``dW x``, and the QRs the factoring took."""
    gen = torch.Generator().manual_seed(2)
    all_layers = layers(gen)
    qr = torch.linalg.qr
    calls: list = []

    def counting_qr(a, *args, **kw):
        calls.append(a.shape[-1])
        return qr(a, *args, **kw)

    from qvd_pack_probe.qvd import QLinear

    wide = QLinear(256, 192, weight_q=torch.randint(-127, 128, (192, 256), generator=gen, dtype=torch.int8),
                   weight_scale=torch.rand(192, generator=gen) * 0.01 + 0.002, bias=None, act_scale=0.05, zero_point=0,
                   w_bits=8, a_bits=8)
    cases = [(name, all_layers[name]) for name in ("linear", "conv3x3", "linear_scri_norm")]
    cases.append(("linear256x192", (wide, torch.randn(6, 256, generator=gen), None)))
    facts = {}
    torch.linalg.qr = counting_qr
    try:
        for lname, (layer, x, seen) in cases:
            seen = x if seen is None else seen
            shape = tuple(layer.weight.shape)
            n, k = shape[0], int(torch.Size(shape[1:]).numel())
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                low = (torch.randn(n, LOW, generator=gen) @ torch.randn(LOW, k, generator=gen)) * 0.003
                full = torch.randn(n, k, generator=gen) * 0.01
                off = 4 * tolerance(dtype)
                noisy = low + off * low.norm() / (n * k) ** 0.5 * torch.randn(n, k, generator=gen)
                kinds = [("low", low), ("full", full), ("noisy", noisy)]
                if n * k // (n + k) > 64:
                    kinds.append(("wide", torch.randn(n, WIDE, generator=gen) @ torch.randn(WIDE, k, generator=gen)))
                for kind, diff in kinds:
                    diff = diff.reshape(shape).to(dtype)
                    key, case = f"{lname}.weight", {}
                    try:
                        calls.clear()
                        with torch.inference_mode():
                            base = layer(seen)
                            patches = [(1.0, (diff,), 1.0, None, None)]
                            delta = weight_patches.delta_for(layer, patches, key, torch.float32)
                            layer.set_delta(delta)
                            out = layer(seen)
                        want = effect(layer, x, diff.float())
                        case.update(rank=0 if delta.up is None else delta.up.shape[1], dense=delta.dense is not None,
                                    qr_calls=len(calls), qr_columns=sum(calls), pays=n * k // (n + k),
                                    rel_err=float(((out - base) - want).norm() / want.norm()),
                                    tolerance=tolerance(dtype))
                    except Exception:
                        case["error"] = traceback.format_exc()[-1500:]
                    finally:
                        layer.set_delta(None)
                    facts[f"{lname}/{str(dtype).removeprefix('torch.')}/{kind}"] = case
    finally:
        torch.linalg.qr = qr
    return facts


def main(pack_dir: str) -> dict:
    torch.set_num_threads(2)
    from comfy.cli_args import args
    args.cpu = True

    load_pack(Path(pack_dir))
    weight_patches = sys.modules["qvd_pack_probe.nodes.weight_patches"]
    facts = {"zero": zero_cases(weight_patches), "dtypes": dtype_cases(weight_patches)}
    try:
        facts["on_load"] = on_load_case(weight_patches)
    except Exception:
        facts["on_load"] = {"error": traceback.format_exc()[-1500:]}
    return facts


if __name__ == "__main__":
    print("QVD_PROBE " + json.dumps(main(*sys.argv[1:2])), flush=True)
