"""Seeded mutation fuzz of both QVD file kinds: no damaged or edited file crashes the loader, raises a raw
exception, or loads as a model other than the one saved.

Raw damage (bytes changed, no checksum renewed) must be refused with the pack's error naming the file, or
load exactly what was saved. Re-signed edits (valid checksum: a buggy tool, a hand edit) must be refused the
same way, or, where they change only values calibration decides (activation scales and zero points, SCRI
shift / scale, HiDi-TQ levels, the recorded config; every value of a calibration file), load a model that runs
and stays finite. An edit of anything the model determines (codes, weight scales, biases, folded norms, the
structure, which norm feeds which layer) is refused: the loader recomputes those from the model, and a load ends
with the first model call, which proves the SCRI folds. Rewirings re-signed with every value made to agree with the
model (``file_mutations.rewirings``) are among the edits."""
import copy
import json
import os
import random
import time

import pytest
import torch

from qvd import (Calibrator, QVDConfig, QVDError, load_calibration, load_quantized, quantize_model, save_calibration,
                 save_quantized)
from qvd.io import CALIBRATION_KEY, KEY
from qvd.quantizers import dequantize_weight
from qvd.identity import install
from qvd.timesteps import follow_timesteps
from qvd.verify import follow_folds

import file_mutations as fm
from unet_fixtures import TIMESTEPS

SEED = 20261201
CASES = {"quantized": (1400, 500, 300, 200), "calibration": (700, 300, 200, 0)}  # raw, metadata, tensor edits, rewirings
# `make test` runs the first eighth of each kind's cases (the same seeds: a prefix of the whole run), `make test-full`
# the whole fuzz.
SHARE = pytest.mark.parametrize("share", [pytest.param(8, id="eighth"),
                                          pytest.param(1, id="whole", marks=pytest.mark.full)])
# Files of one down block (ResNets with their time projections, a transformer with norm-folded SCRI, a motion
# module, the stride-2 downsampler): every layer kind and SCRI placement, small enough for thousands of loads.
SKIP = ("down_blocks.1.*", "up_blocks.*", "mid_block.*", "conv_in", "conv_out")


@pytest.fixture(scope="module")
def small(unet, inputs):
    """(calibration, quantize result) of the UNet's first down block; 16 rows per layer, 3 timestep buckets."""
    with Calibrator(unet, QVDConfig(calib_rows=16, skip=SKIP)) as cal:
        for t in TIMESTEPS[:3]:
            inputs.run(unet, t)
    calibration = cal.result()
    return calibration, quantize_model(copy.deepcopy(unet), calibration, QVDConfig(skip=SKIP, timestep_buckets=3),
                                       apply=False)


# What a re-signed file may change and still load: the values calibration decides (the model determines the rest,
# and the loader recomputes it from the model: qvd/verify.py).
CALIBRATED = {"act_scale", "zero_points", "timestep_edges", "scri_shift", "scri_inv_scale", "levels", "config"}


def _codes_fit(module, model) -> bool:
    """Whether ``module``'s codes, undone through its own SCRI transform, are its layer's weight in ``model`` within
    half a quantization step (what codes made for that transform from the model's weight are); ``qvd_name``: the
    layer's name, which a loaded file's modules carry."""
    w = model.get_submodule(module.qvd_name).weight.detach().float()
    got = module.scri.unfold_weight(dequantize_weight(module.weight, module.weight_scale))
    step = module.weight_scale.view(-1, *[1] * (w.dim() - 1)) * module.scri.inv_scale.view(1, -1, *[1] * (w.dim() - 2))
    return bool(((got - w).abs() <= step * (0.5 + 1e-4) + 1e-7).all())


def _quantized_differences(a, b, model=None) -> set[str]:
    """The fields in which two loaded quantize results differ (empty: the same model); codes and scales made for
    another SCRI transform count as unchanged where they are ``model``'s weight for it (``_codes_fit``)."""
    if set(a.modules) != set(b.modules):
        return {"the set of layers"}
    attrs = ("zero_points", "w_bits", "a_bits", "scri_in_norm", "stride", "padding", "kernel_size", "in_features",
             "out_features", "in_channels", "out_channels")
    found = set() if a.config == b.config else {"config"}
    if a.clock.edges != b.clock.edges:
        found.add("timestep_edges")
    for n, ma in a.modules.items():
        mb = b.modules[n]
        sa, sb = ma.state_dict(), mb.state_dict()
        if type(ma) is not type(mb) or sa.keys() != sb.keys():
            found.add(f"the kind or fields of {n}")
            continue
        changed = {k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])}
        if {"scri_shift", "scri_inv_scale"} & changed and _codes_fit(ma, model):
            changed -= {"weight", "weight_scale"}  # codes made for the file's own (calibrated) transform
        found.update(k if getattr(ma, "qvd_quantized", False) else f"norm {k}" for k in changed)
        found.update(k for k in attrs if getattr(ma, k, None) != getattr(mb, k, None))
    return found


def _calibration_differences(a, b) -> set[str]:
    """Whether two calibrations differ ({"statistics"}) or not (empty): every value in one is calibration's."""
    if (a.timesteps, a.norm_groups, set(a.layers)) != (b.timesteps, b.norm_groups, set(b.layers)):
        return {"statistics"}
    for n, sa in a.layers.items():
        sb = b.layers[n]
        if (sa.signature, sa.temporal, sa.calls, set(sa.temporal_vectors), sa.times) != (
                sb.signature, sb.temporal, sb.calls, set(sb.temporal_vectors), sb.times):
            return {"statistics"}
        if not all(torch.equal(x, y) for x, y in [(sa.ch_min, sb.ch_min), (sa.ch_max, sb.ch_max), (sa.rows, sb.rows),
                                                  (sa.row_times, sb.row_times)]
                   + [(sa.temporal_vectors[t], sb.temporal_vectors[t]) for t in sa.temporal_vectors]
                   + [(x, y) for ra, rb in zip(sa.ranges_at, sb.ranges_at) for x, y in zip(ra, rb)]):
            return {"statistics"}
    return set()


