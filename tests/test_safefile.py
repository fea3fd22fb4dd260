"""The verified container (qvd/safefile.py): header values of any JSON type refused by name, a file of another kind
refused from its header alone, and what a read costs (one buffer of the file's data, ordinary tensors viewing it).

The seeded mutation fuzz of whole QVD files is test_file_fuzz.py; the file formats built on this are test_io.py."""
import json
import math
import tracemalloc

import pytest
import torch

from qvd import safefile
from qvd.errors import QuantizedFileError

KEY, KIND = "qvd_test", "QVD test"
MB = 1 << 20


def _read(path):
    return safefile.read(path, KEY, QuantizedFileError, KIND)


def _split(path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(path, header, data: bytes = b"") -> None:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


@pytest.fixture
def small(tmp_path):
    """(path, tensors) of a valid file with tensors of three dtypes, one of them empty."""
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.arange(5, dtype=torch.int8),
               "c": torch.zeros(0, 4, dtype=torch.float16)}
    path = tmp_path / "small.safetensors"
    safefile.write(path, tensors, KEY, {"format_version": 2})
    return path, tensors


def _nested(depth: int):
    v = None
    for _ in range(depth):
        v = [v]
    return v


# One value of every JSON type and then some: what a corrupt file or a hand edit may put anywhere in the header.
VALUES = [None, True, False, 0, 1, -1, 4, 2 ** 31, 2 ** 64, 10 ** 30, -0.0, 1.5, 1e308, float("nan"), float("inf"),
          "", "F32", "I32", "x", "8", "\ud800", "{}", "[1]", [], ["F32"], [1], [0, 4], [4, 0], [1.0], [True], [None],
          [[1]], ["1"], [1, 2, 3, 4, 5, 6, 7, 8, 9], {}, {"dtype": "F32"}, {"a": [1, {"b": None}]}, _nested(200)]


def _utf8(s) -> bool:
    try:
        s.encode()
    except UnicodeEncodeError:
        return False
    return True


def _object_text(s: str) -> bool:
    try:
        return isinstance(json.loads(s), dict)
    except ValueError:
        return False


def _edits(header: dict, tensors: dict):
    """(label, header, tensor, must_load) of each single-value edit: the value in every tensor field, element and
    entry (``tensor``: its name), the metadata map, its values and the header itself."""
    def edit(change):
        h = json.loads(json.dumps(header))
        change(h)
        return h

    def differs(a, b):  # as JSON: False is not 0, -0.0 is not 0
        return json.dumps(a) != json.dumps(b)
    for v in VALUES:
        for name in tensors:
            for field in ("dtype", "shape", "data_offsets"):
                if differs(header[name][field], v):
                    yield f"{name}.{field}={v!r}", edit(lambda h: h[name].__setitem__(field, v)), name, False
                for i in range(len(header[name][field]) if field != "dtype" else 0):
                    if differs(header[name][field][i], v):
                        yield (f"{name}.{field}[{i}]={v!r}", edit(lambda h: h[name][field].__setitem__(i, v)), name,
                               False)
            yield f"{name}={v!r}", edit(lambda h: h.__setitem__(name, v)), name, False
        yield f"header={v!r}", v, None, False
        yield f"__metadata__={v!r}", edit(lambda h: h.__setitem__("__metadata__", v)), None, False
        yield f"checksum={v!r}", edit(lambda h: h["__metadata__"].__setitem__(KEY + "_sha256", v)), None, False
        yield f"other metadata={v!r}", edit(lambda h: h["__metadata__"].__setitem__("other", v)), None, \
            isinstance(v, str) and _utf8(v)
        if isinstance(v, str) and _utf8(v):  # the kind's text, re-signed: loads where it is a JSON object
            sign = {KEY: v, KEY + "_sha256": safefile.checksum(v, tensors)}
            yield f"{KEY}={v!r} (re-signed)", edit(lambda h: h["__metadata__"].update(sign)), None, _object_text(v)
        else:
            yield f"{KEY}={v!r}", edit(lambda h: h["__metadata__"].__setitem__(KEY, v)), None, False
    yield "metadata key \\ud800", edit(lambda h: h["__metadata__"].__setitem__("\ud800", "x")), None, False
    renamed = {("\ud800" if k == "b" else k): t for k, t in tensors.items()}

    def rename(h):  # re-signed: the checksum escapes the name, so only the reader's own check refuses it
        h["\ud800"] = h.pop("b")
        h["__metadata__"][KEY + "_sha256"] = safefile.checksum(h["__metadata__"][KEY], renamed)
    yield "tensor name \\ud800 (re-signed)", edit(rename), "\ud800", False


