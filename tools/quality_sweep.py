"""The quality statistic of a TinyVDM under several sampler settings, and its CPU step times (docs/tinyvdm.md).

    .venv/bin/python -m tools.quality_sweep --settings 20:3,10:3,10:2 --seeds 0-11
    .venv/bin/python -m tools.quality_sweep --state .cache/tiny_vdm_train.pt --settings 20:3   # a run's EMA
    .venv/bin/python -m tools.quality_sweep --settings 10:2 --seeds 48-95 --step-times 3

Each setting is ``DDIM steps:CFG scale``; clip i is seed i, class seed % 12 (as ``make demo``). Prints one
markdown row per setting beside the data's, and with ``--step-times N`` N runs of ``evaluate.step_times``
(fp32 vs W8A8 integer kernels vs their float simulation, QVD default config calibrated on one clip).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qvd import QVDConfig  # noqa: E402
from qvd_demo import evaluate as E  # noqa: E402
from qvd_demo import quality as Q  # noqa: E402
from qvd_demo import tinyvdm as T  # noqa: E402


def load(weights: Path | None, state: Path | None) -> T.TinyVDM:
    """The shipped (or given) TinyVDM file, or the EMA of a training state of ``tools/train_tiny_vdm.py``."""
    if state is None:
        return T.load_trained(weights)
    saved = torch.load(state, weights_only=True)
    model = T.build_model(0, saved["settings"]["prediction"])
    model.load_state_dict(saved["ema"])
    print(f"{state}: EMA at step {saved['step']}")
    return model.eval()


def sweep(model, settings, seeds) -> list[str]:
    """Markdown rows of the quality statistic for each (steps, guidance), then the data's."""
    conds = [s % T.NULL_CLASS for s in seeds]
    rows = {}
    for steps, guidance in settings:
        clips = T.sample_many(model, conds, seeds, steps=steps, guidance=guidance)
        rows[f"DDIM {steps}, CFG {guidance:g}"] = Q.quality(list(clips), conds)
    return Q.table(rows, Q.data_quality(conds, seeds[0]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=None, help="TinyVDM file (default: the shipped one)")
    ap.add_argument("--state", type=Path, default=None, help="a training state instead: its EMA is evaluated")
    ap.add_argument("--settings", default="10:2", help="comma-separated DDIM steps:CFG scale")
    ap.add_argument("--seeds", default="0-11", help="first-last seed (inclusive)")
    ap.add_argument("--step-times", type=int, default=0, help="also time one CFG step this many times")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        settings = [(int(a), float(b)) for a, b in (s.split(":") for s in args.settings.split(","))]
        lo, hi = (int(v) for v in args.seeds.split("-"))
    except ValueError:
        ap.error(f"--settings must look like 10:2,20:3 and --seeds like 0-11, got {args.settings!r}, {args.seeds!r}")
    if hi < lo:
        ap.error(f"--seeds {args.seeds}: the last seed is before the first")
    model = load(args.weights, args.state)
    lines = sweep(model, settings, list(range(lo, hi + 1)))
    print("\n".join(lines))
    times = []
    if args.step_times:
        q = E.quantized_copy(model, E.calibrate(model, QVDConfig(), [0], steps=2), QVDConfig())[0]
        for _ in range(args.step_times):
            t = E.step_times(model, q)
            times.append(t)
            print(f"one CFG step: fp32 {t['fp32'] * 1e3:.1f} ms, W8A8 integer kernels {t['int'] * 1e3:.1f} ms "
                  f"({t['fp32'] / t['int']:.2f}x fp32), float simulation {t['fake'] * 1e3:.1f} ms")
    return {"table": lines, "step_times": times}


if __name__ == "__main__":
    main()
