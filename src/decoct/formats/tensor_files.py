"""Safetensors files of an artifact read on access, so a loaded set does not hold them in memory.

An FKD label store of ImageNet-1K at IPC 10 for 300 epochs is about 6 GB of logits (docs/label-store.md,
Size of a store); a distilled set that held every label file from the moment it was loaded could not
be evaluated on an ordinary machine. :class:`TensorFiles` is the ``name -> {tensor name: Tensor}``
mapping that :class:`~decoct.formats.artifact.DistilledSet` keeps as ``label_files``: each entry is
either tensors already in memory, a :class:`TensorFile` (a listed file of a loaded artifact, read
and checked again on every access), or a :class:`Deferred` (tensors computed on access, e.g. the
epochs of a pruned store). Nothing is cached here; the label store keeps its own small LRU.

What a read checks (every problem raises :class:`~decoct.formats.errors.ArtifactError` naming the
file): the file is still the plain file of the size and (``os.lstat``) identity it had when the
artifact was loaded; a whole-file read is hashed again when the artifact was loaded with
verification; its safetensors header (dtypes, shapes, byte ranges) equals the one checked at load.
A partial read (:meth:`TensorFile.read`, rows of some tensors) checks the identity, not the hash.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from decoct.formats.errors import ArtifactError
from decoct.runtime.filecheck import FileCheckError, safetensors_header
from decoct.runtime.io import load_tensors_bytes, sha256_bytes, tensors_to_bytes

__all__ = ["Deferred", "Spec", "TensorFile", "TensorFiles", "file_entry", "file_payload_bytes", "file_specs",
           "payload_bytes", "safetensors_size"]

Spec = tuple[torch.dtype, tuple[int, ...]]
"""(dtype, shape) of one tensor of a file."""

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32,
    "F32": torch.float32, "I64": torch.int64, "U64": torch.uint64, "F64": torch.float64,
    "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn,
}


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def _nbytes(spec: Spec) -> int:
    dtype, shape = spec
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty(0, dtype=dtype).element_size()


@dataclass(frozen=True, eq=False)
class TensorFile:
    """One listed safetensors file of a loaded artifact: where it is and what was checked at load.

    ``sha256`` is the manifest's hash when the artifact was loaded with verification (then checked
    again on every whole-file read), None otherwise. Build with :meth:`open`.
    """

    path: Path
    rel: str
    size: int
    sha256: str | None
    specs: dict[str, Spec]
    offsets: dict[str, int]
    identity: tuple[int, int, int, int]

    @classmethod
    def open(cls, path: Path, rel: str, size: int, sha256: str | None) -> TensorFile:
        """Check the file's size and safetensors header (not its data) and remember both."""
        path = Path(path).absolute()
        try:
            st = os.lstat(path)
        except FileNotFoundError as e:
            raise ArtifactError(f"{rel}: missing — listed in manifest.json but not found") from e
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"{rel}: is not a regular file")
        if st.st_size != size:
            raise ArtifactError(f"{rel}: size is {st.st_size} bytes, manifest.json says {size} — "
                                "the file was truncated or changed after saving")
        try:
            header = safetensors_header(path, rel)
            with open(path, "rb") as f:  # the byte ranges of a header safetensors_header has just checked
                (n,) = struct.unpack("<Q", f.read(8))
                raw = json.loads(f.read(n).decode("utf-8"))
        except FileCheckError as e:
            raise ArtifactError(str(e)) from e
        except OSError as e:
            raise ArtifactError(f"{rel}: cannot be read ({e.strerror or e})") from e
        specs = {k: (_TORCH_DTYPES[v["dtype"]], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}
        offsets = {k: 8 + n + int(raw[k]["data_offsets"][0]) for k in specs}
        return cls(path, rel, size, sha256, specs, offsets, _identity(st))

    def _check_unchanged(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError as e:
            raise ArtifactError(f"{self.rel}: missing — removed after the artifact was loaded from "
                                f"{self.path.parent.parent}; load it again") from e
        if not stat.S_ISREG(st.st_mode) or _identity(st) != self.identity:
            raise ArtifactError(f"{self.rel}: changed on disk after the artifact was loaded from "
                                f"{self.path.parent.parent} (size, time or inode differ); load it again")

    def read_bytes(self) -> bytes:
        """The whole file, checked (identity, size, and SHA-256 when the load verified it)."""
        self._check_unchanged()
        data = self.path.read_bytes()
        if len(data) != self.size:
            raise ArtifactError(f"{self.rel}: size is {len(data)} bytes, manifest.json says {self.size} — "
                                "the file was truncated or changed after saving")
        if self.sha256 is not None and sha256_bytes(data) != self.sha256:
            raise ArtifactError(f"{self.rel}: sha256 mismatch — the file was changed or corrupted after saving")
        return data

    def load(self) -> dict[str, Tensor]:
        """Every tensor of the file (on the CPU), after the checks of :meth:`read_bytes`."""
        data = self.read_bytes()
        if self.sha256 is None:  # not hashed: at least the header must be the one checked at load
            try:
                header = safetensors_header(data, self.rel)
            except FileCheckError as e:
                raise ArtifactError(str(e)) from e
            specs = {k: (_TORCH_DTYPES[v["dtype"]], tuple(v["shape"])) for k, v in header.items()
                     if k != "__metadata__"}
            if specs != self.specs:
                raise ArtifactError(f"{self.rel}: tensors differ from when the artifact was loaded; load it again")
        try:
            return load_tensors_bytes(data)
        except Exception as e:  # the header was valid; anything else is damage
            raise ArtifactError(f"{self.rel}: cannot be read as safetensors ({e})") from e

    def read(self, parts: Mapping[str, tuple[int, int] | None]) -> dict[str, Tensor]:
        """Some tensors of the file, whole (``None``) or rows ``[start, stop)`` of their first dimension.

        Reads only those bytes; checks the file's identity, not its hash (see the module docstring).
        """
        self._check_unchanged()
        out: dict[str, Tensor] = {}
        with open(self.path, "rb") as f:
            for key, rows in parts.items():
                if key not in self.specs:
                    raise ArtifactError(f"{self.rel}: has no tensor named {key!r}")
                dtype, shape = self.specs[key]
                if not shape:
                    raise ArtifactError(f"{self.rel}: tensor {key!r} has no rows to read")
                row = _nbytes((dtype, shape[1:]))
                start, stop = (0, shape[0]) if rows is None else rows
                if not 0 <= start <= stop <= shape[0]:
                    raise ArtifactError(f"{self.rel}: rows {start}:{stop} of {key!r} are outside its {shape[0]} rows")
                f.seek(self.offsets[key] + start * row)
                buf = f.read((stop - start) * row)
                if len(buf) != (stop - start) * row:
                    raise ArtifactError(f"{self.rel}: truncated after the artifact was loaded; load it again")
                t = torch.frombuffer(bytearray(buf), dtype=dtype) if buf else torch.empty(0, dtype=dtype)
                out[key] = t.reshape(stop - start, *shape[1:])
        return out

    def meta(self) -> dict[str, Tensor]:
        """Every tensor as a ``meta`` tensor (dtype and shape, no data): for checks that need no values."""
        return {k: torch.empty(shape, dtype=dtype, device="meta") for k, (dtype, shape) in self.specs.items()}


@dataclass(frozen=True, eq=False)
class Deferred:
    """Tensors computed on access (``load()``), with their (dtype, shape) known beforehand."""

    load: Callable[[], dict[str, Tensor]]
    specs: dict[str, Spec]


Entry = dict[str, Tensor] | TensorFile | Deferred


class TensorFiles(Mapping[str, dict[str, Tensor]]):
    """``name -> {tensor name: Tensor}`` whose entries may live on disk: ``files[name]`` reads them.

    A read-only mapping; ``name in files``, ``len``, iteration and :meth:`specs` never read data.
    Each access of a file entry reads and checks it again (nothing is cached: hold the result as
    long as it is needed, and no longer).
    """

    def __init__(self, entries: Mapping[str, Entry] | None = None) -> None:
        self._entries: dict[str, Entry] = dict(entries or {})
        for name, e in self._entries.items():
            if not isinstance(e, (dict, TensorFile, Deferred)):
                raise ValueError(f"entry {name!r} must be a dict of tensors, a TensorFile or a Deferred, "
                                 f"got {type(e).__name__}")

    def __getitem__(self, name: str) -> dict[str, Tensor]:
        e = self._entries[name]
        if isinstance(e, TensorFile):
            return e.load()
        if isinstance(e, Deferred):
            return e.load()
        return e

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        kinds = {n: "file" if isinstance(e, TensorFile) else "deferred" if isinstance(e, Deferred) else "memory"
                 for n, e in self._entries.items()}
        return f"TensorFiles({kinds})"

    def entry(self, name: str) -> Entry:
        """The entry itself (tensors, :class:`TensorFile` or :class:`Deferred`), nothing read."""
        return self._entries[name]

    def specs(self, name: str) -> dict[str, Spec]:
        return file_specs(self, name)

    def file_bytes(self, name: str) -> bytes:
        """The entry as safetensors bytes: a file's own checked bytes (copied exactly), else serialised."""
        e = self._entries[name]
        if isinstance(e, TensorFile):
            return e.read_bytes()
        return tensors_to_bytes(self[name])


def file_entry(files: Mapping[str, dict[str, Tensor]], name: str) -> Entry:
    """The entry of ``name`` without reading it (a plain dict's value is its tensors)."""
    return files.entry(name) if isinstance(files, TensorFiles) else files[name]


def file_specs(files: Mapping[str, dict[str, Tensor]], name: str) -> dict[str, Spec]:
    """(dtype, shape) of every tensor of ``name``, read from the header, never from the data."""
    e = file_entry(files, name)
    if isinstance(e, (TensorFile, Deferred)):
        return dict(e.specs)
    return {k: (t.dtype, tuple(t.shape)) for k, t in e.items()}


def file_payload_bytes(files: Mapping[str, dict[str, Tensor]], name: str) -> int:
    """Bytes of the tensors of one entry (numel x element size), without reading the data."""
    return sum(_nbytes(s) for s in file_specs(files, name).values())


def payload_bytes(files: Mapping[str, dict[str, Tensor]]) -> int:
    """Bytes of every tensor of every entry, for a plain dict of tensors or :class:`TensorFiles`.

    Use this (not a loop over ``files.values()``) to measure label files: it reads no data.
    """
    return sum(file_payload_bytes(files, name) for name in files)


def as_tensor_files(value: Any) -> TensorFiles:
    """``value`` (a dict of name -> tensors, or TensorFiles) as a :class:`TensorFiles`."""
    if isinstance(value, TensorFiles):
        return value
    return TensorFiles(dict(value))


# safetensors' dtype order (its Rust ``Dtype`` enum, "increasing alignment order"): a file lays its tensors
# out by this order descending, then by name, and the header lists them in that order
_ST_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
             "I64", "U64")
_ST_NAMES = {v: k for k, v in _TORCH_DTYPES.items()}


def safetensors_size(specs: Mapping[str, Spec]) -> int:
    """Exact size in bytes of the safetensors file ``tensors_to_bytes`` writes for tensors of these
    (dtype, shape), computed without any tensor: 8 (header length) + the JSON header padded with spaces
    to a multiple of 8 + the data. The header lists each tensor as ``{"dtype", "shape", "data_offsets"}``
    in safetensors' layout order (dtype alignment descending, then name; ``safetensors/src/tensor.rs``,
    ``prepare``), compact JSON, no ``__metadata__``. What a label store's file sizes are predicted by
    (:func:`decoct.formats.label_pruning.label_store_bytes`)."""
    rank = {name: i for i, name in enumerate(_ST_ORDER)}
    items = sorted(((_ST_NAMES[d], name, tuple(int(s) for s in shape)) for name, (d, shape) in specs.items()),
                   key=lambda t: (-rank[t[0]], t[1]))
    header: dict[str, Any] = {}
    offset = 0
    for dt, name, shape in items:
        n = _nbytes((_TORCH_DTYPES[dt], shape))
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    h = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode())
    return 8 + h + (8 - h % 8) % 8 + offset
