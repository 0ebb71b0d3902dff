"""``DistilledSet``: the distilled-set artifact, a self-describing directory a user can ship.

Layout of an artifact directory::

    manifest.json                          format, dataset info, labels, storage, file hashes
    images/<c:03d>_<class>/<k:05d>.png     8-bit RGB/L PNG, or palette PNG at 1/2/4/8 bits
    images.safetensors                     instead of PNGs, only when float storage was asked for
    labels/soft.safetensors                soft labels, float16
    labels/<name>.safetensors              other label stores (e.g. FKD)
    extra/<name>.safetensors               attachments that are not distilled data (e.g. ZCA)

:meth:`DistilledSet.export_imagefolder` writes a plain ImageFolder tree plus ``decoct-export.json``
(and ``labels.safetensors`` / ``zca.safetensors``): what evaluation applies to the pixels.

Why a directory of PNGs rather than one tensor file: the pixels a distilled set claims to cost
are exactly the bytes in ``images/``, anyone can look at them, and the storage accounting
(:meth:`DistilledSet.storage`) is measured from real files. Every file's SHA-256 lives in the
manifest so a changed, truncated or missing file is caught at load time.

Nothing read back is trusted unchecked: :meth:`DistilledSet.load`, :func:`verify` and ``decoct
info`` run one check (``_inspect``): the manifest must be a JSON object whose counts, shapes and
palette sizes agree with the files it lists (so its numbers cannot size an allocation), every file
is a plain file (no symbolic links) of the listed size and SHA-256 (hashed in chunks), no file is
unlisted, each PNG's header (size, bit depth, colour type) is checked before it is decoded (images
are at most :data:`MAX_IMAGE_SIDE` pixels a side), each safetensors header before it is loaded,
and the manifest's ``storage`` claims must equal what the files measure. Encoding and decoding the
PNGs themselves is :mod:`decoct.formats.png`; every problem raises
:class:`~decoct.formats.errors.ArtifactError`.

Ordering: an artifact stores images class by class (class 0 first) and, within a class, in the
order they appear in ``images``; loading returns them in that *canonical* order. ``save``
applies a stable sort by label first, so save -> load is the identity exactly for sets that are
already in canonical order (``is_canonical``); use :meth:`DistilledSet.canonical` to reorder.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import Tensor

from decoct.data.types import DatasetInfo, normalize, to_uint8
from decoct.formats.errors import ArtifactError
from decoct.formats.png import bits_for, decode_png, encode_png, gather_palette
from decoct.formats.tensor_files import TensorFile, TensorFiles, payload_bytes
from decoct.runtime.filecheck import (
    FileCheckError,
    confined_path,
    is_int,
    is_sha256,
    read_json_object,
    regular_file_size,
    safetensors_header,
)
from decoct.runtime.io import (
    atomic_write_json,
    fsync_paths,
    load_tensors_bytes,
    pending_replacement,
    replace_dir,
    sha256_bytes,
    sha256_file,
    tensors_to_bytes,
)

__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_MARKER",
    "FORMAT",
    "MAX_IMAGE_SIDE",
    "VERSION",
    "DistilledSet",
    "ExportError",
    "class_dir_name",
    "inspect",
    "verify",
]

FORMAT = "decoct-distilled-set"
VERSION = 1
MANIFEST = "manifest.json"

_FLOAT_STORAGE = {torch.float16: "safetensors-float16", torch.float32: "safetensors-float32"}
_FLOAT_STORAGE_DTYPES = {v: k for k, v in _FLOAT_STORAGE.items()}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SOFT_FILE = "labels/soft.safetensors"
_FLOAT_FILE = "images.safetensors"
_FP16_MAX = 65504.0
_COMPONENTS = ("images", "labels", "extra")
MAX_IMAGE_SIDE = 2048
"""Largest image height/width an artifact may declare (an 8-bit RGB image of 2048x2048 is 12 MB);
checked, with each PNG's own header, before anything is decoded."""
MAX_CHANNELS = 64
EXPORT_FORMAT = "decoct-imagefolder-export"
EXPORT_MARKER = "decoct-export.json"
"""Written at the top of every ImageFolder export: what evaluation applies to the images, and the
mark that lets ``export --force`` replace a directory decoct itself exported (and nothing else)."""
_EXPORT_LABELS = "labels.safetensors"
_EXPORT_ZCA = "zca.safetensors"


class ExportError(ValueError):
    """An export target cannot be written (not empty, not ours, read-only)."""


