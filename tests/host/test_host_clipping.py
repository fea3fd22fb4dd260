"""The clipping report and timestep coverage (issue 29): quantized layers count how much of their inputs their static
ranges clip over a sampling run, a run far from what the calibration saw is named in the log, and QVD Calibrate's
timestep coverage makes a calibration at 4 steps fit other step counts and samplers (``clipping_probe.py``)."""
from __future__ import annotations

import pytest

from comfy_host import REPO, run_probe

pytestmark = [pytest.mark.slow, pytest.mark.full]  # ~20 min on a 2-core AVX2 CPU: int8 forced, 200+ calls


@pytest.fixture(scope="module")
def probe(sd15_checkpoint):
    facts = run_probe("clipping_probe.py", sd15_checkpoint, REPO, timeout=1800)
    print(f"\nclipping: {facts}")
    return facts


OTHER_TIMESTEPS = ("20 steps", "dpmpp_2m karras 20 steps")


def test_a_run_as_calibrated_clips_little_and_is_not_flagged(probe):
    """Measured on the synthetic SD1.5 (calibrated on one prompt, euler 4 steps, 64 px, default coverage): the worst
    layer clips 0.5 % as calibrated, 0.6 % with another prompt, 0.4 % at 20 steps, 0.6 % with DPM++ 2M / Karras; the
    log threshold is 5 %."""
    runs = probe["coverage default"]
    for run in ("as calibrated", "another prompt") + OTHER_TIMESTEPS:
        assert runs[run]["layers"] > 200 and runs[run]["worst"] < 0.02, (run, runs[run])
        assert not runs[run]["logged"], (run, runs[run])


def test_timestep_coverage_fits_other_step_counts_and_samplers(probe):
    """Calibrated at euler 4 steps, the default coverage adds 16 timesteps over the rest of the schedule. Measured:
    sampled at 20 steps or with DPM++ 2M / Karras, the worst layer clips 0.43 / 0.58 % against 0.86 / 1.06 % without
    coverage, and the output is 4.88 / 4.62 % from FP against 5.15 / 4.97 %; as calibrated 8.00 % against 7.99 %
    (with another prompt 8.2 % against 7.7 %: one static scale per layer spans more timesteps)."""
    cov, none = probe["coverage default"], probe["coverage 0"]
    assert none["added"] == 0 and cov["added"] >= 5 and cov["timesteps"] == none["timesteps"] + cov["added"]
    for run in OTHER_TIMESTEPS:
        assert cov[run]["worst"] < 0.8 * none[run]["worst"], (run, cov[run], none[run])
        # the output error of this random-weight model moves with the CPU's float rounding by more than the 5-7 % the
        # coverage gains here (a 2-core AVX2 EPYC failed a 1.02x bound): not worse, within the as-calibrated margin
        assert cov[run]["error"] < 1.1 * none[run]["error"], (run, cov[run], none[run])
    assert cov["as calibrated"]["error"] < 1.1 * none["as calibrated"]["error"]


def test_a_run_far_from_the_calibration_is_named_in_the_log(probe):
    """At 96 px (calibrated at 64) the worst layer clips 18 % and the output is 3x further from FP (22 % vs 8 %): one
    log line names the worst layers and the fix."""
    far, near = probe["coverage default"]["96 px"], probe["coverage default"]["as calibrated"]
    assert far["worst"] > 0.05 and far["error"] > 1.5 * near["error"], (far, near)
    (line,) = far["logged"]
    assert "clipped more than 5 %" in line and "Calibrate with this graph" in line and "diffusion_model." in line


def test_timestep_buckets_run_from_a_file_and_old_files_load(probe):
    """4 timestep buckets (``QVDConfig.timestep_buckets``, Python API) through QVD Save / Load Quantized: every sampled
    step runs the bucket of its timestep, the file samples exactly as the in-process model, QVD Load Quantized says
    so; a format 2 file (saved before buckets) loads as one bucket, exactly. Measured on this graph, from FP with 1 /
    4 buckets: 8.0 / 7.5 % as calibrated, 8.2 / 7.2 % with another prompt, 4.9 / 4.9 % at 20 steps, 4.6 / 4.5 % with
    DPM++ 2M / Karras on an AVX-512 Xeon; 7.3 / 7.6, 7.2 / 7.9, 4.8 / 5.0, 4.3 / 4.9 % on an AVX2 EPYC (the float
    parts round differently, and this random model amplifies it). The bound: 4 buckets within 25 % of one scale (the
    default stays one bucket: on the trained TinyVDM they lose, docs/results.md)."""
    b = probe["buckets"]
    assert len(b["edges"]) == 3 and "4 activation scales per W8A8 layer" in b["report_line"], b
    assert b["file_equals_in_process"] and b["format2_equals_one_bucket"], b
    for run in ("as calibrated", "20 steps", "dpmpp_2m karras 20 steps"):
        assert b[run]["bucket_of_timestep"] and len(b[run]["buckets_run"]) >= 3, (run, b[run])
    one = probe["coverage default"]
    print({run: (round(one[run]["error"], 4), round(b[run]["error"], 4)) for run in one if isinstance(one[run], dict)})
    for run, facts in one.items():
        if isinstance(facts, dict) and run != "96 px":
            assert b[run]["error"] < 1.25 * facts["error"], (run, b[run], facts)
