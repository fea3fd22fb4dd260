"""Calibration: hook every Linear / Conv2d of a module tree and keep bounded statistics.

Per layer, over every timestep and frame: per-input-channel min / max (SCRI), also per timestep (the timestep
buckets' ranges), and a weighted reservoir of ``calib_rows`` input rows (tokens for a Linear, receptive-field
patches of the zero-padded input for a conv, laid out ``(kh, kw, C)`` like the int8 im2col), each tagged with its
call's timestep, used for range search and output-error measurement.
Layer roles are found from what the calls show, for any architecture (name patterns in the config only add to
them): a Linear is *temporal* (QVD's temporal features: HTDQ) when each call's input holds no more distinct rows than
the call has distinct timesteps (one vector per sample, broadcast over its tokens / frames) and it changes with the
timestep; it is on the *conditioning path* when its inputs are the same at every timestep; the *first* / *last* layers
read the model's own input / give its output, found by following each tensor through the model call
(``callgraph``). Temporal layers keep their input vector at each timestep (HTDQ needs the per-step features).
LayerNorm / GroupNorm outputs fed unchanged to layers are recorded, so SCRI can fold into the norm: a norm
forms a group only when its output reaches nothing but those layers (every other torch operation on it, such as
another node's attention patch, is watched for), since folding changes the tensor every consumer sees.
"""
from __future__ import annotations

import collections
import copy

import torch
from torch import nn

from .callgraph import INPUT, METADATA, Following, Provenance, flat_tensors, tensors_in
from .config import QVDConfig
from .errors import CalibrationError, NonFiniteActivationError
from .identity import find_layers, fingerprint, layer_signature
from .timesteps import as_timestep, timestep_argument


def conv_padding(module: nn.Conv2d) -> tuple[int, int, int, int]:
    """The zero padding a conv applies, as ``F.pad``'s (left, right, top, bottom); ``padding="same"`` included."""
    if module.padding == "valid":
        return 0, 0, 0, 0
    if module.padding == "same":
        (kh, kw), (dh, dw) = module.kernel_size, module.dilation
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return tw // 2, tw - tw // 2, th // 2, th - th // 2
    ph, pw = module.padding
    return pw, pw, ph, ph


def _channel_range(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-input-channel (min, max) of one call."""
    if isinstance(module, nn.Linear):
        x2 = x.reshape(-1, x.shape[-1])
        return x2.amin(0), x2.amax(0)
    mn, mx = x.amin((0, 2, 3)), x.amax((0, 2, 3))
    if any(conv_padding(module)):
        mn, mx = mn.clamp(max=0), mx.clamp(min=0)  # padded zeros are quantized too
    return mn, mx


def _sample_rows(module: nn.Module, x: torch.Tensor, k: int, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """``k`` random input rows (tokens or conv patches) and the total number of rows."""
    if isinstance(module, nn.Linear):
        x2 = x.reshape(-1, x.shape[-1])
        idx = torch.randint(0, x2.shape[0], (k,), generator=gen).to(x.device)
        return x2[idx].float(), x2.shape[0]
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    pad = conv_padding(module)
    xp = nn.functional.pad(x, pad) if any(pad) else x
    n, c, h, w = xp.shape
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    total = n * oh * ow
    flat = torch.randint(0, total, (k,), generator=gen)
    bi, rem = flat // (oh * ow), flat % (oh * ow)
    yi, xi = (rem // ow) * sh, (rem % ow) * sw
    dy, dx = torch.meshgrid(torch.arange(kh) * dh, torch.arange(kw) * dw, indexing="ij")
    ys, xs = yi[:, None, None] + dy, xi[:, None, None] + dx  # [k, kh, kw]
    dev = x.device
    patches = xp.permute(0, 2, 3, 1)[bi[:, None, None].to(dev), ys.to(dev), xs.to(dev)]  # [k, kh, kw, C]
    return patches.reshape(k, kh * kw * c).float(), total


_SEEN_PER_TIMESTEP = 64  # distinct inputs remembered per timestep (the conditioning-path test)
_PROBE_COLUMNS = 4  # columns compared first when counting an input's distinct rows
_ULPS = 64  # fp32 units in the last place (at a row's largest magnitude) two equal rows may differ by


def _summary(x: torch.Tensor) -> tuple:
    """An exact summary of one input (shape, dtype and integer sums of its bit patterns): equal for equal tensors
    whatever the order a float sum would add them in (a zero-mean input's float sum is rounding noise)."""
    b = x.contiguous().view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])
    return (tuple(x.shape), str(x.dtype), int(b.sum(dtype=torch.int64)), int(b[..., ::2].sum(dtype=torch.int64)))