def _sanitise(name: str) -> str:
    """ASCII-only, filesystem-safe form of a class name (the class index keeps dirs unique)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")
    return s[:48] or "class"


def class_dir_name(index: int, name: str) -> str:
    """Directory of one class inside ``images/``: zero-padded index so dirs sort by class."""
    return f"{index:03d}_{_sanitise(name)}"


def _check_json(value: Any, what: str) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a dict, got {type(value).__name__}")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serialisable (no NaN/inf): {e}") from e


def _check_tensor_files(files: Any, what: str) -> dict[str, dict[str, Tensor]]:
    if isinstance(files, TensorFiles):  # entries on disk were checked when opened, and are not read here
        in_memory = {n: files.entry(n) for n in files if isinstance(files.entry(n), dict)}
        _check_tensor_files(in_memory, what)
        _check_tensor_files({n: {"x": torch.zeros(1)} for n in files if n not in in_memory}, what)
        return files  # type: ignore[return-value]
    if not isinstance(files, dict):
        raise ValueError(f"{what} must be a dict of name -> dict of tensors")
    out: dict[str, dict[str, Tensor]] = {}
    for name, tensors in files.items():
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(
                f"{what} name {name!r} must be 1-64 characters of letters, digits, '_', '.', '-' "
                "and start with a letter or digit (it becomes a file name)"
            )
        if not isinstance(tensors, dict) or not tensors:
            raise ValueError(f"{what}[{name!r}] must be a non-empty dict of str -> Tensor")
        for key, t in tensors.items():
            if not isinstance(key, str) or not isinstance(t, Tensor):
                raise ValueError(f"{what}[{name!r}] must map str -> Tensor, got {key!r}: {type(t)}")
        out[name] = {k: t.detach().cpu() for k, t in tensors.items()}
    return out


@dataclass(eq=False)
class DistilledSet:
    """A distilled dataset: pixels, labels and everything needed to reuse and audit them.

    ``images`` (uint8, N x C x H x W) are always the pixels a model sees. When ``palettes`` /
    ``palette_indices`` are set the set is colour-reduced and stored as palette PNGs; when
    ``float_images`` (normalised, float16/float32) are set the set is stored as floats and
    ``images`` is their uint8 quantisation. All tensors are kept on the CPU. Palette sets use one
    K for every image (``palettes`` is (N, K, C)); the manifest still lists K per image.

    ``label_files`` maps a name to its tensors: a plain dict for a set built in memory; for a
    loaded set a :class:`~decoct.formats.tensor_files.TensorFiles` whose entries stay on disk and
    are read (and checked again) on each access, so a label store of gigabytes is never held whole
    (docs/label-store.md, Reading a store). Measure them with
    :func:`~decoct.formats.tensor_files.payload_bytes`, not by loading every value.
    """

    info: DatasetInfo
    images: Tensor
    labels: Tensor
    soft_labels: Tensor | None = None
    palette_indices: Tensor | None = None
    palettes: Tensor | None = None
    method: str = "custom"
    config: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    attachments: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    label_files: Mapping[str, dict[str, Tensor]] = field(default_factory=dict)
    float_images: Tensor | None = None
    _last_storage: dict | None = field(default=None, init=False, repr=False)

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        info = self.info
        if not isinstance(info, DatasetInfo):
            raise ValueError(f"info must be a DatasetInfo, got {type(info).__name__}")
        if not isinstance(self.images, Tensor):
            raise ValueError("images must be a torch.Tensor")
        self.images = self.images.detach().cpu()
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if tuple(self.images.shape[1:]) != info.image_shape:
            raise ValueError(
                f"images have shape (C, H, W) = {tuple(self.images.shape[1:])}, dataset "
                f"{info.name!r} needs {info.image_shape}"
            )
        n = self.images.shape[0]
        if n == 0:
            raise ValueError("a distilled set needs at least one image")

        if not isinstance(self.labels, Tensor):
            raise ValueError("labels must be a torch.Tensor")
        labels = self.labels.detach().cpu()
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        self.labels = labels.long()
        lo, hi = int(self.labels.min()), int(self.labels.max())
        if lo < 0 or hi >= info.num_classes:
            raise ValueError(
                f"labels must be in [0, {info.num_classes}) for {info.num_classes} classes, "
                f"got values in [{lo}, {hi}]"
            )

        if self.soft_labels is not None:
            soft = self.soft_labels.detach().cpu()
            if not soft.is_floating_point():
                raise ValueError(f"soft_labels must be a float tensor, got {soft.dtype}")
            if soft.shape != (n, info.num_classes):
                raise ValueError(
                    f"soft_labels must have shape ({n}, {info.num_classes}), got {tuple(soft.shape)}"
                )
            if not torch.isfinite(soft).all() or soft.abs().max() > _FP16_MAX:
                raise ValueError(
                    "soft_labels must be finite and within float16 range (|x| <= 65504)"
                )
            self.soft_labels = soft

        if (self.palettes is None) != (self.palette_indices is None):
            raise ValueError("palettes and palette_indices must be given together")
        if self.palettes is not None and self.palette_indices is not None:
            if self.float_images is not None:
                raise ValueError("a set is stored either as palettes or as float images, not both")
            self._check_palette(n)

        if self.float_images is not None:
            self._check_float(n)

        if not isinstance(self.method, str) or not self.method:
            raise ValueError("method must be a non-empty string")
        _check_json(self.config, "config")
        _check_json(self.meta, "meta")
        self.attachments = _check_tensor_files(self.attachments, "attachments")
        self.label_files = _check_tensor_files(self.label_files, "label_files")
        if "soft" in self.label_files:
            raise ValueError("label_files name 'soft' is reserved for soft_labels")

    def _check_palette(self, n: int) -> None:
        info = self.info
        pal = self.palettes.detach().cpu()  # type: ignore[union-attr]
        idx = self.palette_indices.detach().cpu()  # type: ignore[union-attr]
        if (
            pal.dtype != torch.uint8
            or pal.dim() != 3
            or pal.shape[0] != n
            or pal.shape[2] != info.channels
        ):
            raise ValueError(
                f"palettes must be uint8 ({n}, K, {info.channels}), got {pal.dtype} {tuple(pal.shape)}"
            )
        k = pal.shape[1]
        if not 1 <= k <= 256:
            raise ValueError(f"palette size K must be in 1..256, got {k}")
        if idx.dtype != torch.uint8 or idx.shape != (n, info.height, info.width):
            raise ValueError(
                f"palette_indices must be uint8 ({n}, {info.height}, {info.width}), "
                f"got {idx.dtype} {tuple(idx.shape)}"
            )
        if int(idx.max()) >= k:
            raise ValueError(
                f"palette_indices reach {int(idx.max())} but palettes have K={k} colours"
            )
        if not torch.equal(gather_palette(idx, pal), self.images):
            bad = (gather_palette(idx, pal) != self.images).flatten(1).any(1).nonzero().flatten()
            raise ValueError(
                f"images must equal palettes[n][palette_indices[n]]; they differ for images "
                f"{bad[:10].tolist()} (use DistilledSet.from_palette to build images)"
            )
        self.palettes, self.palette_indices = pal.contiguous(), idx.contiguous()

    def _check_float(self, n: int) -> None:
        x = self.float_images.detach().cpu()  # type: ignore[union-attr]
        if x.dtype not in _FLOAT_STORAGE:
            raise ValueError(f"float_images must be float16 or float32, got {x.dtype}")
        if x.shape != self.images.shape:
            raise ValueError(
                f"float_images must have the images' shape {tuple(self.images.shape)}, "
                f"got {tuple(x.shape)}"
            )
        if not torch.isfinite(x).all():
            raise ValueError("float_images contain NaN or inf")
        diff = (to_uint8(x.float(), self.info).short() - self.images.short()).abs().max()
        if int(diff) > 1:
            raise ValueError(
                "images must be the uint8 quantisation of float_images (to_uint8); "
                "use DistilledSet.from_float"
            )
        self.float_images = x

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_palette(
        cls,
        info: DatasetInfo,
        indices: Tensor,
        palettes: Tensor,
        labels: Tensor,
        **kwargs: Any,
    ) -> DistilledSet:
        """Build a colour-reduced set; ``images`` are computed as ``palettes[n][indices[n]]``."""
        idx = indices.detach().cpu()
        pal = palettes.detach().cpu()
        if idx.dim() != 3 or pal.dim() != 3 or idx.shape[0] != pal.shape[0]:
            raise ValueError(
                f"indices must be (N, H, W) and palettes (N, K, C), got {tuple(idx.shape)} and "
                f"{tuple(pal.shape)}"
            )
        if idx.dtype != torch.uint8 or pal.dtype != torch.uint8:
            raise ValueError(f"indices and palettes must be uint8, got {idx.dtype} and {pal.dtype}")
        if idx.numel() and int(idx.max()) >= pal.shape[1]:
            raise ValueError(f"indices reach {int(idx.max())} but palettes have K={pal.shape[1]}")
        images = gather_palette(idx, pal)
        return cls(info, images, labels, palette_indices=idx, palettes=pal, **kwargs)

    @classmethod
    def from_float(
        cls,
        info: DatasetInfo,
        x: Tensor,
        labels: Tensor,
        *,
        float_storage: torch.dtype | None = None,
        **kwargs: Any,
    ) -> DistilledSet:
        """Build a set from normalised float images (what distillation optimises).

        By default the images are quantised to uint8 (``to_uint8``) and stored as 8-bit PNGs,
        which is what a fair storage comparison assumes. Pass ``float_storage=torch.float16`` or
        ``torch.float32`` to keep the floats themselves (then they are what is stored and counted).
        """
        x = x.detach().cpu()
        if not x.is_floating_point():
            raise ValueError(f"x must be a float tensor of normalised images, got {x.dtype}")
        if float_storage is None:
            return cls(info, to_uint8(x.float(), info), labels, **kwargs)
        if float_storage not in _FLOAT_STORAGE:
            raise ValueError(
                f"float_storage must be torch.float16 or torch.float32, got {float_storage}"
            )
        stored = x.to(float_storage)
        images = to_uint8(stored.float(), info)
        return cls(info, images, labels, float_images=stored, **kwargs)

    # ------------------------------------------------------------------ views
    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        extras = [
            f"{k}={list(v)}"
            for k, v in (("label_files", self.label_files), ("attachments", self.attachments))
            if v
        ]
        return (
            f"DistilledSet(dataset={self.info.name!r}, method={self.method!r}, n={len(self)}, "
            f"image_shape={self.info.image_shape}, storage={self.image_storage!r}, "
            f"soft_labels={self.soft_labels is not None}{''.join(', ' + e for e in extras)})"
        )

    @property
    def ipc(self) -> list[int]:
        """Images per class, one count per class of ``info`` (zeros included)."""
        return torch.bincount(self.labels, minlength=self.info.num_classes).tolist()

    @property
    def hard_labels(self) -> Tensor:
        """Class index per image (int64), whether or not soft labels are also present."""
        return self.labels

    @property
    def is_palette(self) -> bool:
        return self.palettes is not None

    @property
    def palette_sizes(self) -> list[int] | None:
        """Colours per image for palette sets, else None."""
        if self.palettes is None:
            return None
        return [int(self.palettes.shape[1])] * len(self)

    @property
    def image_storage(self) -> str:
        """How the pixels are stored on disk (recorded in the manifest)."""
        if self.float_images is not None:
            return _FLOAT_STORAGE[self.float_images.dtype]
        if self.palettes is not None:
            return "png-palette"
        return "png-rgb" if self.info.channels == 3 else "png-gray"

    @property
    def is_canonical(self) -> bool:
        """True when images are grouped by class in increasing class order (save -> load is exact)."""
        return bool((self.labels[1:] >= self.labels[:-1]).all())

    def canonical(self) -> DistilledSet:
        """A copy reordered by a stable sort on the labels: the order ``save`` stores.

        ``label_files`` and ``attachments`` are carried over unchanged; they are opaque to this
        class, so per-image stores must be built for the canonical order.
        """
        order = torch.sort(self.labels, stable=True).indices

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[order]

        return DistilledSet(
            info=self.info,
            images=self.images[order],
            labels=self.labels[order],
            soft_labels=pick(self.soft_labels),
            palette_indices=pick(self.palette_indices),
            palettes=pick(self.palettes),
            method=self.method,
            config=self.config,
            meta=self.meta,
            attachments=self.attachments,
            label_files=self.label_files,
            float_images=pick(self.float_images),
        )

    def to_float(self, device: torch.device | str | None = None) -> Tensor:
        """Normalised float32 images for training: the stored floats, or the uint8 pixels normalised."""
        if self.float_images is not None:
            return self.float_images.to(device=device, dtype=torch.float32)
        return normalize(self.images, self.info, device)

    # ------------------------------------------------------------------ saving
    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the artifact directory atomically and return its path.

        Files are written into a temporary directory next to ``path`` which then replaces
        ``path`` in one step, so a crash leaves either the old artifact or the new one. Refuses
        to replace a non-empty directory that is not a decoct artifact, and an existing artifact
        unless ``overwrite=True``. Images are stored in canonical order (stable sort by label).
        """
        final = Path(path)
        _check_target(final, overwrite)
        if not self.is_canonical and self.label_files:
            raise ValueError(
                "the set is not in canonical (class-sorted) order and has label_files, which may "
                "be indexed per image; build it with set.canonical() and matching label_files"
            )
        ds = self if self.is_canonical else self.canonical()
        if ds.float_images is None and self.info.channels not in (1, 3):
            raise ValueError(
                f"PNG storage supports 1 or 3 channels, got {self.info.channels}; "
                "use DistilledSet.from_float(..., float_storage=torch.float16)"
            )
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            files = ds._write_payload(tmp)
            storage = ds._storage_from_sizes(_component_sizes(files))
            atomic_write_json(tmp / MANIFEST, ds._manifest(files, storage))
            replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._last_storage = storage
        return final

    def _write_payload(self, root: Path) -> dict[str, dict[str, Any]]:
        """Write every data file under ``root``; returns the manifest's ``files`` table."""
        writer = _PayloadWriter(root)
        put = writer.put

        if self.float_images is not None:
            put(_FLOAT_FILE, tensors_to_bytes({"images": self.float_images}), "images")
        else:
            for rel, i in self._image_paths():
                if self.palettes is not None and self.palette_indices is not None:
                    data = encode_png(self.images[i], self.palette_indices[i], self.palettes[i])
                else:
                    data = encode_png(self.images[i])
                put(rel, data, "images")
        if self.soft_labels is not None:
            put(_SOFT_FILE, tensors_to_bytes({"soft_labels": self.soft_labels.half()}), "labels")
        for name in self.label_files:  # one file at a time; a loaded file's own bytes are copied
            files_ = self.label_files
            data = files_.file_bytes(name) if isinstance(files_, TensorFiles) else tensors_to_bytes(files_[name])
            put(f"labels/{name}.safetensors", data, "labels")
        for name, tensors in self.attachments.items():
            put(f"extra/{name}.safetensors", tensors_to_bytes(tensors), "extra")
        writer.sync()
        return writer.files

    def _image_paths(self) -> list[tuple[str, int]]:
        """(relative PNG path, image index) for every image, in storage order."""
        out: list[tuple[str, int]] = []
        for c, name in enumerate(self.info.classes):
            members = (self.labels == c).nonzero().flatten().tolist()
            for k, i in enumerate(members):
                out.append((f"images/{class_dir_name(c, name)}/{k:05d}.png", i))
        return out

    def _manifest(self, files: dict[str, dict[str, Any]], storage: dict) -> dict[str, Any]:
        m: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "dataset": self.info.to_dict(),
            "method": self.method,
            "config": self.config,
            "meta": self.meta,
            "counts_per_class": self.ipc,
            "num_images": len(self),
            "image_storage": self.image_storage,
        }
        if self.palette_sizes is not None:
            m["palette_sizes"] = self.palette_sizes
        m["labels"] = {"hard": self.labels.tolist()}
        store = _store_record(self.label_files)
        if store is not None:  # the label store's format and encoding (docs/artifact.md, manifest)
            m["labels"]["store"] = store
        m["storage"] = storage
        m["files"] = files
        return m

    # ------------------------------------------------------------------ storage accounting
    def _raw_bits(self) -> dict[str, int]:
        soft = self.soft_labels.numel() if self.soft_labels is not None else 0
        extra = sum(t.numel() * t.element_size() for ts in self.attachments.values() for t in ts.values())
        # label files measured from their headers: no label file is read
        return _raw_bits_of(self.info, len(self), self.image_storage, self.palette_sizes, soft,
                            payload_bytes(self.label_files), extra)

    def _storage_from_sizes(self, disk: dict[str, int]) -> dict[str, Any]:
        return _storage_of(self.info, len(self), self.image_storage, self._raw_bits(), disk)

    def storage(self, path: str | Path | None = None) -> dict[str, Any]:
        """What this distilled set costs, in bytes on disk and in raw information.

        ``bytes_on_disk`` is measured from the artifact files at ``path`` (or taken from the last
        ``save``/``load`` when ``path`` is None): ``images`` (PNGs or images.safetensors),
        ``labels`` (labels/*.safetensors), ``extra`` (extra/*, e.g. ZCA state, not part of the
        distilled data) and ``total = images + labels``. manifest.json is never counted; hard
        labels are encoded by the class directories and cost no file of their own.

        ``raw_bytes`` is the information content, ``ceil(bits / 8)`` per entry:

        - images, 8-bit sets: ``N*C*H*W*8``; float sets: ``numel * dtype bits``;
          palette sets: ``sum_n H*W*max(1, ceil(log2 K_n))``
        - palettes: ``sum_n K_n*C*8`` (0 for non-palette sets)
        - labels: hard ``N*ceil(log2 num_classes)`` + soft ``numel*16`` + each label file
          ``numel * dtype bits``
        - extra: attachments ``numel * dtype bits`` (not in the total)
        - total: ``ceil((images + palettes + labels bits) / 8)``

        ``bits_per_pixel`` (per spatial pixel, all channels): ``raw`` = (images + palettes bits)
        / (N*H*W), ``on_disk`` = 8 * bytes_on_disk.images / (N*H*W).
        """
        if path is None:
            if self._last_storage is None:
                raise ValueError("storage(): this set has not been saved or loaded; pass a path")
            return json.loads(json.dumps(self._last_storage))
        root = Path(path)
        layout = _parse_manifest(_read_manifest(root))
        sizes: dict[str, int] = {}
        for rel in layout.files:
            try:
                sizes[rel] = regular_file_size(confined_path(root, rel, "manifest.json"), rel)
            except FileNotFoundError as e:
                raise ArtifactError(f"{rel}: missing — listed in manifest.json but not found") from e
            except FileCheckError as e:
                raise ArtifactError(str(e)) from e
        return self._storage_from_sizes(_measured_components(layout, sizes))

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> DistilledSet:
        """Read an artifact; with ``verify`` every file's size and SHA-256 are checked first.

        Any problem (missing/changed/undecodable/linked/unlisted file, wrong format, numbers that
        disagree with the files, storage claims that disagree with the measured files) raises
        :class:`ArtifactError` naming the file: exactly the problems :func:`verify` and
        ``decoct info`` report. ``verify=False`` skips hashing (sizes and headers are still
        checked before anything is read or decoded).
        """
        root = Path(path)
        if not (root / "manifest.json").exists() and pending_replacement(root):
            # a kill between replace_dir's renames: the run layer repairs it under the run's lock
            run = root.parent if root.name == "artifact" else root
            raise ArtifactError(
                f"{root}: a replacement of this artifact was interrupted (a staged or backup copy waits "
                f"beside it); repair it with `decoct info {run}` (or decoct.runtime.runs.resolve_artifact) and load again")
        problems, ds, _ = _inspect(root, check_files=verify)
        if problems or ds is None:
            if len(problems) == 1:
                one = problems[0]
                raise ArtifactError(one if one.startswith(str(root)) else f"{root}: {one}")
            raise ArtifactError(
                f"{root}: artifact failed verification ({len(problems)} problems):\n  " + "\n  ".join(problems)
            )
        return ds

    @staticmethod
    def verify(path: str | Path) -> list[str]:
        """Problems with the artifact at ``path`` (empty when intact); never raises for them."""
        return verify(path)

    # ------------------------------------------------------------------ export
    def export_imagefolder(self, out_dir: str | Path, *, overwrite: bool = False) -> Path:
        """Write a plain ``<out>/<class_name>/<k:05d>.png`` tree for tools that read ImageFolder,
        plus what evaluation applies to those pixels, so nothing the set needs is lost.

        8-bit PNGs (RGB, or L for one channel; palette sets are expanded), written via a temp
        directory so the export appears complete or not at all. Classes without images get no
        directory (ImageFolder rejects empty class folders). Beside the class folders:

        - ``decoct-export.json``: class order and folders, the file of every row, hard labels,
          normalisation, the learned learning rate, which side files exist and how to apply them
          (``apply``: the lines :meth:`export_notes` returns), and what was not exported;
        - ``labels.safetensors`` (soft-label sets): ``soft_labels`` (N, classes) float32 logits,
          row i for ``files[i]``, columns in decoct's class order;
        - ``zca.safetensors`` (ZCA sets): ``mean`` (D,) and ``W`` (D, D) float32, applied after
          normalisation as ``x' = (x.reshape(N, D) - mean) @ W``.

        ``out_dir`` must be new, empty, or an earlier decoct export (replaced only with
        ``overwrite=True``; a foreign non-empty directory is never replaced). Raises
        :class:`ExportError` otherwise, or when the location is not writable.
        """
        out = Path(out_dir)
        _check_export_target(out, overwrite)
        names = [_folder_name(c, name) for c, name in enumerate(self.info.classes)]
        if len(set(names)) != len(names):
            raise ValueError(f"class names collide after making them file-system safe: {names}")
        parent = out.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            if not os.access(parent, os.W_OK | os.X_OK):
                raise PermissionError(13, "permission denied", str(parent))
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
        except OSError as e:
            raise ExportError(f"cannot export to {out}: cannot write in {parent} ({e.strerror or e}); "
                              "choose a directory you can write to") from e
        try:
            written: list[Path] = []
            dirs: list[Path] = []
            rows: list[tuple[str, int]] = []
            for c, name in enumerate(names):
                members = (self.labels == c).nonzero().flatten().tolist()
                if not members:
                    continue
                d = tmp / name
                d.mkdir()
                dirs.append(d)
                for k, i in enumerate(members):
                    p = d / f"{k:05d}.png"
                    p.write_bytes(encode_png(self.images[i]))
                    written.append(p)
                    rows.append((f"{name}/{k:05d}.png", i))
            written += self._write_export_side_files(tmp, names, rows)
            fsync_paths(written)
            fsync_paths(dirs + [tmp])
            replace_dir(tmp, out)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ExportError(f"cannot export to {out}: {e.strerror or e} ({e.filename or out})") from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out

    def _label_store_summary(self) -> dict[str, Any] | None:
        from decoct.formats.label_store import HEADER_FILE, LabelStore

        if HEADER_FILE not in self.label_files:
            return None
        out: dict[str, Any] = {"name": HEADER_FILE, "exported": False}
        try:
            store = LabelStore.from_label_files(self.label_files)
            if store is not None:
                out.update(epochs=store.header["epochs"], batch=store.batch, prune_factor=store.prune_factor,
                           label_format=store.encoding.name)
        except ValueError:
            pass
        out["note"] = ("teacher logits of recorded crops/flips/mixes of these images, replayed by decoct's soft "
                       "protocol: use it with `decoct evaluate RUN --protocol soft`, or label the exported images "
                       "with your own teacher")
        return out

    def export_notes(self) -> list[str]:
        """What a consumer of an ImageFolder export must apply to train as decoct evaluates this
        set (printed by ``decoct export`` and stored as ``apply`` in decoct-export.json)."""
        info = self.info
        mean = ", ".join(f"{v:.4g}" for v in info.mean)
        std = ", ".join(f"{v:.4g}" for v in info.std)
        notes = [f"normalise: x = (pixel / 255 - mean) / std per channel, mean ({mean}), std ({std})"]
        if "zca" in self.attachments:
            notes.append(f"this set was trained with ZCA whitening: apply {_EXPORT_ZCA} after normalising, "
                         "x' = (x.reshape(N, -1) - mean) @ W (train and test images alike); without it the "
                         "images are not what the set was distilled for")
        if "syn_lr" in self.meta:
            notes.append(f"learned lr {float(self.meta['syn_lr']):.6g}: the set was distilled with this student "
                         "step size (meta.syn_lr); decoct's classic/fast protocols train the student with it as "
                         "the SGD learning rate")
        folders = [_folder_name(c, n) for c, n in enumerate(info.classes)]
        used = [f for c, f in enumerate(folders) if bool((self.labels == c).any())]
        reordered = sorted(used) != folders
        if self.soft_labels is not None:
            notes.append(f"soft labels in {_EXPORT_LABELS}: 'soft_labels' row i belongs to files[i] of "
                         f"{EXPORT_MARKER}; they are logits, train with KL(softmax(t) || softmax(out)) "
                         "(temperature 1) instead of the folder labels"
                         + ("; columns follow decoct's class order (classes[].index), not ImageFolder's"
                            if reordered else ""))
        if reordered:
            notes.append(f"class indices: ImageFolder numbers the folders in sorted order, decoct's class index "
                         f"of each folder is in {EXPORT_MARKER} (classes[].index)")
        store = self._label_store_summary()
        if store is not None:
            epochs = f", {store['epochs']} epochs" if "epochs" in store else ""
            notes.append(f"not exported: the FKD label store (labels/fkd*{epochs}): " + store["note"])
        other = sorted(set(self.attachments) - {"zca"}) + sorted(f"labels/{k}" for k in self.label_files
                                                                   if store is None or not k.startswith("fkd"))
        if other:
            notes.append(f"not exported: {', '.join(other)} (decoct-specific files of the artifact)")
        return notes

    def _write_export_side_files(self, root: Path, folders: list[str], rows: list[tuple[str, int]]) -> list[Path]:
        """decoct-export.json (+ labels.safetensors, zca.safetensors when the set has them)."""
        from decoct.augment import ZCA

        written: list[Path] = []
        side = [EXPORT_MARKER]
        order = torch.tensor([i for _, i in rows], dtype=torch.long)
        soft = None
        if self.soft_labels is not None:
            (root / _EXPORT_LABELS).write_bytes(
                tensors_to_bytes({"soft_labels": self.soft_labels[order].float().contiguous()}))
            written.append(root / _EXPORT_LABELS)
            side.append(_EXPORT_LABELS)
            soft = {"file": _EXPORT_LABELS, "tensor": "soft_labels", "shape": [len(rows), self.info.num_classes],
                    "dtype": "float32", "kind": "logits",
                    "loss": "KL(softmax(soft_labels / T) || softmax(out / T)) * T^2 with T = 1"}
        zca = None
        if "zca" in self.attachments:
            z = ZCA.from_state_dict(self.attachments["zca"])
            (root / _EXPORT_ZCA).write_bytes(tensors_to_bytes({"mean": z.mean.float(), "W": z.W.float()}))
            written.append(root / _EXPORT_ZCA)
            side.append(_EXPORT_ZCA)
            zca = {"file": _EXPORT_ZCA, "tensors": {"mean": [int(z.mean.numel())],
                                                    "W": [int(z.W.shape[0]), int(z.W.shape[1])]},
                   "formula": "after normalising: x' = ((x.reshape(N, D) - mean) @ W).reshape(N, C, H, W)"}
        used = sorted({f.split("/")[0] for f, _ in rows})
        marker = {
            "format": EXPORT_FORMAT,
            "version": 1,
            "source": {"method": self.method, "dataset": self.info.name, "image_storage": self.image_storage},
            "dataset": self.info.to_dict(),
            "classes": [{"index": c, "name": n, "folder": folders[c], "images": int((self.labels == c).sum())}
                        for c, n in enumerate(self.info.classes)],
            "imagefolder_index": {f: k for k, f in enumerate(used)},
            "files": [f for f, _ in rows],
            "hard_labels": [int(self.labels[i]) for _, i in rows],
            "normalize": {"mean": list(self.info.mean), "std": list(self.info.std),
                          "formula": "x[c] = (pixel[c] / 255 - mean[c]) / std[c]"},
            "zca": zca,
            "soft_labels": soft,
            "learned_lr": float(self.meta["syn_lr"]) if "syn_lr" in self.meta else None,
            "label_store": self._label_store_summary(),
            "side_files": side,
            "apply": self.export_notes(),
        }
        (root / EXPORT_MARKER).write_text(json.dumps(marker, indent=2, allow_nan=False) + "\n", "utf-8")
        written.append(root / EXPORT_MARKER)
        return written


