"""Every Triton kernel (the fused-quantize GEMMs included) at every tile its autotuner may pick compiles for
sm_80 / 86 / 89 / 90 on this CPU (`make test`: sm_86; `make test-full`: all four) (``triton.compile`` + the wheel's ptxas, no GPU): int8 tensor-core instructions in
the GEMM and conv PTX, no register spills, shared memory within each arch's limit, and the conv's flat K loop
compiling fast."""
from __future__ import annotations

import statistics

import pytest

pytest.importorskip("triton")

from bench import compile_kernels as ck  # noqa: E402


@pytest.fixture(scope="module", params=[pytest.param((86,), id="sm_86"),  # RTX 30: no fp8, many artists' cards
                                        pytest.param(tuple(a for a in ck.ARCHS if a != 86), id="other-archs",
                                                     marks=pytest.mark.full)])
def results(request):
    out = ck.run(request.param, workers=2)
    print("\n" + ck.table(out))
    return request.param, out


def test_every_kernel_tile_and_arch_is_compiled(results):
    from qvd.kernels import triton_kernels as tk
    archs, results = results
    done = {(r["kernel"], r["arch"], ck.tile_name(r)) for r in results}
    for arch in archs:
        for m in (1, 100, 5000):
            for n in (64, 320, 1280):
                for kernel in ck.GEMMS:
                    for cfg in tk.classes_of(kernel)[tk.shape_class(tk._bucket(m), n, arch)]:
                        name = ck.tile_name({"tile": cfg.kwargs, "warps": cfg.num_warps, "stages": cfg.num_stages})
                        assert (kernel, arch, name) in done
        for kernel in ("quantize", "hiditq_encode", "hiditq_decode"):
            assert (kernel, arch, "-") in done


def test_no_spills_shared_memory_within_limits_int8_mma(results):
    _, results = results
    bad = [f"{r['kernel']} sm_{r['arch']} {ck.tile_name(r)} {r['out']}: {'; '.join(ck.problems(r))}"
           for r in results if ck.problems(r)]
    assert not bad, "\n".join(bad)
    assert all(r["int8_mma"] for r in results if r["kernel"] in ck.GEMMS)


def test_conv_compiles_fast(results):
    """The flat K loop: one pipelined loop, not KH x KW unrolled copies (which took 13-19 s per tile)."""
    conv = [r["seconds"] for r in results[1] if r["kernel"].startswith("conv3x3")]
    print(f"conv3x3 compile s: median {statistics.median(conv):.1f}, max {max(conv):.1f} over {len(conv)}")
    assert statistics.median(conv) <= 4.0
    assert max(conv) <= 10.0
