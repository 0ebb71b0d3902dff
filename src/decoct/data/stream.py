"""Streamed image folders: splits too large to decode into memory (ImageNet-1K: ~193 GB at 224 px).

A streamed split is an index -- every image's path and label, built once by listing the class
folders and cached (a few tens of MB for ImageNet's 1.28M files) -- plus decoding on demand, in
DataLoader worker processes, into one of the views of :mod:`decoct.data.views`. Batches cross
the worker boundary as uint8 (4x less than float); normalisation happens on the device.

Layout: ``<root>/train/<class>/<image>`` and ``<root>/val/<class>/<image>`` (``test/`` is accepted
for the second split), as ImageNet is kept after the usual validation reorganisation and as
torchvision's ``datasets.ImageNet`` leaves it. Classes are the folder names, sorted; files are
sorted by name within a class; hidden files and OS litter are skipped, and every other file must
have an image suffix (:data:`decoct.data.sources.IMAGE_SUFFIXES`).

Decoding: ``torchvision.io.decode_image`` (libjpeg-turbo; JPEG, PNG, GIF, WebP; CMYK and grey
JPEGs converted to RGB), 1.6x PIL's rate on 500 x 375 JPEGs on the 2-core build machine
(benchmarks/imagenet_scale.py measures both); PIL only for the formats torchvision cannot read
(BMP, TIFF, PPM). torchvision 0.29 deprecates its image codecs in favour of TorchCodec; they are
still the fastest decoder that comes with torch here, so decoct keeps them and silences that warning.

Index cache key: the split folder's resolved path plus every class folder's name and mtime_ns
(adding, removing or renaming a file changes its folder's mtime), so listing 1,000 folders is
all a second load costs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from decoct.data.sources import (
    IMAGE_SUFFIXES,
    BadImageError,
    ImageFolderError,
    cache_dir,
    is_ignored,
)
from decoct.data.views import VIEWS, apply_view, view_generator
from decoct.runtime.io import atomic_save_tensors, load_tensors

INDEX_FORMAT = 1
SECOND_SPLIT = ("val", "test")

__all__ = [
    "FileIndex",
    "StreamSplit",
    "StreamedImages",
    "build_index",
    "decode_file",
    "find_split",
    "load_index",
    "parse_classes",
    "stream_loader",
]


@dataclass(frozen=True)
class FileIndex:
    """Every image of one split: ``paths[i]`` (relative to ``root``, ``<class>/<file>``) has label
    ``labels[i]`` (int64, into ``classes``). Paths are one numpy bytes array (no per-file Python
    object: 1.28M paths cost ~60 MB and are shared, not copied, by forked workers)."""

    root: Path
    classes: tuple[str, ...]
    paths: np.ndarray
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> Path:
        return self.root / os.fsdecode(bytes(self.paths[i]))

    def subset_classes(self, keep: Sequence[int]) -> FileIndex:
        """Only the classes ``keep`` (indices into ``classes``), relabelled 0..len(keep)-1 in that order."""
        keep_t = torch.as_tensor(list(keep), dtype=torch.long)
        remap = torch.full((len(self.classes),), -1, dtype=torch.long)
        remap[keep_t] = torch.arange(len(keep_t))
        new = remap[self.labels]
        sel = torch.nonzero(new >= 0).flatten()
        order = sel[torch.argsort(new[sel], stable=True)]
        return FileIndex(self.root, tuple(self.classes[k] for k in keep), self.paths[order.numpy()], new[order])


def find_split(root: Path, names: Sequence[str]) -> Path:
    """The first ``root/<name>`` folder that exists; ImageFolderError naming them otherwise."""
    for n in names:
        if (root / n).is_dir():
            return root / n
    raise ImageFolderError(f"{root} has no {' or '.join(n + '/' for n in names)} folder; expected "
                           f"{root}/train/<class>/<image> and {root}/val/<class>/<image>")


def _class_dirs(split: Path) -> list[os.DirEntry]:
    dirs, stray = [], []
    with os.scandir(split) as it:
        for e in it:
            if is_ignored(e.name):
                continue
            (dirs if e.is_dir(follow_symlinks=True) else stray).append(e)
    if stray and not dirs:
        raise ImageFolderError(
            f"{split} holds files ({stray[0].name}, ...) but no class folders; ImageNet's validation images "
            "must first be sorted into <wnid>/ folders (torchvision.datasets.ImageNet or the usual valprep.sh)")
    if stray:
        raise ImageFolderError(f"{split} holds a file outside any class folder: {stray[0].name}")
    if not dirs:
        raise ImageFolderError(f"{split} holds no class folders")
    for d in dirs:
        if any(ord(ch) < 32 for ch in d.name):
            raise ImageFolderError(f"{split}: class folder name {d.name!r} holds a control character")
    return sorted(dirs, key=lambda e: e.name)


def _key(split: Path, dirs: list[os.DirEntry]) -> str:
    rows = [[d.name, d.stat(follow_symlinks=True).st_mtime_ns] for d in dirs]
    blob = json.dumps({"format": INDEX_FORMAT, "path": str(split.resolve()), "classes": rows})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _scan(split: Path, dirs: list[os.DirEntry]) -> tuple[list[bytes], list[int]]:
    paths: list[bytes] = []
    labels: list[int] = []
    for k, d in enumerate(dirs):
        names = []
        with os.scandir(d.path) as it:
            for e in it:
                if is_ignored(e.name):
                    continue
                if not e.is_file(follow_symlinks=True):
                    raise ImageFolderError(f"{split}/{d.name}: {e.name} is not a file (nested folders are not read)")
                if not e.name.lower().endswith(IMAGE_SUFFIXES):
                    raise ImageFolderError(f"{split}/{d.name}/{e.name}: not an image file name "
                                           f"(suffixes {', '.join(IMAGE_SUFFIXES)})")
                names.append(e.name)
        if not names:
            raise ImageFolderError(f"{split}/{d.name}: class folder holds no image")
        names.sort()
        prefix = os.fsencode(d.name) + b"/"
        paths += [prefix + os.fsencode(n) for n in names]
        labels += [k] * len(names)
    return paths, labels


def _labels_ok(labels: Tensor, k: int) -> bool:
    """Whether cached labels are what :func:`_scan` writes: 1-D, sorted, and every class 0..k-1 present."""
    if labels.dim() != 1 or not len(labels) or int(labels[0]) != 0 or int(labels[-1]) != k - 1:
        return False
    step = labels[1:] - labels[:-1]
    return bool(((step == 0) | (step == 1)).all())


def build_index(split: Path, use_cache: bool = True) -> FileIndex:
    """The index of one split folder, from the cache when its class folders are unchanged."""
    split = Path(split)
    dirs = _class_dirs(split)
    classes = tuple(d.name for d in dirs)
    path = cache_dir() / f"index-{_key(split, dirs)}.safetensors"
    if use_cache and path.exists():
        try:
            t = load_tensors(path)
            names = bytes(t["paths"].numpy()).split(b"\n")
            meta = json.loads(bytes(t["meta"].numpy()).decode())
            labels = t["labels"].long()
            if meta["classes"] == list(classes) and len(names) == len(labels) and _labels_ok(labels, len(classes)):
                return FileIndex(split, classes, np.array(names), labels)
        except Exception:  # a damaged cache file is rebuilt, never trusted
            pass
    paths, labels = _scan(split, dirs)
    index = FileIndex(split, classes, np.array(paths), torch.tensor(labels, dtype=torch.long))
    if use_cache:
        blob = b"\n".join(paths)
        meta = json.dumps({"classes": list(classes)}).encode()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_save_tensors(path, {"paths": torch.frombuffer(bytearray(blob), dtype=torch.uint8),
                                       "labels": index.labels.to(torch.int32),
                                       "meta": torch.frombuffer(bytearray(meta), dtype=torch.uint8)})
        except OSError:
            pass  # a read-only cache costs only the listing time
    return index


def load_index(root: Path) -> tuple[FileIndex, FileIndex]:
    """(train, val) indexes of ``root``; the two must hold the same classes."""
    train = build_index(find_split(root, ("train",)))
    val = build_index(find_split(root, SECOND_SPLIT))
    if train.classes != val.classes:
        only_t = sorted(set(train.classes) - set(val.classes))[:3]
        only_v = sorted(set(val.classes) - set(train.classes))[:3]
        raise ImageFolderError(f"{root}: train and {val.root.name} hold different classes "
                               f"(only in train: {only_t}, only in {val.root.name}: {only_v})")
    return train, val


def parse_classes(spec: str | Sequence[str] | None, classes: Sequence[str]) -> list[int] | None:
    """Which classes to keep: ``None`` (all), ``"A:B"`` (sorted class indices A..B-1), or names.

    Raises ValueError for an empty or out-of-range range or an unknown name."""
    if spec is None:
        return None
    if isinstance(spec, str) and ":" in spec:
        a, _, b = spec.partition(":")
        try:
            lo, hi = int(a or 0), int(b or len(classes))
        except ValueError:
            raise ValueError(f"classes {spec!r}: expected START:STOP class indices, e.g. 0:10") from None
        if not 0 <= lo < hi <= len(classes):
            raise ValueError(f"classes {spec!r}: need 0 <= START < STOP <= {len(classes)}")
        return list(range(lo, hi))
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    where = {c: i for i, c in enumerate(classes)}
    missing = [n for n in names if n not in where]
    if missing:
        raise ValueError(f"classes: {missing[:5]} are not class folders of this tree")
    if len(set(names)) != len(names):
        raise ValueError("classes: a class is named twice")
    return [where[n] for n in names]


# ---------------------------------------------------------------------------------------------
# decoding


def decode_file(path: Path, channels: int = 3) -> Tensor:
    """One image file -> uint8 (C, H, W); BadImageError naming the file when it does not decode (or
    cannot be read: removed since the index was built, no permission)."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadImageError(f"{path}: cannot be read ({e.strerror or e})") from None
    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    try:
        with warnings.catch_warnings():  # torchvision 0.29 points at TorchCodec (module docstring)
            warnings.simplefilter("ignore", DeprecationWarning)
            t = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
        if t.dim() == 4:  # an animated GIF: every frame; the first, as PIL and the in-memory path read it
            t = t[0]
        if t.dtype == torch.uint16:  # a 16-bit PNG: each sample to the nearest 8-bit level, as decoct.data.sources
            t = ((t.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)
        return t
    except (RuntimeError, ValueError):
        pass  # a format torchvision does not read (BMP, TIFF, PPM): PIL, below
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB" if channels == 3 else "L"))
    except UnidentifiedImageError:
        raise BadImageError(f"{path}: not an image torchvision or Pillow can read (unknown or damaged format)") from None
    except (OSError, ValueError) as e:
        raise BadImageError(f"{path}: cannot be decoded, the file is damaged or cut short ({e})") from None
    t = torch.from_numpy(arr.copy())
    return t.permute(2, 0, 1).contiguous() if t.dim() == 3 else t[None]


class StreamedImages(torch.utils.data.Dataset):
    """Item ``(position, i)`` -> ``(uint8 view of image i, label, position)``.

    ``position`` is the image's place in the pass (it seeds the random view, see
    :func:`decoct.data.views.view_generator`); batches of items come from :func:`stream_loader`.
    """

    def __init__(self, index: FileIndex, view: str, size: int, seed: int = 0, channels: int = 3) -> None:
        if view not in VIEWS:
            raise ValueError(f"unknown view {view!r}; known: {', '.join(VIEWS)}")
        self.index, self.view, self.size, self.seed, self.channels = index, view, size, seed, channels

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, int, int]:
        pos, i = item
        img = decode_file(self.index.path(i), self.channels)
        g = view_generator(self.seed, pos) if self.view == "train" else None
        return apply_view(img, self.view, self.size, g), int(self.index.labels[i]), pos