# ---------------------------------------------------------------------- module helpers
def _folder_name(index: int, name: str) -> str:
    """Human-readable, file-system-safe class folder name for ImageFolder exports."""
    s = re.sub(r'[\x00-\x1f/\\:*?"<>|]+', "_", name).strip(" .")
    return s or f"class_{index}"


def _check_target(final: Path, overwrite: bool) -> None:
    """Refuse to clobber anything that is not a decoct artifact, or one without overwrite=True."""
    if not final.exists():
        return
    if not final.is_dir():
        raise FileExistsError(f"{final} exists and is not a directory")
    manifest = final / MANIFEST
    is_artifact = False
    if manifest.is_file():
        try:
            is_artifact = json.loads(manifest.read_text("utf-8")).get("format") == FORMAT
        except (ValueError, AttributeError, OSError):
            is_artifact = False
    if is_artifact:
        if not overwrite:
            raise FileExistsError(
                f"{final} already holds a distilled set; pass overwrite=True to replace it"
            )
        return
    if any(final.iterdir()):
        raise FileExistsError(
            f"{final} is a non-empty directory that is not a decoct artifact (no decoct "
            "manifest.json); refusing to overwrite it"
        )


class _PayloadWriter:
    """Writes an artifact's data files under ``root`` and builds the manifest's ``files`` table
    (sha256, bytes, component of each); :meth:`sync` makes them durable (files, then their dirs)
    before the directory is renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: dict[str, dict[str, Any]] = {}
        self.dirs: set[Path] = set()

    def put(self, rel: str, data: bytes, component: str) -> None:
        p = self.root / rel
        if p.parent not in self.dirs:
            p.parent.mkdir(parents=True, exist_ok=True)
            self.dirs.add(p.parent)
        p.write_bytes(data)
        self.files[rel] = {"sha256": sha256_bytes(data), "bytes": len(data), "component": component}

    def sync(self) -> None:
        fsync_paths([self.root / rel for rel in self.files])
        fsync_paths(sorted(self.dirs, key=lambda p: len(p.parts), reverse=True))


def export_marker(out: Path, name: str, fmt: str) -> dict[str, Any] | None:
    """The JSON object ``out/name`` when it is a plain file marking an export of format ``fmt``
    (what a decoct export writes beside its files), else None: unreadable or foreign is None."""
    marker = out / name
    try:
        m = read_json_object(marker, str(marker)) if marker.is_file() and not marker.is_symlink() else None
    except FileCheckError:
        return None
    return m if m is not None and m.get("format") == fmt else None


def _check_export_target(out: Path, overwrite: bool) -> None:
    """An export goes to a new or empty directory, or replaces an earlier decoct export (with
    ``overwrite``) that holds nothing but what that export wrote; anything else is refused."""
    if out.is_symlink():
        raise ExportError(f"{out} is a symbolic link; export to a real directory path")
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory; choose another --imagefolder path")
    if not os.access(out, os.W_OK | os.X_OK):
        raise ExportError(f"{out} is not writable (read-only?); choose a directory you can write to")
    if not any(out.iterdir()):
        return
    m = export_marker(out, EXPORT_MARKER, EXPORT_FORMAT)
    if m is None:
        raise ExportError(f"{out} is not empty and is not a decoct export (no {EXPORT_MARKER}); refusing to "
                          "replace it: choose a new or empty directory")
    if not overwrite:
        raise ExportError(f"{out} holds an earlier decoct export; pass --force (in Python: overwrite=True) to replace it")
    ours = set(m.get("files") or []) | set(m.get("side_files") or [])
    for dirpath, dirnames, filenames in os.walk(out):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(out).as_posix()
            if p.is_symlink() or (not p.is_dir() and rel not in ours):
                raise ExportError(f"{out} holds an earlier decoct export plus {rel}, which the export did not "
                                  "write; refusing to replace it (move that file out first)")


def _component_sizes(files: dict[str, dict[str, Any]]) -> dict[str, int]:
    sizes = {"images": 0, "labels": 0, "extra": 0}
    for rel, entry in files.items():
        comp = entry.get("component")
        if comp not in sizes:
            raise ArtifactError(f"{rel}: unknown component {comp!r} in manifest.json")
        sizes[comp] += int(entry["bytes"])
    return sizes


def _safe_rel(rel: Any) -> PurePosixPath:
    """A manifest path, refused if it could point outside the artifact directory."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise ArtifactError(f"manifest.json: invalid file path {rel!r}")
    p = PurePosixPath(rel)
    if p.is_absolute() or any(part in ("", ".", "..") for part in p.parts) or rel == MANIFEST:
        raise ArtifactError(f"manifest.json: unsafe file path {rel!r}")
    return p


