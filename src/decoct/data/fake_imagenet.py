"""``python -m decoct.data.fake_imagenet DST``: an ImageNet-shaped tree of generated JPEGs.

Why: ImageNet itself cannot be shipped with tests or benchmarks, but its *shape* is what the
streaming path must survive: 1,000 ``n########`` class folders, JPEGs of ImageNet's typical sizes
(most 500 x 375 or 375 x 500, some smaller or larger), a ``val/`` split in the same folders. Each
class gets its own colour pattern so a network can tell classes apart; pixels carry mild noise
so the JPEGs are as costly to decode as photos of the same size.
"""

from __future__ import annotations

import argparse
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# (width, height) and weight: ImageNet's most common sizes dominate, a tail of others
SIZES = (((500, 375), 0.55), ((375, 500), 0.2), ((500, 333), 0.1), ((333, 500), 0.05), ((640, 480), 0.05),
         ((300, 225), 0.05))

__all__ = ["main", "make_tree", "wnid"]


def wnid(k: int) -> str:
    """A WordNet-id-shaped class folder name for class ``k`` (sorted in class order)."""
    return f"n{1_000_000 + 37 * k:08d}"


def _image(rng: np.random.Generator, k: int, classes: int, size: tuple[int, int]) -> bytes:
    from PIL import Image

    w, h = size
    hue = 2 * np.pi * k / classes
    base = 127 + 90 * np.array([np.cos(hue), np.cos(hue + 2.1), np.cos(hue + 4.2)])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    freq = 1 + (k % 7)
    wave = np.sin(freq * (xx / w) * np.pi * 2 + rng.uniform(0, 6.3)) * np.cos((k % 5 + 1) * yy / h * np.pi)
    img = base[None, None, :] + 60 * wave[..., None] + rng.normal(0, 12, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def make_tree(dst: str | os.PathLike, classes: int | Sequence[str] = 1000, per_class: int = 2,
              val_per_class: int = 1, seed: int = 0, size: tuple[int, int] | None = None) -> int:
    """Write ``dst/train/<wnid>/<wnid>_<i>.JPEG`` and ``dst/val/<wnid>/...``; returns the files written.

    ``classes``: a count (folders named by :func:`wnid`) or the folder names themselves (real
    wnids, e.g. an MTT subset's from :data:`decoct.data.subsets.SUBSETS`, to stand in for the
    ImageNet tree a named subset reads). ``size`` (width, height) fixes every image's size (small
    trees for tests); default: ImageNet's typical size mix (:data:`SIZES`). Existing files are
    overwritten; nothing else is touched."""
    if isinstance(classes, str):
        raise ValueError(f"classes must be a count or a list of folder names, got the string {classes!r}")
    if isinstance(classes, int):
        names = [wnid(k) for k in range(classes)]
    else:
        names = [str(c) for c in classes]
        bad = [c for c in names if not c or c.startswith(".") or "/" in c or "\\" in c]
        if bad:
            raise ValueError(f"classes: {bad[0]!r} cannot be a class folder name")
        if len(set(names)) != len(names):
            raise ValueError("classes: a folder name is given twice")
    if not names or per_class < 1 or val_per_class < 1:
        raise ValueError("classes, per_class and val_per_class must be at least 1")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"size must be (width, height) of at least 1 pixel each, got {size!r}")
    rng = np.random.default_rng(seed)
    sizes, weights = zip(*SIZES, strict=True)
    n = 0
    for split, count in (("train", per_class), ("val", val_per_class)):
        for k, name in enumerate(names):
            folder = Path(dst) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                s = size or sizes[rng.choice(len(sizes), p=np.array(weights))]
                (folder / f"{name}_{i}.JPEG").write_bytes(_image(rng, k, len(names), s))
                n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m decoct.data.fake_imagenet", description=__doc__.split("\n\n")[1])
    p.add_argument("dst", help="folder to write train/ and val/ into")
    p.add_argument("--classes", type=int, default=None, help="number of classes (default 1000)")
    p.add_argument("--subset", default=None, metavar="NAME",
                   help="the 10 wnid folders of an MTT subset instead (imagenette, imagewoof, imagefruit, "
                        "imagemeow, imagesquawk, imageyellow), so 'decoct ... --dataset NAME' can read the tree")
    p.add_argument("--per-class", type=int, default=2, help="train images per class")
    p.add_argument("--val-per-class", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("W", "H"), help="one fixed image size")
    a = p.parse_args(argv)
    if a.subset is not None:
        from decoct.data.subsets import SUBSETS

        if a.classes is not None:
            p.error("give --classes or --subset, not both")
        if a.subset.lower() not in SUBSETS:
            p.error(f"--subset {a.subset!r}: known subsets are {', '.join(SUBSETS)}")
        classes: int | list[str] = list(SUBSETS[a.subset.lower()])
    else:
        classes = 1000 if a.classes is None else a.classes
    try:
        n = make_tree(a.dst, classes, a.per_class, a.val_per_class, a.seed, tuple(a.size) if a.size else None)
    except ValueError as e:
        p.error(str(e))
    print(f"wrote {n} JPEGs under {a.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