class _Batches(torch.utils.data.Sampler):
    """Lists of ``(position, index)``: this rank's batches of a pass over ``order``."""

    def __init__(self, order: Tensor, batch_size: int, batches: Sequence[int]) -> None:
        self.order, self.bs, self.batches = order, batch_size, list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b in self.batches:
            lo = b * self.bs
            yield [(p, int(self.order[p])) for p in range(lo, min(lo + self.bs, len(self.order)))]


def _collate(items: list[tuple[Tensor, int, int]]) -> tuple[Tensor, Tensor, Tensor]:
    xs = [x for x, _, _ in items]
    out = None
    if torch.utils.data.get_worker_info() is not None:
        # in a worker: stack straight into shared memory, as torch's default_collate does, so the
        # batch is not copied again when it is sent to the main process
        n = len(xs) * xs[0].numel()
        out = xs[0].new(xs[0]._typed_storage()._new_shared(n, device="cpu")).resize_(len(xs), *xs[0].shape)
    return (torch.stack(xs, out=out), torch.tensor([y for _, y, _ in items], dtype=torch.long),
            torch.tensor([p for _, _, p in items], dtype=torch.long))


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # one decode per worker process; the workers are the parallelism


class _Loader(torch.utils.data.DataLoader):
    """A DataLoader whose worker's BadImageError arrives as the worker raised it: one line naming the
    file, not torch's "Caught ... in DataLoader worker process N" + the worker's traceback."""

    def __iter__(self) -> Iterator:
        it = super().__iter__()
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except BadImageError as e:
                text = str(e)
                if "Original Traceback" in text:  # re-raised from a worker: its message is the last line
                    text = text.rstrip().rsplit("BadImageError: ", 1)[-1]
                raise BadImageError(text) from None
            yield batch


