"""The file formats: bit-exact round trips, and every damaged or edited file refused by name before use.

The named cases are the reproducers of the mutation run that found the old loader's holes (issue 13); the
seeded fuzz over both file kinds is test_file_fuzz.py."""
import copy
import json
import os
import re
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
    for field, value in (("zero_point", [z + 1 for z in meta["layers"][name]["zero_point"]]), ("a_bits", 4)):
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
        meta["layers"][_first(meta, "linear")]["zero_point"][-1] = 128
    _refused(_edited(saved, tmp_path, zp), unet, r"zero_point\[\d\] is 128, expected an integer in \[-128, 127\]")

    def bits(meta):
        meta["layers"][_first(meta, "linear")]["a_bits"] = 4
    _refused(_edited(saved, tmp_path, bits), unet, r"w_bits / a_bits is 8 / 4, expected 8 / 8 \(the file's config")


def test_an_empty_layers_map_is_refused(unet, saved, tmp_path):
    """Found by the mutation run: with no layers the SCRI-folded norms were installed alone (18 % off)."""
    _refused(_edited(saved, tmp_path, lambda m: m.update(layers={})), unet, "the layers map")


def test_a_bias_relabelled_int32_is_refused(unet, saved, tmp_path):
    tensors, meta = fm.read(saved, KEY)
    key = next(k for k in sorted(tensors) if k.endswith(".bias") and k[:-5] in meta["layers"])

    def edit(ts):
        ts[key] = ts[key].view(torch.int32)
    _refused(_edited(saved, tmp_path, edit_tensors=edit), unet, rf"tensor '{key}' is I32 \[\d+\], expected F32")


@pytest.mark.parametrize("recorded, match, error", [(None, "different checkpoint", ModelMismatchError),
                                                    (1e308, "different checkpoint", ModelMismatchError),
                                                    (float("nan"), "w_rel_err is nan, expected a finite number",
                                                     QuantizedFileError)])
def test_the_file_cannot_switch_off_the_weight_check(saved, tmp_path, recorded, match, error):
    """The recorded weight error is informational: the check against the model's weights uses none of it."""
    def edit(meta):
        for r in meta["report"]:
            if "w_rel_err" in r:
                r["w_rel_err"] = recorded
    path = _edited(saved, tmp_path, edit)
    _refused(path, build_unet(seed=7), match, error)


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
    msg = _refused(_edited(saved, tmp_path, lambda m: m.update(format_version="3")), unet, "format version '3'")
    assert "reads versions 2 and 3" in msg
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


# ---- re-signed files: every value the model determines is recomputed from it (qvd/verify.py)

def _layer(meta, kind, scri=None, tensors=None):
    """The first layer of ``kind`` (with SCRI placement ``scri``; with a bias among ``tensors``)."""
    return next(n for n, i in sorted(meta["layers"].items())
                if i["kind"] == kind and (scri is None or i.get("scri", "").startswith(scri))
                and (tensors is None or f"{n}.bias" in tensors))


def _codes_edit(meta, tensors, count):
    """Edits ``count`` codes of the first linear layer well away from a rounding tie (+-9 inside the range)."""
    key = f"{_layer(meta, 'linear')}.weight"
    flat = tensors[key].reshape(-1)
    for j in range(count):
        i = (j * 7919) % flat.numel()
        flat[i] = int(flat[i]) - 9 if int(flat[i]) > 0 else int(flat[i]) + 9


def _scale_edit(factor, channel=None):
    def edit(meta, tensors):
        key = f"{_layer(meta, 'conv')}.weight_scale"
        if channel is None:
            tensors[key] *= factor
        else:
            tensors[key][channel] = factor
    return edit


def _one_code_up(meta, tensors):
    """+1 on one code of a 3x3 conv whose exact value is far from a tie (what a single-bit edit does)."""
    name = next(n for n, i in sorted(meta["layers"].items()) if i["kind"] == "conv" and i["kernel"] == [3, 3])
    codes = tensors[f"{name}.weight"].reshape(-1)
    i = int(((codes.abs() > 2) & (codes.abs() < 100)).nonzero()[3])
    codes[i] += 1