def _near(rows: torch.Tensor, rep: torch.Tensor) -> torch.Tensor:
    """[R] whether each row equals ``rep`` up to rounding: one unit in the last place of its dtype per element, plus
    ``_ULPS`` fp32 units at ``rep``'s largest magnitude (a GEMM rounds identical rows differently by their place in
    the batch: CPU kernels block rows, accumulate in another order, and a 16-bit result can land one step apart)."""
    a, b = rows.float(), rep.float()
    tol = torch.finfo(rows.dtype).eps * torch.maximum(a.abs(), b.abs()) + _ULPS * torch.finfo(torch.float32).eps * \
        b.abs().max()
    return ((a - b).abs() <= tol).all(dim=-1)


def _clusters_at_most(x2: torch.Tensor, limit: int) -> bool:
    left = x2
    for _ in range(limit):
        left = left[~_near(left, left[0])]
        if left.shape[0] == 0:
            return True
    return False


def _distinct_rows_at_most(x2: torch.Tensor, limit: int) -> bool:
    """Whether the rows of ``x2`` take at most ``limit`` distinct values (rows equal up to rounding, ``_near``,
    count as one; a few columns first, so a token input is told apart cheaply)."""
    if x2.shape[0] <= limit:
        return True
    step = max(1, x2.shape[1] // _PROBE_COLUMNS)
    return _clusters_at_most(x2[:, ::step], limit) and _clusters_at_most(x2, limit)


def _rows_by_timestep(x2: torch.Tensor, row_timesteps: torch.Tensor | None) -> dict | None:
    """{timestep: its input row} when a call has several timesteps (per token / frame) and its rows follow them,
    each timestep's rows repeated in blocks or tiled; None when they do not."""
    if row_timesteps is None or x2.shape[0] % row_timesteps.numel():
        return None
    times = x2.shape[0] // row_timesteps.numel()
    for ts in (row_timesteps.repeat_interleave(times), row_timesteps.repeat(times)):
        out = {}
        for t in ts.unique().tolist():
            rows = x2[ts.to(x2.device) == t]
            if not bool(_near(rows, rows[0]).all()):
                break
            out[round(t, 4)] = rows[0].float().cpu()
        else:
            return out
    return None


class LayerStats:
    """Bounded statistics of one layer's input.

    ``temporal``: a temporal layer (HTDQ), set by a config pattern or, by ``finish``, observed: a Linear whose every
    call had no more distinct input rows than distinct timesteps (``broadcast``) and whose input changed with the
    timestep. ``conditioning_only``: the layer saw the same inputs at every timestep (its input depends on the
    conditioning alone: a text embedding, cross-attention keys / values). ``finish`` decides both from a summary of
    each call's input."""

    def __init__(self, name: str, signature: list, temporal: bool, rows: int):
        self.name = name
        self.signature = signature
        self.temporal = temporal
        self.broadcast = signature[0] == "linear"  # until a call shows more distinct rows than timesteps
        self.capacity = rows
        self.ch_min = self.ch_max = None
        self.rows = None  # [R, D] fp32
        self.keys = None  # [R] log-keys of the weighted reservoir
        self.times: list = []  # the timesteps calls came at (None: unknown), in order of first call
        self.row_times = None  # [R] int64: each row's index into ``times``
        self.ranges_at: list = []  # per entry of ``times``: (ch_min, ch_max) of its calls
        self.calls = 0
        self.temporal_vectors: dict[float, torch.Tensor] = {}
        self.norm_sources: set = set()
        self.inputs_at: dict = {}  # timestep -> summaries of the inputs seen then
        self.conditioning_only = False

    @classmethod
    def restore(cls, name: str, signature: list, temporal: bool, calls: int, ch_min: torch.Tensor,
                ch_max: torch.Tensor, rows: torch.Tensor, temporal_vectors: dict, times: list,
                row_times: torch.Tensor, ranges_at: list, conditioning_only: bool = False) -> "LayerStats":
        """Finished statistics read back from a calibration file."""
        s = cls(name, signature, temporal, rows.shape[0])
        s.calls, s.ch_min, s.ch_max, s.rows, s.temporal_vectors = calls, ch_min, ch_max, rows, temporal_vectors
        s.times, s.row_times, s.ranges_at = list(times), row_times.long(), list(ranges_at)
        s.conditioning_only = conditioning_only
        return s

    def bucket_view(self, bucket_of) -> tuple[torch.Tensor, list]:
        """(each row's bucket ``[R]``, per bucket index found: (ch_min, ch_max) of its calls) for ``bucket_of(t)``
        (an int per timestep); rows and calls of an unknown timestep (None) are in bucket -1."""
        index = torch.tensor([-1 if t is None else bucket_of(t) for t in self.times], dtype=torch.long)
        ranges = {}
        for b, (mn, mx) in zip(index.tolist(), self.ranges_at):
            lo, hi = ranges.get(b, (mn, mx))
            ranges[b] = (torch.minimum(lo, mn), torch.maximum(hi, mx))
        return index[self.row_times], ranges

    def update(self, module: nn.Module, x: torch.Tensor, timestep, gen: torch.Generator, source,
               distinct_timesteps: int = 1, row_timesteps: torch.Tensor | None = None) -> None:
        x = x.detach()
        mn, mx = (t.float() for t in _channel_range(module, x))
        self.ch_min = mn if self.ch_min is None else torch.minimum(self.ch_min, mn)
        self.ch_max = mx if self.ch_max is None else torch.maximum(self.ch_max, mx)
        if timestep not in self.times:
            self.times.append(timestep)
            self.ranges_at.append((mn, mx))
        at = self.times.index(timestep)
        lo, hi = self.ranges_at[at]
        self.ranges_at[at] = (torch.minimum(lo, mn), torch.maximum(hi, mx))
        self.norm_sources.add(source)
        self.calls += 1
        rows, total = _sample_rows(module, x, self.capacity, gen)
        # Weighted reservoir (Efraimidis-Spirakis): each sampled row stands for total / k rows.
        u = torch.rand(rows.shape[0], generator=gen).clamp_min(1e-12).to(rows.device)
        keys = u.log() / (total / rows.shape[0])
        times = torch.full((rows.shape[0],), at, dtype=torch.long, device=rows.device)
        if self.rows is not None:
            rows, keys = torch.cat([self.rows, rows]), torch.cat([self.keys, keys])
            times = torch.cat([self.row_times, times])
        keep = keys.topk(min(self.capacity, keys.numel())).indices
        self.rows, self.keys, self.row_times = rows[keep], keys[keep], times[keep]
        if self.broadcast and not _distinct_rows_at_most(x.reshape(-1, x.shape[-1]), distinct_timesteps):
            self.broadcast = False
        if (self.temporal or self.broadcast) and timestep is not None:
            x2 = x.reshape(-1, x.shape[-1])
            per_row = _rows_by_timestep(x2, row_timesteps) if distinct_timesteps > 1 else None
            self.temporal_vectors.update(per_row or {timestep: x2[0].float().cpu()})
        elif self.temporal_vectors and not self.temporal:
            self.temporal_vectors = {}
        seen = self.inputs_at.setdefault(timestep, set())
        if len(seen) < _SEEN_PER_TIMESTEP:
            seen.add(_summary(x))

    def finish(self) -> None:
        """Decide ``conditioning_only`` (at least two timesteps, each with the same set of inputs) and the observed
        ``temporal`` role (broadcast, at least two timesteps, inputs that differ between them), and keep the finished
        statistics on the CPU (a host caches them; they would hold accelerator memory)."""
        ts = [t for t in self.inputs_at if t is not None]
        same = all(self.inputs_at[t] == self.inputs_at[ts[0]] for t in ts)
        self.conditioning_only = not self.temporal and len(ts) >= 2 and None not in self.inputs_at and same
        self.temporal = self.temporal or (self.broadcast and len(ts) >= 2 and not same)
        if not self.temporal:
            self.temporal_vectors = {}
        self.inputs_at = {}
        self.ch_min, self.ch_max, self.rows, self.keys, self.row_times = (
            t.cpu() for t in (self.ch_min, self.ch_max, self.rows, self.keys, self.row_times))
        self.ranges_at = [(mn.cpu(), mx.cpu()) for mn, mx in self.ranges_at]

    def check_finite(self) -> bool:
        return bool(torch.isfinite(self.ch_min).all() and torch.isfinite(self.ch_max).all())


ROLES = ("first", "last")
COVERAGE_POINTS = 20  # default of coverage_timesteps' points (QVD Calibrate's timestep_coverage): docs/results.md


def coverage_timesteps(seen, t_min: float, t_max: float, points: int) -> list[float]:
    """Timesteps for calibration calls beyond the sampler's, so that one calibration covers the model's whole noise
    schedule ``[t_min, t_max]`` whatever the step count it was sampled with: ``points`` evenly spaced timesteps but
    those within half a spacing of one in ``seen`` (descending, rounded as ``Calibrator.set_timestep`` rounds)."""
    if points < 1 or not t_max > t_min:
        return []
    grid = torch.linspace(t_min, t_max, points, dtype=torch.float64).tolist() if points > 1 else [(t_min + t_max) / 2]
    half = (t_max - t_min) / (2 * max(points - 1, 1))
    return sorted({round(t, 4) for t in grid if all(abs(t - s) >= half for s in seen)}, reverse=True)


class Calibration:
    """Result of calibration: per-layer statistics, temporal features and the timesteps seen. ``patches``: the
    attention patches the host graph applied while it was calibrated (e.g. IPAdapter's), as the host glue names
    them; None when unknown. ``coverage``: the timesteps of ``timesteps`` added by coverage calls (not sampled).
    ``settings``: what was sampled (sampler, steps, sizes, ...: short strings / numbers), as the host names it.
    ``roles``: ``first`` (the weighted modules that read the model's input: its latent, a ControlNet's hint; not the
    timestep or the conditioning, whose layers have roles of their own) and ``last`` (those whose output is the
    model's output), any weighted module (a Conv3d patch embedding too), found by ``Calibrator``."""

    def __init__(self, layers: dict[str, LayerStats], timesteps: list[float], norm_groups: dict[str, list[str]],
                 patches: list[str] | None = None, coverage: list[float] | None = None,
                 settings: dict | None = None, roles: dict[str, list[str]] | None = None):
        self.layers = layers
        self.timesteps = timesteps
        self.norm_groups = norm_groups
        self.patches = patches
        self.coverage = list(coverage or [])
        self.settings = dict(settings or {})
        self.roles = {r: list((roles or {}).get(r, [])) for r in ROLES}

    @property
    def signatures(self) -> dict[str, list]:
        return {n: s.signature for n, s in self.layers.items()}

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.signatures)

    def subset(self, heads: dict[str, str]) -> "Calibration":
        """The statistics of the sub-models ``heads`` names (first name part, e.g. ``controlnet_<key>``), renamed to
        their values (e.g. ``controlnet``): what one model of a calibrated graph quantizes from. Raises when none is
        there."""
        def renamed(name: str) -> str | None:
            head, dot, rest = name.partition(".")
            return heads[head] + dot + rest if head in heads else None

        layers = {}
        for name, stats in self.layers.items():
            new = renamed(name)
            if new is not None:
                layers[new] = copy.copy(stats)
                layers[new].name = new
        if not layers:
            raise CalibrationError(f"the calibration holds no layers of {', '.join(sorted(heads)) or 'this model'}: "
                                   f"calibrate with it in the graph QVD Calibrate samples")
        groups = {renamed(norm): [renamed(n) for n in names] for norm, names in self.norm_groups.items()
                  if renamed(norm) is not None}
        roles = {r: [renamed(n) for n in names if renamed(n) is not None] for r, names in self.roles.items()}
        return Calibration(layers, list(self.timesteps), groups, self.patches, self.coverage, self.settings, roles)

    def temporal_features(self, name: str) -> torch.Tensor:
        """Features of a temporal layer, one row per timestep in sampling order (t descending)."""
        vec = self.layers[name].temporal_vectors
        return torch.stack([vec[t] for t in sorted(vec, reverse=True)])