def _read_manifest(root: Path) -> dict[str, Any]:
    """manifest.json as a dict with the right format and version (nothing else checked yet)."""
    if not root.is_dir():
        raise ArtifactError(f"{root}: not a directory")
    mpath = root / MANIFEST
    if not mpath.exists() and not mpath.is_symlink():
        raise ArtifactError(f"{root}: no manifest.json — not a decoct distilled-set artifact")
    try:
        manifest = read_json_object(mpath, str(mpath))
    except FileCheckError as e:
        raise ArtifactError(str(e)) from e
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath}: format is {str(manifest.get('format'))[:40]!r}, not {FORMAT!r} — "
                            "not a decoct distilled-set manifest")
    if manifest.get("version") != VERSION:
        raise ArtifactError(
            f"{mpath}: version {str(manifest.get('version'))[:20]!r} is not supported "
            f"(this decoct reads version {VERSION})"
        )
    return manifest


def _files_table(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The manifest's ``files`` table, every entry checked: safe path, sha256, size, component."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactError("manifest.json: 'files' must map paths to {sha256, bytes, component}")
    for rel, entry in files.items():
        _safe_rel(rel)
        if not isinstance(entry, dict):
            raise ArtifactError(f"manifest.json: files[{rel!r}] must be {{sha256, bytes, component}}")
        if not is_sha256(entry.get("sha256")):
            raise ArtifactError(f"manifest.json: files[{rel!r}] has no valid sha256 (64 hex digits)")
        size = entry.get("bytes")
        if not is_int(size, 0):
            raise ArtifactError(f"manifest.json: files[{rel!r}].bytes must be a non-negative integer")
        if entry.get("component") not in _COMPONENTS:
            raise ArtifactError(f"{rel}: unknown component {entry.get('component')!r} in manifest.json")
    return files


def _int_list(v: Any, what: str, lo: int, hi: int) -> list[int]:
    if not isinstance(v, list) or not all(is_int(x, lo, hi) for x in v):
        raise ArtifactError(f"manifest.json: {what} must be a list of integers in [{lo}, {hi}]")
    return v


def _dataset_info(d: Any) -> DatasetInfo:
    """DatasetInfo from the manifest, with every field type- and range-checked first."""
    if not isinstance(d, dict):
        raise ArtifactError("manifest.json: 'dataset' must be an object")
    name, classes = d.get("name"), d.get("classes")
    if not isinstance(name, str) or not name:
        raise ArtifactError("manifest.json: dataset.name must be a non-empty string")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ArtifactError("manifest.json: dataset.classes must be a non-empty list of strings")
    c, h, w = d.get("channels"), d.get("height"), d.get("width")
    if not is_int(c, 1, MAX_CHANNELS):
        raise ArtifactError(f"manifest.json: dataset.channels must be an integer in 1..{MAX_CHANNELS}")
    for key, v in (("height", h), ("width", w)):
        if not is_int(v, 1, MAX_IMAGE_SIDE):
            raise ArtifactError(f"manifest.json: dataset.{key} is {str(v)[:20]}; decoct reads images of "
                                f"1..{MAX_IMAGE_SIDE} pixels a side")
    for key in ("mean", "std"):
        v = d.get(key)
        if (not isinstance(v, list) or len(v) != c
                or not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in v)):
            raise ArtifactError(f"manifest.json: dataset.{key} must be {c} finite numbers")
    if any(x <= 0 for x in d["std"]):
        raise ArtifactError("manifest.json: dataset.std must be positive")
    return DatasetInfo.from_dict(d)


