"""Weight patches beside the int8 kernels: ``y = W8A8(x) + up(down(x)) + D x``.

A quantized layer's int8 codes never change after quantization. A weight patch from a host (a LoRA) is held
as a ``WeightDelta`` and added to the kernel's output in the activation dtype:

- low rank: ``down`` [R, K, *kernel] and ``up`` [N, R] (scales folded into ``up``; several LoRAs are stacked
  along R), run as two small GEMMs (convs: ``down`` as the layer's own k x k conv with R channels, ``up`` as a
  1x1 conv). Cost ``R (K + N)`` per output position against ``K N`` for the layer.
- dense: ``D`` [N, K, *kernel], the exact difference of a patched weight (adapters with no low-rank form).

``for_scri_input`` folds a SCRI transform the layer's input already carries (``x' = (x - z) / s``, done by
the preceding norm) into the delta: ``dW x = (dW s) (x' + z / s)``, so the branch still adds exactly ``dW x``
and holds no more than the patch itself (the constant part is computed per call from the layer's own z, s).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .scri import ScriTransform


@dataclass
class WeightDelta:
    """What host weight patches add to one layer (see module docstring). ``source`` identifies the host patches it
    was built from (the host's own objects, compared by identity)."""
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    source: tuple = ()

    @property
    def device(self) -> torch.device:
        return (self.up if self.up is not None else self.dense).device

    @property
    def dtype(self) -> torch.dtype:
        return (self.up if self.up is not None else self.dense).dtype

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.down, self.up, self.dense) if t is not None)

    def same_source(self, source: tuple) -> bool:
        return len(source) == len(self.source) and all(a is b for a, b in zip(source, self.source))

    def for_scri_input(self, scri: ScriTransform) -> "WeightDelta":
        """The same delta for a Linear / 1x1 conv whose input is ``x' = (x - z) / s``: ``dW x = (dW s)
        (x' + z / s)``, so ``down`` and ``dense`` are folded like the layer's weight; the caller passes ``z / s``
        as the call's ``offset``."""
        if self.down is not None and self.down.shape[2:].numel() != 1:  # a k x k kernel (rank 0 too)
            raise ValueError("a SCRI input transform folds only into Linear / 1x1-conv deltas")
        scaled = lambda t: None if t is None else scri.fold_weight(t).to(t.dtype)
        return WeightDelta(scaled(self.down), self.up, scaled(self.dense), self.source)

    def to(self, device) -> "WeightDelta":
        return self.map(lambda t: t.to(device))

    def map(self, fn) -> "WeightDelta":
        """The same delta with ``fn`` applied to each of its tensors (a host moving or casting the layer)."""
        move = lambda t: None if t is None else fn(t)
        return WeightDelta(move(self.down), move(self.up), move(self.dense), self.source)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, stride: int | None = None, padding: int = 0,
                 offset: torch.Tensor | None = None) -> torch.Tensor:
        """``y`` plus the delta's output for input ``x + offset`` (``stride`` set: a conv with that stride and
        padding; ``offset``: one value per input channel, its part computed once and broadcast)."""
        y = y + self._apply(x, stride, padding)
        if offset is not None:
            point = offset.to(x.dtype).view(1, -1) if stride is None else offset.to(x.dtype).view(1, -1, 1, 1)
            y = y + self._apply(point, stride, 0)
        return y

    def _apply(self, x: torch.Tensor, stride: int | None, padding: int) -> torch.Tensor:
        cast = lambda t: t.to(device=x.device, dtype=x.dtype)
        out = 0
        if self.down is not None and self.down.shape[0]:  # rank 0 adds nothing (a conv with 0 channels would fail)
            if stride is None:
                out = F.linear(F.linear(x, cast(self.down)), cast(self.up))
            else:
                out = F.conv2d(F.conv2d(x, cast(self.down), None, stride, padding), cast(self.up)[:, :, None, None])
        if self.dense is not None:
            out = out + (F.linear(x, cast(self.dense)) if stride is None
                         else F.conv2d(x, cast(self.dense), None, stride, padding))
        return out
