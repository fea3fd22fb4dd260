"""Quantized layers that replace ``nn.Linear`` / ``nn.Conv2d``.

``QLinear`` / ``QConv2d`` (W8A8): int8 weights with per-output-channel fp32 scales, static activation
quantizers (scale, zero point), one per timestep bucket (``clock``: ``qvd.timesteps``), and optional SCRI input
shift / scale. ``mode = "int"`` (default) runs the
kernels from ``qvd.kernels`` on the layer's compute route (``compute``: ``auto`` / ``int8`` / ``weight-only``,
``kernels.run_route``; ``set_compute``); ``mode = "fake"`` simulates the W8A8 rounding in floating point.
``HiDiTQLinear``: the time-projection layers; HiDi-TQ look-up-table activations, int8 weights.
All tensors are ``nn.Parameter(requires_grad=False)`` so hosts that move / offload parameters see them;
``forward`` brings them to the input's device when a host left them elsewhere (low-VRAM offloading, streaming).
Device rules, in one place: what a layer derives from its stored tensors (packed codes, epilogue biases, pad codes,
a weight-only route's float weight) is kept in one cache (``_cached``), per kind and device, only for the device the
stored tensors are on, and emptied whenever the layer moves (``_apply``: a host's ``.to()``; ``make_resident`` /
``release``: a host keeping a device copy while the stored tensors stay home). The int8 codes never change after
quantization: a host's weight patches (LoRA) run beside the kernel as a ``qvd.delta.WeightDelta`` (see
``_HostHooks``), which follows the layer when it moves.
``forward`` takes ``input`` like ``nn.Linear`` / ``nn.Conv2d`` (callers such as diffusers pass it by name).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .delta import WeightDelta
from .errors import QVDError
from .quantizers import act_qrange, dequantize_weight
from .scri import ScriTransform
from .timesteps import TimestepClock


CLIP_CHECK_EVERY = 8  # calls between two clipping counts of a layer (``count_clipping``)
CLIP_CHECK_ELEMENTS = 1 << 20  # about how many input elements one count reads (a strided view, every channel)


def _strided_sample(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """A view of ``x`` with every channel and about ``CLIP_CHECK_ELEMENTS`` elements: the other dimensions taken with
    one stride (no copy: counting a large activation allocates little)."""
    if x.numel() <= CLIP_CHECK_ELEMENTS or x.dim() < 2:
        return x
    step = math.ceil((x.numel() / CLIP_CHECK_ELEMENTS) ** (1 / (x.dim() - 1)))
    return x[tuple(slice(None) if d == channel_dim else slice(None, None, step) for d in range(x.dim()))]


def _param(t: torch.Tensor | None):
    return None if t is None else nn.Parameter(t, requires_grad=False)


class _HostHooks(nn.Module):
    """A host's weight-patch protocol (ComfyUI's, without importing it): the int8 codes are never rewritten.

    Weight patches (a LoRA) reach the layer as a ``WeightDelta`` added beside the kernel (``qvd.delta``), and bias
    patches as a patched copy of the float bias: the host glue calls ``set_delta`` when the host loads the model,
    with that model's patches (None: none). ``comfy_patched_weights`` is always True, so a host that merges patches
    into weights at load (ComfyUI's whole load) skips this layer instead of doing float work it would throw away. A
    host that offloads the layer (ComfyUI's low-VRAM load) sets ``comfy_cast_weights`` and may queue its patches in
    ``weight_function`` / ``bias_function``; ``read_host_patches`` (set by the glue) turns the weight's into the
    delta at call time, the bias's apply to the stored bias. A patched weight written through ``set_weight`` that the
    glue did not resolve is an error at the next call, never a silent loss.
    """

    comfy_cast_weights = False
    read_host_patches = None  # (layer, weight_function) -> WeightDelta | None; set by the host glue
    delta_dtype = None  # the dtype the host glue keeps this layer's delta in (its activation dtype)

    def __init__(self):
        super().__init__()
        self.weight_function, self.bias_function = [], []
        self.delta: WeightDelta | None = None
        self.patched_bias: torch.Tensor | None = None
        self.unresolved_patch = False

    @property
    def comfy_patched_weights(self) -> bool:
        return True

    @comfy_patched_weights.setter
    def comfy_patched_weights(self, _value) -> None:
        pass  # the host marks what it merged; nothing is ever merged into this layer

    @comfy_patched_weights.deleter
    def comfy_patched_weights(self) -> None:
        pass

    def _apply(self, fn, recurse=True):
        where = lambda: [(t.device, t.dtype, t.data_ptr()) for t in (*self._parameters.values(),  # noqa: E731
                                                                      *self._buffers.values()) if t is not None]
        before = where()
        out = super()._apply(fn, recurse)
        self.moved(fn, changed=where() != before)
        return out

    def moved(self, fn, changed: bool = True) -> None:
        """The layer's tensors moved (``fn``: what moved them, applied to its branch too): nothing derived on the old
        device stays reachable from it. ``changed`` False: they already were where ``fn`` puts them (a ``.to()`` of a
        loaded model), and what was derived from them stays."""
        if changed:
            self.__dict__.get("_cache", {}).clear()
        self.delta = None if self.delta is None else self.delta.map(fn)
        self.patched_bias = None if self.patched_bias is None else fn(self.patched_bias)

    def set_delta(self, delta: WeightDelta | None, bias: torch.Tensor | None = None) -> None:
        """Add ``delta`` (host weight patches in the layer's own input domain) to every call and use ``bias`` (the
        host's patched float bias) for the stored one; None removes either."""
        self.unresolved_patch = False
        if delta is not self.delta:
            self.delta = None if delta is None else self._for_input(delta)
        self.patched_bias = None if bias is None else bias.detach().float()

    def _bias(self) -> torch.Tensor | None:
        """The float bias of this call when the host queued no bias patch: the patched one, else the stored one."""
        return self.bias if self.patched_bias is None else self.patched_bias

    def _for_input(self, delta: WeightDelta) -> WeightDelta:
        return delta

    def _current_delta(self) -> WeightDelta | None:
        if self.unresolved_patch:
            raise QVDError(f"a weight patch was written to a quantized {type(self).__name__} "
                           f"{tuple(self.weight.shape)} outside the model loading QVD follows (e.g. a hook LoRA): it "
                           f"cannot be applied to int8 weights. Load the LoRA with a LoRA loader node after QVD")
        if self.comfy_cast_weights and self.weight_function:
            if self.read_host_patches is None:
                raise QVDError(f"a host queued weight functions on a quantized {type(self).__name__} "
                               f"{tuple(self.weight.shape)} and no host glue reads them")
            self.set_delta(self.read_host_patches(self, self.weight_function))
        if self.delta is not None and self.delta.device != self.weight.device:
            self.delta = self.delta.to(self.weight.device)  # the host moved the layer (offloading)
        return self.delta

    def _call_weights(self, device) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """(int8 codes, float bias, patched) for this call on ``device``; ``patched`` when the host's queued
        bias patches changed the bias (then nothing derived from the stored bias may be reused)."""
        w = _to(self.weight, device)
        if not self.comfy_cast_weights or not self.bias_function:
            return w, _to(self._bias(), device), False
        b = _to(self.bias, device)
        for f in self.bias_function:
            b = f(b)
        return w, b, True

    # ComfyUI's full-load patching: ``convert_weight`` gives the float weight in the layer's own input domain,
    # ComfyUI adds its patches to it and hands the result to ``set_weight``, which keeps the codes (the glue
    # sets the delta from the same patches once the load is done).
    def set_weight(self, weight: torch.Tensor, inplace_update: bool = False, seed=None, return_weight=False,
                   **_) -> torch.Tensor | None:
        self.unresolved_patch = True
        return self.weight if return_weight else None


def _to(t: torch.Tensor | None, device) -> torch.Tensor | None:
    """``t`` on ``device``: itself when it is there, else a copy, non-blocking towards an accelerator (from pinned
    memory, e.g. an offloaded layer's codes that ComfyUI pinned, it overlaps other work)."""
    if t is None or t.device == device:
        return t
    return t.to(device, non_blocking=torch.device(device).type != "cpu")


def _key(t: torch.Tensor | None) -> tuple:
    """Cache key that changes when a tensor is replaced or modified in place (inference tensors have no
    version counter; ComfyUI replaces them rather than writing into them)."""
    if t is None:
        return (None,)
    return id(t), t.data_ptr(), -1 if t.is_inference() else t._version


class _QuantizedBase(_HostHooks):
    """Shared state of W8A8 layers (see module docstring).

    ``weight`` holds int8 codes of ``W * s`` (``s`` the SCRI scale per input channel, 1 without SCRI) and
    ``bias`` the layer's own bias; the SCRI correction ``W z`` and the zero-point correction are derived from
    them in ``scri_bias`` and ``epilogue_bias`` (cached; a host may replace or patch the bias).
    ``scri_in_norm``: the SCRI transform is done by the preceding norm, not by the quantize kernel.
    ``act_scale`` ``[B]`` / ``zero_points`` (``B`` ints): the activation quantizer of each timestep bucket (a number
    each: one bucket); ``clock`` says which one runs (``act_scale_now`` / ``zero_point``).
    """

    qvd_quantized = True

    def __init__(self, weight_q, weight_scale, bias, act_scale, zero_point, w_bits, a_bits,
                 scri_shift=None, scri_inv_scale=None, scri_in_norm=False):
        super().__init__()
        self.weight = _param(weight_q.to(torch.int8))
        self.weight_scale = _param(weight_scale.float())
        self.bias = _param(None if bias is None else bias.float())
        self.act_scale = _param(torch.as_tensor(act_scale, dtype=torch.float32).detach().reshape(-1).clone())
        self.scri_shift = _param(None if scri_shift is None else scri_shift.float())
        self.scri_inv_scale = _param(None if scri_inv_scale is None else scri_inv_scale.float())
        self.scri_in_norm = bool(scri_in_norm)
        self.zero_points = tuple(int(z) for z in (zero_point if isinstance(zero_point, (list, tuple))
                                                  else [zero_point]))
        if len(self.zero_points) != self.act_scale.numel():
            raise QVDError(f"{self.act_scale.numel()} activation scales for {len(self.zero_points)} zero points")
        self.clock = TimestepClock()
        self.w_bits, self.a_bits = int(w_bits), int(a_bits)
        self.qmin, self.qmax = act_qrange(self.a_bits)
        self.mode = "int"
        self.compute = "int8"  # the file's own W8A8 semantics; the ComfyUI nodes default to "auto"
        self.clipping: list | None = None  # [clipped elements (a tensor once counted), elements, calls]: counting
        self._cache = {}

    def _bucket(self) -> int:
        return 0 if len(self.zero_points) == 1 else self.clock.bucket()

    @property
    def zero_point(self) -> int:
        """The zero point of the current timestep bucket."""
        return self.zero_points[self._bucket()]

    def act_scale_now(self, device) -> torch.Tensor:
        """The activation scale of the current timestep bucket (0-d) on ``device``."""
        return _to(self.act_scale[self._bucket()], device)

    def _cached(self, kind: str, device, deps, build, extra: tuple = ()):
        """``build()`` for ``device``, kept per (``kind``, device) while ``deps`` (tensors) and ``extra`` are unchanged;
        kept only where the stored codes are (a call on another device, e.g. an offloaded or streamed layer's, builds
        it again); the cache empties when the layer moves (``moved``)."""
        device = torch.device(device)
        key = extra + tuple(k for t in deps for k in _key(t))
        hit = self._cache.get((kind, device))
        if hit is None or hit[0] != key:
            hit = (key, build())
            if device == self.weight.device:
                self._cache[(kind, device)] = hit
        return hit[1]

    def float_weight_bytes(self) -> int:
        """Bytes of the float weights this layer keeps (0 when none; see ``prepare``)."""
        return sum(v.numel() * v.element_size() for (kind, _), (_, v) in self._cache.items() if kind == "float_weight")

    @property
    def scri(self) -> ScriTransform | None:
        """The SCRI transform of this layer's input (done by the kernel, or by the preceding norm)."""
        return ScriTransform.stored(self.scri_shift, self.scri_inv_scale)

    def _weight_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(``W z``, ``s_x s_w zp sum_k W_q``), [N] fp32: the bias terms the stored codes determine, computed once per
        weight version on the layer's own device (an offloaded layer's call copies N floats, never recomputes them)."""
        home = self.weight.device

        def build():
            scri = self.scri
            wz = (torch.zeros(self.weight.shape[0], device=home) if scri is None
                  else scri.folded_bias(dequantize_weight(self.weight, self.weight_scale), None))
            rowsum = self.weight.flatten(1).sum(1, dtype=torch.int32).float()
            zp = torch.tensor(self.zero_points, dtype=torch.float32, device=home)[:, None]
            corr = self.act_scale.float()[:, None] * self.weight_scale * (zp * rowsum)  # [B, N]
            return wz.detach(), corr.detach()
        return self._cached("weight_terms", home, (self.weight, self.weight_scale, self.act_scale, self.scri_shift,
                                                   self.scri_inv_scale), build, self.zero_points)

    def _bias_of(self, bias: torch.Tensor | None, device, epilogue: bool) -> torch.Tensor:
        """``b + W z`` (the bias of the SCRI-transformed input; fake mode, weight-only after a SCRI norm) or, for
        the integer kernels, the epilogue biases ``b + W z - s_x s_w zp sum_k W_q`` (``[B, N]``: one per timestep
        bucket), for the float bias ``bias``."""
        wz, corr = (_to(t, device) for t in self._weight_terms())
        b = wz if bias is None else _to(bias, device).float() + wz
        return b - corr if epilogue else b

    def scri_bias(self, device=None) -> torch.Tensor:
        """``b + W z`` for the layer's bias (cached on the layer's device)."""
        return self._stored_bias(False, device)

    def epilogue_bias(self, device=None) -> torch.Tensor:
        """The integer kernels' epilogue bias for the layer's bias at the current timestep bucket (cached on the
        layer's device, all buckets' at once)."""
        return self._stored_bias(True, device)[self._bucket()]

    def _stored_bias(self, epilogue: bool, device) -> torch.Tensor:
        home = self.weight.device
        deps = (self.weight, self.weight_scale, self._bias(), self.act_scale, self.scri_shift, self.scri_inv_scale)
        b = self._cached("epilogue_bias" if epilogue else "scri_bias", home, deps,
                         lambda: self._bias_of(self._bias(), home, epilogue), self.zero_points)
        return _to(b, home if device is None else device)

    def packed_weight(self, weight: torch.Tensor) -> kernels.PackedWeight:
        """The codes ``weight`` (the stored ones, on the call's device) in the kernels' K-major layout: kept as this
        layer's state on its own device; for an offloaded layer's call, views of the copied codes."""
        return self._cached("packed_weight", weight.device, (self.weight, self.weight_scale),
                            lambda: kernels.PackedWeight(weight, _to(self.weight_scale, weight.device)))

    def _operands(self, device, epilogue: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 codes, bias) for this call: the epilogue bias (integer kernels) or the SCRI bias (fake mode);
        from the cache unless the host's queued bias patches apply now."""
        w, b, patched = self._call_weights(device)
        if patched:
            b = self._bias_of(b, device, epilogue)
            return w, b[self._bucket()] if epilogue else b
        return w, self.epilogue_bias(device) if epilogue else self.scri_bias(device)

    def _delta_offset(self, device) -> torch.Tensor | None:
        """``z / s``: what the delta adds to a norm-transformed input ``(x - z) / s`` to read ``x / s``."""
        if not self.scri_in_norm or self.scri_shift is None:
            return None
        scri = self.scri
        return (scri.shift / scri.scale).to(device)

    def _kernel_scri(self, device):
        if self.scri_shift is None or self.scri_in_norm:
            return None, None
        return self.scri_shift.to(device), self.scri_inv_scale.to(device)

    def _float_operands(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(float weight, bias) of the weight-only route, in ``dtype``. With SCRI in the kernel the layer reads its
        own input (``W = dequant / s``, its own bias); after a SCRI norm it reads ``(x - z) / s`` (bias ``b + W z``).
        On the CPU the float weight is kept (dequantizing a large weight per call costs more than the float op
        there); elsewhere it is made per call (device memory bandwidth makes that cheap; int8 memory is kept)."""
        in_norm = self.scri_in_norm and self.scri_shift is not None
        if in_norm:
            w, b = self._operands(device, epilogue=False)
        else:
            w, b, _ = self._call_weights(device)
        col = None if in_norm or self.scri_inv_scale is None else self.scri_inv_scale.to(device)
        build = lambda: kernels.dequantize(w, self.weight_scale.to(device), col, dtype)
        if device.type == "cpu":
            wf = self._cached("float_weight", device, (self.weight, self.weight_scale, self.scri_inv_scale), build,
                              (dtype,))
        else:
            wf = build()
        return wf, None if b is None else b.to(dtype)

    def prepare(self, device: torch.device, dtype: torch.dtype) -> int:
        """Make at load time what this layer's route keeps on ``device``: on a CPU where the route is weight-only
        without timing (``kernels.fixed_route``), its float weight in ``dtype``. Returns the bytes kept."""
        if self.mode == "int" and device.type == "cpu" and kernels.fixed_route(self.compute, device) == "weight-only":
            self._float_operands(device, dtype)
        return self.float_weight_bytes()

    def drop_float_weight(self) -> None:
        """Free the weight-only route's kept float weight (``auto`` chose the integer kernels)."""
        for k in [k for k in self._cache if k[0] == "float_weight"]:
            del self._cache[k]

    def _route(self, x: torch.Tensor, channel_dim: int, int8_fn, float_fn) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():  # the integer kernels have no gradient
            raise QVDError(f"{type(self).__name__} got an input that needs a gradient: QVD's quantized layers run "
                           "inference only. Call the model under torch.no_grad() or torch.inference_mode() (ComfyUI "
                           "and diffusers pipelines do).")
        key = (type(self).__name__, tuple(x.shape), x.stride(), tuple(self.weight.shape), getattr(self, "stride", None),
               getattr(self, "padding", None), self.scri_shift is not None and not self.scri_in_norm, x.dtype)
        y, route = kernels.run_route(self.compute, key, x.device, int8_fn, float_fn)
        if route == "int8":
            self.drop_float_weight()
            self._count_clipping(x, channel_dim)
        return y

    def count_clipping(self, on: bool) -> tuple[float, int] | None:
        """Start counting how much of this layer's input its static activation range clips (``on``), or stop and
        return (clipped share, elements checked) since the start (None if nothing was checked). Every
        ``CLIP_CHECK_EVERY``-th call of the integer route is checked, on a strided view of its input
        (``_strided_sample``); the counts stay on the device until read."""
        counted, self.clipping = self.clipping, ([0, 0, 0] if on else None)
        if on or counted is None or not counted[1]:
            return None
        return float(counted[0]) / counted[1], counted[1]

    def _count_clipping(self, x: torch.Tensor, channel_dim: int) -> None:
        c = self.clipping
        if c is None:
            return
        c[2] += 1
        if (c[2] - 1) % CLIP_CHECK_EVERY:
            return
        shift, inv = self._kernel_scri(x.device)
        view = [1] * x.dim()
        view[channel_dim] = -1
        v = _strided_sample(x.detach(), channel_dim % x.dim()).float()
        if shift is not None:
            v = (v - shift.float().view(view)) * inv.float().view(view)
        v = v / self.act_scale_now(x.device).float() + self.zero_point
        c[0] = c[0] + ((v < self.qmin - 0.5) | (v > self.qmax + 0.5)).sum()  # on the device: no sync per call
        c[1] += v.numel()

    def _fake_input(self, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
        shift, inv = self._kernel_scri(x.device)
        scale = self.act_scale_now(x.device)
        q = kernels.reference.quantize_activation(x, scale, self.zero_point, self.qmin, self.qmax, shift, inv,
                                                  channel_dim)
        return (q.float() - self.zero_point) * scale.float()

    def _fake_forward(self, x: torch.Tensor, op) -> torch.Tensor:
        """Simulated rounding in float: the same codes, then a float op with the dequantized weight."""
        w, fold = self._operands(x.device, epilogue=False)
        return op(dequantize_weight(w, self.weight_scale.to(x.device)), fold).to(x.dtype)

    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **_) -> torch.Tensor:
        """The float weight the codes ``weight`` stand for, in the layer's own (pre-SCRI) input domain."""
        w = dequantize_weight(weight, self.weight_scale.to(weight.device))
        return w if self.scri is None else self.scri.unfold_weight(w)

    def _for_input(self, delta: WeightDelta) -> WeightDelta:
        """Where the preceding norm does the SCRI transform, the delta is folded so that it still adds ``dW x``
        for the norm's real output ``x`` (with ``_delta_offset`` at each call)."""
        if self.scri_in_norm and self.scri_shift is not None:
            return delta.for_scri_input(self.scri)
        return delta

    def extra_repr(self) -> str:
        scri = "norm" if self.scri_in_norm else self.scri_shift is not None
        return (f"w_bits={self.w_bits}, a_bits={self.a_bits}, scri={scri}, timestep_buckets={len(self.zero_points)}, "
                f"mode={self.mode}, compute={self.compute}")


class QLinear(_QuantizedBase):
    def __init__(self, in_features: int, out_features: int, **kw):
        super().__init__(**kw)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x, dev = input, input.device
        delta = self._current_delta()
        if self.mode == "fake":
            y = self._fake_forward(x, lambda w, b: F.linear(self._fake_input(x, -1), w, b))
        else:
            y = self._route(x, -1, lambda: self._int8(x), lambda: self._weight_only(x))
        return y if delta is None else delta(x, y, offset=self._delta_offset(dev))

    def _int8(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device
        shift, inv = self._kernel_scri(dev)
        w, bias = self._operands(dev, epilogue=True)
        return kernels.linear_w8a8(x, self.packed_weight(w), bias, self.act_scale_now(dev), self.zero_point,
                                   self.qmin, self.qmax, shift, inv)

    def _weight_only(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, *self._float_operands(x.device, x.dtype))


class QConv2d(_QuantizedBase):
    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride: int, padding: int, **kw):
        super().__init__(**kw)
        # channels-last codes: the kernels' K-major [N, KH*KW*C] matrix is then a view, not a second copy
        self.weight = _param(self.weight.detach().contiguous(memory_format=torch.channels_last))
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = tuple(kernel_size), int(stride), int(padding)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x, dev = input, input.device
        delta = self._current_delta()
        if self.mode == "fake":
            xp = F.pad(x, (self.padding,) * 4) if self.padding else x
            y = self._fake_forward(x, lambda w, b: F.conv2d(self._fake_input(xp, 1), w, b, self.stride))
        else:
            y = self._route(x, 1, lambda: self._int8(x), lambda: self._weight_only(x))
        return y if delta is None else delta(x, y, self.stride, self.padding, self._delta_offset(dev))

    def _int8(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device
        shift, inv = self._kernel_scri(dev)
        w, bias = self._operands(dev, epilogue=True)
        return kernels.conv2d_w8a8(x, self.packed_weight(w), bias, self.act_scale_now(dev), self.zero_point,
                                   self.qmin, self.qmax, shift, inv, self.stride, self.padding, self.pad_codes(dev))

    def pad_codes(self, device=None) -> torch.Tensor | None:
        """What the zero padding reads: each input channel's code of 0.0 (``kernels.pad_codes``) at the current
        timestep bucket, made once per activation quantizer on the layer's device; None without padding."""
        if not self.padding:
            return None
        home = self.weight.device
        shift, inv = self._kernel_scri(home)
        codes = self._cached("pad_codes", home, (self.act_scale, self.scri_shift, self.scri_inv_scale),
                             lambda: torch.stack([kernels.pad_codes(self.in_channels, s, z, self.qmin, self.qmax, shift,
                                                                    inv, home)
                                                  for s, z in zip(self.act_scale, self.zero_points)]),
                             (self.scri_in_norm, self.zero_points))
        return _to(codes[self._bucket()], home if device is None else device)

    def _weight_only(self, x: torch.Tensor) -> torch.Tensor:
        w, bias = self._float_operands(x.device, x.dtype)
        return F.conv2d(x.contiguous(), w, bias, self.stride, self.padding)  # the float layer's own layout


class HiDiTQLinear(_HostHooks):
    """Time-projection Linear: HiDi-TQ activation codes (look-up table) x int8 per-channel weights."""

    qvd_quantized = True

    def __init__(self, in_features: int, out_features: int, weight_q, weight_scale, bias, levels, w_bits):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _param(weight_q.to(torch.int8))
        self.weight_scale = _param(weight_scale.float())
        self.bias = _param(None if bias is None else bias.float())
        self.levels = _param(levels.float())
        self.w_bits = int(w_bits)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x, dev = input, input.device
        delta = self._current_delta()
        w, b, _ = self._call_weights(dev)
        y = self.compute(x, self.levels.to(dev), w.float(), self.weight_scale.to(dev), b).to(x.dtype)
        return y if delta is None else delta(x, y)

    @staticmethod
    def compute(x: torch.Tensor, levels: torch.Tensor, weight_f: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        """The layer's output: HiDi-TQ codes of ``x`` decoded, times the weight codes ``weight_f`` (as fp32, made
        per call: a kept copy takes 4x the codes, 106 MiB more told for an SD1.5 UNet's time layers, measured, for
        about 20 ms of a 5 s CPU step; ``make gpu-check`` times both on a GPU), per-channel scaled."""
        xq = kernels.hiditq_decode(kernels.hiditq_encode(x, levels), levels)
        y = (xq @ weight_f.t()) * weight_scale
        return y if bias is None else y + bias

    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **_) -> torch.Tensor:
        """The float weight the codes ``weight`` stand for."""
        return weight.float() * self.weight_scale.to(weight.device)[:, None]

    def extra_repr(self) -> str:
        return f"w_bits={self.w_bits}, levels={self.levels.numel()}"


def make_resident(module: nn.Module, device) -> int:
    """Put a copy of ``module``'s own parameters on ``device`` in their place; the stored ones stay where they are as
    its home (``release`` gives them back: nothing is copied back, int8 codes never change). For a host that keeps a
    layer on an accelerator while its stored tensors stay in (pinned) host memory. Returns the bytes held on
    ``device``."""
    device = torch.device(device)
    home = module.__dict__.setdefault("qvd_home", {})
    copied = False
    for name, p in module._parameters.items():
        if p is not None and p.device != device:
            home.setdefault(name, p)
            module._parameters[name] = nn.Parameter(p.detach().to(device, non_blocking=True), requires_grad=False)
            copied = True
    if copied:
        _moved(module, device)
    return resident_bytes(module)


def release(module: nn.Module) -> int:
    """Give ``module`` back its stored parameters (undo ``make_resident``); returns the bytes freed on the device."""
    home = module.__dict__.pop("qvd_home", {})
    freed = resident_bytes(module, home)
    for name, p in home.items():
        module._parameters[name] = p
    if home:
        _moved(module, next(iter(home.values())).device)
    return freed


def resident_bytes(module: nn.Module, home: dict | None = None) -> int:
    """Bytes of the device copies ``make_resident`` put in ``module`` (0 when it holds its stored tensors; a copy a
    host moved back to the stored tensors' device counts as none)."""
    home = module.__dict__.get("qvd_home", {}) if home is None else home
    return sum(p.numel() * p.element_size() for n, p in module._parameters.items()
               if n in home and p is not None and p.device != home[n].device)


def _moved(module: nn.Module, device: torch.device) -> None:
    if isinstance(module, _HostHooks):
        module.moved(lambda t: t.to(device))


def kept_float_bytes(modules) -> int:
    """Bytes of float weights the weight-only route keeps over ``modules`` (``float_weight_bytes``)."""
    return sum(m.float_weight_bytes() for m in modules if isinstance(m, _QuantizedBase))


def set_compute(tree: nn.Module, compute: str) -> None:
    """Compute route of every W8A8 layer under ``tree``: ``auto`` (the faster of the two, measured per layer shape
    and device at first use), ``int8`` (the W8A8 integer kernels) or ``weight-only`` (codes dequantized into the
    activation dtype, float op on the unquantized input; see ``qvd.kernels``)."""
    if compute not in kernels.COMPUTE:
        raise ValueError(f"compute={compute!r}: use one of {kernels.COMPUTE}")
    for m in tree.modules():
        if isinstance(m, (QLinear, QConv2d)):
            m.compute = compute


def set_mode(tree: nn.Module, mode: str) -> None:
    """Run every W8A8 layer under ``tree`` with real integer kernels ("int") or fake-quant ("fake").

    ``HiDiTQLinear`` has one path: its look-up-table decode is already exact."""
    if mode not in ("int", "fake"):
        raise ValueError(f"mode={mode!r}: use 'int' or 'fake'")
    for m in tree.modules():
        if isinstance(m, (QLinear, QConv2d)):
            m.mode = mode