class _Run:
    """Loads each case, classifies the outcome, and collects failures (label + what went wrong).

    ``differences(got, baseline)`` names what a loaded case changed; a re-signed case may change only what
    ``allowed`` holds (None: anything)."""

    def __init__(self, tmp_path, load, differences, runs, allowed=None):
        self.path = tmp_path / "case.safetensors"
        self.load, self.differences, self.runs, self.allowed = load, differences, runs, allowed
        self.baseline = None
        self.counts = {"refused": 0, "same": 0, "edited, runs": 0}
        self.failures = []

    def case(self, label: str, resigned: bool) -> None:
        try:
            got = self.load(self.path)
        except QVDError as e:
            if os.path.basename(self.path) not in str(e):
                self.failures.append(f"{label}: error names no file: {e}")
            self.counts["refused"] += 1
            return
        except Exception as e:  # noqa: BLE001 - any other exception is what this test exists to find
            self.failures.append(f"{label}: raw {type(e).__name__}: {str(e)[:200]}")
            return
        changed = self.differences(got, self.baseline)
        if not changed:
            self.counts["same"] += 1
        elif not resigned:
            self.failures.append(f"{label}: damaged file loaded as a different model")
        elif self.allowed is not None and not changed <= self.allowed:
            self.failures.append(f"{label}: edited file loaded with what the model determines changed: "
                                 f"{sorted(changed - self.allowed)}")
        else:
            problem = self.runs(got)
            if problem:
                self.failures.append(f"{label}: edited file loaded, then {problem}")
            else:
                self.counts["edited, runs"] += 1

    def raw(self, raw: bytes, count: int, rng) -> None:
        for label, data in fm.raw_mutations(raw, rng, count):
            self.path.write_bytes(data)
            self.case(label, resigned=False)

    def resigned(self, src, key: str, counts: tuple, rng, model=None) -> None:
        tensors, meta = fm.read(src, key)
        for label, edit in fm.meta_edits(meta, rng, counts[0]):
            fm.resign(src, self.path, key, edit_meta=edit)
            self.case(label, resigned=True)
        for label, edit in fm.tensor_edits(tensors, rng, counts[1]):
            fm.resign(src, self.path, key, edit_tensors=edit)
            self.case(label, resigned=True)
        for label, edit in (fm.rewirings(model, meta, tensors, rng, counts[2]) if counts[2] else ()):
            t, m = {k: v.clone() for k, v in tensors.items()}, copy.deepcopy(meta)
            edit(m, t)
            fm.write_text(self.path, t, key, json.dumps(m))
            self.case(label, resigned=True)


def _report(kind: str, run: _Run, seconds: float) -> None:
    print(f"\n{kind}: {sum(run.counts.values()) + len(run.failures)} cases in {seconds:.1f} s: {run.counts}")
    assert not run.failures, f"{len(run.failures)} failing case(s):\n" + "\n".join(run.failures[:30])


@pytest.mark.slow
@SHARE
def test_fuzz_quantized_files(unet, inputs, small, tmp_path, share):
    src = tmp_path / "good.safetensors"
    save_quantized(src, small[1])

    def runs(result):
        model = copy.deepcopy(unet)
        install(model, result.modules)
        follow_timesteps(model, result.clock)
        try:
            y = inputs.run(model, 600)
        except QVDError:
            return None
        except Exception as e:  # noqa: BLE001
            return f"its forward raised {type(e).__name__}: {str(e)[:150]}"
        return None if bool(torch.isfinite(y).all()) else "its output is not finite"

    def load(path):
        """A user's load: the file checked against the model, then the first call, which proves its SCRI folds."""
        result = load_quantized(path, unet, apply=False)
        model = copy.deepcopy(unet)
        install(model, result.modules)
        follow_timesteps(model, result.clock)
        follow_folds(model, result.wiring)
        inputs.run(model, 600)
        return result

    run = _Run(tmp_path, load, lambda a, b: _quantized_differences(a, b, unet), runs, CALIBRATED)
    run.baseline = load(src)
    rng, start = random.Random(SEED), time.monotonic()
    raw_n, meta_n, tensor_n, rewire_n = (n // share for n in CASES["quantized"])
    run.raw(src.read_bytes(), raw_n, rng)
    run.resigned(src, KEY, (meta_n, tensor_n, rewire_n), rng, unet)
    _report("quantized file", run, time.monotonic() - start)


@pytest.mark.slow
@SHARE
def test_fuzz_calibration_files(unet, small, tmp_path, share):
    src = tmp_path / "good.calibration.safetensors"
    save_calibration(src, small[0])

    def runs(cal):
        try:
            quantize_model(unet, cal, QVDConfig(skip=SKIP), apply=False)
        except QVDError:
            return None
        except Exception as e:  # noqa: BLE001
            return f"quantize_model raised {type(e).__name__}: {str(e)[:150]}"
        return None

    run = _Run(tmp_path, load_calibration, _calibration_differences, runs)
    run.baseline = load_calibration(src)
    rng, start = random.Random(SEED + 1), time.monotonic()
    raw_n, meta_n, tensor_n, _ = (n // share for n in CASES["calibration"])
    run.raw(src.read_bytes(), raw_n, rng)
    run.resigned(src, CALIBRATION_KEY, (meta_n, tensor_n, 0), rng)
    _report("calibration file", run, time.monotonic() - start)
