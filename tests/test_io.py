"""The file formats: bit-exact round trips, and every damaged or edited file refused by name before use.

The named cases are the reproducers of the mutation run that found the old loader's holes (issue 13); the
seeded fuzz over both file kinds is test_file_fuzz.py."""
import copy
import json
import os
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qvd import (CalibrationFileError, ModelMismatchError, QuantizedFileError, QVDError, load_calibration,
                 load_quantized, save_calibration, save_quantized)
from qvd.io import CALIBRATION_KEY, KEY

import file_mutations as fm
from unet_fixtures import build_unet


@pytest.fixture(scope="module")
def saved(unet, quantized, tmp_path_factory):
    path = tmp_path_factory.mktemp("qvd") / "model.safetensors"
    save_quantized(path, quantized[1])
    return path


@pytest.fixture(scope="module")
def saved_calibration(calibration, tmp_path_factory):
    path = tmp_path_factory.mktemp("qvd") / "model.calibration.safetensors"
    save_calibration(path, calibration)
    return path


def _edited(saved, tmp_path, edit_meta=None, edit_tensors=None, name="edited.safetensors", key=KEY):
    path = tmp_path / name
    fm.resign(saved, path, key, edit_meta, edit_tensors)
    return path


def _first(meta, kind):
    return next(n for n, info in sorted(meta["layers"].items()) if info["kind"] == kind)


def _refused(path, model, match, error=QuantizedFileError):
    with pytest.raises(error, match=match) as e:
        load_quantized(path, model)
    assert str(path) in str(e.value) or os.path.basename(path) in str(e.value)
    return str(e.value)


def test_round_trip_is_bit_exact(unet, inputs, quantized, saved):
    fresh = copy.deepcopy(unet)
    res = load_quantized(saved, fresh)
    assert set(res.modules) == set(quantized[1].modules)
    for t in (999, 50):
        assert torch.equal(inputs.run(fresh, t), inputs.run(quantized[0], t))


def test_never_overwrites_and_is_readable_like_other_model_files(unet, quantized, saved, tmp_path):
    before = saved.read_bytes()
    with pytest.raises(FileExistsError, match="choose another file name"):
        save_quantized(saved, quantized[1])
    assert saved.read_bytes() == before
    old = os.umask(0o022)
    try:
        save_quantized(tmp_path / "shared.safetensors", quantized[1])
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "shared.safetensors").st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.safetensors"]  # no temp file left


