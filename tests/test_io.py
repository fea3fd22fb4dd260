"""The quantized file format: bit-exact round trip, and every bad file refused with a clear error."""
import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qvd import ModelMismatchError, QuantizedFileError, load_quantized, save_quantized

from unet_fixtures import build_unet


@pytest.fixture(scope="module")
def saved(unet, quantized, tmp_path_factory):
    path = tmp_path_factory.mktemp("qvd") / "model.safetensors"
    save_quantized(path, unet, quantized[1])
    return path


def test_round_trip_is_bit_exact(unet, inputs, quantized, saved):
    fresh = copy.deepcopy(unet)
    res = load_quantized(saved, fresh)
    assert set(res.modules) == set(quantized[1].modules)
    for t in (999, 50):
        assert torch.equal(inputs.run(fresh, t), inputs.run(quantized[0], t))


def test_never_overwrites(unet, quantized, saved):
    before = saved.read_bytes()
    with pytest.raises(FileExistsError, match="choose another file name"):
        save_quantized(saved, unet, quantized[1])
    assert saved.read_bytes() == before


def test_truncated_and_corrupt_files(unet, saved, tmp_path):
    raw = saved.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(QuantizedFileError, match="truncated or corrupt"):
        load_quantized(tmp_path / "t.safetensors", copy.deepcopy(unet))
    flipped = bytearray(raw)
    flipped[-50] ^= 0x55
    (tmp_path / "c.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(QuantizedFileError, match="checksum"):
        load_quantized(tmp_path / "c.safetensors", copy.deepcopy(unet))
    with pytest.raises(QuantizedFileError, match="does not exist"):
        load_quantized(tmp_path / "missing.safetensors", copy.deepcopy(unet))


def _rewrite_header(src, dst, edit):
    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["qvd"])
    edit(meta)
    save_file(tensors, str(dst), metadata={"qvd": json.dumps(meta)})


def test_other_format_version_and_foreign_files(unet, saved, tmp_path):
    _rewrite_header(saved, tmp_path / "v.safetensors", lambda m: m.update(format_version=99))
    with pytest.raises(QuantizedFileError, match="version 99"):
        load_quantized(tmp_path / "v.safetensors", copy.deepcopy(unet))
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(QuantizedFileError, match="not a QVD quantized model"):
        load_quantized(tmp_path / "plain.safetensors", copy.deepcopy(unet))


def test_file_from_another_model_is_refused(unet, saved):
    with pytest.raises(ModelMismatchError, match="different checkpoint"):
        load_quantized(saved, build_unet(seed=7))  # same architecture, other weights
    from diffusers import UNetMotionModel
    other = UNetMotionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=48,
                            down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
                            up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), norm_num_groups=8,
                            num_attention_heads=2, motion_num_attention_heads=2)
    with pytest.raises(ModelMismatchError, match="different model"):
        load_quantized(saved, other)  # other shapes


def test_loading_onto_a_quantized_model_is_refused(quantized, saved):
    with pytest.raises(QuantizedFileError, match="already quantized"):
        load_quantized(saved, quantized[0])
