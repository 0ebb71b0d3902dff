"""Dataset registry: ``load_dataset(name)`` returns whole splits as uint8 tensors.

Names: ``digits`` (scikit-learn's bundled 8x8 digits, the offline default), ``cifar10``
(the shared ImageFolder archive when present, else torchvision's files, downloaded only with
``download=True``), ``cifar100`` (torchvision), ``tinyimagenet10`` (the shared archive),
``tinyimagenet`` and ``imagefolder`` (``root`` = a directory or ``.tar``/``.tar.gz`` archive
holding ``[prefix/]train/<class>/<file>`` and ``test/<class>/<file>``), ``imagenet`` (a
``train/<wnid>/`` + ``val/<wnid>/`` tree, streamed from disk when it does not fit in memory:
:mod:`decoct.data.stream`), and MTT's ten-class subsets of that tree at 128 x 128 ``imagenette``,
``imagewoof``, ``imagefruit``, ``imagemeow``, ``imagesquawk``, ``imageyellow``
(:mod:`decoct.data.subsets`). docs/datasets.md describes them.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from decoct.data.sources import (
    BadImageError,
    DataNotFoundError,
    ImageFolderError,
    cache_meta,
    cached,
    data_roots,
    meta_tensor,
    note,
    read_imagefolder,
    scan_directory,
    summary_line,
)
from decoct.data.types import Dataset, DatasetInfo, ImageSplit, denormalize, normalize, to_uint8
from decoct.runtime.config import env_bytes
from decoct.runtime.registry import Registry

DATASETS: Registry[Callable[..., Dataset]] = Registry("dataset")

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _split(t: dict[str, torch.Tensor], name: str) -> ImageSplit:
    return ImageSplit(t[f"{name}_images"], t[f"{name}_labels"])


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.double().div(255)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3))
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def _from_imagefolder(
    source: Path, name: str, mean=None, std=None, image_size: int | None = None, channels: int = 3,
    skip_bad: bool = False, label: str | None = None,
) -> Dataset:
    """Decode (or read from the cache) an image-folder tree; print what it holds to stderr when it
    is decoded, and on every load when ``label`` is given (a user's own tree)."""
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    entries = rows = None
    if source.is_dir():
        entries, rows = scan_directory(source)  # the cache key sees every file
    built = []

    def build() -> dict[str, torch.Tensor]:
        fd = read_imagefolder(source, channels=channels, image_size=image_size, skip_bad=skip_bad, entries=entries)
        first = [f"{n} ({why[:80]})" for n, why in fd.skipped[:3]]
        t = {"meta": meta_tensor({"classes": fd.classes, "skipped": len(fd.skipped), "skipped_first": first})}
        for s, (x, y) in fd.splits.items():
            t[f"{s}_images"], t[f"{s}_labels"] = x, y
        built.append(True)
        return t

    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:40] or "imagefolder"
    t = cached(source, tag, {"image_size": image_size, "channels": channels, "skip_bad": skip_bad}, build, rows=rows)
    meta = cache_meta(t)
    classes = tuple(meta["classes"])
    train, test = _split(t, "train"), _split(t, "test")
    if built or label:
        line = summary_line(label or name, classes, len(train), len(test), meta["skipped"])
        note(line + (f", first: {'; '.join(meta['skipped_first'])}" if meta["skipped"] else ""))
    if mean is None:
        mean, std = _channel_stats(train.images)
    c, h, w = train.images.shape[1:]
    info = DatasetInfo(name, classes, c, h, w, tuple(mean), tuple(std))
    return Dataset(info, train, test)


def _find(candidates: list[str], root: str | None) -> tuple[Path | None, list[Path]]:
    """The first ``root/candidate`` that exists (over :func:`data_roots`), and the paths tried; an
    explicit root that is itself one of the candidates (the archive, not its folder) is taken."""
    tried = []
    if root and Path(root).expanduser().name in candidates and Path(root).expanduser().exists():
        return Path(root).expanduser(), [Path(root).expanduser()]
    for r in data_roots(root):
        for c in candidates:
            p = r / c
            tried.append(p)
            if p.exists():
                return p, tried
    return None, tried


