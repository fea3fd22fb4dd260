"""Train the embedded TinyVDM on procedural moving-shape clips (CPU, seeded, resumable).

    make tinyvdm MINUTES=60      # = .venv/bin/python tools/train_tiny_vdm.py --max-minutes 60: resumes the run

DDPM loss on the chosen prediction target (epsilon, v or the clean sample), optionally min-SNR-gamma
weighted (Hang et al. 2023), 10 % condition dropout (for classifier-free guidance), AdamW with warm-up and
cosine decay, fp32 (bf16 autocast is 10x slower on a CPU without AVX-512 BF16: measured), an EMA of the
weights (what is saved, as fp16 safetensors with the run's settings as metadata).

Resumable: every ``--save-every`` steps and when ``--max-minutes`` is reached the whole state (weights,
EMA, optimizer, data generator, losses) goes to ``--state`` (default under ``.cache/``); running the same
command again continues from it, so no run exceeds its wall-clock budget and the result is that of one
uninterrupted run. ``--extend`` resumes with a larger ``--steps`` (the cosine decay then runs over the new
length from that step on; the metadata's ``schedule`` records it). The shipped file is written only when all
``--steps`` are done (``--export`` writes the current EMA anyway, marked partial).

``--init-from`` starts a new run from the EMA weights of a TinyVDM file (the shipped one, say) with a fresh
optimizer and schedule: how training goes on where the state in ``.cache/`` did not survive (a new machine).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qvd_demo import tinyvdm as T  # noqa: E402

DEFAULT_STATE = Path(__file__).resolve().parent.parent / ".cache" / "tiny_vdm_train.pt"


def target_and_weight(sched, x0, noise, t, prediction: str, snr_gamma: float | None):
    """The regression target of ``prediction`` and the per-sample loss weight (min-SNR-gamma, or 1)."""
    abar = sched.alphas_cumprod[t].float()
    a, s = abar.sqrt().view(-1, 1, 1, 1, 1), (1 - abar).sqrt().view(-1, 1, 1, 1, 1)
    target = {"epsilon": noise, "v_prediction": a * noise - s * x0, "sample": x0}[prediction]
    if snr_gamma is None:
        return target, torch.ones_like(abar)
    snr = abar / (1 - abar)
    clipped = snr.clamp(max=snr_gamma)
    # min(SNR, gamma) in x0 units, expressed for each target's own loss scale
    weight = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[prediction]
    return target, weight


def init_source(path: Path, prediction: str) -> tuple[T.TinyVDM, dict]:
    """The TinyVDM at ``path`` to start from and what the run records of it (file, sha256, its clips seen)."""
    src = T.load_trained(path)
    if src.prediction_type != prediction or src.unet_config != T.UNET_CONFIG:
        raise SystemExit(f"{path} predicts {src.prediction_type!r} with another architecture or target than this "
                         f"run ({prediction!r}, qvd_demo.tinyvdm.UNET_CONFIG): pass --prediction "
                         f"{src.prediction_type} or start without --init-from")
    meta = src.metadata
    seen = int(meta.get("clips_seen_total", meta.get("clips_seen", 0)))
    return src, {"file": Path(path).name, "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16],
                 "clips_seen_total": seen}


def new_state(args, start: T.TinyVDM | None = None) -> dict:
    """A fresh run: the seeded initial weights, or those of ``start`` (``--init-from``)."""
    torch.manual_seed(args.seed)
    model = T.build_model(args.seed, args.prediction).train()
    if start is not None:
        model.load_state_dict(start.state_dict())
    return {"model": model, "ema": copy.deepcopy(model).eval().requires_grad_(False),
            "opt": torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0),
            "gen": torch.Generator().manual_seed(args.seed), "step": 0, "losses": [], "minutes": 0.0,
            "schedule": [[0, args.steps]]}  # [from step, planned steps]: one entry per --extend


def save_state(path: Path, st: dict, settings: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": st["model"].state_dict(), "ema": st["ema"].state_dict(), "opt": st["opt"].state_dict(),
                "gen": st["gen"].get_state(), "step": st["step"], "losses": st["losses"],
                "minutes": st["minutes"], "schedule": st["schedule"], "settings": settings}, tmp)
    tmp.replace(path)


def load_state(path: Path, args, settings: dict) -> dict:
    saved = torch.load(path, weights_only=True)
    diff = {k: (saved["settings"].get(k), v) for k, v in settings.items() if saved["settings"].get(k) != v}
    extend = args.extend and set(diff) == {"steps"} and settings["steps"] > saved["step"]
    if diff and not extend:
        raise SystemExit(f"{path} was trained with other settings {diff} (saved, now): rerun with the saved "
                         f"settings to resume (--extend with a larger --steps lengthens the run), or pass "
                         f"--state with a new path to start another run")
    schedule = saved["schedule"]
    if extend:  # the cosine decay is recomputed over the new length from here on (recorded in the metadata)
        print(f"extending the run from {saved['settings']['steps']} to {settings['steps']} steps at step "
              f"{saved['step']}", flush=True)
        schedule = schedule + [[saved["step"], settings["steps"]]]
    st = new_state(args)
    st["schedule"] = schedule
    st["model"].load_state_dict(saved["model"])
    st["ema"].load_state_dict(saved["ema"])
    st["opt"].load_state_dict(saved["opt"])
    st["gen"].set_state(saved["gen"])
    st.update(step=saved["step"], losses=saved["losses"], minutes=saved["minutes"])
    return st


def train(args, st: dict, settings: dict) -> dict:
    """Advance ``st`` towards ``args.steps`` within ``args.max_minutes`` (and ``args.run_steps``); saves the
    state as it goes."""
    model, ema, opt, g = st["model"], st["ema"], st["opt"], st["gen"]
    sched = T.make_scheduler("ddpm", args.prediction)
    warmup = max(1, args.steps // 20)
    lr_at = lambda s: args.lr * min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    start, minutes0, first = time.time(), st["minutes"], st["step"]
    while st["step"] < args.steps:
        if args.run_steps is not None and st["step"] - first >= args.run_steps:
            print(f"stopping at step {st['step']} after --run-steps {args.run_steps}", flush=True)
            break
        if (time.time() - start) / 60 > args.max_minutes:
            print(f"stopping at step {st['step']}: this run's budget of {args.max_minutes} min is spent; "
                  f"run the same command again to continue", flush=True)
            break
        step = st["step"]
        ids = torch.randint(0, T.NULL_CLASS, (args.batch,), generator=g)
        x0 = T.make_clips(ids, g).permute(0, 2, 1, 3, 4)  # [B, 3, F, H, W]
        cond = torch.where(torch.rand(args.batch, generator=g) < args.cond_dropout,
                           torch.full_like(ids, T.NULL_CLASS), ids)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch,), generator=g)
        xt = sched.add_noise(x0, noise, t)
        target, weight = target_and_weight(sched, x0, noise, t, args.prediction, args.snr_gamma)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        pred = model(xt, t, model.encode(cond))
        loss = ((pred - target).square().mean((1, 2, 3, 4)) * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        d = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        st["losses"].append(loss.item())
        st["step"] = step + 1
        st["minutes"] = minutes0 + (time.time() - start) / 60
        if st["step"] % args.log_every == 0:
            recent = sum(st["losses"][-args.log_every:]) / args.log_every
            print(f"step {st['step']}/{args.steps} loss {recent:.4f} lr {lr_at(step):.2e} "
                  f"{st['minutes']:.1f} min", flush=True)
        if st["step"] % args.save_every == 0:
            save_state(args.state, st, settings)
    save_state(args.state, st, settings)
    return st


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=T.DEFAULT_WEIGHTS)
    ap.add_argument("--state", type=Path, default=DEFAULT_STATE, help="resumable training state")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prediction", choices=T.PREDICTION_TYPES, default="v_prediction")
    ap.add_argument("--snr-gamma", type=float, default=5.0, help="min-SNR-gamma loss weight; 0 = unweighted")
    ap.add_argument("--cond-dropout", type=float, default=0.1)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-minutes", type=float, default=60.0, help="this run's wall-clock budget")
    ap.add_argument("--run-steps", type=int, default=None, help="at most this many steps in this run")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--export", action="store_true", help="write --out now even if the run is not finished")
    ap.add_argument("--extend", action="store_true", help="resume a run with a larger --steps than it was started with")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="start a new run from this TinyVDM file's weights (fresh optimizer and schedule)")
    args = ap.parse_args(argv)
    args.snr_gamma = args.snr_gamma or None
    torch.set_num_threads(args.threads)
    settings = {k: getattr(args, k) for k in ("steps", "batch", "lr", "seed", "prediction", "snr_gamma",
                                               "cond_dropout", "ema_decay")}
    start = None
    if args.init_from is not None:
        start, settings["init_from"] = init_source(args.init_from, args.prediction)
    args.state.parent.mkdir(parents=True, exist_ok=True)
    if args.state.is_file():
        st = load_state(args.state, args, settings)
        print(f"resuming {args.state} at step {st['step']}/{args.steps} ({st['minutes']:.1f} min so far)", flush=True)
    else:
        st = new_state(args, start)
    st = train(args, st, settings)
    done = st["step"] >= args.steps
    if not (done or args.export):
        print(f"not finished ({st['step']}/{args.steps} steps): {args.out} left as it was", flush=True)
        return st
    tail = st["losses"][-100:] or [float("nan")]
    prior = settings.get("init_from", {}).get("clips_seen_total", 0)
    info = {**settings, "steps_done": st["step"], "clips_seen": st["step"] * args.batch,
            "clips_seen_total": prior + st["step"] * args.batch,
            "loss_last100": sum(tail) / len(tail), "minutes": round(st["minutes"], 1), "partial": not done,
            "schedule": st["schedule"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    T.save_weights(st["ema"], args.out, info)
    size = args.out.stat().st_size
    print(f"saved {args.out} ({size / 1e6:.2f} MB): {json.dumps(info)}", flush=True)
    if size > 5e6:
        raise SystemExit(f"{args.out} is {size / 1e6:.2f} MB, over the 5 MB limit for shipped weights")
    return st


if __name__ == "__main__":
    main()
