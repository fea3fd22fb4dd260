"""Weight patches beside the int8 kernels: ``y = W8A8(x) + up(down(x)) + D x + c``.

A quantized layer's int8 codes never change after quantization. A weight patch from a host (a LoRA) is held
as a ``WeightDelta`` and added to the kernel's output in the activation dtype:

- low rank: ``down`` [R, K, *kernel] and ``up`` [N, R] (scales folded into ``up``; several LoRAs are stacked
  along R), run as two small GEMMs (convs: ``down`` as the layer's own k x k conv with R channels, ``up`` as a
  1x1 conv). Cost ``R (K + N)`` per output position against ``K N`` for the layer.
- dense: ``D`` [N, K, *kernel], the exact difference of a patched weight (adapters with no low-rank form).

``for_scri_input`` folds a SCRI transform the layer's input already carries (``x' = (x - z) / s``, done by
the preceding norm) into the delta: ``dW x = (dW s) x' + dW z``, so the branch still adds exactly ``dW x``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class WeightDelta:
    """What host weight patches add to one layer (see module docstring). ``source`` identifies the host patches it
    was built from (the host's own objects, compared by identity); ``owner`` the host model that set it."""
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    source: tuple = ()
    owner: object = None

    @property
    def rank(self) -> int:
        return 0 if self.down is None else self.down.shape[0]

    @property
    def device(self) -> torch.device:
        return next(t for t in (self.up, self.dense, self.bias) if t is not None).device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.down, self.up, self.dense, self.bias) if t is not None)

    def same_source(self, source: tuple) -> bool:
        return len(source) == len(self.source) and all(a is b for a, b in zip(source, self.source))

    def for_scri_input(self, shift: torch.Tensor, inv_scale: torch.Tensor) -> "WeightDelta":
        """The same delta for a layer whose input is ``(x - shift) * inv_scale`` (a 1x1 conv or a Linear)."""
        s = 1.0 / inv_scale.float()
        down = dense = None
        bias = torch.zeros(self.up.shape[0] if self.up is not None else self.dense.shape[0], device=self.device)
        if self.down is not None:
            if self.down[0, 0].numel() != 1:
                raise ValueError("a SCRI input transform folds only into Linear / 1x1-conv deltas")
            d = self.down.float()
            down = (d * _per_input(s, d)).to(self.down.dtype)
            bias = bias + self.up.float() @ (d.flatten(1) @ shift.float())
        if self.dense is not None:
            d = self.dense.float()
            dense = (d * _per_input(s, d)).to(self.dense.dtype)
            bias = bias + d.flatten(1) @ shift.float()
        if self.bias is not None:
            bias = bias + self.bias.float()
        return WeightDelta(down, self.up, dense, bias, self.source, self.owner)

    def to(self, device) -> "WeightDelta":
        move = lambda t: None if t is None else t.to(device)
        return WeightDelta(move(self.down), move(self.up), move(self.dense), move(self.bias), self.source, self.owner)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, stride: int | None = None, padding: int = 0) -> torch.Tensor:
        """``y`` plus the delta's output for input ``x`` (``stride`` set: a conv with that stride and padding)."""
        cast = lambda t: t.to(device=x.device, dtype=x.dtype)
        if self.down is not None:
            if stride is None:
                y = y + F.linear(F.linear(x, cast(self.down)), cast(self.up))
            else:
                h = F.conv2d(x, cast(self.down), None, stride, padding)
                y = y + F.conv2d(h, cast(self.up)[:, :, None, None])
        if self.dense is not None:
            y = y + (F.linear(x, cast(self.dense)) if stride is None
                     else F.conv2d(x, cast(self.dense), None, stride, padding))
        if self.bias is not None:
            b = cast(self.bias)
            y = y + (b if stride is None else b.view(-1, 1, 1))
        return y


def _per_input(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return s.to(t.device).view(1, -1, *([1] * (t.dim() - 2)))