@dataclass
class _Layout:
    """What a manifest says, every number checked against the files it lists (nothing read yet)."""

    info: DatasetInfo
    counts: list[int]
    num_images: int
    storage_kind: str
    palette_sizes: list[int] | None
    files: dict[str, dict[str, Any]]
    image_files: list[str]  # in storage order
    method: str
    config: dict
    meta: dict


def _store_record(label_files: Mapping[str, dict[str, Tensor]]) -> dict[str, Any] | None:
    """The manifest's ``labels.store`` record of the label store in ``label_files`` (None without one)."""
    from decoct.formats.label_store import manifest_entry

    return manifest_entry(label_files)


def _parse_manifest(m: dict[str, Any]) -> _Layout:
    """Check a manifest's structure and numbers before anything is sized by them.

    Every count is bounded by what the manifest itself holds (``labels.hard`` lists every image,
    every PNG must be a listed file) and image sizes by :data:`MAX_IMAGE_SIDE`, so a forged
    manifest fails here, before any allocation proportional to its numbers.
    """
    files = _files_table(m)
    info = _dataset_info(m.get("dataset"))
    counts = _int_list(m.get("counts_per_class"), "counts_per_class", 0, 1 << 62)
    num_images = m.get("num_images")
    if not is_int(num_images, 1):
        raise ArtifactError("manifest.json: num_images must be a positive integer")
    labels = m.get("labels")
    hard = labels.get("hard") if isinstance(labels, dict) else None
    if isinstance(labels, dict) and "store" in labels:
        from decoct.formats.label_store import check_manifest_entry

        try:
            check_manifest_entry(labels["store"])  # a store this version cannot read: one line naming it
        except ValueError as e:
            raise ArtifactError(str(e)) from e
    if not isinstance(hard, list) or len(hard) != num_images:
        raise ArtifactError(
            f"manifest.json: labels.hard must list one class per image ({str(num_images)[:20]} images), "
            f"it has {len(hard) if isinstance(hard, list) else 'none'}")
    if len(counts) != info.num_classes or sum(counts) != num_images:
        raise ArtifactError(
            f"manifest.json: counts_per_class {str(counts)[:80]} do not match {info.num_classes} classes "
            f"and num_images={num_images}"
        )
    pos = 0
    for c, n in enumerate(counts):  # sum(counts) == len(hard): bounded by the manifest's own size
        if any(v != c or not is_int(v) for v in hard[pos:pos + n]):
            raise ArtifactError("manifest.json: labels.hard disagree with counts_per_class")
        pos += n
    storage_kind = m.get("image_storage")
    palette_sizes = m.get("palette_sizes")
    if storage_kind == "png-palette":
        palette_sizes = _int_list(palette_sizes, "palette_sizes", 1, 256)
        if len(palette_sizes) != num_images:
            raise ArtifactError("manifest.json: png-palette storage needs one palette size per image")
    elif palette_sizes is not None:
        raise ArtifactError(f"manifest.json: palette_sizes given for {str(storage_kind)[:30]!r} storage")
    listed_images = {rel for rel, e in files.items() if e["component"] == "images"}
    if storage_kind in _FLOAT_STORAGE_DTYPES:
        image_files = [_FLOAT_FILE]
    elif storage_kind in ("png-rgb", "png-gray", "png-palette"):
        want_c = {"png-rgb": (3,), "png-gray": (1,), "png-palette": (1, 3)}[storage_kind]
        if info.channels not in want_c:
            raise ArtifactError(f"manifest.json: {storage_kind} storage with {info.channels} channels")
        if num_images > len(listed_images):
            raise ArtifactError(f"manifest.json: num_images={num_images} but only {len(listed_images)} image "
                                "files are listed")
        image_files = [f"images/{class_dir_name(c, name)}/{k:05d}.png"
                       for c, name in enumerate(info.classes) for k in range(counts[c])]
    else:
        raise ArtifactError(f"manifest.json: unknown image_storage {str(storage_kind)[:40]!r}")
    if listed_images != set(image_files):
        extra = sorted(listed_images - set(image_files))
        missing = [r for r in image_files if r not in listed_images]
        raise ArtifactError(
            "manifest.json: the image files listed do not match counts_per_class and the classes "
            f"(not listed: {missing[:3]}; listed but not expected: {extra[:3]})")
    for rel, entry in files.items():
        if entry["component"] == "images":
            continue
        parts = _safe_rel(rel).parts
        ok = (len(parts) == 2 and parts[0] in ("labels", "extra") and parts[1].endswith(".safetensors")
              and _NAME_RE.match(parts[1][: -len(".safetensors")]) is not None)
        if not ok:
            raise ArtifactError(f"{rel}: unexpected file listed in manifest.json")
        if entry["component"] != parts[0]:
            raise ArtifactError(f"{rel}: wrong component {entry['component']!r} in manifest.json")
    method, config, meta = m.get("method"), m.get("config"), m.get("meta")
    if not isinstance(method, str) or not isinstance(config, dict) or not isinstance(meta, dict):
        raise ArtifactError("manifest.json: method must be a string, config and meta objects")
    if not isinstance(m.get("storage"), dict):
        raise ArtifactError("manifest.json: 'storage' must be an object")
    return _Layout(info, counts, num_images, storage_kind, palette_sizes, files, image_files, method,
                   config, meta)


