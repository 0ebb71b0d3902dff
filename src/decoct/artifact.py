"""``DistilledSet``: the distilled-set artifact, a self-describing directory a user can ship.

Layout of an artifact directory::

    manifest.json                          format, dataset info, labels, storage, file hashes
    images/<c:03d>_<class>/<k:05d>.png     8-bit RGB/L PNG, or palette PNG at 1/2/4/8 bits
    images.safetensors                     instead of PNGs, only when float storage was asked for
    labels/soft.safetensors                soft labels, float16
    labels/<name>.safetensors              other label stores (e.g. FKD)
    extra/<name>.safetensors               attachments that are not distilled data (e.g. ZCA)

Why a directory of PNGs rather than one tensor file: the pixels a distilled set claims to cost
are exactly the bytes in ``images/``, anyone can look at them, and the storage accounting
(:meth:`DistilledSet.storage`) is measured from real files. Every file's SHA-256 lives in the
manifest so a changed, truncated or missing file is caught at load time.

Ordering: an artifact stores images class by class (class 0 first) and, within a class, in the
order they appear in ``images``; loading returns them in that *canonical* order. ``save``
applies a stable sort by label first, so save -> load is the identity exactly for sets that are
already in canonical order (``is_canonical``); use :meth:`DistilledSet.canonical` to reorder.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from decoct.data.types import DatasetInfo, normalize, to_uint8
from decoct.io import (
    atomic_write_json,
    fsync_paths,
    load_tensors_bytes,
    replace_dir,
    sha256_bytes,
    tensors_to_bytes,
)

__all__ = ["FORMAT", "VERSION", "ArtifactError", "DistilledSet", "class_dir_name", "verify"]

FORMAT = "decoct-distilled-set"
VERSION = 1
MANIFEST = "manifest.json"

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_FLOAT_STORAGE = {torch.float16: "safetensors-float16", torch.float32: "safetensors-float32"}
_FLOAT_STORAGE_DTYPES = {v: k for k, v in _FLOAT_STORAGE.items()}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SOFT_FILE = "labels/soft.safetensors"
_FLOAT_FILE = "images.safetensors"
_FP16_MAX = 65504.0


class ArtifactError(ValueError):
    """An artifact on disk is missing, corrupted, or not a decoct distilled set."""


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


def _gather_palette(indices: Tensor, palettes: Tensor) -> Tensor:
    """palettes (N,K,C) looked up at indices (N,H,W) -> images (N,C,H,W)."""
    n = torch.arange(indices.shape[0]).view(-1, 1, 1)
    return palettes[n, indices.long()].permute(0, 3, 1, 2).contiguous()


def _bits_for(k: int) -> int:
    """ceil(log2 k), at least 1: bits needed to index k distinct values."""
    return max(1, (k - 1).bit_length())


def _png_depth_for_palette(k: int) -> int:
    """PNG palette images exist at 1, 2, 4 or 8 bits per pixel."""
    return 1 if k <= 2 else 2 if k <= 4 else 4 if k <= 16 else 8


def _png_layout(data: bytes) -> tuple[int, int, int]:
    """(bit depth, colour type, number of PLTE entries) read from a PNG's header chunks."""
    if data[:8] != _PNG_MAGIC:
        raise ValueError("not a PNG")
    pos, depth, colour, plte = 8, -1, -1, 0
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"IHDR":
            depth, colour = data[pos + 16], data[pos + 17]
        elif kind == b"PLTE":
            plte = length // 3
        elif kind == b"IDAT":
            break
        pos += 12 + length
    return depth, colour, plte