def _not_found(name: str, tried: list[Path], fix: str) -> DataNotFoundError:
    listing = ", ".join(str(p) for p in tried)
    return DataNotFoundError(f"dataset {name!r} not found (tried {listing}). {fix}")


@DATASETS.register("digits")
def _digits(root: str | None = None, download: bool = False) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images); fixed stratified split, 360 test images."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    idx_train, idx_test = train_test_split(
        np.arange(len(images)), test_size=360, random_state=0, stratify=d.target
    )
    idx_train.sort()
    idx_test.sort()
    x = torch.from_numpy(images)
    y = torch.from_numpy(d.target.astype(np.int64))
    train = ImageSplit(x[idx_train], y[idx_train])
    mean, std = _channel_stats(train.images)
    info = DatasetInfo("digits", tuple(str(i) for i in range(10)), 1, 8, 8, mean, std)
    return Dataset(info, train, ImageSplit(x[idx_test], y[idx_test]))


def _torchvision_cifar(name: str, cls_name: str, folder: str, mean, std, root, download,
                       tried_before: tuple[Path, ...] = ()) -> Dataset:
    roots = data_roots(root)
    tried = [*tried_before, *(r / folder for r in roots)]
    base = next((r for r in roots if (r / folder).exists()), None)
    if base is None and not download:
        raise _not_found(
            name,
            tried,
            "Fix: pass --data-root DIR (or set $DECOCT_DATA) to a directory holding it, "
            "or add --download to fetch it from the internet.",
        )
    import torchvision  # seconds to import: only once the files are known to be there (or wanted)

    base = base or roots[0]
    cls = getattr(torchvision.datasets, cls_name)

    def build() -> dict[str, torch.Tensor]:
        t = {}
        for split, train in (("train", True), ("test", False)):
            ds = cls(str(base), train=train, download=download)
            t[f"{split}_images"] = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
            t[f"{split}_labels"] = torch.tensor(ds.targets, dtype=torch.long)
        t["meta"] = meta_tensor({"classes": list(ds.classes), "skipped": 0, "skipped_first": []})
        return t

    if download:
        cls(str(base), train=True, download=True)
        cls(str(base), train=False, download=True)
    t = cached(base / folder, name, {}, build)
    classes = tuple(cache_meta(t)["classes"])
    info = DatasetInfo(name, classes, 3, 32, 32, mean, std)
    return Dataset(info, _split(t, "train"), _split(t, "test"))


@DATASETS.register("cifar10")
def _cifar10(root: str | None = None, download: bool = False, skip_bad: bool = False) -> Dataset:
    """CIFAR-10: the shared ImageFolder archive when present, else torchvision's files."""
    archive, tried = _find(["cifar10.tar.gz", "cifar10"], root)
    if archive is not None and (archive.is_file() or (archive / "train").exists()):
        return _from_imagefolder(archive, "cifar10", CIFAR10_MEAN, CIFAR10_STD, skip_bad=skip_bad)
    return _torchvision_cifar("cifar10", "CIFAR10", "cifar-10-batches-py", CIFAR10_MEAN, CIFAR10_STD, root, download,
                              tuple(tried))


@DATASETS.register("cifar100")
def _cifar100(root: str | None = None, download: bool = False) -> Dataset:
    return _torchvision_cifar("cifar100", "CIFAR100", "cifar-100-python", CIFAR100_MEAN, CIFAR100_STD, root, download)


@DATASETS.register("tinyimagenet10")
def _tiny10(root: str | None = None, download: bool = False, skip_bad: bool = False) -> Dataset:
    """The shared 10-class Tiny-ImageNet (64x64), ImageNet normalisation as DC/MTT use."""
    path, tried = _find(["tinyimagenet10.tar.gz", "tinyimagenet10"], root)
    if path is None:
        raise _not_found("tinyimagenet10", tried, "Fix: pass --data-root DIR or set $DECOCT_DATA.")
    return _from_imagefolder(path, "tinyimagenet10", IMAGENET_MEAN, IMAGENET_STD, skip_bad=skip_bad)


