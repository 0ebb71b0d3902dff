"""``python -m decoct.data.resize SRC DST --size N``: a copy of an image-folder tree at one size.

Why: decoct's commands load a tree whose images all have one size. A tree of mixed sizes (photos)
is made uniform once with this tool -- shorter side to N (bicubic), then a centre crop, the same
mapping as ``load_dataset("imagefolder", root=SRC, image_size=N)`` -- and DST is then passed as
``--data-root``. Images are written as PNG (lossless), so DST loads to exactly the pixels that
``image_size=N`` gives; class folders, file names (suffix ``.png``) and the split layout are kept,
and SRC (a directory or a ``.tar``/``.tar.gz`` archive) follows the same rule as every load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path, PurePosixPath

from PIL import Image

from decoct.data.sources import DataNotFoundError, data_roots, read_imagefolder
from decoct.runtime.io import fsync_dir, fsync_paths


def resize_imagefolder(src: str | os.PathLike, dst: str | os.PathLike, size: int, channels: int = 3,
                       skip_bad: bool = False) -> int:
    """Write ``dst/<split>/<class>/<name>.png`` at ``size`` x ``size`` for every image of ``src``;
    returns the number written. ``dst`` must not exist or be an empty folder (nothing is replaced);
    it appears complete or not at all (written beside it, then renamed)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"--size must be a positive integer, got {size!r}")
    if channels not in (1, 3):
        raise ValueError(f"--channels must be 1 or 3, got {channels!r}")
    source = data_roots(src)[0]
    out = Path(dst).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty folder; pass a new path")
    fd = read_imagefolder(source, channels=channels, image_size=size, skip_bad=skip_bad)
    tmp = out.parent / f".{out.name}.resize-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    written: list[Path] = []
    try:
        for split, (images, labels) in fd.splits.items():
            taken: set[Path] = set()
            for img, label, within in zip(images, labels.tolist(), fd.names[split], strict=True):
                rel = PurePosixPath(fd.classes[label]) / within
                path = tmp / split / rel.with_suffix(".png")
                if path in taken:  # a.jpg and a.png in one folder: keep both
                    path = tmp / split / f"{rel}.png"
                taken.add(path)
                path.parent.mkdir(parents=True, exist_ok=True)
                arr = img.permute(1, 2, 0).numpy()
                Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(path, format="PNG")
                written.append(path)
        fsync_paths(written)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return len(written)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: one line on success, one error line and exit 2 on bad input."""
    p = argparse.ArgumentParser(prog="python -m decoct.data.resize", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="image-folder tree: a directory or .tar/.tar.gz archive")
    p.add_argument("dst", help="new folder to write (must not exist, or be empty)")
    p.add_argument("--size", type=int, required=True, help="side of the square output images, in pixels")
    p.add_argument("--channels", type=int, default=3, choices=[1, 3], help="3 = RGB, 1 = grayscale")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) files that are not images")
    args = p.parse_args(argv)
    try:
        n = resize_imagefolder(args.src, args.dst, args.size, args.channels, args.skip_bad)
    except (ValueError, DataNotFoundError) as e:
        print(f"python -m decoct.data.resize: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} images at {args.size}x{args.size} to {args.dst}; load them with --data-root {args.dst}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
