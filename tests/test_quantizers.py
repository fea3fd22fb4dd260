"""Uniform weight / activation quantizers and the config's validation."""
import pytest
import torch

from qvd import QVDConfig, QVDError
from qvd.quantizers import activation_qparams, dequantize_weight, fake_quant, quantize_weight


def test_weight_codes_are_symmetric_per_output_channel():
    w = torch.randn(16, 8, 3, 3) * torch.logspace(-2, 1, 16).view(-1, 1, 1, 1)
    q, s = quantize_weight(w, 8)
    assert q.dtype == torch.int8 and q.shape == w.shape and s.shape == (16,)
    assert int(q.abs().amax()) == 127 and int(q.min()) >= -127
    # each channel uses its own scale: relative error is the same small level for tiny and huge channels
    err = (dequantize_weight(q, s) - w).flatten(1).norm(dim=1) / w.flatten(1).norm(dim=1)
    assert float(err.max()) < 0.01


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_mse_weight_clip_never_worse_than_minmax(bits):
    w = torch.randn(32, 256)
    w[:, 0] *= 20  # an outlier column stretches min-max ranges
    e = {c: float((dequantize_weight(*quantize_weight(w, bits, c)) - w).pow(2).sum()) for c in ("minmax", "mse")}
    assert e["mse"] <= e["minmax"]
    q, _ = quantize_weight(w, bits, "mse")
    assert int(q.abs().amax()) <= 2 ** (bits - 1) - 1


def test_activation_ranges_and_zero_point():
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(0)).abs() * 3 - 0.2  # asymmetric, long tail
    lo, hi = float(x.min()), float(x.max())
    s, zp = activation_qparams(x, 8, "minmax", lo, hi)
    assert fake_quant(torch.tensor([0.0]), s, zp, 8).item() == 0.0  # zero is exact
    assert abs(fake_quant(torch.tensor([hi]), s, zp, 8).item() - hi) <= s
    errs = {m: float((fake_quant(x, *activation_qparams(x, 8, m, lo, hi), 8) - x).pow(2).mean())
            for m in ("minmax", "percentile", "mse")}
    assert errs["mse"] <= errs["minmax"]


def test_config_rejects_unsupported_settings():
    with pytest.raises(QVDError, match="w_bits"):
        QVDConfig(w_bits=3)
    with pytest.raises(QVDError, match="a_bits"):
        QVDConfig(a_bits=4)
    with pytest.raises(QVDError, match="act_range"):
        QVDConfig(act_range="max")
    cfg = QVDConfig(w_bits=4, a_bits=6, skip=["conv_out"])
    assert QVDConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.layer_bits("conv_in") == (8, 8) and cfg.layer_bits("down_blocks.0.resnets.0.conv1") == (4, 6)
    assert cfg.is_temporal("up_blocks.1.resnets.0.time_emb_proj") and cfg.is_temporal("input_blocks.1.0.emb_layers.1")