@DATASETS.register("tinyimagenet")
def _tiny(root: str | None = None, download: bool = False, skip_bad: bool = False) -> Dataset:
    """Full Tiny-ImageNet as an ImageFolder tree with train/ and test/ (the val set re-foldered)."""
    path, tried = _find(["tinyimagenet.tar.gz", "tinyimagenet", "tiny-imagenet-200"], root)
    if path is None:
        raise _not_found(
            "tinyimagenet", tried,
            "Fix: pass --data-root DIR holding tinyimagenet/{train,test}/<class>/ (no automatic download).",
        )
    return _from_imagefolder(path, "tinyimagenet", IMAGENET_MEAN, IMAGENET_STD, skip_bad=skip_bad)


@DATASETS.register("imagefolder")
def _imagefolder(root: str | None = None, download: bool = False, image_size: int | None = None,
                 channels: int = 3, skip_bad: bool = False) -> Dataset:
    """Any ``train/<class>/`` + ``test/<class>/`` tree (directory or tar archive); mean/std from train.

    What counts as a class and an image is the rule in :mod:`decoct.data.sources`; the classes
    found are printed to stderr on every load. ``image_size`` resizes (shorter side, centre crop),
    ``channels`` 1 loads grayscale, ``skip_bad`` skips (and counts) files that are not images."""
    if not root:
        raise ValueError("dataset 'imagefolder' needs --data-root PATH (a directory or .tar/.tar.gz archive)")
    path = data_roots(root)[0]  # raises when it does not exist
    name = path.name.split(".")[0] or "imagefolder"
    return _from_imagefolder(path, name, image_size=image_size, channels=channels, skip_bad=skip_bad,
                             label=f"imagefolder {path}")


DATA_MODES = ("auto", "memory", "stream")
DEFAULT_MEMORY_LIMIT = 4 * 2**30


def memory_limit() -> int:
    """Decoded bytes above which ``data_mode='auto'`` streams: ``$DECOCT_MEMORY_LIMIT`` or 4 GiB."""
    return env_bytes("DECOCT_MEMORY_LIMIT", DEFAULT_MEMORY_LIMIT)


def _default_workers() -> int:
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _imagenet_root(root: str | None) -> Path:
    """The ImageNet tree: ``root/{imagenet,ILSVRC2012,imagenet-1k}`` over :func:`data_roots`, or ``root``."""
    path, tried = _find(["imagenet", "ILSVRC2012", "imagenet-1k"], root)
    if path is None and root:
        path = Path(root).expanduser()
    if path is None or not path.is_dir():
        raise _not_found("imagenet", tried, "Fix: pass --data-root DIR holding train/<wnid>/ and val/<wnid>/.")
    return path


