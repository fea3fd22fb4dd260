"""Timestep buckets: which of a layer's static activation quantizers runs at the current timestep.

A calibration that covers the model's noise schedule is split into ``QVDConfig.timestep_buckets`` intervals of
equal width in the model's own timestep (what its forward receives: 0..999 for SD / AnimateDiff, ``1000 sigma`` for
Wan), and each W8A8 layer gets one (scale, zero point) per interval: its whole range narrowed to the input range of
that interval's calls (``quantize.py``). At run time a ``TimestepClock`` shared by one quantized model's layers holds the bucket
of the model call in progress: ``follow_timesteps`` sets it from each call's ``timestep(s)`` argument (plain torch,
a quantized ControlNet's own copy), or the host glue sets it (ComfyUI: a DIFFUSION_MODEL wrapper).
"""
from __future__ import annotations

import bisect
import functools
import inspect

import torch
from torch import nn

from .errors import QVDError


def timestep_argument(model: nn.Module, args, kwargs, position: int | None = None):
    """The ``timestep`` / ``timesteps`` argument of a call of ``model``'s forward (diffusers / ComfyUI models, a ComfyUI
    ControlNet; a host wrapper around the forward passes the same arguments), or None: the one place a model call's
    timestep is read. ``position``: where the host's convention puts it when the forward names it otherwise (ComfyUI's
    diffusion models: ``(x, t, ...)``)."""
    found = _timestep_position(type(model))
    if found is None:
        return args[position] if position is not None and len(args) > position else None
    name, pos = found
    return kwargs.get(name, args[pos] if len(args) > pos else None)


@functools.lru_cache(maxsize=None)
def _timestep_position(cls: type) -> tuple[str, int] | None:
    """(name, position among the call's arguments) of ``cls.forward``'s timestep parameter, or None."""
    try:
        params = list(inspect.signature(cls.forward).parameters)[1:]  # without self
    except (TypeError, ValueError):
        return None
    name = next((p for p in ("timestep", "timesteps") if p in params), None)
    return None if name is None else (name, params.index(name))


def as_timestep(t) -> float:
    """One number for a model call's timestep argument (a number, or a tensor per sample or per token: its largest
    value, the noisy tokens'), rounded as calibration keys timesteps."""
    if torch.is_tensor(t):
        t = t.detach().max()
    return round(float(t), 4)


def bucket_edges(timesteps, buckets: int) -> list[float]:
    """Inner edges (ascending) splitting ``[min, max]`` of the calibrated ``timesteps`` into ``buckets`` intervals of
    equal width; an interval holding no calibrated timestep is merged into its neighbour. [] is one bucket."""
    ts = sorted(float(t) for t in timesteps)
    if buckets <= 1 or len(ts) < 2 or ts[0] == ts[-1]:
        return []
    width = (ts[-1] - ts[0]) / buckets
    edges = [round(ts[0] + width * i, 4) for i in range(1, buckets)]
    kept = []
    for e in edges:  # keep an edge only when a calibrated timestep lies between it and the previous kept edge
        lo = kept[-1] if kept else -float("inf")
        if any(lo <= t < e for t in ts):
            kept.append(e)
    return kept  # the last interval holds the largest timestep


def bucket_of(t: float, edges) -> int:
    """The bucket of timestep ``t``: 0 below the first edge, ``len(edges)`` from the last one up (a timestep outside
    the calibrated range takes the nearest end bucket)."""
    return bisect.bisect_right(edges, t)


class TimestepClock:
    """The bucket of the model call in progress, shared by one quantized model's W8A8 layers (``edges``: from
    ``bucket_edges``; none: one bucket, and the clock is never read)."""

    def __init__(self, edges=()):
        self.edges = [float(e) for e in edges]
        self.index: int | None = None if self.edges else 0
        self.timestep: float | None = None

    @property
    def buckets(self) -> int:
        return len(self.edges) + 1

    def set(self, t) -> None:
        """The timestep of the coming calls (see ``as_timestep``)."""
        self.timestep = as_timestep(t)
        self.index = bucket_of(self.timestep, self.edges)

    def bucket(self) -> int:
        if self.index is None:
            raise QVDError(f"a quantized layer with {self.buckets} timestep buckets ran before any timestep was "
                           f"known: run it through its model's forward with the timestep argument, or call "
                           f"QuantizeResult.set_timestep(t) first")
        return self.index


def follow_timesteps(model: nn.Module, clock: TimestepClock) -> list:
    """Forward pre-hooks on ``model`` (each child of a ``ModuleDict`` / ``ModuleList`` root) setting ``clock`` from
    each call's ``timestep(s)`` argument; returns the hook handles. None for a one-bucket clock."""
    if clock.buckets == 1:
        return []
    models = list(model.children()) if isinstance(model, (nn.ModuleDict, nn.ModuleList)) else [model]

    def hook(module, args, kwargs):
        t = timestep_argument(module, args, kwargs)
        if torch.is_tensor(t) or isinstance(t, (int, float)):
            clock.set(t)
    return [m.register_forward_pre_hook(hook, with_kwargs=True) for m in models]