class _NormUseWatch(Following):
    """Names the norms whose recent output a torch operation reads outside the quantizable layers' forwards, and
    carries the calibrated call graph (``callgraph.Following``) through every operation outside the weighted modules."""

    def __init__(self, calibrator: "Calibrator"):
        super().__init__(calibrator.provenance, lambda: calibrator._in_layer > 0, METADATA | {"__setitem__"})
        self.cal = calibrator

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        cal = self.cal
        if cal._in_layer == 0 and cal._recent_norm_outputs and getattr(func, "__name__", "") not in METADATA:
            watched = {id(t): n for n, t in cal._recent_norm_outputs}
            for t in tensors_in((*args, *kwargs.values())):
                if id(t) in watched:
                    cal.norm_other_uses.setdefault(watched[id(t)], getattr(func, "__name__", "") or str(func))
        return super().__torch_function__(func, types, args, kwargs)


class Calibrator:
    """Context manager hooking every quantizable layer under ``root``; forwards run inside it.

    Call ``set_timestep(t)`` before each forward, unless the model's forward (``root``'s, or each one's of a
    ``ModuleDict`` root) takes a ``timestep`` / ``timesteps`` argument (diffusers / ComfyUI models), which is recorded
    automatically.
    """

    def __init__(self, root: nn.Module, config: QVDConfig | None = None):
        self.root = root
        self.config = config or QVDConfig()
        self.layers = find_layers(root, self.config)
        if not self.layers:
            raise CalibrationError(f"{type(root).__name__} has no Linear / Conv2d layers to calibrate: "
                                   f"pass the diffusion model (UNet) or a tree containing it")
        self.stats = {n: LayerStats(n, layer_signature(m), self.config.is_temporal(n), self.config.calib_rows)
                      for n, m in self.layers.items()}
        self.timestep = None
        self.timesteps: set[float] = set()
        self._gen = torch.Generator().manual_seed(self.config.seed)
        self._handles = []
        self._recent_norm_outputs = collections.deque(maxlen=4)
        self._norm_name = {}
        self._in_layer = 0  # depth of quantizable layers' forwards running now
        self.norm_other_uses: dict[str, str] = {}  # norm -> an operation that read its output besides the layers
        self.provenance = Provenance()
        self._watch = _NormUseWatch(self)
        self._distinct_timesteps = 1  # distinct timestep values of the current model call
        self._row_timesteps = None  # the call's timestep tensor, flattened
        self._model_depth = 0
        # Weighted modules QVD does not hook for statistics (other convs, skipped layers): nodes of the call graph too.
        self._others = {n: m for n, m in root.named_modules()
                        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and n not in self.layers}
        self.reads_input: set[str] = set()
        self.gives_output: set[str] = set()

    def set_timestep(self, t) -> None:
        """The timestep of the coming calls: a number, or the model's timestep tensor (per sample, or per token:
        recorded as its largest value, the noisy tokens'; each row of a temporal input is keyed by its own)."""
        self._row_timesteps = t.detach().flatten().float().cpu() if torch.is_tensor(t) else None
        self._distinct_timesteps = max(1, int(torch.unique(t).numel())) if torch.is_tensor(t) else 1
        self.timestep = as_timestep(t)
        self.timesteps.add(self.timestep)

    def __enter__(self) -> "Calibrator":
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_pre_hook(self._layer_hook(name), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._layer_done(name), always_call=True))
        for name, module in self._others.items():
            self._handles.append(module.register_forward_pre_hook(self._graph_node(name), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._graph_node_done(name)))
        models = list(self.root.children()) if isinstance(self.root, (nn.ModuleDict, nn.ModuleList)) else [self.root]
        for model in models:  # the calls the call graph is followed through (a ModuleDict's models: each one)
            self._handles.append(model.register_forward_pre_hook(self._model_call, with_kwargs=True))
            self._handles.append(model.register_forward_hook(self._model_done, with_kwargs=True, always_call=True))
        for name, module in self.root.named_modules():
            if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                self._norm_name[id(module)] = name
                self._handles.append(module.register_forward_hook(self._norm_hook))
        self._watch.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._watch.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._recent_norm_outputs.clear()

    def _norm_hook(self, module, _inp, out):
        if torch.is_tensor(out):
            self._recent_norm_outputs.append((self._norm_name[id(module)], out))

    def _model_call(self, module, args, kwargs):
        """A model call records its timestep argument (per sample or per token, as Wan 2.2's image-to-video gives)
        and starts the call graph at its tensor arguments (not those nested in lists / dicts, such as ControlNet
        residuals: they come from another model)."""
        if self._model_depth == 0:
            t = timestep_argument(module, args, kwargs)
            if torch.is_tensor(t) or isinstance(t, (int, float)):
                self.set_timestep(t)
            self.provenance.start(a for a in (*args, *kwargs.values()) if torch.is_tensor(a))
        self._model_depth += 1

    def _model_done(self, _module, _args, _kwargs, output):
        self._model_depth -= 1
        if self._model_depth == 0:
            self.gives_output.update(n for t in flat_tensors(output) for n in self.provenance.get(t) if n != INPUT)
            self.provenance.stop()

    def _reads_input(self, name: str, x) -> None:
        if self.provenance.active and INPUT in self.provenance.get(x):
            self.reads_input.add(name)

    def _graph_node(self, name):
        def hook(_module, args, kwargs):
            self._reads_input(name, args[0] if args else kwargs.get("input"))
        return hook

    def _graph_node_done(self, name):
        def hook(_module, _args, output):
            if self.provenance.active:
                for t in tensors_in((output,)):
                    self.provenance.set(t, frozenset((name,)))
        return hook

    def _layer_hook(self, name):
        stats = self.stats[name]

        def hook(module, args, kwargs):
            self._in_layer += 1
            x = args[0] if args else kwargs["input"]
            source = next((n for n, t in self._recent_norm_outputs if t is x), None)
            stats.update(module, x, self.timestep, self._gen, source, self._distinct_timesteps, self._row_timesteps)
            self._reads_input(name, x)
        return hook

    def _layer_done(self, name):
        node_done = self._graph_node_done(name)

        def hook(module, args, output):
            self._in_layer -= 1
            node_done(module, args, output)
        return hook

    def _roles(self, seen: dict[str, LayerStats]) -> dict[str, list[str]]:
        """First: modules reading the model's input, but the temporal layers (they read the timestep) and the Linear
        layers on the conditioning path (they read the prompt embedding); last: modules giving the model's output."""
        def reads_latent(n: str) -> bool:
            s = seen.get(n)
            return s is None or not (s.temporal or (s.conditioning_only and s.signature[0] == "linear"))
        ran = set(seen) | set(self._others)
        return {"first": sorted(n for n in self.reads_input if n in ran and reads_latent(n)),
                "last": sorted(n for n in self.gives_output if n in ran)}

    def result(self) -> Calibration:
        """Finished statistics; raises if nothing ran or a layer saw NaN / Inf."""
        seen = {n: s for n, s in self.stats.items() if s.calls}
        for s in seen.values():
            s.finish()
        if not seen:
            raise CalibrationError("no calibration forward pass reached the model's layers: run the sampler "
                                   "(or the model) inside the Calibrator context")
        bad = [n for n, s in seen.items() if not s.check_finite()]
        if bad:
            raise NonFiniteActivationError(
                f"non-finite (NaN/Inf) activations in {len(bad)} layer(s), e.g. {bad[:3]}: the model produces "
                f"NaN/Inf at this precision or with these inputs; fix the model / dtype (try fp32) and calibrate again")
        groups = collections.defaultdict(list)
        for n, s in seen.items():
            if len(s.norm_sources) == 1 and None not in s.norm_sources:
                groups[next(iter(s.norm_sources))].append(n)
        for norm in self.norm_other_uses:
            groups.pop(norm, None)
        return Calibration(seen, sorted(self.timesteps, reverse=True), dict(groups), roles=self._roles(seen))