def _raw_bits_of(info: DatasetInfo, num_images: int, image_storage: str, palette_sizes: list[int] | None,
                 soft_numel: int, label_payload: int, extra_payload: int) -> dict[str, int]:
    """Raw information bits per component (see :meth:`DistilledSet.storage`), from what a set holds
    or what its manifest and file headers say (:func:`_layout_storage`): nothing is decoded."""
    c, h, w = info.image_shape
    n = num_images
    if image_storage in _FLOAT_STORAGE_DTYPES:
        images = n * c * h * w * torch.empty(0, dtype=_FLOAT_STORAGE_DTYPES[image_storage]).element_size() * 8
        palettes = 0
    elif palette_sizes is not None:
        images = sum(h * w * bits_for(k) for k in palette_sizes)
        palettes = sum(k * c * 8 for k in palette_sizes)
    else:
        images, palettes = n * c * h * w * 8, 0
    labels = n * (info.num_classes - 1).bit_length() + soft_numel * 16 + label_payload * 8
    return {"images": images, "palettes": palettes, "labels": labels, "extra": extra_payload * 8}


def _storage_of(info: DatasetInfo, num_images: int, image_storage: str, bits: dict[str, int],
                disk: dict[str, int]) -> dict[str, Any]:
    """The ``storage`` section of a manifest from raw bits and measured bytes per component."""
    total_bits = bits["images"] + bits["palettes"] + bits["labels"]
    pixels = num_images * info.height * info.width
    return {
        "image_storage": image_storage,
        "bytes_on_disk": {
            "images": disk["images"],
            "labels": disk["labels"],
            "extra": disk["extra"],
            "total": disk["images"] + disk["labels"],
        },
        "raw_bytes": {
            "images": math.ceil(bits["images"] / 8),
            "palettes": math.ceil(bits["palettes"] / 8),
            "labels": math.ceil(bits["labels"] / 8),
            "extra": math.ceil(bits["extra"] / 8),
            "total": math.ceil(total_bits / 8),
        },
        "bits_per_pixel": {
            "raw": (bits["images"] + bits["palettes"]) / pixels,
            "on_disk": disk["images"] * 8 / pixels,
        },
    }


