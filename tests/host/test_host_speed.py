"""``auto`` in the real host (0.3.75, 0.33): the graph of issue 27 (synthetic SD1.5 and, with AnimateDiff-Evolved,
mm_sd_v15_v2; 128 px, 8 frames, 2 steps), KSampler on the FP MODEL and on QVD Quantize Model's output with compute
``auto``, alternated in one process (``speed_probe.py``, the probe ``python -m bench.host_speed`` prints with its
time ratio; docs/benchmarks.md). On a CPU without VNNI ``auto`` runs weight-only: the same float ops as FP; with VNNI
the integer kernels where they measure faster."""
from __future__ import annotations

import argparse

import pytest

from comfy_host import REPO, ade_path, run_probe


def check_routes(f: dict, bound: float) -> None:
    """What ``auto`` decided on this CPU, as ``qvd.kernels`` decides it: without VNNI (or int8 kernels) weight-only on
    every layer with no timing and the reason in the report; otherwise one timed decision per layer shape, each naming
    the route it kept. The output near FP. Times are printed (``bench.host_speed``), not asserted."""
    routes, line = f["routes"], next(ln for ln in f["report"].splitlines() if ln.startswith("compute:"))
    if routes["skips_int8"]:
        assert routes["int8"] == routes["weight-only"] == 0 and routes["summary"] == "no per-shape timing", routes
        assert f"weight-only ({routes['skips_int8']})" in line, line
    else:
        assert routes["int8"] + routes["weight-only"] > 0 and "int8 kernels where" in line, (routes, line)
        assert routes["summary"].startswith(f"int8 kernels on {routes['int8']} of "), routes
    assert 0 < f["rel_err"] < bound, f["rel_err"]


@pytest.mark.slow
@pytest.mark.full
def test_auto_decides_the_route_this_cpu_allows_and_the_graph_stays_near_fp(sd15_checkpoint, motion_model):
    from bench.host_speed import table

    ade = ade_path()
    extra = (ade, motion_model) if ade is not None else ()
    f = run_probe("speed_probe.py", sd15_checkpoint, REPO, "auto", 128, 8, 2, 2, *extra, timeout=3600)
    print("\n" + table(f, argparse.Namespace(size=128, frames=8, steps=2, ade=ade, compute="auto")))
    check_routes(f, 0.5)