def _norm_group_shift(meta, tensors):
    """Every layer that reads one folded norm gets the same new SCRI shift (consistent, but not the norm's)."""
    norm = meta["layers"][_layer(meta, "linear", "norm:")]["scri"]
    for n, i in meta["layers"].items():
        if i.get("scri") == norm:
            tensors[f"{n}.scri_shift"] += 0.01


RESIGNED_MODEL_EDITS = {
    "two codes changed": (lambda m, t: _codes_edit(m, t, 2), "values of the int8 codes"),
    "one channel's weight_scale 1e-38": (_scale_edit(1e-38, channel=3), "weight_scale of output channel 3"),
    "weight_scale x1.01": (_scale_edit(1.01), "weight_scale of output channel 0"),
    "weight_scale x0.5": (_scale_edit(0.5), "weight_scale of output channel 0"),
    "one code +1": (_one_code_up, "1 of .* values of the int8 codes"),
    "a temporal layer's codes": (lambda m, t: t[f"{_layer(m, 'temporal')}.weight"].neg_(), "int8 codes"),
    "a layer's bias": (lambda m, t: t[f"{_layer(m, 'linear', tensors=t)}.bias"].add_(1e-3), "values of bias"),
    "a folded norm's weight": (lambda m, t: t[f"{sorted(m['norms'])[0]}.weight"].mul_(1.001), "the folded weight"),
    "a folded norm's bias": (lambda m, t: t[f"{sorted(m['norms'])[0]}.bias"].add_(1e-3), "the folded bias"),
    "the scri_shift of a norm-folded group": (_norm_group_shift, "the folded bias"),
    "the scri_shift of one layer of a group": (
        lambda m, t: t[f"{_layer(m, 'linear', 'norm:')}.scri_shift"].add_(0.01), "a SCRI transform other than"),
}


@pytest.mark.parametrize("case", sorted(RESIGNED_MODEL_EDITS))
def test_resigned_edits_of_what_the_model_determines_are_refused(unet, saved, tmp_path, case):
    """Issue 30's mutation run: each of these loaded as a different model when the checksum was renewed."""
    edit, match = RESIGNED_MODEL_EDITS[case]
    tensors, meta = fm.read(saved, KEY)
    tensors = {k: v.clone() for k, v in tensors.items()}
    edit(meta, tensors)
    path = tmp_path / "resigned.safetensors"
    fm.write_text(path, tensors, KEY, json.dumps(meta))
    msg = _refused(path, unet, match, ModelMismatchError)
    assert "layer " in msg and "expected" in msg


def test_zero_codes_with_a_huge_scale_and_a_scaled_bias_are_refused(unet, saved, tmp_path):
    """The old check compared the file's error on the file's own scales: huge scales made any codes look fine."""
    def edit(ts):
        name = next(k[:-7] for k in sorted(ts) if k.endswith(".weight") and ts[k].dtype == torch.int8
                    and ts[k].dim() == 2 and k[:-7] + ".bias" in ts)
        ts[f"{name}.weight"].zero_()
        ts[f"{name}.weight_scale"].fill_(1e3)
        ts[f"{name}.bias"].mul_(100)
    _refused(_edited(saved, tmp_path, edit_tensors=edit), unet, r"weight_scale of output channel 0 is 1000, expected",
             ModelMismatchError)


def _renorm(layer_from: str, norm_to: str):
    """A re-signed edit: the SCRI of layer ``layer_from``'s group is said to be folded into ``norm_to``."""
    def edit(meta, tensors):
        old = meta["layers"][layer_from]["scri"]
        for n, i in meta["layers"].items():
            if i.get("scri") == old:
                i["scri"] = f"norm:{norm_to}"
        if old[5:] != norm_to:
            del meta["norms"][old[5:]], tensors[f"{old[5:]}.weight"], tensors[f"{old[5:]}.bias"]
    return edit


