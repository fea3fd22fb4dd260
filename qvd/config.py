"""`QVDConfig`: every knob of the quantizer in one place."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fnmatch import fnmatch

from .errors import QVDError

ACT_RANGES = ("minmax", "percentile", "mse")
MAX_BUCKETS = 16  # QVDConfig.timestep_buckets
WEIGHT_CLIPS = ("minmax", "mse")

# Layer roles (temporal, conditioning path, first / last) are found by calibration from the model's calls
# (``calibrate.py``), for every architecture; the patterns below only add layers to them. The first and last layers
# are 0.02 % of an SD1.5 UNet's MACs (bench/first_last_share.py) and the layers whose quantization error reaches the
# sampled video most directly (docs/results.md).
# Spatial cross-attention keys / values / output: diffusers (``*.attentions.*``; motion modules are
# ``*.motion_modules.*``), a ComfyUI UNet (``diffusion_model.*``; ADE motion modules use other names) and ControlNet.
CROSS_ATTENTION_PATTERNS = tuple(f"{root}.*.attn2.{p}" for root in ("attentions", "diffusion_model", "controlnet")
                                 for p in ("to_k", "to_v", "to_out.0"))


def matches(name: str, patterns) -> bool:
    """True if the dotted layer ``name`` matches a pattern, anywhere as a suffix (fnmatch syntax)."""
    return any(fnmatch(name, p) or fnmatch(name, "*." + p) for p in patterns)


@dataclass(frozen=True)
class QVDConfig:
    """Quantization settings.

    w_bits / a_bits: weight (4-8) and activation (6-8) bit widths; codes are stored as int8.
    weight_clip: per-output-channel symmetric weight range, "minmax" or "mse" (searched clip).
    act_range: static per-tensor activation range search, "minmax" | "percentile" | "mse".
    htdq: quantize temporal features with HiDi-TQ searched by K = L2 + htdq_lambda * (1 - TDScore).
    scri: per-channel shift + scale of activations (Scattered Channel Range Integration), alpha searched
      per layer over ``scri_alphas``; folded into the preceding LayerNorm/GroupNorm where exact.
    scri_max_gain: cap on a channel's SCRI gain ``1 / s_j`` (robustness to inputs unlike calibration's).
    scri_skip: layers without SCRI. Default: the spatial cross-attention keys / values / output, which read
      the prompt embedding; its per-channel ranges seen on a few calibration prompts do not cover other
      prompts. (A diffusers motion module's ``attn2`` is temporal self-attention and keeps SCRI.)
    skip: layer-name patterns left out of calibration and quantization (the user's list).
    keep_ends_float: the first and last layers (found in calibration: those reading the model's input, those giving
      its output) stay in full precision; False: W8A8 at 8 bits whatever the bit widths.
    keep_float: patterns kept in full precision besides them.
    keep_8bit: patterns forced to 8 bits whatever the bit widths.
    temporal: patterns of temporal layers besides those calibration observes (``calibrate.py``).
    timestep_buckets: static activation quantizers per W8A8 layer, one per interval of the calibrated timesteps
      (``qvd/timesteps.py``; 1: one per layer). The default is measured: docs/results.md.
    calib_rows: input rows (tokens / conv patches) kept per layer during calibration.
    search_channels: output channels (a seeded subset) on which the SCRI alpha search measures a layer's error;
      layers with no more are searched on all of them; 0: always all (slower, see bench/quantize_time.py).
    """
    w_bits: int = 8
    a_bits: int = 8
    weight_clip: str = "minmax"
    act_range: str = "mse"
    percentile: float = 99.99
    htdq: bool = True
    htdq_lambda: float = 1.0
    htdq_window: int = 1
    scri: bool = True
    scri_alphas: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    scri_fold_norm: bool = True
    scri_max_gain: float = 4.0
    scri_skip: tuple = CROSS_ATTENTION_PATTERNS
    skip: tuple = ()
    keep_ends_float: bool = True
    keep_float: tuple = ()
    keep_8bit: tuple = ()
    temporal: tuple = ()
    timestep_buckets: int = 1
    calib_rows: int = 256
    search_channels: int = 512
    seed: int = 0

    def __post_init__(self):
        if not 4 <= self.w_bits <= 8:
            raise QVDError(f"w_bits={self.w_bits} is not supported: use 4 to 8")
        if not 6 <= self.a_bits <= 8:
            raise QVDError(f"a_bits={self.a_bits} is not supported: use 6 to 8")
        if self.act_range not in ACT_RANGES:
            raise QVDError(f"act_range={self.act_range!r}: use one of {ACT_RANGES}")
        if self.weight_clip not in WEIGHT_CLIPS:
            raise QVDError(f"weight_clip={self.weight_clip!r}: use one of {WEIGHT_CLIPS}")
        if not 1 <= self.timestep_buckets <= MAX_BUCKETS:
            raise QVDError(f"timestep_buckets={self.timestep_buckets} is not supported: use 1 to {MAX_BUCKETS}")
        if not 16 <= self.calib_rows <= 1 << 20:
            raise QVDError(f"calib_rows={self.calib_rows} is not supported: use 16 to {1 << 20}")
        if self.search_channels != 0 and not 16 <= self.search_channels <= 1 << 20:
            raise QVDError(f"search_channels={self.search_channels} is not supported: use 0 (all) or 16 to {1 << 20}")
        if not 0 < self.percentile <= 100:
            raise QVDError(f"percentile={self.percentile} is not a percentile: use a value in (0, 100]")
        if not (self.htdq_lambda >= 0 and self.htdq_window >= 1 and self.scri_max_gain >= 1):
            raise QVDError(f"htdq_lambda={self.htdq_lambda}, htdq_window={self.htdq_window}, scri_max_gain="
                           f"{self.scri_max_gain}: use htdq_lambda >= 0, htdq_window >= 1, scri_max_gain >= 1")
        if not self.scri_alphas or not all(0 <= a <= 1 for a in self.scri_alphas):
            raise QVDError(f"scri_alphas={self.scri_alphas}: give one or more alphas in [0, 1]")
        for f in ("scri_alphas", "scri_skip", "skip", "keep_float", "keep_8bit", "temporal"):
            object.__setattr__(self, f, tuple(getattr(self, f)))

    def is_temporal(self, name: str) -> bool:
        return matches(name, self.temporal)

    def layer_bits(self, name: str, end: bool = False) -> tuple[int, int]:
        """(w_bits, a_bits) for a layer: first / last layers (``end``) and ``keep_8bit`` stay at 8 bit."""
        return (8, 8) if end or matches(name, self.keep_8bit) else (self.w_bits, self.a_bits)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "QVDConfig":
        """The config ``to_dict`` wrote; every field's JSON type is checked (a file is not trusted)."""
        if not isinstance(d, dict):
            raise QVDError(f"a QVDConfig is a JSON object, not {type(d).__name__}")
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        unknown = set(d) - set(defaults)
        if unknown:
            raise QVDError(f"unknown QVDConfig fields {sorted(unknown)[:5]}: made by a newer QVD? Upgrade the pack")
        return cls(**{k: _typed(k, v, defaults[k]) for k, v in d.items()})


def _typed(name: str, value, default):
    """``value`` as the type of ``default`` (bool / int / finite float / str, or a list of the tuple's items)."""
    like = (default[0] if default else "") if isinstance(default, tuple) else default

    def ok(v) -> bool:
        if isinstance(like, (bool, str)):
            return type(v) is type(like)
        if isinstance(like, int):
            return type(v) is int
        return type(v) in (int, float) and math.isfinite(v)
    if isinstance(default, tuple) and isinstance(value, list) and all(ok(v) for v in value):
        return tuple(type(like)(v) for v in value)
    if not isinstance(default, tuple) and ok(value):
        return type(like)(value)
    expected = ("a list of " if isinstance(default, tuple) else "") + type(like).__name__
    raise QVDError(f"QVDConfig field {name} is {str(value)[:40]!r}: expected {expected}")
