"""The images of a saved distilled set, decoded per batch from its files instead of held as one tensor.

A distilled ImageNet-1K set at IPC 50 is 50,000 images of 3x224x224: 7.5 GB of uint8 pixels (and
four times that as float32). Sets whose pixels exceed :func:`max_set_bytes` (``$DECOCT_MAX_SET_BYTES``,
default 2 GiB) are meant to be trained from an :class:`ImageBank`: an index of the artifact's image
files that decodes only the images a batch asks for. The soft-label trainer
(:func:`decoct.train.soft_students.train_fkd`) takes a bank wherever it takes the set's uint8 pixels,
with the same result bit for bit (the pixels are the same; docs/label-store.md, Reading a store).

What is checked is what :meth:`DistilledSet.load <decoct.formats.artifact.DistilledSet.load>` checks:
the manifest, and with ``verify`` every file's size and SHA-256 (streamed) when the bank is opened;
then each image file when it is read: its size against the manifest, its SHA-256 again (with
``verify``), its PNG header against the manifest before it is decoded. Every problem raises
:class:`~decoct.formats.errors.ArtifactError` naming the file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from decoct.data.types import DatasetInfo, to_uint8
from decoct.formats.artifact import (
    _FLOAT_FILE,
    _FLOAT_STORAGE_DTYPES,
    _SOFT_FILE,
    MANIFEST,
    _check_target,
    _component_sizes,
    _integrity_problems,
    _Layout,
    _layout_raw_bits,
    _layout_storage,
    _open_label_files,
    _parse_manifest,
    _PayloadWriter,
    _read_listed,
    _read_manifest,
    _safe_rel,
    _storage_claim_problems,
    _storage_of,
    _store_record,
)
from decoct.formats.errors import ArtifactError
from decoct.formats.png import decode_png
from decoct.formats.tensor_files import TensorFile, TensorFiles, as_tensor_files
from decoct.runtime.config import env_bytes
from decoct.runtime.io import atomic_write_json, replace_dir, sha256_bytes

__all__ = ["DEFAULT_MAX_SET_BYTES", "ImageBank", "max_set_bytes", "pixel_bytes"]

DEFAULT_MAX_SET_BYTES = 2 * 2**30


def max_set_bytes() -> int:
    """uint8 pixel bytes above which a distilled set is read per batch from its files:
    ``$DECOCT_MAX_SET_BYTES`` (a number of bytes), or 2 GiB."""
    return env_bytes("DECOCT_MAX_SET_BYTES", DEFAULT_MAX_SET_BYTES)


def pixel_bytes(path: str | Path) -> int:
    """Bytes of the uint8 pixels of the artifact at ``path`` (N x C x H x W), from its checked manifest."""
    layout = _parse_manifest(_read_manifest(Path(path)))
    c, h, w = layout.info.image_shape
    return layout.num_images * c * h * w


def _raise(root: Path, problems: list[str]) -> None:
    if len(problems) == 1:
        one = problems[0]
        raise ArtifactError(one if one.startswith(str(root)) else f"{root}: {one}")
    raise ArtifactError(f"{root}: artifact failed verification ({len(problems)} problems):\n  " + "\n  ".join(problems))


class ImageBank:
    """A saved set's images, read per batch: ``bank.batch(idx)`` is ``DistilledSet.load(path).images[idx]``.

    Also carries what the soft protocol needs besides the pixels: ``info``, ``labels`` (hard, in
    storage order), ``method``/``config``/``meta`` (the manifest's), ``label_files`` (read on access,
    as a loaded set's; not the soft labels nor the attachments, whose names are ``attachment_names``),
    :meth:`storage` and :meth:`fingerprint` (the label store's
    :func:`~decoct.formats.label_store.set_fingerprint`, computed by streaming every image once).
    Open with :meth:`open`; :meth:`save_with_label_files` writes the set with other label files.
    """

    def __init__(self, root: Path, layout: _Layout, verified: bool, workers: int,
                 sizes: dict[str, int] | None = None) -> None:
        self.root = root
        self.info: DatasetInfo = layout.info
        self._layout = layout
        self._verified = verified
        self.workers = max(1, int(workers))
        self.labels = torch.repeat_interleave(torch.arange(self.info.num_classes), torch.tensor(layout.counts))
        self.shape: tuple[int, int, int, int] = (layout.num_images, *self.info.image_shape)
        self.label_files: TensorFiles = _open_label_files(root, layout, verified)
        self.method, self.config, self.meta = layout.method, layout.config, layout.meta
        self.attachment_names: tuple[str, ...] = tuple(
            _safe_rel(rel).parts[1][: -len(".safetensors")] for rel, e in layout.files.items()
            if e["component"] == "extra")
        self._float: TensorFile | None = None
        if layout.storage_kind in _FLOAT_STORAGE_DTYPES:
            entry = layout.files[_FLOAT_FILE]
            self._float = TensorFile.open(root / _FLOAT_FILE, _FLOAT_FILE, entry["bytes"],
                                          entry["sha256"] if verified else None)
            want = (_FLOAT_STORAGE_DTYPES[layout.storage_kind], self.shape)
            if self._float.specs.get("images") != want:
                raise ArtifactError(f"{_FLOAT_FILE}: tensor 'images' is {self._float.specs.get('images')}, "
                                    f"expected {want}")
        self._fingerprint: str | None = None
        if sizes is None:
            sizes = {rel: int(e["bytes"]) for rel, e in layout.files.items()}
        self._storage = _layout_storage(root, layout, sizes, self.label_files)

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True, workers: int | None = None) -> ImageBank:
        """Check the artifact at ``path`` and index its images; nothing is decoded. With ``verify``, what
        :meth:`DistilledSet.load <decoct.formats.artifact.DistilledSet.load>` checks before decoding: every
        file hashed (streamed), and every ``storage`` claim of the manifest against the measured files
        and the file headers. ``workers``: threads decoding a batch (default up to 8)."""
        root = Path(path)
        manifest = _read_manifest(root)
        layout = _parse_manifest(manifest)
        sizes = None
        if verify:
            problems, sizes = _integrity_problems(root, layout, manifest)
            if problems:
                _raise(root, problems)
        if workers is None:
            workers = min(8, os.cpu_count() or 1)
        bank = cls(root, layout, verify, workers, sizes)
        if verify:
            problems = _storage_claim_problems(manifest["storage"], bank._storage, tuple(bank._storage))
            if problems:
                _raise(root, problems)
        return bank

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ImageBank({str(self.root)!r}, n={len(self)}, image_shape={self.info.image_shape})"

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    @property
    def nbytes(self) -> int:
        """Bytes the pixels would take as one uint8 tensor."""
        n, c, h, w = self.shape
        return n * c * h * w

    def _image(self, i: int) -> Tensor:
        layout = self._layout
        rel = layout.image_files[i]
        data = _read_listed(self.root, layout, rel)  # size against the manifest first
        if self._verified and sha256_bytes(data) != layout.files[rel]["sha256"]:
            raise ArtifactError(f"{rel}: sha256 mismatch — the file was changed or corrupted after saving")
        k = layout.palette_sizes[i] if layout.palette_sizes is not None else None
        return decode_png(data, rel, self.info, layout.storage_kind == "png-palette", k)[0]

    def batch(self, idx: Tensor | Sequence[int]) -> Tensor:
        """uint8 (B, C, H, W) pixels of the images ``idx`` (positions in storage order), decoded now."""
        pos = torch.as_tensor(idx).long().flatten().tolist()
        n = len(self)
        bad = [i for i in pos if not 0 <= i < n]
        if bad:
            raise IndexError(f"image index {bad[0]} outside [0, {n}) of {self.root}")
        if self._float is not None:
            rows = [self._float.read({"images": (i, i + 1)})["images"] for i in pos]
            x = torch.cat(rows) if rows else torch.empty(0, *self.shape[1:], dtype=self._float.specs["images"][0])
            return to_uint8(x.float(), self.info)
        if not pos:
            return torch.empty(0, *self.shape[1:], dtype=torch.uint8)
        if self.workers == 1 or len(pos) == 1:
            return torch.stack([self._image(i) for i in pos])
        with ThreadPoolExecutor(min(self.workers, len(pos))) as pool:  # zlib and Pillow release the GIL
            return torch.stack(list(pool.map(self._image, pos)))

    def chunks(self, size: int = 256) -> Iterator[Tensor]:
        """Every image in storage order, ``size`` at a time."""
        for s in range(0, len(self), size):
            yield self.batch(range(s, min(len(self), s + size)))

    def fingerprint(self) -> str:
        """The set's :func:`~decoct.formats.label_store.set_fingerprint`, streamed (computed once)."""
        if self._fingerprint is None:
            from decoct.formats.label_store import stream_fingerprint

            self._fingerprint = stream_fingerprint(self.shape, self.info.num_classes, self.chunks(), self.labels)
        return self._fingerprint

    def storage(self) -> dict[str, Any]:
        """What :meth:`DistilledSet.storage <decoct.formats.artifact.DistilledSet.storage>` gives for this
        artifact, computed from the files measured when the bank was opened and their headers (equal to
        the manifest's claims, which :meth:`open` checks with ``verify``)."""
        return {k: dict(v) if isinstance(v, dict) else v for k, v in self._storage.items()}

    def save_with_label_files(self, path: str | Path, label_files: Mapping[str, dict[str, Tensor]], *,
                              overwrite: bool = False) -> Path:
        """Write this set to ``path`` with ``label_files`` in place of its own (the FKD store of a
        relabel or a pruning), every other file copied byte for byte, nothing decoded: the artifact
        ``dataclasses.replace(DistilledSet.load(root), label_files=label_files).save(path)`` writes,
        for a set too large to load. Atomic as :meth:`DistilledSet.save
        <decoct.formats.artifact.DistilledSet.save>`; each copied file is checked (size, and SHA-256
        when the bank was opened with ``verify``) as it is read. ``path`` may be the bank's own root."""
        final = Path(path)
        _check_target(final, overwrite)
        layout = self._layout
        labels = as_tensor_files(label_files)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            writer = _PayloadWriter(tmp)
            put, files = writer.put, writer.files

            def copy(rel: str) -> None:
                data = _read_listed(self.root, layout, rel)
                entry = layout.files[rel]
                put(rel, data, entry["component"])
                if self._verified and files[rel]["sha256"] != entry["sha256"]:
                    raise ArtifactError(f"{rel}: sha256 mismatch — the file was changed or corrupted after saving")

            # the order DistilledSet.save writes: images, soft labels, label files, attachments
            for rel in layout.image_files:
                copy(rel)
            if _SOFT_FILE in layout.files:
                copy(_SOFT_FILE)
            for name in labels:  # one file at a time; a file entry's own bytes are copied
                put(f"labels/{name}.safetensors", labels.file_bytes(name), "labels")
            for rel, entry in layout.files.items():
                if entry["component"] == "extra":
                    copy(rel)
            writer.sync()
            storage = _storage_of(self.info, len(self), layout.storage_kind,
                                  _layout_raw_bits(self.root, layout, labels), _component_sizes(files))
            manifest = _read_manifest(self.root)
            manifest["storage"], manifest["files"] = storage, files
            record = _store_record(labels)  # the new label store's format, as DistilledSet.save records it
            manifest["labels"] = {k: v for k, v in manifest["labels"].items() if k != "store"}
            if record is not None:
                manifest["labels"]["store"] = record
            atomic_write_json(tmp / MANIFEST, manifest)
            replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final