@pytest.mark.parametrize("layer, norm, match", [
    # a 32-wide proj_in naming a 64-channel norm of another block
    ("up_blocks.1.attentions.0.proj_in", "mid_block.attentions.0.norm", r"of its input width \(32\)"),
    # the same width and type, but another block's norm
    ("up_blocks.1.attentions.0.proj_in", "down_blocks.0.attentions.0.norm", "in its own block"),
    # a norm of the layer's own block that feeds other layers (norm2 feeds attn2, not attn1)
    ("mid_block.attentions.0.transformer_blocks.0.attn1.to_q", "mid_block.attentions.0.transformer_blocks.0.norm2",
     "the folded bias|the folded weight|SCRI transform other than"),
])
def test_a_layer_naming_a_norm_that_does_not_feed_it_is_refused(unet, saved, tmp_path, layer, norm, match):
    tensors, meta = fm.read(saved, KEY)
    tensors = {k: v.clone() for k, v in tensors.items()}
    _renorm(layer, norm)(meta, tensors)
    path = tmp_path / "renorm.safetensors"
    fm.write_text(path, tensors, KEY, json.dumps(meta))
    _refused(path, unet, match, ModelMismatchError)


def _claims(dtype: str):
    """A metadata edit: every layer's report says its source weight was held at ``dtype``."""
    def edit(meta):
        for r in meta["report"]:
            if "weight_dtype" in r:
                r["weight_dtype"] = dtype
    return edit


def _rewired(saved, tmp_path, edit):
    """A re-signed copy of ``saved`` with ``edit(meta, tensors)`` applied."""
    tensors, meta = fm.read(saved, KEY)
    tensors, meta = {k: v.clone() for k, v in tensors.items()}, copy.deepcopy(meta)
    edit(meta, tensors)
    path = tmp_path / "rewired.safetensors"
    fm.write_text(path, tensors, KEY, json.dumps(meta))
    return path


def test_a_model_held_at_lower_precision_takes_a_file_made_at_fp32(unet, quantized, saved, tmp_path):
    """ComfyUI may hold the checkpoint in fp16 where the file was made in fp32: the codes then agree up to fp16's
    rounding, which the check allows (the file records the source precision); a file that claims the model's own
    precision gets no such slack."""
    half = copy.deepcopy(unet).half()
    res = load_quantized(saved, half, apply=False)
    assert set(res.modules) == set(quantized[1].modules)

    _refused(_edited(saved, tmp_path, _claims("F16")), half, "this model.s", ModelMismatchError)