def _file_rows(idx) -> list[list]:
    """Cache-key rows of every file of an index (path, size, mtime, ctime): an image replaced in place,
    which leaves its folder's mtime alone, still changes the key of the decoded cache."""
    root, rows = os.fsencode(idx.root) + b"/", []
    for rel in idx.paths.tolist():
        st = os.stat(root + rel)
        rows.append([idx.root.name, os.fsdecode(rel), st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    return rows


MEMORY_VIEWS = ("val", "resize")


@DATASETS.register("imagenet")
def _imagenet(root: str | None = None, download: bool = False, data_mode: str = "auto",
              classes: str | list[str] | None = None, image_size: int = 224, workers: int | None = None,
              view: str = "val") -> Dataset:
    """ImageNet(-1K) kept as ``train/<wnid>/*.JPEG`` + ``val/<wnid>/*.JPEG`` (the layout after the
    usual validation reorganisation, and torchvision's ``datasets.ImageNet`` layout).

    ``data_mode``: ``stream`` reads images per batch in ``workers`` processes (the views of
    :mod:`decoct.data.views`: RandomResizedCrop + flip for statistics, Resize + CenterCrop for
    validation); ``memory`` decodes both splits once through the validation view (Resize(256) +
    CenterCrop(224) at the default size) into uint8 tensors (cached on disk); ``auto`` streams when
    the decoded splits would exceed :func:`memory_limit`. ``classes``: ``"A:B"`` (class indices of
    the sorted wnids) or wnid names, to work on a subset. ``view``: the view ``memory`` decodes
    through (``val``, or ``resize``: the whole image squeezed to ``image_size`` square, as MTT's
    ImageNet subsets are; :mod:`decoct.data.subsets`); a streamed split has no such choice (each
    stage picks its view), so ``resize`` with a streamed split is refused. Normalisation:
    ImageNet's mean/std, the constants torchvision's weights expect. Never downloaded (ImageNet's
    licence needs a login).
    """
    from decoct.data.stream import StreamSplit, load_index, parse_classes

    if download:
        raise ValueError("dataset 'imagenet' cannot be downloaded (its licence needs a login at image-net.org); "
                         "put train/<wnid>/ and val/<wnid>/ under --data-root DIR")
    if data_mode not in DATA_MODES:
        raise ValueError(f"data_mode must be one of {', '.join(DATA_MODES)}, got {data_mode!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 8 <= image_size <= 1024:
        raise ValueError(f"image_size must be an integer in [8, 1024], got {image_size!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise ValueError(f"workers must be a non-negative integer, got {workers!r}")
    if view not in MEMORY_VIEWS:
        raise ValueError(f"view must be one of {', '.join(MEMORY_VIEWS)}, got {view!r}")
    path = _imagenet_root(root)
    train_idx, val_idx = load_index(path)
    keep = parse_classes(classes, train_idx.classes)
    if keep is not None:
        train_idx, val_idx = train_idx.subset_classes(keep), val_idx.subset_classes(keep)
    info = DatasetInfo("imagenet", train_idx.classes, 3, image_size, image_size, IMAGENET_MEAN, IMAGENET_STD)
    decoded = (len(train_idx) + len(val_idx)) * 3 * image_size * image_size
    mode = data_mode if data_mode != "auto" else ("stream" if decoded > memory_limit() else "memory")
    if view != "val" and mode == "stream":
        why = ("data_mode is 'stream'" if data_mode == "stream" else f"data_mode 'auto' streams these splits "
               f"({decoded / 2**30:.1f} GiB decoded, over $DECOCT_MEMORY_LIMIT {memory_limit():,} bytes)")
        raise ValueError(f"view {view!r} is how data_mode 'memory' decodes the splits, but {why}; a streamed "
                         "split's view is chosen by each stage: pass data_mode='memory' or leave view out")
    n_workers = _default_workers() if workers is None else workers
    note(f"imagenet {path}: {len(info.classes)} classes, {len(train_idx):,} train / {len(val_idx):,} val images, "
         f"{mode} ({decoded / 2**30:.1f} GiB decoded at {image_size} px)")
    subset = tuple(keep) if keep is not None else None
    if mode == "stream":
        return Dataset(info, StreamSplit(train_idx, image_size, workers=n_workers),  # type: ignore[arg-type]
                       StreamSplit(val_idx, image_size, workers=n_workers), subset_of=subset)  # type: ignore[arg-type]
    rows = _file_rows(train_idx) + _file_rows(val_idx)

    def build() -> dict[str, torch.Tensor]:
        t = {"meta": meta_tensor({"classes": list(info.classes), "skipped": 0, "skipped_first": []})}
        for name, idx in (("train", train_idx), ("test", val_idx)):
            xs, ys = [], []
            for x, y, _ in StreamSplit(idx, image_size, workers=n_workers).loader(view, batch_size=256):
                xs.append(x)
                ys.append(y)
            t[f"{name}_images"], t[f"{name}_labels"] = torch.cat(xs), torch.cat(ys)
        return t

    t = cached(path, "imagenet", {"image_size": image_size, "view": view,
                                          "classes": list(info.classes) if keep is not None else None}, build, rows=rows)
    return Dataset(info, _split(t, "train"), _split(t, "test"), subset_of=subset)


def _mtt_subset(name: str) -> Callable[..., Dataset]:
    """The factory of MTT's named subset ``name`` (:mod:`decoct.data.subsets`)."""
    from decoct.data.subsets import SUBSET_NAMES, SUBSETS

    wnids, names = SUBSETS[name], SUBSET_NAMES[name]

    def factory(root: str | None = None, download: bool = False, workers: int | None = None) -> Dataset:
        from decoct.data.stream import load_index

        if download:
            raise ValueError(f"dataset {name!r} cannot be downloaded: it is read from an ImageNet-1K tree (whose "
                             "licence needs a login at image-net.org); put train/<wnid>/ and val/<wnid>/ under "
                             "--data-root DIR")
        path = _imagenet_root(root)
        train_idx, _ = load_index(path)  # cached: the factory below reads it again for nothing
        have = set(train_idx.classes)
        missing = [f"{w} ({n})" for w, n in zip(wnids, names, strict=True) if w not in have]
        if missing:
            raise ImageFolderError(
                f"dataset {name!r} needs 10 ImageNet-1K class folders; {train_idx.root} lacks {len(missing)}: "
                f"{', '.join(missing)}. Fix: pass --data-root DIR of a full ImageNet-1K train/ + val/ tree")
        data = _imagenet(root=str(path), data_mode="memory", classes=list(wnids), image_size=128,
                         workers=workers, view="resize")
        data.info = replace(data.info, name=name)
        return data

    factory.__doc__ = (f"MTT's {name}: ImageNet-1K classes {', '.join(names)}, in that order (labels 0-9), "
                       "from the imagenet tree, both splits squeezed whole to 128 x 128 (MTT's Resize((128, 128)) "
                       "+ CenterCrop(128)), in memory, ImageNet mean/std.")
    return factory


def _register_subsets() -> None:
    from decoct.data.subsets import SUBSETS

    for name in SUBSETS:
        DATASETS.register(name)(_mtt_subset(name))


_register_subsets()


def is_streamed(data: Dataset) -> bool:
    """Whether ``data``'s splits are read from disk per batch (:class:`decoct.data.stream.StreamSplit`)."""
    return bool(getattr(data.train, "streamed", False))


def load_dataset(name: str, root: str | os.PathLike | None = None, download: bool = False, **kwargs) -> Dataset:
    """Load a registered dataset as whole uint8 splits (see the module docstring for names)."""
    factory = DATASETS.get(name)
    try:
        inspect.signature(factory).bind(root=None, download=download, **kwargs)
    except TypeError:
        allowed = [p for p in inspect.signature(factory).parameters if p not in ("root", "download")]
        raise ValueError(
            f"dataset {name!r} takes no option {', '.join(repr(k) for k in kwargs if k not in allowed)}; "
            f"its options: {', '.join(allowed) or 'none'}") from None
    data = factory(root=str(root) if root is not None else None, download=download, **kwargs)
    # recorded by sets and teachers made from it, so later commands find this data again
    data.source = {"registry": name.lower(), "root": str(Path(root).expanduser().absolute()) if root else None,
                   **({"options": dict(kwargs)} if kwargs else {})}
    return data


def list_datasets() -> list[str]:
    return DATASETS.names()


__all__ = [
    "DATASETS", "BadImageError", "DataNotFoundError", "ImageFolderError", "Dataset", "DatasetInfo", "ImageSplit",
    "DATA_MODES", "denormalize", "is_streamed", "list_datasets", "load_dataset", "memory_limit", "normalize",
    "to_uint8",
]