def _layout_raw_bits(root: Path, layout: _Layout, label_files: Mapping[str, dict[str, Tensor]] | None = None
                     ) -> dict[str, int]:
    """:func:`_raw_bits_of` of the artifact at ``root`` from its manifest and the safetensors headers of
    its label and extra files (``label_files`` instead of its own label files when given): nothing
    is decoded and no tensor is read."""
    def opened(component: str) -> TensorFiles:
        out: dict[str, TensorFile] = {}
        for rel, entry in layout.files.items():
            if entry["component"] == component and rel != _SOFT_FILE:
                try:
                    p = confined_path(root, rel, "manifest.json")
                except FileCheckError as e:
                    raise ArtifactError(str(e)) from e
                out[rel] = TensorFile.open(p, rel, entry["bytes"], None)
        return TensorFiles(out)

    labels = label_files if label_files is not None else opened("labels")
    soft = layout.num_images * layout.info.num_classes if _SOFT_FILE in layout.files else 0
    return _raw_bits_of(layout.info, layout.num_images, layout.storage_kind, layout.palette_sizes, soft,
                        payload_bytes(labels), payload_bytes(opened("extra")))


def _layout_storage(root: Path, layout: _Layout, sizes: dict[str, int],
                    label_files: Mapping[str, dict[str, Tensor]] | None = None) -> dict[str, Any]:
    """What :meth:`DistilledSet.storage` gives for the artifact at ``root``, without decoding it
    (:func:`_layout_raw_bits`); bytes from ``sizes``, the measured size of every listed file."""
    return _storage_of(layout.info, layout.num_images, layout.storage_kind,
                       _layout_raw_bits(root, layout, label_files), _measured_components(layout, sizes))


def _measured_components(layout: _Layout, sizes: dict[str, int]) -> dict[str, int]:
    """Bytes per component of the files as measured on disk (listed files only)."""
    out = {c: 0 for c in _COMPONENTS}
    for rel, entry in layout.files.items():
        out[entry["component"]] += sizes.get(rel, 0)
    return out


def _storage_claim_problems(claimed: Any, measured: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    """Where the manifest's ``storage`` section says something other than what was measured."""
    problems = []
    if not isinstance(claimed, dict):
        return ["manifest.json: 'storage' must be an object"]
    for section in keys:
        want, got = measured[section], claimed.get(section)
        if isinstance(want, dict):
            got = got if isinstance(got, dict) else {}
            for k, v in want.items():
                if got.get(k) != v:
                    problems.append(
                        f"manifest.json: storage.{section}.{k} claims {str(got.get(k))[:30]}, the files measure "
                        f"{v:,} — the manifest was edited after saving" if isinstance(v, int) else
                        f"manifest.json: storage.{section}.{k} claims {str(got.get(k))[:30]}, the contents give "
                        f"{v} — the manifest was edited after saving")
        elif got != want:
            problems.append(f"manifest.json: storage.{section} claims {str(got)[:30]!r}, the contents give {want!r}")
    return problems


def _integrity_problems(root: Path, layout: _Layout, manifest: dict[str, Any]) -> tuple[list[str], dict[str, int]]:
    """Links, unlisted files, missing files, size and SHA-256 mismatches, and storage claims that
    disagree with the measured files; one message each. Files are hashed in chunks (streamed).
    Returns (problems, measured size of every listed file present)."""
    problems: list[str] = []
    sizes: dict[str, int] = {}
    files = layout.files
    links: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            p = base / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                links.add(rel)
                problems.append(f"{rel}: is a symbolic link; an artifact may hold only plain files and directories")
            elif name in filenames and rel != MANIFEST and rel not in files:
                problems.append(f"{rel}: not listed in manifest.json — added after saving (remove it)")
        dirnames[:] = sorted(n for n in dirnames if not (base / n).is_symlink())
    for rel, entry in files.items():
        parts = rel.split("/")
        if any("/".join(parts[:i]) in links for i in range(1, len(parts) + 1)):
            continue  # reported above
        try:
            p = confined_path(root, rel, "manifest.json")
            size = regular_file_size(p, rel)
        except FileNotFoundError:
            problems.append(f"{rel}: missing — listed in manifest.json but not found")
            continue
        except FileCheckError as e:
            problems.append(str(e))
            continue
        sizes[rel] = size
        if size != entry["bytes"]:
            problems.append(
                f"{rel}: size is {size} bytes, manifest.json says {entry['bytes']} — "
                "the file was truncated or changed after saving"
            )
        elif sha256_file(p) != entry["sha256"]:
            problems.append(
                f"{rel}: sha256 mismatch — the file was changed or corrupted after saving"
            )
    if not problems:
        comp = _measured_components(layout, sizes)
        measured = {"bytes_on_disk": dict(comp, total=comp["images"] + comp["labels"])}
        problems += _storage_claim_problems(manifest.get("storage"), measured, ("bytes_on_disk",))
    return problems, sizes


def _read_listed(root: Path, layout: _Layout, rel: str) -> bytes:
    """A listed file's bytes, its size checked against the manifest before it is read."""
    if rel not in layout.files:
        raise ArtifactError(f"{rel}: expected file is not listed in manifest.json")
    try:
        p = confined_path(root, rel, "manifest.json")
        size = regular_file_size(p, rel)
    except FileNotFoundError as e:
        raise ArtifactError(f"{rel}: missing — listed in manifest.json but not found") from e
    except FileCheckError as e:
        raise ArtifactError(str(e)) from e
    if size != layout.files[rel]["bytes"]:
        raise ArtifactError(f"{rel}: size is {size} bytes, manifest.json says {layout.files[rel]['bytes']} — "
                            "the file was truncated or changed after saving")
    return p.read_bytes()


def _read_tensors(data: bytes, rel: str, expect: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] | None = None
                  ) -> dict[str, Tensor]:
    """Tensors of a listed safetensors file; the header (dtypes, shapes) is checked first."""
    try:
        header = safetensors_header(data, rel)
    except FileCheckError as e:
        raise ArtifactError(str(e)) from e
    for name, (dtypes, shape) in (expect or {}).items():
        h = header.get(name)
        if h is None:
            raise ArtifactError(f"{rel}: has no tensor named {name!r}")
        if h["dtype"] not in dtypes or h["shape"] != shape:
            raise ArtifactError(f"{rel}: tensor {name!r} is {h['dtype']} {h['shape']}, expected "
                                f"{'/'.join(dtypes)} {shape}")
    try:
        return load_tensors_bytes(data)
    except Exception as e:  # the header was valid; anything else is damage
        raise ArtifactError(f"{rel}: cannot be read as safetensors ({e})") from e


