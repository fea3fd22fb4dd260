"""Attention patches (``attn1_patch`` / ``attn2_patch``: ComfyUI's core hypernetwork) on a QVD-quantized MODEL whose
SCRI is folded into the transformer blocks' norms, in-process in ComfyUI (0.3.75, 0.33), sampling with KSampler.

ComfyUI hands these patches the norm's output; folded, that is ``(x - z) / s``. Measured here: what a recording patch
receives against the original norm of the same input (QVD's wrapper on, and off as the control), that an identity
patch leaves the output unchanged (the values go back to the folded layers' domain), and the hypernetwork's effect on
the quantized model against its effect on FP. Prints one JSON line.

    python hypernetwork_probe.py CHECKPOINT PACK_DIR HYPERNETWORK   (cwd = ComfyUI's directory, on PYTHONPATH)
"""
from __future__ import annotations

import json
import sys

import torch

from comfy_host import TINY
from lowvram_probe import SKIP, calibrated


def main(checkpoint: str, pack_dir: str, hypernetwork: str) -> dict:
    torch.set_num_threads(2)
    from comfy.cli_args import args
    args.cpu = True
    import nodes
    from comfy_extras.nodes_hypernetwork import load_hypernetwork_patch

    qvd, model, positive, calibration = calibrated(checkpoint, pack_dir)
    patching = sys.modules["qvd_pack_probe.nodes.patching"]
    quantized = qvd["QVDQuantizeModel"]().quantize(model, calibration, 8, 8, True, True, SKIP, "int8")["result"][0]
    folded = {n: m for n, m in patching.attached_result(quantized).modules.items() if getattr(m, "qvd_scri_norm", 0)}
    originals = {n: model.model.get_submodule(n) for n in folded}  # the checkpoint's own norms (never replaced)
    latent = nodes.EmptyLatentImage().generate(64, 64, 2)[0]

    def sample(m) -> torch.Tensor:
        return nodes.common_ksampler(m, 7, 1, 5.0, "euler", "normal", positive, positive, latent)[0]["samples"]

    last = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, name=n: last.update(name=name, x=inp[0]))
             for n, m in folded.items()]
    errors = {"attn1_patch": [], "attn2_patch": []}

    def recorder(kind: str, suffix: str):
        def patch(n, context, value, extra_options):
            if last.get("name", "").endswith(suffix):
                with torch.no_grad():
                    want = originals[last["name"]](last["x"])
                errors[kind].append(float((n - want).norm() / want.norm()))
            last.clear()
            return n, context, value
        return patch

    def with_patches(m, p1, p2):
        m = m.clone()
        m.set_model_attn1_patch(p1)
        m.set_model_attn2_patch(p2)
        return m

    facts = {"folded_norms": sorted(n.rpartition(".")[2] for n in folded)}
    try:
        plain = sample(quantized)
        recorded = sample(with_patches(quantized, recorder("attn1_patch", ".norm1"), recorder("attn2_patch", ".norm2")))
        facts["seen_vs_norm"] = {k: max(v) if v else None for k, v in errors.items()}
        facts["compared"] = {k: len(v) for k, v in errors.items()}
        facts["identity_vs_plain"] = float((recorded - plain).norm() / plain.norm())
        unfold = patching._unfold_for_patches
        patching._unfold_for_patches = lambda *a: None  # the control: the patches see the folded values
        try:
            errors = {"attn1_patch": [], "attn2_patch": []}
            sample(with_patches(quantized, recorder("attn1_patch", ".norm1"), recorder("attn2_patch", ".norm2")))
            facts["seen_vs_norm_without_unfolding"] = {k: max(v) if v else None for k, v in errors.items()}
        finally:
            patching._unfold_for_patches = unfold
    finally:
        for h in hooks:
            h.remove()

    hn = load_hypernetwork_patch(hypernetwork, 1.0)
    fp_plain = sample(model)
    fp_hn = sample(with_patches(model, hn, hn))
    err = lambda a, b: float((a - b).norm() / b.norm())
    cos = lambda a, b: float((a * b).sum() / (a.norm() * b.norm()))
    q_hn = sample(with_patches(quantized, hn, hn))
    unfold, patching._unfold_for_patches = patching._unfold_for_patches, lambda *a: None
    q_hn_folded = sample(with_patches(quantized, hn, hn))  # the control: the hypernetwork reads (x - z) / s
    patching._unfold_for_patches = unfold
    # an artist's other order: the hypernetwork loaded before QVD Calibrate, so its effect is in the calibration
    fp_model_hn = with_patches(model, hn, hn)
    cal = qvd["QVDCalibrate"]().calibrate(fp_model_hn, positive, positive, latent, 0, 1, 5.0, "euler", "normal", 1,
                                          timestep_coverage=TINY["timestep_coverage"])
    q_cal = qvd["QVDQuantizeModel"]().quantize(fp_model_hn, cal["result"][0], 8, 8, True, True, SKIP,
                                               "int8")["result"][0]
    facts.update(effect_size=err(fp_hn, fp_plain), error_plain=err(plain, fp_plain), error_after=err(q_hn, fp_hn),
                 error_after_without_unfolding=err(q_hn_folded, fp_hn), error_calibrated_with=err(sample(q_cal), fp_hn),
                 effect_cosine=cos(q_hn - plain, fp_hn - fp_plain),
                 effect_cosine_without_unfolding=cos(q_hn_folded - plain, fp_hn - fp_plain))
    return facts


if __name__ == "__main__":
    print("QVD_PROBE " + json.dumps(main(*sys.argv[1:4])), flush=True)
