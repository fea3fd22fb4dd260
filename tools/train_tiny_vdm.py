"""Train the embedded TinyVDM on procedural moving-shape clips (CPU, one thread, seeded).

    .venv/bin/python tools/train_tiny_vdm.py --out assets/tiny_vdm.safetensors --steps 2000

Epsilon-prediction DDPM loss, 10 % condition dropout (for classifier-free guidance), AdamW with warm-up and
cosine decay, bf16 autocast on CPU, an EMA of the weights (what is saved, as fp16 safetensors with the
config, steps, seed and final loss as metadata). ``--max-minutes`` stops early (and says so in the metadata)
so a run never exceeds its wall-clock budget.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qvd_demo import tinyvdm as T  # noqa: E402


def train(steps: int, batch: int, lr: float, seed: int, max_minutes: float, log_every: int = 50,
          ckpt: Path | None = None, cond_dropout: float = 0.1, ema_decay: float = 0.995):
    torch.manual_seed(seed)
    model = T.build_model(seed).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    sched = T.make_scheduler("ddpm")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    lr_at = lambda s: lr * min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(seed)
    start, losses, step = time.time(), [], 0
    for step in range(steps):
        if (time.time() - start) / 60 > max_minutes:
            print(f"stopping at step {step}: wall-clock budget of {max_minutes} min reached", flush=True)
            break
        ids = torch.randint(0, T.NULL_CLASS, (batch,), generator=g)
        x0 = T.make_clips(ids, g).permute(0, 2, 1, 3, 4)  # [B, 3, F, H, W]
        cond = torch.where(torch.rand(batch, generator=g) < cond_dropout, torch.full_like(ids, T.NULL_CLASS), ids)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        xt = sched.add_noise(x0, noise, t)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = model(xt, t, model.encode(cond))
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            print(f"step {step + 1}/{steps} loss {recent:.4f} lr {lr_at(step):.2e} "
                  f"{time.time() - start:.0f}s", flush=True)
            if ckpt is not None and (step + 1) % (log_every * 10) == 0:
                T.save_weights(ema, ckpt, {"steps": step + 1, "seed": seed, "partial": True})
    done = len(losses)
    tail = losses[-min(100, done):] if done else [float("nan")]
    info = {"steps": done, "steps_planned": steps, "batch": batch, "lr": lr, "seed": seed,
            "loss_last100": sum(tail) / len(tail), "minutes": round((time.time() - start) / 60, 2),
            "ema_decay": ema_decay, "cond_dropout": cond_dropout, "stopped_early": done < steps}
    return ema, info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=T.DEFAULT_WEIGHTS)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-minutes", type=float, default=36.0)
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = Path(".cache") / "tiny_vdm_partial.safetensors"
    ckpt.parent.mkdir(exist_ok=True)
    ema, info = train(args.steps, args.batch, args.lr, args.seed, args.max_minutes, args.log_every, ckpt)
    T.save_weights(ema, args.out, info)
    size = args.out.stat().st_size
    print(f"saved {args.out} ({size / 1e6:.2f} MB): {info}", flush=True)
    if size > 5e6:
        raise SystemExit(f"{args.out} is {size / 1e6:.2f} MB, over the 5 MB limit for shipped weights")


if __name__ == "__main__":
    main()
