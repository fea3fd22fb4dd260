"""``qvd.delta.WeightDelta`` with a rank-0 low-rank part (factors of an all-zero difference): it adds nothing, on a
Linear and a 3x3 conv with stride and padding, with SCRI in the kernel and done by the preceding norm (where the delta
is folded into the norm's transformed input), alone or beside a dense part."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qvd import QConv2d, QLinear
from qvd.delta import WeightDelta


def _layer(kind: str, scri: str | None, g: torch.Generator):
    n, c, kernel = (96, 64, ()) if kind == "linear" else (48, 32, (3, 3) if kind == "conv3x3" else (1, 1))
    kw = dict(weight_q=torch.randint(-127, 128, (n, c, *kernel), generator=g, dtype=torch.int8),
              weight_scale=torch.rand(n, generator=g) * 0.01 + 0.002, bias=torch.randn(n, generator=g),
              act_scale=0.05, zero_point=3, w_bits=8, a_bits=8)
    if scri:
        kw.update(scri_shift=torch.randn(c, generator=g), scri_inv_scale=torch.rand(c, generator=g) + 0.5,
                  scri_in_norm=scri == "norm")
    if kind == "linear":
        return QLinear(c, n, **kw), torch.randn(6, c, generator=g)
    if kind == "conv3x3":
        return QConv2d(c, n, kernel, 2, 1, **kw), torch.randn(2, c, 9, 9, generator=g)
    return QConv2d(c, n, kernel, 1, 0, **kw), torch.randn(2, c, 5, 5, generator=g)


@pytest.mark.parametrize("kind, scri", [("linear", None), ("linear", "kernel"), ("linear", "norm"),
                                        ("conv3x3", None), ("conv3x3", "kernel"), ("conv1x1", "norm")])
@pytest.mark.parametrize("with_dense", [False, True])
def test_a_rank_zero_delta_adds_nothing(kind, scri, with_dense):
    g = torch.Generator().manual_seed(0)
    layer, x = _layer(kind, scri, g)
    seen = x
    if layer.scri_in_norm:  # the layer is given the norm's transformed output
        view = (-1,) if x.dim() == 2 else (-1, 1, 1)
        seen = (x - layer.scri_shift.view(view)) * layer.scri_inv_scale.view(view)
    shape = tuple(layer.weight.shape)
    dense = torch.randn(shape, generator=g) * 0.01 if with_dense else None
    with torch.inference_mode():
        base = layer(seen)
        layer.set_delta(WeightDelta(torch.zeros(0, *shape[1:]), torch.zeros(shape[0], 0), dense))
        out = layer(seen)
    if dense is None:
        assert torch.equal(out, base)
    else:
        want = F.linear(x, dense) if x.dim() == 2 else F.conv2d(x, dense, None, layer.stride, layer.padding)
        assert float(((out - base) - want).norm() / want.norm()) < 1e-5