def stream_loader(index: FileIndex, view: str, size: int, *, batch_size: int, order: Tensor | None = None,
                  batches: Sequence[int] | None = None, seed: int = 0, workers: int = 0,
                  channels: int = 3) -> torch.utils.data.DataLoader:
    """A DataLoader of ``(x uint8 (B, C, S, S), y (B,), position (B,))`` over ``index`` in ``order``.

    ``order`` (default: file order) is the pass's order of image indices; the pass is cut into
    batches of ``batch_size`` positions, and ``batches`` (default: all) are the batch numbers this
    process reads -- a torchrun rank passes its share. ``workers`` decoding processes (0: in
    this process). Random views are seeded by position, so the pixels do not depend on the
    workers or the sharding.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    order = torch.arange(len(index)) if order is None else order
    n_batches = -(-len(order) // batch_size)
    batches = range(n_batches) if batches is None else batches
    wrong = [b for b in batches if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < n_batches]
    if wrong:
        raise ValueError(f"batches: {wrong[0]!r} is not a batch number of this pass (0..{n_batches - 1})")
    ds = StreamedImages(index, view, size, seed, channels)
    return _Loader(
        ds, batch_sampler=_Batches(order, batch_size, batches), num_workers=workers, collate_fn=_collate,
        worker_init_fn=_worker_init if workers else None, persistent_workers=False,
        prefetch_factor=4 if workers else None)


class StreamSplit:
    """A split read from disk per batch: the labels in memory, the pixels never all at once.

    Offers what the in-memory :class:`~decoct.data.types.ImageSplit` offers except ``images``
    (which raises, naming the fix): ``labels``, ``len``, ``class_indices``, ``class_counts``,
    plus :meth:`load` (a few images, decoded here) and :meth:`loader` (a DataLoader).
    """

    def __init__(self, index: FileIndex, size: int, channels: int = 3, workers: int = 0) -> None:
        self.index, self.size, self.channels, self.workers = index, size, channels, workers

    streamed = True

    @property
    def labels(self) -> Tensor:
        return self.index.labels

    @property
    def images(self) -> Tensor:
        raise ValueError(
            f"this split ({self.index.root}, {len(self)} images) is streamed from disk and has no in-memory "
            "image tensor; this step needs the whole split in memory: load it with data_mode='memory' "
            "(--data-mode memory) if it fits, or use a step that streams (squeeze --weights, lpld/dwa/sre2l, "
            "relabel, evaluate)")

    def __len__(self) -> int:
        return len(self.index)

    def class_indices(self, c: int) -> Tensor:
        return torch.nonzero(self.labels == c, as_tuple=False).flatten()

    def class_counts(self, num_classes: int) -> Tensor:
        return torch.bincount(self.labels, minlength=num_classes)

    def load(self, idx: Tensor | Sequence[int], view: str = "resize", seed: int = 0) -> Tensor:
        """Images ``idx`` decoded in this process: uint8 (n, C, S, S). For a few images (real init)."""
        ds = StreamedImages(self.index, view, self.size, seed, self.channels)
        out = [ds[(p, int(i))][0] for p, i in enumerate(torch.as_tensor(idx).flatten().tolist())]
        return torch.stack(out) if out else torch.zeros(0, self.channels, self.size, self.size, dtype=torch.uint8)

    def loader(self, view: str, *, batch_size: int, order: Tensor | None = None, batches: Sequence[int] | None = None,
               seed: int = 0, workers: int | None = None) -> torch.utils.data.DataLoader:
        """:func:`stream_loader` over this split (``workers`` default: the split's)."""
        return stream_loader(self.index, view, self.size, batch_size=batch_size, order=order, batches=batches,
                             seed=seed, workers=self.workers if workers is None else workers,
                             channels=self.channels)
