"""Weight patches that add nothing, and plain differences stored in fp16 / bf16, on QVD's quantized layers, driven
in-process in ComfyUI by ``delta_probe.py`` (no checkpoint): a 64 -> 96 Linear and a 32 -> 48 3x3 conv (stride 2,
padding 1), plain, with SCRI in the kernel, and a Linear / 1x1 conv whose norm does the SCRI transform.

- An all-zero difference (a zero-strength or empty motion LoRA that AnimateDiff-Evolved merged into ``up @ down``)
  or a patch of strength 0 adds no branch: the layer's output is exactly its unpatched one; beside another patch
  the layer adds exactly that patch's ``dW x``; the MODEL tells its size without patches.
- A difference stored in float32, fp16 or bf16 that is a low-rank product becomes a branch of that rank (after one
  QR where the rank is under 64) and reproduces the difference within its dtype's rounding (1e-5 for float32, 2 eps
  for fp16 / bf16); one that is full rank, or a low-rank one off by four times that, stays dense (exact); growing
  the basis, or refusing, QRs each basis column once.
"""
from __future__ import annotations

import pytest

from comfy_host import REPO, run_probe

ZERO_ONLY = ("zero_diff", "zero_named_diff", "zero_strength_lora")
MIXED = {"zero_diff+lora": "low rank", "lora+zero_diff": "low rank", "zero_diff+full_diff": "dense"}
RANK = 4  # delta_probe.RANK


@pytest.fixture(scope="module")
def probe():
    return run_probe("delta_probe.py", REPO, timeout=600)


def _cases(probe: dict, section: str, names) -> dict:
    """The cases ``layer/list/path`` of ``section`` whose patch list is one of ``names``."""
    return {k: v for k, v in probe[section].items() if k.split("/")[1] in names}


def test_an_all_zero_difference_adds_no_branch_and_leaves_each_layer_exact(probe):
    cases = _cases(probe, "zero", ZERO_ONLY)
    assert len(cases) == 6 * len(ZERO_ONLY) * 2, sorted(cases)  # six layers, load time and call time
    for name, case in cases.items():
        assert "error" not in case, (name, case["error"])
        assert not case["branch"] and case["unchanged"] and case["again_equal"], (name, case)


def test_a_zero_difference_beside_another_patch_adds_exactly_that_patch(probe):
    cases = _cases(probe, "zero", MIXED)
    assert len(cases) == 6 * len(MIXED) * 2, sorted(cases)
    for name, case in cases.items():
        assert "error" not in case, (name, case["error"])
        if MIXED[name.split("/")[1]] == "low rank":
            assert case["rank"] == RANK and not case["dense"], (name, case)  # the zero difference adds no rank
        else:
            assert case["rank"] == 0 and case["dense"], (name, case)
        assert case["rel_err"] < 1e-5 and case["again_equal"], (name, case)


def test_a_model_whose_only_patch_is_an_all_zero_difference_tells_its_base_size(probe):
    case = probe["on_load"]
    assert "error" not in case, case["error"]
    assert case["added"] == ["lin.weight"], case
    assert not case["branch"] and case["unchanged"] and case["told"] == 1000, case


def test_a_low_rank_fp16_bf16_or_float32_difference_becomes_a_branch_of_its_rank_after_one_qr(probe):
    low = {k: v for k, v in probe["dtypes"].items() if k.endswith("/low")}
    assert len(low) == 12, sorted(low)  # four layers, three dtypes
    for name, case in low.items():
        assert "error" not in case, (name, case["error"])
        assert case["rank"] == 8 and not case["dense"], (name, case)
        assert case["qr_calls"] == 1, (name, case)
        assert case["rel_err"] <= case["tolerance"], (name, case)


def test_a_difference_of_rank_over_64_is_found_by_growing_the_basis_once_per_column(probe):
    wide = {k: v for k, v in probe["dtypes"].items() if k.endswith("/wide")}
    assert len(wide) == 3, sorted(wide)  # the 256 -> 192 Linear, three dtypes
    for name, case in wide.items():
        assert "error" not in case, (name, case["error"])
        assert case["rank"] == 80 and not case["dense"], (name, case)
        assert case["qr_columns"] <= case["pays"] and case["rel_err"] <= case["tolerance"], (name, case)


def test_a_full_rank_or_noisy_difference_stays_dense_and_exact(probe):
    cases = {k: v for k, v in probe["dtypes"].items() if k.endswith(("/full", "/noisy"))}
    assert len(cases) == 24, sorted(cases)
    for name, case in cases.items():
        assert "error" not in case, (name, case["error"])
        assert case["rank"] == 0 and case["dense"] and case["rel_err"] < 1e-5, (name, case)


def test_refusing_a_difference_qrs_each_basis_column_once(probe):
    """The range finder grows its basis (64, then the widest rank that pays): a refused difference costs one QR of
    each column, not a fresh QR of the whole basis per width."""
    cases = {k: v for k, v in probe["dtypes"].items() if k.endswith(("/full", "/noisy"))}
    grown = [k for k, v in cases.items() if v.get("pays", 0) > 64]
    assert grown, sorted(cases)  # the 256 -> 192 Linear
    for name, case in cases.items():
        assert "error" not in case, (name, case["error"])
        assert case["qr_columns"] <= case["pays"], (name, case)