def _encode_png(
    image: Tensor, indices: Tensor | None = None, palette: Tensor | None = None
) -> bytes:
    """One image as PNG bytes: palette-indexed when ``palette`` is given, else 8-bit RGB/L.

    Palette PNGs carry exactly the image's K colours and the smallest bit depth PNG allows
    (Pillow picks 1/2/4/8 bits from the PLTE size; ``bits=`` caps it). The written header is
    checked so a Pillow that pads the palette or widens the depth fails loudly instead of
    silently inflating the reported storage.
    """
    buf = BytesIO()
    if palette is not None and indices is not None:
        k, c = palette.shape
        h, w = indices.shape
        rgb = palette.numpy() if c == 3 else palette.numpy().repeat(3, axis=1)
        im = Image.frombytes("P", (w, h), indices.numpy().tobytes())
        im.putpalette(rgb.tobytes(), rawmode="RGB")
        im.save(buf, format="PNG", optimize=True, bits=_bits_for(k))
        data = buf.getvalue()
        depth, colour, entries = _png_layout(data)
        if (depth, colour, entries) != (_png_depth_for_palette(k), 3, k):
            raise RuntimeError(
                f"Pillow wrote a palette PNG with bit depth {depth}, colour type {colour} and "
                f"{entries} palette entries; expected depth {_png_depth_for_palette(k)} with {k} "
                "entries. This Pillow version is not supported for palette storage."
            )
        return data
    hwc = image.permute(1, 2, 0).numpy()
    im = Image.fromarray(np.ascontiguousarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc))
    im.save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def _decode_png(
    data: bytes, rel: str, info: DatasetInfo, palette_mode: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """PNG bytes -> (pixels (C,H,W), palette indices (H,W) or None, palette (K,C) or None)."""
    try:
        with Image.open(BytesIO(data)) as im:
            im.load()
            fmt, mode, size = im.format, im.mode, im.size
            arr = np.array(im)
            pal = im.getpalette() if mode == "P" else None
    except Exception as e:  # Pillow raises many types for damaged files
        raise ArtifactError(
            f"{rel}: cannot be decoded as a PNG ({e}) — the file is corrupted"
        ) from e
    if fmt != "PNG":
        raise ArtifactError(f"{rel}: is a {fmt} file, expected PNG")
    if size != (info.width, info.height):
        raise ArtifactError(
            f"{rel}: image is {size[0]}x{size[1]} (WxH), dataset {info.name!r} needs "
            f"{info.width}x{info.height}"
        )
    c = info.channels
    if palette_mode:
        if mode != "P" or not pal:
            raise ArtifactError(f"{rel}: PNG mode is {mode!r}, a palette set needs mode 'P'")
        # numpy, not torch: per-image torch indexing costs milliseconds of dispatch overhead
        palette = np.asarray(pal, dtype=np.uint8).reshape(-1, 3)[:, :c]
        indices = arr.astype(np.uint8)
        if int(indices.max()) >= palette.shape[0]:
            raise ArtifactError(f"{rel}: pixel index {int(indices.max())} is outside its palette")
        pixels = np.ascontiguousarray(palette[indices].transpose(2, 0, 1))
        return (
            torch.from_numpy(pixels),
            torch.from_numpy(indices),
            torch.from_numpy(np.ascontiguousarray(palette)),
        )
    want = "RGB" if c == 3 else "L"
    if mode != want:
        raise ArtifactError(f"{rel}: PNG mode is {mode!r}, expected {want!r} for {c} channel(s)")
    hwc = arr.reshape(info.height, info.width, c)
    return torch.from_numpy(np.ascontiguousarray(hwc)).permute(2, 0, 1).contiguous(), None, None


@dataclass(eq=False)
class DistilledSet:
    """A distilled dataset: pixels, labels and everything needed to reuse and audit them.

    ``images`` (uint8, N x C x H x W) are always the pixels a model sees. When ``palettes`` /
    ``palette_indices`` are set the set is colour-reduced and stored as palette PNGs; when
    ``float_images`` (normalised, float16/float32) are set the set is stored as floats and
    ``images`` is their uint8 quantisation. All tensors are kept on the CPU. Palette sets use one
    K for every image (``palettes`` is (N, K, C)); the manifest still lists K per image.
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
    label_files: dict[str, dict[str, Tensor]] = field(default_factory=dict)
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
        if not torch.equal(_gather_palette(idx, pal), self.images):
            bad = (_gather_palette(idx, pal) != self.images).flatten(1).any(1).nonzero().flatten()
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
        images = _gather_palette(idx, pal)
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
        files: dict[str, dict[str, Any]] = {}
        dirs: set[Path] = set()

        def put(rel: str, data: bytes, component: str) -> None:
            p = root / rel
            if p.parent not in dirs:
                p.parent.mkdir(parents=True, exist_ok=True)
                dirs.add(p.parent)
            p.write_bytes(data)
            files[rel] = {"sha256": sha256_bytes(data), "bytes": len(data), "component": component}

        if self.float_images is not None:
            put(_FLOAT_FILE, tensors_to_bytes({"images": self.float_images}), "images")
        else:
            for rel, i in self._image_paths():
                if self.palettes is not None and self.palette_indices is not None:
                    data = _encode_png(self.images[i], self.palette_indices[i], self.palettes[i])
                else:
                    data = _encode_png(self.images[i])
                put(rel, data, "images")
        if self.soft_labels is not None:
            put(_SOFT_FILE, tensors_to_bytes({"soft_labels": self.soft_labels.half()}), "labels")
        for name, tensors in self.label_files.items():
            put(f"labels/{name}.safetensors", tensors_to_bytes(tensors), "labels")
        for name, tensors in self.attachments.items():
            put(f"extra/{name}.safetensors", tensors_to_bytes(tensors), "extra")
        # Durable before the directory is renamed into place: files first, then their dirs.
        fsync_paths([root / rel for rel in files])
        fsync_paths(sorted(dirs, key=lambda p: len(p.parts), reverse=True))
        return files

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
        m["storage"] = storage
        m["files"] = files
        return m

    # ------------------------------------------------------------------ storage accounting
    def _raw_bits(self) -> dict[str, int]:
        info = self.info
        n, c, h, w = self.images.shape
        if self.float_images is not None:
            images = self.float_images.numel() * self.float_images.element_size() * 8
            palettes = 0
        elif self.palette_sizes is not None:
            images = sum(h * w * _bits_for(k) for k in self.palette_sizes)
            palettes = sum(k * c * 8 for k in self.palette_sizes)
        else:
            images, palettes = n * c * h * w * 8, 0
        labels = n * (info.num_classes - 1).bit_length()
        if self.soft_labels is not None:
            labels += self.soft_labels.numel() * 16
        for tensors in self.label_files.values():
            labels += sum(t.numel() * t.element_size() * 8 for t in tensors.values())
        extra = sum(
            t.numel() * t.element_size() * 8
            for ts in self.attachments.values()
            for t in ts.values()
        )
        return {"images": images, "palettes": palettes, "labels": labels, "extra": extra}

    def _storage_from_sizes(self, disk: dict[str, int]) -> dict[str, Any]:
        bits = self._raw_bits()
        total_bits = bits["images"] + bits["palettes"] + bits["labels"]
        pixels = len(self) * self.info.height * self.info.width
        return {
            "image_storage": self.image_storage,
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
        manifest = _read_manifest(root)
        files = _files_table(manifest)
        sizes: dict[str, dict[str, Any]] = {}
        for rel, entry in files.items():
            p = root / _safe_rel(rel)
            if not p.is_file():
                raise ArtifactError(f"{rel}: missing — listed in manifest.json but not found")
            sizes[rel] = {"bytes": p.stat().st_size, "component": entry.get("component")}
        return self._storage_from_sizes(_component_sizes(sizes))

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> DistilledSet:
        """Read an artifact; with ``verify`` every file's size and SHA-256 are checked first.

        Any problem (missing/changed/undecodable file, wrong format, inconsistent contents)
        raises :class:`ArtifactError` naming the file.
        """
        root = Path(path)
        manifest = _read_manifest(root)
        if verify:
            problems = _integrity_problems(root, manifest)
            if problems:
                raise ArtifactError(
                    f"{root}: artifact failed verification:\n  " + "\n  ".join(problems)
                )
        ds = _decode(root, manifest)
        ds._last_storage = ds.storage(root)
        return ds

    @staticmethod
    def verify(path: str | Path) -> list[str]:
        """Problems with the artifact at ``path`` (empty when intact); never raises for them."""
        return verify(path)

    # ------------------------------------------------------------------ export
    def export_imagefolder(self, out_dir: str | Path, *, overwrite: bool = False) -> Path:
        """Write a plain ``<out>/<class_name>/<k:05d>.png`` tree for tools that read ImageFolder.

        8-bit PNGs (RGB, or L for one channel; palette sets are expanded), written via a temp
        directory so the export appears complete or not at all. Classes without images get no
        directory (ImageFolder rejects empty class folders). Note that ImageFolder numbers
        classes in sorted name order, which may differ from ``info.classes`` order.
        """
        out = Path(out_dir)
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
            raise FileExistsError(
                f"{out} exists and is not empty; pass overwrite=True to replace it"
            )
        names = [_folder_name(c, name) for c, name in enumerate(self.info.classes)]
        if len(set(names)) != len(names):
            raise ValueError(f"class names collide after making them file-system safe: {names}")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            written: list[Path] = []
            dirs: list[Path] = []
            for c, name in enumerate(names):
                members = (self.labels == c).nonzero().flatten().tolist()
                if not members:
                    continue
                d = tmp / name
                d.mkdir()
                dirs.append(d)
                for k, i in enumerate(members):
                    p = d / f"{k:05d}.png"
                    p.write_bytes(_encode_png(self.images[i]))
                    written.append(p)
            fsync_paths(written)
            fsync_paths(dirs)
            replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out


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
    if not isinstance(rel, str) or not rel or "\\" in rel:
        raise ArtifactError(f"manifest.json: invalid file path {rel!r}")
    p = PurePosixPath(rel)
    if p.is_absolute() or any(part in ("", ".", "..") for part in p.parts) or rel == MANIFEST:
        raise ArtifactError(f"manifest.json: unsafe file path {rel!r}")
    return p


def _read_manifest(root: Path) -> dict[str, Any]:
    if not root.is_dir():
        raise ArtifactError(f"{root}: not a directory")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{root}: no manifest.json — not a decoct distilled-set artifact")
    try:
        manifest = json.loads(mpath.read_text("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"manifest.json: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"manifest.json: format is not {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise ArtifactError(
            f"manifest.json: version {manifest.get('version')!r} is not supported "
            f"(this decoct reads version {VERSION})"
        )
    return manifest


def _files_table(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        raise ArtifactError("manifest.json: 'files' must map paths to {sha256, bytes, component}")
    return files


def _integrity_problems(root: Path, manifest: dict[str, Any]) -> list[str]:
    """Size/SHA-256 mismatches, missing files and unlisted files, one message each."""
    problems: list[str] = []
    files = _files_table(manifest)
    for rel, entry in files.items():
        try:
            p = root / _safe_rel(rel)
        except ArtifactError as e:
            problems.append(str(e))
            continue
        if not p.is_file():
            problems.append(f"{rel}: missing — listed in manifest.json but not found")
            continue
        data = p.read_bytes()
        if len(data) != entry.get("bytes"):
            problems.append(
                f"{rel}: size is {len(data)} bytes, manifest.json says {entry.get('bytes')} — "
                "the file was truncated or changed after saving"
            )
        elif sha256_bytes(data) != entry.get("sha256"):
            problems.append(
                f"{rel}: sha256 mismatch — the file was changed or corrupted after saving"
            )
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            if rel != MANIFEST and rel not in files:
                problems.append(f"{rel}: not listed in manifest.json — added after saving")
    return problems


def _decode(root: Path, m: dict[str, Any]) -> DistilledSet:
    """Rebuild a DistilledSet from an artifact directory (integrity is checked by the caller)."""
    files = _files_table(m)

    def read(rel: str) -> bytes:
        if rel not in files:
            raise ArtifactError(f"{rel}: expected file is not listed in manifest.json")
        p = root / _safe_rel(rel)
        if not p.is_file():
            raise ArtifactError(f"{rel}: missing — listed in manifest.json but not found")
        return p.read_bytes()

    def read_tensors(rel: str) -> dict[str, Tensor]:
        try:
            return load_tensors_bytes(read(rel))
        except ArtifactError:
            raise
        except Exception as e:
            raise ArtifactError(f"{rel}: cannot be read as safetensors ({e})") from e

    try:
        info = DatasetInfo.from_dict(m["dataset"])
        counts = [int(v) for v in m["counts_per_class"]]
        num_images = int(m["num_images"])
        storage_kind = str(m["image_storage"])
        hard = [int(v) for v in m["labels"]["hard"]]
        palette_sizes = [int(v) for v in m["palette_sizes"]] if "palette_sizes" in m else None
        method, config, meta = m["method"], m["config"], m["meta"]
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"manifest.json: malformed ({type(e).__name__}: {e})") from e

    if len(counts) != info.num_classes or sum(counts) != num_images or min(counts, default=0) < 0:
        raise ArtifactError(
            f"manifest.json: counts_per_class {counts} do not match {info.num_classes} classes "
            f"and num_images={num_images}"
        )
    labels = torch.repeat_interleave(torch.arange(info.num_classes), torch.tensor(counts))
    if hard != labels.tolist():
        raise ArtifactError("manifest.json: labels.hard disagree with counts_per_class")

    palette_mode = storage_kind == "png-palette"
    kwargs: dict[str, Any] = {}
    if storage_kind in _FLOAT_STORAGE_DTYPES:
        x = read_tensors(_FLOAT_FILE).get("images")
        want = _FLOAT_STORAGE_DTYPES[storage_kind]
        if x is None or x.dtype != want or tuple(x.shape) != (num_images, *info.image_shape):
            raise ArtifactError(
                f"{_FLOAT_FILE}: expected tensor 'images' {want} of shape "
                f"{(num_images, *info.image_shape)}"
            )
        images = to_uint8(x.float(), info)
        kwargs["float_images"] = x
        image_files = {_FLOAT_FILE}
    elif storage_kind in ("png-rgb", "png-gray", "png-palette"):
        if palette_mode and (palette_sizes is None or len(palette_sizes) != num_images):
            raise ArtifactError(
                "manifest.json: png-palette storage needs one palette size per image"
            )
        pixels, all_idx, all_pal = [], [], []
        image_files = set()
        i = 0
        for c, name in enumerate(info.classes):
            for k in range(counts[c]):
                rel = f"images/{class_dir_name(c, name)}/{k:05d}.png"
                image_files.add(rel)
                px, idx, pal = _decode_png(read(rel), rel, info, palette_mode)
                if (
                    pal is not None
                    and palette_sizes is not None
                    and pal.shape[0] != palette_sizes[i]
                ):
                    raise ArtifactError(
                        f"{rel}: palette has {pal.shape[0]} colours, manifest.json says "
                        f"{palette_sizes[i]}"
                    )
                pixels.append(px)
                all_idx.append(idx)
                all_pal.append(pal)
                i += 1
        images = torch.stack(pixels)
        if palette_mode:
            if len({p.shape[0] for p in all_pal}) != 1:
                raise ArtifactError(
                    "images/: palettes of different sizes are not supported by this version"
                )
            kwargs["palette_indices"] = torch.stack(all_idx)
            kwargs["palettes"] = torch.stack(all_pal)
    else:
        raise ArtifactError(f"manifest.json: unknown image_storage {storage_kind!r}")

    label_files: dict[str, dict[str, Tensor]] = {}
    attachments: dict[str, dict[str, Tensor]] = {}
    for rel, entry in files.items():
        if rel in image_files:
            continue
        parts = _safe_rel(rel).parts
        if rel == _SOFT_FILE:
            soft = read_tensors(rel).get("soft_labels")
            if soft is None:
                raise ArtifactError(f"{rel}: has no tensor named 'soft_labels'")
            kwargs["soft_labels"] = soft.float()
        elif len(parts) == 2 and parts[0] in ("labels", "extra") and rel.endswith(".safetensors"):
            target = label_files if parts[0] == "labels" else attachments
            target[parts[1][: -len(".safetensors")]] = read_tensors(rel)
        else:
            raise ArtifactError(f"{rel}: unexpected file listed in manifest.json")
        if entry.get("component") != ("extra" if parts[0] == "extra" else "labels"):
            raise ArtifactError(
                f"{rel}: wrong component {entry.get('component')!r} in manifest.json"
            )

    try:
        return DistilledSet(
            info=info,
            images=images,
            labels=labels,
            method=method,
            config=config,
            meta=meta,
            label_files=label_files,
            attachments=attachments,
            **kwargs,
        )
    except ArtifactError:
        raise
    except ValueError as e:
        raise ArtifactError(f"{root}: contents are inconsistent: {e}") from e


def verify(path: str | Path) -> list[str]:
    """Every problem with the artifact at ``path``: integrity first, then a full decode.

    Returns an empty list when the artifact is intact and loads; never raises for content
    problems, so it suits ``decoct verify`` style reporting.
    """
    root = Path(path)
    try:
        manifest = _read_manifest(root)
        problems = _integrity_problems(root, manifest)
        if not problems:
            _decode(root, manifest)
    except ArtifactError as e:
        return [str(e)]
    return problems
