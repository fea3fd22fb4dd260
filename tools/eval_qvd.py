"""Quantize the shipped TinyVDM with QVD and compare it with FP on clips from fixed seeds.

    .venv/bin/python tools/eval_qvd.py --n 4 --steps 20 --w-bits 8 --a-bits 8 --gif out/eval.gif
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qvd import QVDConfig  # noqa: E402
from qvd_demo import evaluate as E  # noqa: E402
from qvd_demo import tinyvdm as T  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--w-bits", type=int, default=8)
    ap.add_argument("--a-bits", type=int, default=8)
    ap.add_argument("--calib-clips", type=int, default=2)
    ap.add_argument("--gif", type=Path, default=None)
    args = ap.parse_args(argv)
    fp = T.load_trained()
    cfg = QVDConfig(w_bits=args.w_bits, a_bits=args.a_bits)
    # calibration prompts/seeds differ from the evaluation ones
    cal = E.calibrate(fp, cfg, [T.NULL_CLASS - 1 - i for i in range(args.calib_clips)], steps=args.steps)
    q, _ = E.quantized_copy(fp, cal, cfg)
    res = E.evaluate(fp, q, n=args.n, steps=args.steps)
    clips = res.pop("clips")
    res["weight_bytes_fp16"] = E.weight_bytes(copy.deepcopy(fp).half())
    res["weight_bytes_quant"] = E.weight_bytes(q)
    print(json.dumps(res, indent=2))
    if args.gif:
        T.write_gif(args.gif, [v for pair in zip(clips["fp"], clips["quant"]) for v in pair], per_row=2,
                    labels=("FP", "W8A8"))


if __name__ == "__main__":
    main()
