"""Checks on files decoct reads back from disk, done before their contents size anything.

Why: artifacts, expert sets and teachers are directories users copy, download and edit. Every
number that sizes an allocation (a tensor shape, an image count, an image size) is read from the
file's own header and compared with what the caller expects *before* the data are read, so a
5 KB manifest or a forged header cannot make decoct allocate gigabytes. Paths named inside a
manifest stay inside their directory, and links are refused (a link can point anywhere).

Every error is a :class:`FileCheckError` (a ``ValueError``), naming the file and saying what
is wrong, so the CLI prints one line instead of a traceback.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = [
    "MAX_JSON_BYTES",
    "FileCheckError",
    "confined_path",
    "is_int",
    "is_sha256",
    "read_json_object",
    "regular_file_size",
    "safetensors_header",
]

MAX_JSON_BYTES = 256 << 20
"""Largest manifest / metadata JSON file read (a 50,000-image manifest is about 10 MB)."""
MAX_SAFETENSORS_HEADER = 100 << 20
"""Largest safetensors JSON header accepted (the format's own reference limit)."""

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# safetensors dtype name -> bytes per element
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}


class FileCheckError(ValueError):
    """A file is not what its directory's manifest says it is (or not a file decoct can read)."""


def is_int(value: Any, lo: int | None = None, hi: int | None = None) -> bool:
    """True for a JSON integer (not a bool, not a float) within ``lo``..``hi`` (inclusive) where given:
    the check every number read from a manifest or header gets before it sizes anything."""
    if not isinstance(value, int) or isinstance(value, bool):
        return False
    return (lo is None or value >= lo) and (hi is None or value <= hi)


def is_sha256(value: Any) -> bool:
    """True for a lower-case hex SHA-256 digest (64 characters)."""
    return isinstance(value, str) and bool(_HEX64.match(value))


def regular_file_size(path: Path, what: str | None = None) -> int:
    """Size of ``path`` from ``lstat``; refuses links, directories, devices and missing files."""
    name = what or str(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{name}: missing") from e
    if stat.S_ISLNK(st.st_mode):
        raise FileCheckError(f"{name}: is a symbolic link; decoct reads only plain files here")
    if not stat.S_ISREG(st.st_mode):
        raise FileCheckError(f"{name}: is not a regular file")
    return st.st_size


def confined_path(root: Path, rel: Any, what: str) -> Path:
    """``root / rel`` for a relative path named in a manifest, refused unless it stays inside
    ``root``: no absolute path, no ``..``, no backslash, and no symbolic link on the way."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise FileCheckError(f"{what}: invalid file path {rel!r}")
    p = PurePosixPath(rel)
    if p.is_absolute() or any(part in ("", ".", "..") for part in p.parts) or rel.endswith("/"):
        raise FileCheckError(f"{what}: unsafe file path {rel!r} (must stay inside {root})")
    cur = Path(root)
    for part in p.parts:
        cur = cur / part
        if cur.is_symlink():
            raise FileCheckError(f"{what}: {rel!r} passes through a symbolic link ({cur}); links are refused")
    return Path(root, *p.parts)


def read_json_object(path: Path, what: str | None = None, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """Parse a JSON file that must hold an object; refuses links, huge files and other JSON values."""
    name = what or str(path)
    size = regular_file_size(path, name)
    if size > max_bytes:
        raise FileCheckError(f"{name}: {size:,} bytes, more than the {max_bytes:,} a decoct metadata file may hold")
    try:
        value = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FileCheckError(f"{name}: not valid JSON ({str(e)[:200]})") from e
    if not isinstance(value, dict):
        raise FileCheckError(f"{name}: holds a JSON {type(value).__name__}, not an object — not a decoct file "
                             "(was it overwritten?)")
    return value


def safetensors_header(source: Path | bytes, what: str | None = None) -> dict[str, Any]:
    """The validated header of a safetensors file or buffer, read without loading any tensor.

    Returns ``{name: {"dtype": str, "shape": tuple, "bytes": int}, ..., "__metadata__": {...}}``.
    Checked: the 8-byte length, a JSON object header within bounds, known dtypes, non-negative
    integer shapes whose size matches each tensor's byte range, ranges inside the data section
    that cover it exactly. Random bytes, a pickle, an HTML error page or a truncated download
    all fail here with :class:`FileCheckError` naming the file.
    """
    name = what or (str(source) if not isinstance(source, bytes | bytearray) else "safetensors data")
    if isinstance(source, bytes | bytearray):
        total = len(source)
        head = bytes(source[:8])
    else:
        total = regular_file_size(Path(source), name)
        with open(source, "rb") as f:
            head = f.read(8)
    bad = f"{name}: not a valid safetensors file"
    if len(head) < 8:
        raise FileCheckError(f"{bad} ({total} bytes, too short for a header)")
    (n,) = struct.unpack("<Q", head)
    if n < 2 or n > MAX_SAFETENSORS_HEADER or 8 + n > total:
        raise FileCheckError(f"{bad} (header length {n} does not fit the {total:,}-byte file; "
                             "wrong format or truncated)")
    if isinstance(source, bytes | bytearray):
        raw = bytes(source[8:8 + n])
    else:
        with open(source, "rb") as f:
            f.seek(8)
            raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FileCheckError(f"{bad} (header is not JSON: {str(e)[:120]})") from e
    if not isinstance(header, dict):
        raise FileCheckError(f"{bad} (header is not a JSON object)")
    data_len = total - 8 - n
    out: dict[str, Any] = {}
    ranges = []
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise FileCheckError(f"{bad} (__metadata__ must map strings to strings)")
            out[key] = dict(entry)
            continue
        if not isinstance(entry, dict):
            raise FileCheckError(f"{bad} (entry {key!r} is not an object)")
        dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _DTYPE_BYTES:
            raise FileCheckError(f"{bad} (tensor {key!r} has unknown dtype {str(dtype)[:20]!r})")
        if not isinstance(shape, list) or not all(is_int(s, 0) for s in shape):
            raise FileCheckError(f"{bad} (tensor {key!r} has an invalid shape {str(shape)[:40]})")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(is_int(o) for o in offs)
                or not 0 <= offs[0] <= offs[1] <= data_len):
            raise FileCheckError(f"{bad} (tensor {key!r} lies outside the file's {data_len:,} data bytes: "
                                 f"truncated or corrupted)")
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * _DTYPE_BYTES[dtype]
        if offs[1] - offs[0] != nbytes:
            raise FileCheckError(f"{bad} (tensor {key!r} of shape {tuple(shape)} {dtype} needs {nbytes:,} bytes, "
                                 f"its byte range holds {offs[1] - offs[0]:,})")
        ranges.append((offs[0], offs[1]))
        out[key] = {"dtype": dtype, "shape": tuple(shape), "bytes": nbytes}
    ranges.sort()
    pos = 0
    for start, stop in ranges:
        if start != pos:
            raise FileCheckError(f"{bad} (tensor byte ranges overlap or leave gaps: corrupted)")
        pos = stop
    if pos != data_len:
        raise FileCheckError(f"{bad} ({data_len - pos:,} bytes after the last tensor: corrupted or appended to)")
    return out