def test_header_values_of_any_json_type_are_refused_by_name(small, tmp_path):
    """A dtype that was a JSON list raised a raw ``TypeError: unhashable type``, metadata text with a lone surrogate
    escape a raw ``UnicodeEncodeError``; every edit must raise the caller's error type naming the file and, for a
    tensor's entry, the tensor (or a checksum mismatch, for a well-formed entry), or read back what was saved."""
    src, tensors = small
    header, data = _split(src)
    path = tmp_path / "edited.safetensors"
    wrong = []
    for label, edited, name, must_load in _edits(header, tensors):
        _join(path, edited, data)
        try:
            got, meta = _read(path)
        except QuantizedFileError as e:
            msg = str(e)
            if must_load:
                wrong.append(f"{label}: refused ({msg})")
            elif not msg.startswith(f"{path}: ") or (name is not None and repr(name) not in msg
                                                       and "checksum does not match" not in msg):
                wrong.append(f"{label}: the message does not name the file and tensor: {msg}")
        except Exception as e:  # noqa: BLE001 - what the test is for
            wrong.append(f"{label}: raw {type(e).__name__}: {e}")
        else:
            same = got.keys() == tensors.keys() and all(
                got[k].dtype == t.dtype and torch.equal(got[k], t) for k, t in tensors.items())
            if not must_load and not (same and meta == {"format_version": 2}):
                wrong.append(f"{label}: loaded as something else than what was saved")
    assert not wrong, f"{len(wrong)} edits mishandled:\n" + "\n".join(wrong[:40])


def _sparse(path, header: dict, data_len: int) -> None:
    """A safetensors-shaped file of ``header`` and ``data_len`` zero bytes of data, sparse: no disk, no RAM."""
    _join(path, header)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size + data_len)


BIG = 200 * MB


@pytest.mark.parametrize("meta, data_len, match", [
    ({"modelspec.title": "an SD checkpoint"}, BIG, f"is not a {KIND} file"),
    ({KEY: "{}"}, BIG, "carries no checksum"),
    ({KEY: "{}", KEY + "_sha256": "0" * 64}, BIG + 8, "8 bytes after its last tensor"),
    ({KEY: "{}", KEY + "_sha256": "0" * 64}, BIG - 8, "tensor .w. has a malformed entry"),
], ids=["other-kind", "no-checksum", "trailing-data", "short-data"])
def test_a_file_refused_by_its_header_is_not_read_whole(tmp_path, meta, data_len, match):
    """A 6 GB checkpoint in the models folder was read whole (one buffer of its size) just to be refused: a file
    its header refuses costs its header."""
    path = tmp_path / "checkpoint.safetensors"
    _sparse(path, {"__metadata__": meta, "w": {"dtype": "U8", "shape": [BIG], "data_offsets": [0, BIG]}}, data_len)
    tracemalloc.start()
    try:
        with pytest.raises(QuantizedFileError, match=match) as e:
            _read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(e.value).startswith(f"{path}: ")
    assert peak < MB, f"refusing the file allocated {peak / MB:.0f} MiB"


def _layout(path) -> dict[str, int]:
    header, _ = _split(path)
    return {k: v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def test_tensors_read_under_inference_mode_are_ordinary_views_of_one_buffer(tmp_path):
    """ComfyUI runs nodes under ``torch.inference_mode``: the tensors read there were inference tensors, which the
    host then cloned (twice the file's RAM). They must be ordinary tensors viewing the one data buffer."""
    tensors = {"f64": torch.randn(3, dtype=torch.float64), "f32": torch.randn(4, 5), "bf16": torch.randn(7).bfloat16(),
               "f16": torch.randn(2, 3).half(), "i8": torch.arange(-3, 8, dtype=torch.int8),
               "u8": torch.arange(9, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
               "empty": torch.zeros(0, 3)}
    path = tmp_path / "views.safetensors"
    safefile.write(path, tensors, KEY, {"format_version": 2})
    with torch.inference_mode():
        got, meta = _read(path)
    assert meta == {"format_version": 2}
    assert {k: t.is_inference() for k, t in got.items()} == dict.fromkeys(tensors, False)
    assert all(torch.equal(got[k], t) and got[k].dtype == t.dtype for k, t in tensors.items())
    # every non-empty tensor sits at its file offset in one buffer (torch.frombuffer: no copy)
    offsets = _layout(path)
    bases = {got[k].data_ptr() - offsets[k] for k in tensors if tensors[k].numel()}
    assert len(bases) == 1
    got["u8"][0] = 200
    assert got["u8"]._version == 1  # an ordinary tensor: in-place writes are seen (inference tensors have no version)


def test_a_read_holds_the_files_data_once(tmp_path):
    """Peak Python memory of a read under inference mode is the data section plus small overhead: no second copy
    (the checksum runs over memoryview slices of the buffer). torch's own allocations are not traced; that the
    tensors view the buffer rather than copy it is the test above."""
    tensors = {"w": torch.zeros(16 * MB, dtype=torch.float32), "b": torch.ones(1000), "s": torch.arange(10)}
    path = tmp_path / "big.safetensors"
    safefile.write(path, tensors, KEY, {"format_version": 2})
    data_len = sum(t.numel() * t.element_size() for t in tensors.values())
    tracemalloc.start()
    try:
        with torch.inference_mode():
            got, _ = _read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not got["w"].is_inference() and torch.equal(got["w"], tensors["w"])
    assert peak < 1.1 * data_len + 4 * MB, f"peak {peak / MB:.1f} MiB for {data_len / MB:.1f} MiB of data"
    assert math.isclose(data_len, 64 * MB, rel_tol=0.01)