def test_saving_works_where_the_file_system_has_no_hard_links(unet, inputs, quantized, tmp_path, monkeypatch):
    def no_link(*_):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_link)
    save_quantized(tmp_path / "fat.safetensors", quantized[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fat.safetensors"]
    fresh = copy.deepcopy(unet)
    load_quantized(tmp_path / "fat.safetensors", fresh)
    assert torch.equal(inputs.run(fresh, 999), inputs.run(quantized[0], 999))
    with pytest.raises(FileExistsError):
        save_quantized(tmp_path / "fat.safetensors", quantized[1])


def test_a_name_too_long_is_refused_before_anything_is_written(unet, quantized, calibration, tmp_path):
    for save, obj in ((save_quantized, quantized[1]), (save_calibration, calibration)):
        with pytest.raises(QVDError, match="at most 255 bytes"):
            save(tmp_path / ("x" * 10_000 + ".safetensors"), obj)
    assert list(tmp_path.iterdir()) == []


def test_a_result_without_quantized_layers_is_not_saved(unet, quantized, tmp_path):
    from qvd import QuantizeResult
    empty = QuantizeResult({}, [], quantized[1].config, {})
    with pytest.raises(QVDError, match="no quantized layer"):
        save_quantized(tmp_path / "empty.safetensors", empty)
    assert list(tmp_path.iterdir()) == []


def test_truncated_and_corrupt_files(unet, saved, tmp_path):
    raw = saved.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(raw[: len(raw) // 2])
    _refused(tmp_path / "t.safetensors", copy.deepcopy(unet), "truncated or corrupt")
    flipped = bytearray(raw)
    flipped[-50] ^= 0x55
    (tmp_path / "c.safetensors").write_bytes(bytes(flipped))
    _refused(tmp_path / "c.safetensors", copy.deepcopy(unet), "checksum")
    _refused(tmp_path / "missing.safetensors", copy.deepcopy(unet), "does not exist")


def test_a_header_length_beyond_the_file_is_refused_without_allocating_it(unet, saved, tmp_path):
    raw = bytearray(saved.read_bytes())
    raw[:8] = (2 ** 62).to_bytes(8, "little")
    (tmp_path / "h.safetensors").write_bytes(bytes(raw))
    _refused(tmp_path / "h.safetensors", unet, "header length field")


def test_metadata_edits_without_a_new_checksum_are_refused(unet, saved, tmp_path):
    """The checksum covers the metadata: a zero point +1 or a_bits 8 -> 4 edited in place is caught."""
    tensors, meta = fm.read(saved, KEY)
    with safe_open(str(saved), "pt") as f:
        stored = f.metadata()[KEY + "_sha256"]
    name = _first(meta, "conv")
    for field, value in (("zero_point", meta["layers"][name]["zero_point"] + 1), ("a_bits", 4)):
        edited = copy.deepcopy(meta)
        edited["layers"][name][field] = value
        save_file(tensors, str(tmp_path / "z.safetensors"), metadata={KEY: json.dumps(edited), KEY + "_sha256": stored})
        _refused(tmp_path / "z.safetensors", unet, "checksum")


def test_stride_zero_is_refused_not_a_crash(unet, saved, tmp_path):
    """Found by the mutation run: stride 0 loaded, then oneDNN's int8 conv died with SIGFPE."""
    def edit(meta):
        meta["layers"][_first(meta, "conv")]["stride"] = 0
    _refused(_edited(saved, tmp_path, edit), unet, r"stride is 0, expected an integer in \[1, ")


@pytest.mark.parametrize("padding", [3000, 10 ** 9, 1e9, -1])
def test_padding_beyond_the_kernel_is_refused(unet, saved, tmp_path, padding):
    def edit(meta):
        meta["layers"][_first(meta, "conv")]["padding"] = padding
    _refused(_edited(saved, tmp_path, edit), unet, "padding")


def test_stride_or_padding_other_than_the_models_is_refused(unet, saved, tmp_path):
    def edit(meta):
        name = next(n for n, i in sorted(meta["layers"].items()) if i["kind"] == "conv" and i["kernel"] == [3, 3]
                    and i["padding"] == 1 and i["stride"] == 1)
        meta["layers"][name]["padding"] = 2
    _refused(_edited(saved, tmp_path, edit), unet, "stride 1 and padding 2 in the file", ModelMismatchError)


def test_zero_point_and_bits_are_checked_against_their_ranges_and_the_config(unet, saved, tmp_path):
    def zp(meta):
        meta["layers"][_first(meta, "linear")]["zero_point"] = 128
    _refused(_edited(saved, tmp_path, zp), unet, r"zero_point is 128, expected an integer in \[-128, 127\]")

    def bits(meta):
        meta["layers"][_first(meta, "linear")]["a_bits"] = 4
    _refused(_edited(saved, tmp_path, bits), unet, r"a_bits is 4, expected an integer in \[8, 8\]")


def test_an_empty_layers_map_is_refused(unet, saved, tmp_path):
    """Found by the mutation run: with no layers the SCRI-folded norms were installed alone (18 % off)."""
    _refused(_edited(saved, tmp_path, lambda m: m.update(layers={})), unet, "the layers map")


def test_a_bias_relabelled_int32_is_refused(unet, saved, tmp_path):
    tensors, meta = fm.read(saved, KEY)
    key = next(k for k in sorted(tensors) if k.endswith(".bias") and k[:-5] in meta["layers"])

    def edit(ts):
        ts[key] = ts[key].view(torch.int32)
    _refused(_edited(saved, tmp_path, edit_tensors=edit), unet, rf"tensor '{key}' is I32 \[\d+\], expected F32")


@pytest.mark.parametrize("recorded", [None, float("nan"), 1e308])
def test_the_file_cannot_switch_off_the_weight_check(saved, tmp_path, recorded):
    """The recorded weight error is informational: the check against the model's weights uses none of it."""
    def edit(meta):
        for r in meta["report"]:
            if "w_rel_err" in r:
                r["w_rel_err"] = recorded
    path = _edited(saved, tmp_path, edit)
    _refused(path, build_unet(seed=7), "different checkpoint", ModelMismatchError)


@pytest.mark.parametrize("value", [None, [], "x", float("nan"), 2 ** 80])
def test_metadata_of_the_wrong_type_is_refused(unet, saved, tmp_path, value):
    for edit in (lambda m: m.update(layers=value), lambda m: m.update(config=value),
                 lambda m: m["layers"][_first(m, "conv")].update(kernel=value)):
        _refused(_edited(saved, tmp_path, edit), unet, "expected")
    tensors, _ = fm.read(saved, KEY)
    fm.write_text(tmp_path / "whole.safetensors", tensors, KEY, json.dumps(value))
    _refused(tmp_path / "whole.safetensors", unet, "metadata")


def test_a_missing_field_is_named(unet, saved, tmp_path):
    def edit(meta):
        del meta["layers"][_first(meta, "conv")]["kernel"]
    _refused(_edited(saved, tmp_path, edit), unet, r"\.kernel is missing, expected present")
    _refused(_edited(saved, tmp_path, lambda m: m.pop("layers")), unet, "layers is missing")


def test_deeply_nested_metadata_is_refused(unet, saved, tmp_path):
    tensors, _ = fm.read(saved, KEY)
    fm.write_text(tmp_path / "deep.safetensors", tensors, KEY, "[" * 100_000 + "]" * 100_000)
    _refused(tmp_path / "deep.safetensors", unet, "not valid JSON")


def test_format_version_is_compared_with_its_type(unet, saved, tmp_path):
    msg = _refused(_edited(saved, tmp_path, lambda m: m.update(format_version="2")), unet, "format version '2'")
    assert "reads version 2" in msg
    _refused(_edited(saved, tmp_path, lambda m: m.update(format_version=99)), unet, "format version 99")


def test_a_file_of_the_first_format_is_refused_with_the_fix(unet, saved, tmp_path):
    """Version 1 files had no checksum over shapes and metadata: they cannot be verified."""
    tensors, meta = fm.read(saved, KEY)
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata={KEY: json.dumps({**meta, "format_version": 1})})
    msg = _refused(tmp_path / "v1.safetensors", unet, "no checksum")
    assert "format version 1" in msg and "make it again" in msg


def test_foreign_files_are_refused(unet, tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    _refused(tmp_path / "plain.safetensors", unet, "not a QVD quantized model file")


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


# ---- calibration files

def test_calibration_data_flip_is_refused(saved_calibration, tmp_path):
    raw = bytearray(saved_calibration.read_bytes())
    raw[-10] ^= 0x01
    (tmp_path / "flip.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CalibrationFileError, match="flip.safetensors: its checksum does not match"):
        load_calibration(tmp_path / "flip.safetensors")


def test_calibration_nan_is_refused_naming_the_layer(saved_calibration, tmp_path):
    tensors, _ = fm.read(saved_calibration, CALIBRATION_KEY)
    key = sorted(k for k in tensors if k.endswith("::ch_max"))[0]

    def edit(ts):
        ts[key][0] = float("nan")
    path = _edited(saved_calibration, tmp_path, edit_tensors=edit, key=CALIBRATION_KEY)
    with pytest.raises(CalibrationFileError, match=f"tensor '{key}' is a tensor with NaN"):
        load_calibration(path)


def test_calibration_missing_fields_are_named(saved_calibration, tmp_path):
    def edit(meta):
        del meta["layers"][sorted(meta["layers"])[0]]["calls"]
    path = _edited(saved_calibration, tmp_path, edit, key=CALIBRATION_KEY)
    with pytest.raises(CalibrationFileError, match=r"\.calls is missing"):
        load_calibration(path)
    path = _edited(saved_calibration, tmp_path, lambda m: m.pop("norm_groups"), key=CALIBRATION_KEY)
    with pytest.raises(CalibrationFileError, match="norm_groups is missing"):
        load_calibration(path)


def test_calibration_rows_of_another_width_are_refused(saved_calibration, tmp_path):
    tensors, _ = fm.read(saved_calibration, CALIBRATION_KEY)
    key = sorted(k for k in tensors if k.endswith("::rows"))[0]

    def edit(ts):
        ts[key] = ts[key][:, :-1].contiguous()
    path = _edited(saved_calibration, tmp_path, edit_tensors=edit, key=CALIBRATION_KEY)
    with pytest.raises(CalibrationFileError, match=f"tensor '{key}'"):
        load_calibration(path)


def test_a_quantized_file_is_not_a_calibration(saved):
    with pytest.raises(CalibrationFileError, match="not a QVD calibration file"):
        load_calibration(saved)