def _open_label_files(root: Path, layout: _Layout, verified: bool) -> TensorFiles:
    """The label files other than the soft labels, each checked (size, safetensors header) and left
    on disk: read on access, with the manifest's SHA-256 checked again when ``verified``."""
    out: dict[str, TensorFile] = {}
    for rel, entry in layout.files.items():
        parts = _safe_rel(rel).parts
        if entry["component"] != "labels" or rel == _SOFT_FILE:
            continue
        try:
            p = confined_path(root, rel, "manifest.json")
        except FileCheckError as e:
            raise ArtifactError(str(e)) from e
        out[parts[1][: -len(".safetensors")]] = TensorFile.open(p, rel, entry["bytes"],
                                                                 entry["sha256"] if verified else None)
    return TensorFiles(out)


def _decode(root: Path, layout: _Layout, verified: bool = False) -> DistilledSet:
    """Rebuild a DistilledSet from an artifact directory (integrity is checked by the caller).

    Sizes are checked before any file is read, and each PNG's header before it is decoded. Label
    files other than the soft labels are not read: only their size and safetensors header are
    checked here, and ``label_files`` reads each on access (:class:`TensorFile`; with ``verified``
    the manifest's SHA-256, which the caller has just checked, is checked again on each read).
    """
    info = layout.info
    num_images = layout.num_images
    labels = torch.repeat_interleave(torch.arange(info.num_classes), torch.tensor(layout.counts))
    palette_mode = layout.storage_kind == "png-palette"
    kwargs: dict[str, Any] = {}
    if layout.storage_kind in _FLOAT_STORAGE_DTYPES:
        want = _FLOAT_STORAGE_DTYPES[layout.storage_kind]
        st_dtype = {torch.float16: "F16", torch.float32: "F32"}[want]
        x = _read_tensors(_read_listed(root, layout, _FLOAT_FILE), _FLOAT_FILE,
                          {"images": ((st_dtype,), (num_images, *info.image_shape))})["images"]
        images = to_uint8(x.float(), info)
        kwargs["float_images"] = x
    else:
        pixels, all_idx, all_pal = [], [], []
        for i, rel in enumerate(layout.image_files):
            k = layout.palette_sizes[i] if layout.palette_sizes is not None else None
            px, idx, pal = decode_png(_read_listed(root, layout, rel), rel, info, palette_mode, k)
            pixels.append(px)
            all_idx.append(idx)
            all_pal.append(pal)
        images = torch.stack(pixels)
        if palette_mode:
            if len({p.shape[0] for p in all_pal}) != 1:
                raise ArtifactError(
                    "images/: palettes of different sizes are not supported by this version"
                )
            kwargs["palette_indices"] = torch.stack(all_idx)
            kwargs["palettes"] = torch.stack(all_pal)

    label_files = _open_label_files(root, layout, verified)
    attachments: dict[str, dict[str, Tensor]] = {}
    for rel, entry in layout.files.items():
        if entry["component"] == "images":
            continue
        parts = _safe_rel(rel).parts
        if parts[0] == "labels" and rel != _SOFT_FILE:
            continue  # label_files: opened above, read on access
        data = _read_listed(root, layout, rel)
        if rel == _SOFT_FILE:
            soft = _read_tensors(data, rel, {"soft_labels": (("F16", "F32"), (num_images, info.num_classes))})
            kwargs["soft_labels"] = soft["soft_labels"].float()
        else:
            attachments[parts[1][: -len(".safetensors")]] = _read_tensors(data, rel)

    try:
        return DistilledSet(
            info=info,
            images=images,
            labels=labels,
            method=layout.method,
            config=layout.config,
            meta=layout.meta,
            label_files=label_files,
            attachments=attachments,
            **kwargs,
        )
    except ArtifactError:
        raise
    except ValueError as e:
        raise ArtifactError(f"{root}: contents are inconsistent: {e}") from e


def _inspect(root: Path, check_files: bool = True) -> tuple[list[str], DistilledSet | None, dict[str, int]]:
    """The one check behind ``load``, ``verify`` and ``decoct info``: (problems, set, measured sizes).

    The set is returned only when there is no problem: ``load`` raises exactly when ``verify``
    reports something. ``check_files=False`` skips hashing the files (sizes are still checked
    before each read) and the storage claims.
    """
    sizes: dict[str, int] = {}
    try:
        manifest = _read_manifest(root)
        layout = _parse_manifest(manifest)
        if check_files:
            problems, sizes = _integrity_problems(root, layout, manifest)
            if problems:
                return problems, None, sizes
        ds = _decode(root, layout, verified=check_files)
    except ArtifactError as e:
        return [str(e)], None, sizes
    if not sizes:
        sizes = {rel: e["bytes"] for rel, e in layout.files.items()}
    storage = ds._storage_from_sizes(_measured_components(layout, sizes))
    if check_files:
        problems = _storage_claim_problems(manifest["storage"], storage, tuple(storage))
        if problems:
            return problems, None, sizes
    ds._last_storage = storage
    return [], ds, sizes


def inspect(path: str | Path) -> dict[str, Any]:
    """What ``decoct info`` shows: every problem, and what was *measured* from the files.

    ``problems`` is empty exactly when :meth:`DistilledSet.load` succeeds. ``storage`` is
    computed from the files' sizes on disk and the decoded contents, never copied from the
    manifest; for a damaged artifact only ``bytes_measured`` (listed files present) is given.
    """
    root = Path(path)
    problems, ds, sizes = _inspect(root)
    out: dict[str, Any] = {"path": str(root), "intact": not problems, "problems": problems}
    if ds is not None:
        out.update(method=ds.method, dataset=ds.info.name, num_images=len(ds), counts_per_class=ds.ipc,
                   image_storage=ds.image_storage, soft_labels=ds.soft_labels is not None,
                   label_files=sorted(ds.label_files), attachments=sorted(ds.attachments),
                   storage=ds.storage())
    else:
        out["bytes_measured"] = sum(sizes.values())
    return out


def verify(path: str | Path) -> list[str]:
    """Every problem with the artifact at ``path``: integrity first, then a full decode.

    Returns an empty list when the artifact is intact and loads; never raises for content
    problems, so it suits ``decoct info`` style reporting. It runs the same check as
    :meth:`DistilledSet.load`, so it reports a problem exactly when ``load`` would raise.
    """
    return _inspect(Path(path))[0]
