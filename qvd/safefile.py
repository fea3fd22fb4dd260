"""The verified container both QVD file kinds use: a ``.safetensors`` file whose every byte is checked.

A file holds its tensors and two metadata keys: ``<key>`` (the kind's JSON metadata) and ``<key>_sha256``,
a SHA-256 over that JSON text and every tensor's name, dtype, shape and bytes. ``read`` parses the
safetensors header itself, bounded by the file's size (no allocation the file's size does not justify; no
dimension larger than the data section), checks the kind's key, the checksum entry and that the tensor table
tiles the data section, and only then reads the data section (a file of another kind costs its header, not
its size) into one buffer, compares the checksum over memoryview slices of it (no second copy), and only then
builds the tensors as views of it, ordinary tensors even under ``torch.inference_mode``; every problem raises
the caller's error type naming the file. ``write`` is atomic (temp file + link), never replaces an existing
file, checks the name before writing a byte, and leaves the file readable like other model files (mode 0666
less umask).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets

import torch
from safetensors.torch import save_file

from .errors import QVDError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
MAX_NAME_BYTES = 255  # file-name limit of ext4 / NTFS / APFS
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def _digest(text: str, items) -> str:
    """SHA-256 over the metadata text and ``(name, dtype name, shape, bytes)`` items, sorted by name."""
    h = hashlib.sha256(b"qvd-safefile-v2\0")
    h.update(text.encode())
    for name, dtype, shape, data in sorted(items, key=lambda item: item[0]):
        h.update(json.dumps([name, dtype, list(shape)]).encode())
        h.update(data)
    return h.hexdigest()


def checksum(text: str, tensors: dict[str, torch.Tensor]) -> str:
    """The checksum ``write`` stores for ``text`` and ``tensors`` (what ``read`` compares over the raw bytes)."""
    def raw(t: torch.Tensor):
        t = t.detach().cpu().contiguous()
        return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
    return _digest(text, [(n, DTYPE_NAMES[t.dtype], t.shape, raw(t)) for n, t in tensors.items()])


def check_name(path: str) -> None:
    """Refuse a file name the file system cannot hold, before anything is written."""
    name = os.path.basename(os.fspath(path))
    if not name or len(name.encode()) > MAX_NAME_BYTES:
        raise QVDError(f"file name {name[:40]!r}{'...' if len(name) > 40 else ''} is {len(name.encode())} bytes "
                       f"long: use a name of at most {MAX_NAME_BYTES} bytes (nothing was written)")


def write(path: str, tensors: dict[str, torch.Tensor], key: str, meta: dict, overwrite: bool = False) -> None:
    """Write ``tensors`` with ``meta`` under ``key`` (and its checksum) atomically to ``path``."""
    path = os.fspath(path)
    check_name(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists: choose another file name (nothing was overwritten)")
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    text = json.dumps(meta, sort_keys=True)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".qvd-{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    mode = os.fstat(fd).st_mode & 0o777  # 0666 less the umask, as for any new file
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={key: text, key + "_sha256": checksum(text, tensors)})
        os.chmod(tmp, mode)  # safetensors writes 0600
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic, and fails if the name was taken meanwhile
            except OSError as e:  # taken, or a file system without hard links (FAT, exFAT, some shares)
                if isinstance(e, FileExistsError) or os.path.exists(path):
                    raise FileExistsError(f"{path} appeared while saving: choose another file name") from None
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _unicode(s: str) -> bool:
    """Whether UTF-8 can encode ``s`` (JSON escapes can spell lone surrogates, which it cannot)."""
    try:
        s.encode()
    except UnicodeEncodeError:
        return False
    return True


class _Reader:
    def __init__(self, path: str, error: type[QVDError]):
        self.path, self.error = path, error

    def fail(self, problem: str, fix: str = "save or download it again"):
        raise self.error(f"{self.path}: {problem}; {fix}")

    def load(self, f, n: int) -> bytearray:
        """The next ``n`` bytes of ``f``."""
        buf = bytearray(n)
        try:
            got = f.readinto(buf)
        except OSError as e:
            self.fail(f"it cannot be read ({e.strerror})", "check the file's permissions")
        if got != n:
            self.fail("it changed size while being read")
        return buf

    def json(self, text, what: str):
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as e:
            self.fail(f"the {what} is not valid JSON ({str(e)[:80]}): the file is truncated or corrupt")

    def header(self, raw: bytearray, key: str, kind: str, data_len: int) -> tuple[str, str, dict[str, tuple]]:
        """(metadata text, stored checksum, ``table``) of the header ``raw``: everything checked that needs no data."""
        try:
            header = self.json(raw.decode("utf-8"), "file header")
        except UnicodeDecodeError:
            self.fail("its header is not UTF-8 text: the file is truncated or corrupt")
        if not isinstance(header, dict):
            self.fail("its header is not a JSON object: the file is corrupt")
        meta = header.get("__metadata__", {})
        if not (isinstance(meta, dict)
                and all(isinstance(v, str) and _unicode(k) and _unicode(v) for k, v in meta.items())):
            self.fail("its metadata is not a map of Unicode strings: the file is corrupt")
        if key not in meta:
            self.fail(f"it is not a {kind} file (no '{key}' metadata)", f"pick a file saved as a {kind}")
        entries = self.table(header, data_len)
        if key + "_sha256" not in meta:
            version = self.json(meta[key], "metadata")
            version = version.get("format_version", version.get("version")) if isinstance(version, dict) else None
            self.fail(f"it carries no checksum (format version {version!r}, made by an earlier ComfyUI-QVD)",
                      "make it again with this version of ComfyUI-QVD")
        return meta[key], meta[key + "_sha256"], entries

    def table(self, header: dict, data_len: int) -> dict[str, tuple]:
        """Tensor name -> (dtype, shape, begin, end), checked to tile the data section exactly."""
        entries = {}
        for name, e in header.items():
            if name == "__metadata__":
                continue
            if not _unicode(name):
                self.fail(f"tensor {name!r} has a name that is not Unicode text: the file is corrupt")
            if not (isinstance(e, dict) and set(e) == {"dtype", "shape", "data_offsets"}
                    and isinstance(e["dtype"], str) and e["dtype"] in DTYPES
                    and isinstance(e["shape"], list) and len(e["shape"]) <= 8
                    and all(type(d) is int and 0 <= d <= max(data_len, 1) for d in e["shape"])
                    and isinstance(e["data_offsets"], list) and len(e["data_offsets"]) == 2
                    and all(type(o) is int for o in e["data_offsets"])):
                self.fail(f"tensor {name!r} has a malformed entry in the header (dtype, a shape of at most 8 "
                          f"dimensions each within the file's {data_len} data bytes, two offsets): the file is corrupt")
            begin, end = e["data_offsets"]
            size = math.prod(e["shape"]) * DTYPES[e["dtype"]].itemsize
            if not 0 <= begin <= end <= data_len or end - begin != size:
                self.fail(f"tensor {name!r} ({e['dtype']} {e['shape']}) does not fit its place in the file "
                          f"(bytes {begin}..{end} of {data_len}): the file is truncated or corrupt")
            entries[name] = (DTYPES[e["dtype"]], tuple(e["shape"]), begin, end)
        pos = 0
        for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3], item[0])):
            if begin != pos:
                how = "overlaps" if begin < pos else "leaves a gap after"
                self.fail(f"tensor {name!r} (bytes {begin}..{end}) {how} the tensor before it: the file is corrupt")
            pos = end
        if pos != data_len:
            self.fail(f"the file holds {data_len - pos} bytes after its last tensor: the file is corrupt")
        return entries


def read(path: str, key: str, error: type[QVDError], kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a file written by ``write`` with ``key``; any defect raises ``error``.

    ``kind`` names the file kind in messages ("QVD quantized model", ...). The tensors are ordinary (not
    inference) tensors, so a caller under ComfyUI's ``torch.inference_mode`` need not clone them."""
    path = os.fspath(path)
    r = _Reader(path, error)
    if not os.path.isfile(path):
        raise error(f"{path} does not exist: check the file name / models folder")
    try:
        f = open(path, "rb")
    except OSError as e:
        r.fail(f"it cannot be read ({e.strerror})", "check the file's permissions")
    with f:
        size = os.fstat(f.fileno()).st_size
        n = int.from_bytes(r.load(f, 8), "little") if size >= 8 else -1
        if not 2 <= n <= min(size - 8, MAX_HEADER_BYTES):
            r.fail(f"its header length field ({n}) does not fit the file's {size} bytes: the file is truncated "
                   f"or not a safetensors file")
        text, stored, entries = r.header(r.load(f, n), key, kind, size - 8 - n)
        data = r.load(f, size - 8 - n)
    mem = memoryview(data)
    items = [(name, DTYPE_NAMES[dtype], shape, mem[begin:end]) for name, (dtype, shape, begin, end) in entries.items()]
    if not hmac.compare_digest(_digest(text, items).encode(), stored.encode()):
        r.fail("its checksum does not match its contents: the file is corrupt")
    meta = r.json(text, "metadata")
    if not isinstance(meta, dict):
        r.fail("its metadata is not a JSON object: the file is corrupt")
    tensors = {}
    with torch.inference_mode(False):
        for name, (dtype, shape, begin, end) in entries.items():
            if begin == end:
                tensors[name] = torch.empty(shape, dtype=dtype)
            elif begin % dtype.itemsize == 0:
                tensors[name] = torch.frombuffer(data, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                                 offset=begin).reshape(shape)
            else:
                tensors[name] = torch.frombuffer(bytearray(mem[begin:end]), dtype=dtype).reshape(shape)
    return tensors, meta