def test_the_reader_builds_no_tensor_from_an_unbounded_header(unet, saved, tmp_path):
    """A shape [0, 10**30] made safefile.read raise a raw TypeError (tensors were built before the checksum)."""
    raw = saved.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = sorted(k for k in header if k != "__metadata__")[0]
    for shape, match in (([0, 10 ** 30], "malformed entry"), ([2 ** 40], "malformed entry")):
        header[name]["shape"] = shape
        text = json.dumps(header).encode()
        (tmp_path / "big.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
        _refused(tmp_path / "big.safetensors", unet, match)


def test_a_checksum_that_is_not_ascii_is_refused(unet, saved, tmp_path):
    tensors, meta = fm.read(saved, KEY)
    save_file(tensors, str(tmp_path / "u.safetensors"), metadata={KEY: json.dumps(meta), KEY + "_sha256": "é" * 64})
    _refused(tmp_path / "u.safetensors", unet, "checksum does not match")


@pytest.mark.parametrize("field, value", [("kind", 5), ("kind", "attention"), ("out_rel_err", "0.1"),
                                          ("handler", ["x"]), ("weight_dtype", "F8"), ("timesteps", -1)])
def test_report_fields_of_the_wrong_type_are_refused(unet, saved, tmp_path, field, value):
    """A report entry with a non-string kind or a string error crashed the node's report summary."""
    def edit(meta):
        meta["report"][0][field] = value
    _refused(_edited(saved, tmp_path, edit), unet, rf"report\[0\]\.{field} is")


def test_scri_where_the_files_config_allows_none_is_refused(unet, saved, tmp_path):
    def edit(meta):
        meta["config"]["scri_skip"] = ["*"]
    _refused(_edited(saved, tmp_path, edit), unet, "the file's config gives this layer no SCRI")


def test_calibration_norm_group_members_must_be_layer_names(saved_calibration, tmp_path):
    """A list as a member raised a raw TypeError (``m not in layers``)."""
    def edit(meta):
        norm = sorted(meta["norm_groups"])[0]
        meta["norm_groups"][norm][0] = ["not", "a", "name"]
    path = _edited(saved_calibration, tmp_path, edit, key=CALIBRATION_KEY)
    with pytest.raises(CalibrationFileError, match=r"norm_groups\[.*\]\[0\] is a JSON list, expected a layer"):
        load_calibration(path)


def test_the_check_reads_the_model_without_changing_it_in_any_chunk_size(unet, saved, tmp_path, monkeypatch):
    """The codes are compared in row chunks (bounded memory on the widest layers): every chunk size accepts the
    saved file, refuses an edited code, and leaves the model's weights as they were."""
    import qvd.verify
    before = {k: v.clone() for k, v in unet.state_dict().items()}

    def code_edit(meta, tensors):
        name = next(n for n, i in sorted(meta["layers"].items()) if i["kind"] == "conv" and i["kernel"] == [3, 3])
        flat = tensors[f"{name}.weight"].reshape(-1)
        flat[-1] += 9 if int(flat[-1]) < 0 else -9
    tensors, meta = fm.read(saved, KEY)
    tensors = {k: v.clone() for k, v in tensors.items()}
    code_edit(meta, tensors)
    fm.write_text(tmp_path / "code.safetensors", tensors, KEY, json.dumps(meta))
    for chunk in (1, 300, 1 << 22):
        monkeypatch.setattr(qvd.verify, "_CHUNK", chunk)
        load_quantized(saved, unet, apply=False)
        _refused(tmp_path / "code.safetensors", unet, "values of the int8 codes", ModelMismatchError)
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_the_file_records_what_the_calibration_covered(unet, calibration, quantized, saved, tmp_path):
    """Provenance shown by QVD Load Quantized: the calibration's timesteps and layer count (optional: a file
    without it loads; one with a malformed record is refused)."""
    assert quantized[1].calibrated == {"timesteps": calibration.timesteps, "layers": len(calibration.layers),
                                       "roles": {"first": ["conv_in"], "last": ["conv_out"]}}
    assert load_quantized(saved, unet, apply=False).calibrated == quantized[1].calibrated
    assert load_quantized(_edited(saved, tmp_path, lambda m: m.pop("calibrated")), unet, apply=False).calibrated == {}
    _refused(_edited(saved, tmp_path, lambda m: m["calibrated"].update(timesteps=["999"])), unet,
             r"calibrated\.timesteps\[0\] is '999', expected a finite number")
    _refused(_edited(saved, tmp_path, lambda m: m["calibrated"].update(roles={"middle": []})), unet,
             r"calibrated\.roles field 'middle' is a JSON list, expected absent")


def test_a_motion_proj_in_naming_another_blocks_wider_norm_is_refused(unet, saved, tmp_path):
    """Issue 30's case: a motion-module proj_in 32 wide named a 64-channel norm of another block, loaded, and
    sampled 2.2 % away. Its SCRI tensors are given (neutral) so that only the norm is wrong."""
    layer, norm = "down_blocks.0.motion_modules.0.proj_in", "mid_block.attentions.0.norm"
    tensors, meta = fm.read(saved, KEY)
    tensors = {k: v.clone() for k, v in tensors.items()}
    meta["layers"][layer]["scri"] = f"norm:{norm}"
    tensors.setdefault(f"{layer}.scri_shift", torch.zeros(32))
    tensors.setdefault(f"{layer}.scri_inv_scale", torch.ones(32))
    fm.write_text(tmp_path / "motion.safetensors", tensors, KEY, json.dumps(meta))
    _refused(tmp_path / "motion.safetensors", unet, r"folded into norm mid_block\.attentions\.0\.norm \(GroupNorm, 64 "
             r"channels, in block mid_block\.attentions\.0\).*input width \(32\)", ModelMismatchError)


def test_the_attention_patches_a_calibration_ran_with_travel_with_it_and_are_checked(unet, calibration, tmp_path):
    """``Calibration.patches`` (what the host graph applied while calibrating, e.g. IPAdapter's cross-attention
    replacements) survives a calibration file and goes into the quantized file's ``calibrated``; not a list of
    strings there is refused by name; files without it read as unknown (None)."""
    from qvd import quantize_model

    with_patches = copy.copy(calibration)
    with_patches.patches = ["attn2 replace input 1", "attn2 replace middle 1"]
    path = tmp_path / "with.calibration.safetensors"
    save_calibration(path, with_patches)
    assert load_calibration(path).patches == with_patches.patches
    plain = tmp_path / "plain.calibration.safetensors"
    save_calibration(plain, calibration)
    assert calibration.patches is None and load_calibration(plain).patches is None
    result = quantize_model(copy.deepcopy(unet), load_calibration(path), apply=False)
    assert result.calibrated["patches"] == with_patches.patches
    saved = tmp_path / "q.safetensors"
    save_quantized(saved, result)
    assert load_quantized(saved, copy.deepcopy(unet), apply=False).calibrated["patches"] == with_patches.patches
    bad = _edited(saved, tmp_path, lambda m: m["calibrated"].update(patches=[3]))
    _refused(bad, copy.deepcopy(unet), r"calibrated\.patches\[0\]")


def test_coverage_and_settings_round_trip_and_are_checked(unet, calibration, tmp_path):
    """A calibration's timestep coverage and sampling settings (issue 29) are kept by both file kinds; files without
    them (older ones) still load; a coverage timestep the calibration does not hold, or a setting that is neither a
    short string nor a number, is refused by name."""
    from qvd import quantize_model
    from qvd.config import QVDConfig

    cal = copy.copy(calibration)
    cal.coverage = [calibration.timesteps[-1]]
    cal.settings = {"sampler": "euler", "steps": 4, "cfg": 7.5}
    cal_path = tmp_path / "c.calibration.safetensors"
    save_calibration(cal_path, cal)
    back = load_calibration(cal_path)
    assert (back.coverage, back.settings) == (cal.coverage, cal.settings)
    q = copy.deepcopy(unet)
    result = quantize_model(q, back, QVDConfig())
    assert result.calibrated["coverage"] == cal.coverage and result.calibrated["settings"] == cal.settings
    path = tmp_path / "q.safetensors"
    save_quantized(path, result)
    assert load_quantized(path, unet, apply=False).calibrated == result.calibrated
    old = _edited(path, tmp_path, lambda m: [m["calibrated"].pop(k) for k in ("coverage", "settings")],
                 name="old.safetensors")
    assert "coverage" not in load_quantized(old, unet, apply=False).calibrated
    _refused(_edited(path, tmp_path, lambda m: m["calibrated"].update(coverage=[12345.0])), unet,
             r"calibrated\.coverage .*expected timesteps the calibration lists")
    _refused(_edited(path, tmp_path, lambda m: m["calibrated"]["settings"].update(steps=[4])), unet,
             r"calibrated\.settings\['steps'\] .*expected a finite number")
    _refused(_edited(path, tmp_path, lambda m: m["calibrated"]["settings"].update(sampler="x" * 300)), unet,
             r"calibrated\.settings\['sampler'\] .*at most 256 characters")
    for edit, match in ((lambda m: m.update(coverage=[-1.0]), r"coverage .*timesteps the calibration lists"),
                        (lambda m: m.update(settings={"steps": True}), r"settings\['steps'\]")):
        with pytest.raises(CalibrationFileError, match=match):
            load_calibration(_edited(cal_path, tmp_path, edit, key=CALIBRATION_KEY))
    assert load_calibration(_edited(cal_path, tmp_path, lambda m: [m.pop("coverage"), m.pop("settings")],
                                    key=CALIBRATION_KEY)).coverage == []


def test_coverage_timesteps_fill_what_the_sampler_skipped():
    from qvd.calibrate import coverage_timesteps

    # euler 4 steps on SD (t = 999 / 960 / 889 / 727): the lower two thirds of the schedule are added
    assert coverage_timesteps({999.0, 960.0, 889.0, 727.0}, 0, 999, 10) == [666.0, 555.0, 444.0, 333.0, 222.0,
                                                                           111.0, 0.0]
    assert coverage_timesteps(set(range(0, 1000, 50)), 0, 999, 10) == []  # 20 steps already cover it
    assert coverage_timesteps({500.0}, 0, 999, 0) == [] and coverage_timesteps(set(), 5, 5, 10) == []
    flow = coverage_timesteps({1000.0, 750.0}, 1.0, 1000.0, 4)  # a flow model's t = 1000 sigma
    assert flow == [334.0, 1.0]


BLOCK = "mid_block.attentions.0.transformer_blocks.0"


def test_two_norms_of_one_block_swapped_are_refused_on_the_first_call(unet, inputs, quantized, saved, tmp_path):
    """Found by review: cross-attention's q (fed by norm2) and the feed-forward (fed by norm3) naming each other's norm,
    each folded affine recomputed from the model, passed every check (same block, width and type) and loaded as a worse
    model. The model's own call shows which norm feeds which layer: the first call stops before giving an output."""
    path = _rewired(saved, tmp_path, fm.swap_folds(fm.model_affine(unet), f"{BLOCK}.attn2.to_q",
                                                   f"{BLOCK}.ff.net.0.proj"))
    model = copy.deepcopy(unet)
    load_quantized(path, model)  # what names and values can tell: all consistent
    with pytest.raises(ModelMismatchError, match=rf"layer {BLOCK}.attn2.to_q: the file folds its SCRI into norm "
                                                 rf"{BLOCK}.norm3, but in this model it reads the output of "
                                                 rf"{BLOCK}.norm2") as e:
        inputs.run(model, 999)
    assert str(path) in str(e.value)
    honest = copy.deepcopy(unet)
    res = load_quantized(saved, honest)
    hooks = len(honest._forward_pre_hooks)
    assert torch.equal(inputs.run(honest, 999), inputs.run(quantized[0], 999))
    assert not res.wiring and len(honest._forward_pre_hooks) == hooks - 1  # proven by one call, then not followed


def _resigned(saved, tmp_path, kind: str, field: str, edit, scri: str | None = None):
    """Re-signed: ``edit`` applied to ``field`` of the first layer of ``kind`` (with SCRI ``scri``, when given);
    (file, layer)."""
    found = []

    def apply(meta, tensors):
        found.append(next(n for n, i in sorted(meta["layers"].items())
                          if i["kind"] == kind and (scri is None or i.get("scri") == scri)))
        edit(tensors[f"{found[0]}.{field}"])
    return _rewired(saved, tmp_path, apply), found[0]


@pytest.mark.parametrize("kind, field, scri, match", [
    ("temporal", "levels", None, "HiDi-TQ level of 1e\\+05, expected at most 65504 where the layer computes in float16"),
    ("conv", "scri_shift", "kernel", "SCRI shift of 1e\\+05"),
])
def test_calibrated_values_a_half_precision_model_cannot_hold_are_refused(unet, saved, tmp_path, kind, field, scri,
                                                                           match):
    """Found by review: HiDi-TQ levels or a SCRI shift up to 1e6 loaded and gave inf in fp16. Values the model cannot
    recompute are bounded by what a calibration of a model computing in its dtype gives (fp32 holds these)."""
    path, layer = _resigned(saved, tmp_path, kind, field, lambda t: t.mul_(1e5 / float(t.abs().max())), scri)
    with pytest.raises(QuantizedFileError, match=f"tensor '{re.escape(layer)}.{field}' gives a {match}"):
        load_quantized(path, copy.deepcopy(unet).half(), apply=False)
    load_quantized(path, copy.deepcopy(unet), apply=False)
    with pytest.raises(QuantizedFileError, match=f"{re.escape(layer)}.{field}.*float16"):
        load_quantized(path, copy.deepcopy(unet), apply=False, compute_dtype=torch.float16)  # the host's dtype counts


def _without_zero(levels):
    i = int((levels == 0).nonzero()[0])
    levels[i] = levels[i + 1] / 2


@pytest.mark.parametrize("kind, field, edit, match", [
    ("temporal", "levels", _without_zero, "has no level 0, expected every HiDi-TQ table holds 0"),
    ("linear", "act_scale", lambda t: t.fill_(1e-12), "covers a range of 2.55e-10, expected at least 1e-08"),
])
def test_calibrated_values_no_calibration_gives_are_refused(unet, saved, tmp_path, kind, field, edit, match):
    path, layer = _resigned(saved, tmp_path, kind, field, edit)
    with pytest.raises(QuantizedFileError, match=f"{re.escape(layer)}.{field}' {match}"):
        load_quantized(path, copy.deepcopy(unet), apply=False)


def test_a_claimed_coarser_source_buys_no_slack(unet, saved, tmp_path):
    """Found by review: a file saying its source weights were BF16 was compared with about +-1 code and +-0.8 % on
    biases on any model. The tolerance comes from the model as it is held: an fp32 model's weights are rounded to the
    claimed precision and must then give the file's codes exactly, which codes made from fp32 weights do not."""
    _refused(_edited(saved, tmp_path, _claims("BF16")), unet, "this model.s", ModelMismatchError)


MOTION = "down_blocks.0.motion_modules.0.transformer_blocks.0"


@pytest.mark.parametrize("edit, layer, match", [
    # norm1 feeds q / k / v; v leaves the group (its codes made from its plain weight): it would read (x - z) / s
    (lambda unet: fm.unfold(unet, f"{BLOCK}.attn1.to_v"), f"{BLOCK}.attn1.to_v",
     rf"layer {BLOCK}.attn1.to_v reads the output of norm {BLOCK}.norm1, into which the file folds the SCRI of "
     rf"{BLOCK}.attn1.to_k and 1 more, but not this layer's"),
    # a motion block adds its positional embedding between norm1 and attention: no fold passes an addition
    (lambda unet: fm.fold_into(unet, [f"{MOTION}.attn1.to_q", f"{MOTION}.attn1.to_k", f"{MOTION}.attn1.to_v"],
                               f"{MOTION}.norm1"), f"{MOTION}.attn1.to_",
     rf"the file folds its SCRI into norm {MOTION}.norm1, but in this model it reads a value computed from norm "
     rf"{MOTION}.norm1's output by operations a fold does not pass"),
], ids=["a layer left out of its norm's group", "a fold across a positional embedding"])
def test_folds_the_call_contradicts_are_refused(unet, inputs, saved, tmp_path, edit, layer, match):
    """Found by review: a group with one of its layers left out (it then reads the transformed norm output through its
    plain weight), and layers said folded into a norm whose output reaches them only through an addition (a motion
    block's positional embedding), passed the first version of the wiring proof, which followed any path from the norm.
    Calibration folds only a norm's very output into layers that are all of its readers; the proof asks the same."""
    path = _rewired(saved, tmp_path, edit(unet))
    model = copy.deepcopy(unet)
    load_quantized(path, model)
    with pytest.raises(ModelMismatchError, match=match):
        inputs.run(model, 999)


@pytest.mark.parametrize("source, model", [(torch.float16, torch.bfloat16), (torch.float32, torch.float16),
                                           (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_a_model_held_coarser_than_the_source_matches_within_its_own_rounding(source, model):
    """Found by review: for a bf16-held model and an fp16 source the allowance ignored fp16's subnormal rounding
    (22 of 240k biases of N(0, 0.02) refused). The source's and the model's roundings of one checkpoint both fit."""
    from qvd.safefile import DTYPE_NAMES
    from qvd.verify import held

    w = torch.randn(240_000, generator=torch.Generator().manual_seed(0)) * 0.02  # the fp32 checkpoint
    file_values, mine = w.to(source).float(), w.to(model)
    how = held(DTYPE_NAMES[source], model)
    ref = how.source(mine)
    assert bool(((file_values - ref).abs() <= ref.abs() * how.rel + how.tiny).all())


def test_an_interrupted_first_call_leaves_nothing_followed(unet, inputs, quantized, saved):
    """Found by review: torch runs forward hooks after a call only on exceptions, so a Ctrl-C during the followed first
    call left its TorchFunctionMode on for the rest of the process and no later call was followed. The next call
    closes it, is followed and proves the folds."""
    model = copy.deepcopy(unet)
    res = load_quantized(saved, model)
    layer = model.get_submodule(f"{BLOCK}.attn2.to_q")

    def interrupt(*_):
        raise KeyboardInterrupt
    handle = layer.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        inputs.run(model, 999)
    handle.remove()
    assert torch._C._len_torch_function_stack() == 1  # left on by the interruption
    assert torch.equal(inputs.run(model, 999), inputs.run(quantized[0], 999))
    assert torch._C._len_torch_function_stack() == 0 and not res.wiring
