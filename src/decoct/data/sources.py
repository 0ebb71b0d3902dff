"""Where datasets come from: data roots, archive/directory decoding, and the decoded cache.

Decoding 60,000 JPEGs takes tens of seconds on a laptop CPU, so a decoded split is cached
on disk as a safetensors file (uint8 images + int64 labels) keyed by the source's path, size
and modification time; a second load reads only that file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..io import atomic_save_tensors, load_tensors

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".gif", ".tif", ".tiff")


class DataNotFoundError(FileNotFoundError):
    """A dataset could not be found; the message names the paths tried and the fix."""


def data_roots(explicit: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched for datasets, in order: the explicit ``--data-root``, ``$DECOCT_DATA``,
    ``./data``, ``../shared/datasets`` and the ``shared/datasets`` beside this checkout."""
    roots: list[Path] = []
    if explicit:
        roots.append(Path(explicit))
    if os.environ.get("DECOCT_DATA"):
        roots.append(Path(os.environ["DECOCT_DATA"]))
    roots += [Path("data"), Path("../shared/datasets")]
    here = Path(__file__).resolve()
    if len(here.parents) > 4:
        roots.append(here.parents[4] / "shared" / "datasets")  # <checkout>/../shared for src layout
    seen: list[Path] = []
    for r in roots:
        r = r.expanduser()
        if r.resolve() not in [s.resolve() for s in seen]:
            seen.append(r)
    return seen


def cache_dir() -> Path:
    return Path(os.environ.get("DECOCT_CACHE", Path.home() / ".cache" / "decoct")).expanduser()


def _cache_key(source: Path, extra: dict) -> str:
    st = source.stat()
    payload = json.dumps(
        {"path": str(source.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns, **extra}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cached(source: Path, tag: str, extra: dict, build) -> dict[str, torch.Tensor]:
    """Return ``build()``'s tensors, reading/writing the on-disk decoded cache."""
    path = cache_dir() / f"{tag}-{_cache_key(source, extra)}.safetensors"
    if path.exists():
        try:
            return load_tensors(path)
        except Exception:  # a damaged cache is rebuilt, never trusted
            path.unlink(missing_ok=True)
    tensors = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors(path, tensors)
    except OSError:
        pass  # a read-only cache dir only costs speed; the data itself is correct
    return tensors


def _iter_archive(path: Path) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(path, "r:*") as tar:
        for m in tar:
            if m.isfile() and m.name.lower().endswith(IMAGE_SUFFIXES):
                f = tar.extractfile(m)
                if f is not None:
                    yield m.name, f.read()


def _iter_directory(path: Path) -> Iterator[tuple[str, bytes]]:
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            yield str(p.relative_to(path)), p.read_bytes()


def _decode(data: bytes, channels: int, image_size: int | None) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    img = img.convert("L" if channels == 1 else "RGB")
    if image_size is not None and img.size != (image_size, image_size):
        # shorter side to image_size, then centre crop: the usual eval-time preset
        w, h = img.size
        s = image_size / min(w, h)
        img = img.resize((max(image_size, round(w * s)), max(image_size, round(h * s))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - image_size) // 2, (h - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def read_imagefolder(
    source: Path, channels: int = 3, image_size: int | None = None, splits: tuple[str, ...] = ("train", "test")
) -> tuple[list[str], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Decode an ImageFolder tree ``[prefix/]<split>/<class>/<file>`` from a directory or a
    ``.tar``/``.tar.gz`` archive. Returns (sorted class names, {split: (uint8 images, labels)})."""
    items = _iter_archive(source) if source.is_file() else _iter_directory(source)
    found: dict[str, list[tuple[str, str, bytes]]] = {s: [] for s in splits}
    for name, data in items:
        parts = Path(name).parts
        for i, part in enumerate(parts[:-2]):
            if part in found and len(parts) - i == 3:
                found[part].append((parts[i + 1], parts[-1], data))
                break
    if not found[splits[0]]:
        raise DataNotFoundError(
            f"{source}: no images found under '<split>/<class>/<file>' for split '{splits[0]}'"
        )
    classes = sorted({c for c, _, _ in found[splits[0]]})
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for split, rows in found.items():
        if not rows:
            raise DataNotFoundError(f"{source}: split '{split}' has no images")
        unknown = {c for c, _, _ in rows} - set(index)
        if unknown:
            raise ValueError(f"{source}: split '{split}' has classes absent from '{splits[0]}': {sorted(unknown)}")
        rows.sort(key=lambda r: (index[r[0]], r[1]))
        arrays = [_decode(d, channels, image_size) for _, _, d in rows]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(
                f"{source}: images of split '{split}' have different sizes {sorted(shapes)[:4]}...; "
                "pass --image-size N to resize them"
            )
        images = torch.from_numpy(np.stack(arrays))
        labels = torch.tensor([index[c] for c, _, _ in rows], dtype=torch.long)
        out[split] = (images, labels)
    return classes, out
