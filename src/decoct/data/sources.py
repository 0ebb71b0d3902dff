"""Where datasets come from: data roots, what counts as a class and an image, decoding, and the
decoded cache.

The image-folder rule (one rule, for directories and ``.tar``/``.tar.gz`` archives alike)
-----------------------------------------------------------------------------------------
A tree is ``[prefix/]train/<class>/<image>`` and ``[prefix/]test/<class>/<image>``.

* Ignored everywhere, as if absent: every file or folder whose name starts with ``.`` (hidden:
  ``.ipynb_checkpoints``, ``.DS_Store``, ``._*`` AppleDouble files, ``.git``) and operating-system
  litter (:data:`OS_LITTER`: ``__MACOSX``, ``Thumbs.db``, ``desktop.ini``, ...).
* The tree is the shallowest folder holding a ``train/`` folder (two at the same depth are an
  error); files outside its split folders (a README, a ``classes.txt``) belong to no split.
* A class is a folder directly inside a split folder; every image below it belongs to it. Class
  names with control characters (a newline, a tab) are refused. Every class holds at least one
  image in every split, and train and test have the same classes: otherwise labels would shift.
* Anything else inside a split folder -- a file directly in it, a file whose extension is not an
  image's (:data:`IMAGE_SUFFIXES`), a file that does not decode to faithful 8-bit pixels (see
  :func:`decode_image`) -- is an error naming it; with ``skip_bad=True`` it is skipped and the
  count printed.

Decoding 60,000 JPEGs takes tens of seconds on a laptop CPU, so a decoded dataset is cached on
disk as a safetensors file (see :func:`cached`); a second load reads only that file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import stat
import sys
import tarfile
import unicodedata
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from decoct.runtime.io import atomic_save_tensors, load_tensors

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".pbm", ".webp", ".gif", ".tif", ".tiff")
# lower-cased; names starting with '.' (.DS_Store, ._x, .ipynb_checkpoints, .Trashes) are hidden anyway
OS_LITTER = frozenset({"__macosx", "thumbs.db", "ehthumbs.db", "desktop.ini", "$recycle.bin",
                       "system volume information", "icon\r"})
CACHE_FORMAT = 2  # bump when the cached tensors' layout changes
LEGACY_CACHE = re.compile(r"(imagefolder|cifar10|cifar100)-[0-9a-f]{16}\.safetensors")  # format 1 names


class DataNotFoundError(FileNotFoundError):
    """A dataset could not be found; the message names the paths tried and the fix."""


class ImageFolderError(ValueError):
    """An image-folder tree breaks the layout rule (module docstring); the message names where."""


class BadImageError(ValueError):
    """A file cannot be decoded to faithful 8-bit pixels; the message names the file."""


def is_ignored(name: str) -> bool:
    """Whether a file or folder name is hidden (``.`` prefix) or OS litter: never a class or image."""
    return name.startswith(".") or name.lower() in OS_LITTER


def data_roots(explicit: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched for datasets.

    An explicit root (``--data-root`` / ``root=``) is the only one searched, and must exist: a
    typo must not silently load the same-named dataset from somewhere else. Without one:
    ``$DECOCT_DATA``, ``./data``, ``../shared/datasets`` and the ``shared/datasets`` beside this
    checkout, in that order.
    """
    if explicit:
        root = Path(explicit).expanduser()
        if not root.exists():
            raise DataNotFoundError(
                f"data root {str(root)!r} does not exist; pass --data-root an existing directory (or "
                "archive), or leave it out to search $DECOCT_DATA, ./data and ../shared/datasets")
        return [root]
    roots: list[Path] = []
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


# ---------------------------------------------------------------------------------------------
# the decoded cache


def cache_dir() -> Path:
    return Path(os.environ.get("DECOCT_CACHE", Path.home() / ".cache" / "decoct")).expanduser()


def fingerprint(source: Path, rows: list[tuple] | None = None) -> dict:
    """What the decoded cache of ``source`` is keyed on, so that any change to its data is seen.

    An archive: its resolved path, size, mtime_ns and ctime_ns. A directory: its resolved path and
    a hash of every file's relative path, size, mtime_ns and ctime_ns (``rows`` from
    :func:`scan_directory`, walked here when not given): adding, replacing or deleting one image
    changes the key. (ctime changes on any write, even one that restores the old mtime.)
    """
    resolved = str(source.resolve())
    if source.is_dir():
        if rows is None:
            rows = scan_directory(source)[1]
        digest = hashlib.sha256(json.dumps(sorted(rows)).encode()).hexdigest()
        return {"path": resolved, "files": len(rows), "index": digest}
    st = source.stat()
    return {"path": resolved, "size": st.st_size, "mtime": st.st_mtime_ns, "ctime": st.st_ctime_ns}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _valid_cache(t: dict[str, torch.Tensor]) -> bool:
    """Whether a loaded cache file has the layout :func:`cached` writes (anything else is rebuilt)."""
    try:
        meta = json.loads(bytes(t["meta"].tolist()).decode())
        n = len(meta["classes"])
        if not all(isinstance(c, str) for c in meta["classes"]):
            return False
        for s in ("train", "test"):
            x, y = t[f"{s}_images"], t[f"{s}_labels"]
            if x.dtype != torch.uint8 or x.dim() != 4 or y.dtype != torch.int64 or y.shape != (len(x),):
                return False
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= n):
                return False
        return True
    except (KeyError, ValueError, TypeError, UnicodeDecodeError):
        return False


def cache_meta(t: dict[str, torch.Tensor]) -> dict:
    """The JSON metadata (``classes``, notes) stored beside a cached dataset's tensors."""
    return json.loads(bytes(t["meta"].tolist()).decode())


def meta_tensor(meta: dict) -> torch.Tensor:
    """``meta`` as a uint8 tensor of its JSON text (what :func:`cache_meta` reads back)."""
    return torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)


def cached(source: Path, tag: str, extra: dict, build: Callable[[], dict[str, torch.Tensor]],
           rows: list[tuple] | None = None) -> dict[str, torch.Tensor]:
    """Return ``build()``'s tensors (``meta`` + ``{train,test}_{images,labels}``), reading or
    writing the on-disk decoded cache.

    The file is ``<tag>-<slot>-<key>.safetensors``: ``slot`` names the source and loader options
    (``extra``), ``key`` its :func:`fingerprint`. A file that fails to load or has the wrong layout
    is rebuilt, never trusted; writes are atomic, and older versions of the same slot (and files
    of the first cache format) are removed once the new one is in place, so editing a tree does not
    grow the cache without bound.
    """
    slot = _hash({"path": str(source.resolve()), "tag": tag, "format": CACHE_FORMAT, **extra})[:12]
    key = _hash(fingerprint(source, rows))[:16]
    folder = cache_dir()
    path = folder / f"{tag}-{slot}-{key}.safetensors"
    if path.exists():
        try:
            t = load_tensors(path)
            if _valid_cache(t):
                return t
        except Exception:  # a damaged cache is rebuilt, never trusted
            pass
        path.unlink(missing_ok=True)
    tensors = build()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors(path, tensors)
        for old in folder.glob(f"{tag}-{slot}-*.safetensors"):
            if old != path:
                old.unlink(missing_ok=True)
        for old in folder.glob("*.safetensors"):  # format 1's files, never read again
            if LEGACY_CACHE.fullmatch(old.name):
                old.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only cache dir only costs speed; the data itself is correct
    return tensors


# ---------------------------------------------------------------------------------------------
# listing a tree


@dataclass(frozen=True)
class Entry:
    """One file or folder of a tree: its ``/``-separated path inside the directory or archive."""

    name: str
    is_dir: bool
    problem: str | None = None  # why a file cannot be read as one (a broken link, a device)


def scan_directory(root: Path) -> tuple[list[Entry], list[tuple]]:
    """Every file and folder under ``root`` (hidden names and litter skipped, symlinked folders
    followed) and the fingerprint rows ``(path, size, mtime_ns, ctime_ns)`` of its files (and
    ``(path/, 0, 0, 0)`` of its folders)."""
    entries: list[Entry] = []
    rows: list[tuple] = []
    ids: dict[str, tuple[int, int]] = {}

    def fail(e: OSError) -> None:
        raise ImageFolderError(f"{e.filename}: cannot list this folder ({e.strerror}); fix its permissions")

    for dirpath, dirnames, filenames in os.walk(root, onerror=fail, followlinks=True):
        rel = Path(dirpath).relative_to(root).as_posix()
        st = os.stat(dirpath)
        ids[rel] = (st.st_dev, st.st_ino)
        parent = rel
        while parent != ".":  # a symlink back to a folder above: a loop, not data
            parent = str(PurePosixPath(parent).parent)
            if ids.get(parent) == ids[rel]:
                raise ImageFolderError(f"{dirpath}: symbolic link loop (leads back to {root / parent}); remove it")
        dirnames[:] = sorted(d for d in dirnames if not is_ignored(d))
        if rel != ".":
            entries.append(Entry(rel, True))
            rows.append((rel + "/", 0, 0, 0))  # a new (empty) folder changes the key too
        for f in sorted(filenames):
            if is_ignored(f):
                continue
            name = f if rel == "." else f"{rel}/{f}"
            try:
                fst = os.stat(os.path.join(dirpath, f))
            except OSError as e:
                entries.append(Entry(name, False, f"cannot be read ({e.strerror}; a broken link?)"))
                rows.append((name, -1, -1, -1))
                continue
            ok = stat.S_ISREG(fst.st_mode)
            entries.append(Entry(name, False, None if ok else "is not a regular file"))
            rows.append((name, fst.st_size, fst.st_mtime_ns, fst.st_ctime_ns))
    return entries, rows


def _open_archive(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:*")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise ImageFolderError(
            f"{path}: cannot read it as a .tar/.tar.gz archive ({e}); pass a directory or a complete "
            "tar archive") from e


def _member_name(name: str) -> str | None:
    """A member's normalised path (``./`` and a leading ``/`` dropped); None for an ignored one."""
    parts = [p for p in PurePosixPath(name).parts if p != "/"]
    if not parts or any(is_ignored(p) for p in parts):
        return None
    return "/".join(parts)


def scan_archive(path: Path) -> list[Entry]:
    """Every file and folder in a tar archive (hidden names and litter skipped)."""
    entries = []
    with _open_archive(path) as tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise ImageFolderError(f"{path}: the archive is damaged or cut short ({e}); get a complete copy") from e
        for m in members:
            name = _member_name(m.name)
            if name is None:
                continue
            if m.isdir():
                entries.append(Entry(name, True))
            else:
                ok = m.isfile() or m.islnk() or m.issym()
                entries.append(Entry(name, False, None if ok else "is not a regular file"))
    return entries


def _where(source: Path, name: str, is_dir: bool) -> str:
    return f"{source / name}" if is_dir else f"member {name!r} of {source}"


@dataclass
class _Layout:
    prefix: tuple[str, ...]
    classes: dict[str, set[str]]  # split -> class folders seen
    files: dict[str, list[tuple[str, str, str]]]  # split -> (class, path within class, entry name)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (entry name, why)


def _layout(source: Path, entries: list[Entry], splits: tuple[str, ...]) -> _Layout:
    first = splits[0]
    candidates = set()
    for e in entries:
        parts = e.name.split("/")
        for i, p in enumerate(parts):
            if p == first and (i < len(parts) - 1 or e.is_dir):
                candidates.add(tuple(parts[:i]))
    if not candidates:
        top = sorted({e.name.split("/")[0] for e in entries})
        shown = ", ".join(top[:8]) + (", ..." if len(top) > 8 else "") if top else "nothing"
        raise DataNotFoundError(
            f"{source}: no '{first}/' folder found (it holds: {shown}); an image-folder tree is "
            f"[prefix/]{'/<class>/<image> and '.join(splits)}/<class>/<image>")
    depth = min(len(c) for c in candidates)
    shallowest = sorted(c for c in candidates if len(c) == depth)
    if len(shallowest) > 1:
        trees = ", ".join("/".join(c) + "/" for c in shallowest[:4])
        raise ImageFolderError(f"{source} holds more than one image-folder tree ({trees}); "
                               "pass --data-root one of them")
    prefix = shallowest[0]
    lay = _Layout(prefix, {s: set() for s in splits}, {s: [] for s in splits})
    n = len(prefix)
    for e in entries:
        parts = tuple(e.name.split("/"))
        if len(parts) < n + 2 or parts[:n] != prefix or parts[n] not in splits:
            continue  # outside the split folders: part of no split
        split, rel = parts[n], parts[n + 1:]
        if len(rel) == 1 and not e.is_dir:
            lay.bad.append((e.name, f"is directly inside {split}/, not in a class folder"))
            continue
        lay.classes[split].add(rel[0])
        if e.is_dir:
            continue
        if e.problem:
            lay.bad.append((e.name, e.problem))
        elif not rel[-1].lower().endswith(IMAGE_SUFFIXES):
            suffix = PurePosixPath(rel[-1]).suffix
            kind = f"extension {suffix!r}" if suffix else "no extension"
            lay.bad.append((e.name, f"is not an image ({kind})"))
        else:
            lay.files[split].append((rel[0], "/".join(rel[1:]), e.name))
    for split in splits:
        for c in sorted(lay.classes[split]):
            if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in c):
                raise ImageFolderError(
                    f"{source}: class folder {c!r} in {split}/ has a control character (or undecodable "
                    "byte) in its name; rename the folder")
    return lay


# ---------------------------------------------------------------------------------------------
# decoding


class _Refused(Exception):
    """A decoded image whose pixels have no faithful 8-bit mapping (message says why)."""


_GRAY16 = ("I;16", "I;16B", "I;16L", "I;16N")


def _gray(g: np.ndarray, channels: int) -> np.ndarray:
    return g[..., None] if channels == 1 else np.repeat(g[..., None], 3, axis=2)


def _to_8bit(img: Image.Image, channels: int) -> np.ndarray:
    mode = img.mode
    if mode in _GRAY16 or mode == "I":
        if mode == "I" and img.format not in ("PNG", "PPM"):
            raise _Refused(f"has 32-bit integer pixels (mode I, {img.format}), which have no defined "
                           "8-bit scale; save it with 8 or 16 bits per sample")
        a = np.asarray(img).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise _Refused(f"has {mode} pixels outside 0..65535; save it with 8 or 16 bits per sample")
        key = img.info.get("transparency")
        if isinstance(key, int) and (a == key).any():
            raise _Refused(_transparent(int((a == key).sum())))
        return _gray(((a * 255 + 32767) // 65535).astype(np.uint8), channels)
    if mode in ("P", "PA") or (mode in ("1", "L", "RGB") and "transparency" in img.info):
        img = img.convert("RGBA")  # a palette, or a colour key, as an alpha channel
        mode = "RGBA"
    if mode in ("LA", "RGBA"):
        alpha = np.asarray(img.getchannel("A"))
        if alpha.size and alpha.min() < 255:
            raise _Refused(_transparent(int((alpha < 255).sum())))
        img = img.convert("L" if mode == "LA" else "RGB")  # fully opaque: the alpha says nothing
        mode = img.mode
    if mode in ("1", "L"):
        return _gray(np.asarray(img.convert("L")), channels)
    if mode in ("RGB", "RGBX", "CMYK", "YCbCr"):
        rgb = img.convert("RGB")
        return np.asarray(rgb.convert("L"))[..., None] if channels == 1 else np.asarray(rgb)
    if mode == "F":
        raise _Refused("has floating-point pixels (mode F), which have no defined 8-bit scale "
                       "(0..1? 0..255?); save it as an 8-bit image")
    raise _Refused(f"has mode {mode}, which has no faithful conversion to 8-bit "
                   f"{'grayscale' if channels == 1 else 'RGB'} here; convert it to RGB")


def _transparent(n: int) -> str:
    return (f"has {n} transparent pixel(s); decoct does not guess a background colour: flatten it onto "
            "the background you want (or make it opaque)")


def _resize(arr: np.ndarray, image_size: int) -> np.ndarray:
    """Shorter side to ``image_size`` (bicubic), then a centre crop: the usual eval-time preset."""
    img = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    w, h = img.size
    s = image_size / min(w, h)
    img = img.resize((max(image_size, round(w * s)), max(image_size, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - image_size) // 2, (h - image_size) // 2
    img = img.crop((left, top, left + image_size, top + image_size))
    out = np.asarray(img, dtype=np.uint8)
    return out[..., None] if out.ndim == 2 else out


def decode_image(data: bytes, where: str, channels: int = 3, image_size: int | None = None) -> np.ndarray:
    """Decode one image file to uint8 ``(channels, H, W)``, or raise :class:`BadImageError` naming
    ``where``; never returns pixels that differ from the file's without saying so.

    Per mode (``channels`` 3 -> RGB, 1 -> grayscale):

    * ``1``, ``L``, ``P``, ``RGB``, ``RGBX`` map exactly (``1`` -> 0/255, a palette -> its colours,
      gray -> R=G=B). To 1 channel, colour becomes ITU-R 601 luma (Pillow's ``L``), exact for gray.
    * ``LA``, ``RGBA``, ``PA``, and ``P``/``L``/``RGB``/16-bit gray with a transparency key: a fully
      opaque image drops its alpha exactly; any transparent pixel is an error (no background is
      guessed: the colour under a transparent pixel is arbitrary).
    * 16-bit gray (``I;16*``, and ``I`` from a 16-bit PNG/PGM): each sample to the nearest 8-bit
      level, ``round(v * 255 / 65535)`` (exact for 8-bit data stored as ``257 * v``); Pillow's own
      conversion clips everything above 255 to white. 16-bit *colour* PNGs are reduced by Pillow
      itself to their high byte (``v >> 8``, within one level of the nearest).
    * ``CMYK`` (JPEG, TIFF): ``R = (255 - C)(255 - K) / 255`` etc. (Pillow's conversion); ``YCbCr``
      (TIFF): the JPEG/BT.601 full-range formula. Embedded ICC profiles are not applied, for any
      mode (as torchvision and the reference repos do).
    * ``I`` from other formats (32-bit integers), ``F`` (float), ``LAB``, ``HSV``: refused -- they
      have no defined 8-bit scale or no faithful conversion here.

    A file that fails to decode (cut short, corrupt, not an image), or holds more pixels than
    ``PIL.Image.MAX_IMAGE_PIXELS`` (checked from its header, before decoding: a decompression
    bomb), is an error. An EXIF orientation is applied (the image as viewers show it); an animated
    or multi-page file gives its first frame. ``image_size`` then resizes the shorter side and
    centre-crops to ``image_size`` square.
    """
    truncated_ok = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a cut-short file is an error, never grey-filled
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        w, h = img.size
        limit = Image.MAX_IMAGE_PIXELS
        if limit and w * h > limit:
            raise _Refused(f"is {w}x{h} pixels, more than PIL.Image.MAX_IMAGE_PIXELS ({limit:,}): a "
                           "decompression bomb? shrink the image (or raise that limit if you trust it)")
        img.load()
        if img.getexif().get(0x0112, 1) != 1:
            img = ImageOps.exif_transpose(img)
        arr = _to_8bit(img, channels)
    except _Refused as e:
        raise BadImageError(f"{where} {e}") from None
    except UnidentifiedImageError:
        raise BadImageError(f"{where} is not an image Pillow can read (unknown or damaged format)") from None
    except Image.DecompressionBombError as e:
        raise BadImageError(f"{where} has too many pixels ({e})") from None
    except MemoryError:
        raise
    except Exception as e:  # any decoder failure on this file's bytes: cut short, corrupt, ...
        raise BadImageError(f"{where} cannot be decoded: the file is damaged or cut short "
                            f"({type(e).__name__}: {str(e)[:160]})") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok
    if image_size is not None and arr.shape[:2] != (image_size, image_size):
        arr = _resize(arr, image_size)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


# ---------------------------------------------------------------------------------------------
# reading a tree


@dataclass
class FolderData:
    """What :func:`read_imagefolder` found: sorted class names, ``{split: (images, labels)}``,
    each split's image paths (within their class folder, in order), and the files skipped."""

    classes: list[str]
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]
    names: dict[str, list[str]]
    skipped: list[tuple[str, str]]


def _read_members(source: Path, wanted: set[str]) -> dict[str, bytes | str]:
    """The bytes of the wanted archive members, or why one could not be read."""
    out: dict[str, bytes | str] = {}
    with _open_archive(source) as tar:
        try:
            for m in tar:
                name = _member_name(m.name)
                if name not in wanted or m.isdir():
                    continue
                try:
                    f = tar.extractfile(m)
                    out[name] = f.read() if f is not None else "is not a regular file"
                except KeyError:
                    out[name] = "is a link to a file not in the archive"
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise ImageFolderError(f"{source}: the archive is damaged or cut short ({e}); get a complete copy") from e
    return out


def read_imagefolder(
    source: Path, channels: int = 3, image_size: int | None = None, splits: tuple[str, ...] = ("train", "test"),
    skip_bad: bool = False, entries: list[Entry] | None = None,
) -> FolderData:
    """Decode an image-folder tree (a directory or a ``.tar``/``.tar.gz`` archive) by the rule in
    the module docstring. Every rule violation raises an error naming the file or folder; with
    ``skip_bad`` the files that are not (faithful) images are skipped instead and listed."""
    is_dir = source.is_dir()
    if entries is None:
        entries = scan_directory(source)[0] if is_dir else scan_archive(source)
    lay = _layout(source, entries, splits)
    hint = ("delete or move it (names starting with '.' are ignored); in Python, "
            "load_dataset(..., skip_bad=True) skips such files")
    skipped: list[tuple[str, str]] = []
    for name, why in sorted(lay.bad):
        if not skip_bad:
            raise ImageFolderError(f"{_where(source, name, is_dir)} {why}; {hint}")
        skipped.append((name, why))
    wanted = {name for rows in lay.files.values() for _, _, name in rows}
    blobs = None if is_dir else _read_members(source, wanted)

    decoded: dict[str, list[tuple[str, str, np.ndarray]]] = {}
    for split in splits:
        rows = sorted(lay.files[split])
        decoded[split] = []
        for cls, within, name in rows:
            where = _where(source, name, is_dir)
            try:
                if is_dir:
                    try:
                        data: bytes | str = (source / name).read_bytes()
                    except OSError as e:
                        data = f"cannot be read ({e.strerror})"
                else:
                    data = blobs[name]
                if isinstance(data, str):
                    raise BadImageError(f"{where} {data}")
                arr = decode_image(data, where, channels, image_size)
            except BadImageError as e:
                if not skip_bad:
                    raise BadImageError(f"{e}; replace or delete the file (in Python, "
                                        "load_dataset(..., skip_bad=True) skips such files)") from None
                skipped.append((name, str(e)[len(where) + 1:]))
                continue
            decoded[split].append((cls, within, arr))

    counts = {s: {} for s in splits}
    for s in splits:
        for cls, _, _ in decoded[s]:
            counts[s][cls] = counts[s].get(cls, 0) + 1
    for s in splits:
        for cls in sorted(lay.classes[s]):
            if not counts[s].get(cls):
                folder = "/".join((*lay.prefix, s, cls))
                lost = sum(1 for name, _ in skipped if name.startswith(folder + "/"))
                why = f" (its {lost} file(s) were skipped as bad)" if lost else ""
                raise ImageFolderError(
                    f"{_where(source, folder, is_dir)}: class folder holds no images{why}; add images or remove "
                    "the folder (a class with no images would shift every label)")
    classes = sorted(lay.classes[splits[0]])
    for s in splits[1:]:
        missing = sorted(set(classes) - lay.classes[s])
        extra = sorted(lay.classes[s] - set(classes))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"in {splits[0]}/ but not in {s}/: {_names(missing)}")
            if extra:
                parts.append(f"in {s}/ but not in {splits[0]}/: {_names(extra)}")
            raise ImageFolderError(f"{source}: classes differ between splits ({'; '.join(parts)}); every "
                                   "class needs a folder with images in every split")
    for s in splits:
        if not decoded[s]:
            raise DataNotFoundError(f"{source}: split '{s}' has no images")
    _check_one_size(source, decoded, channels)

    index = {c: i for i, c in enumerate(classes)}
    out, names = {}, {}
    for s in splits:
        images = torch.from_numpy(np.stack([a for _, _, a in decoded[s]]))
        labels = torch.tensor([index[c] for c, _, _ in decoded[s]], dtype=torch.long)
        out[s] = (images, labels)
        names[s] = [w for _, w, _ in decoded[s]]
    return FolderData(classes, out, names, skipped)


def _names(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


def _check_one_size(source: Path, decoded: dict, channels: int) -> None:
    first: dict[tuple, str] = {}
    for s, rows in decoded.items():
        for cls, within, a in rows:
            first.setdefault(a.shape, f"{s}/{cls}/{within}")
    if len(first) == 1:
        return
    (s1, f1), (s2, f2) = list(first.items())[:2]
    size = min(min(shape[1:]) for shape in first)
    dst = str(source.parent / f"{source.name.split('.')[0] or 'data'}-{size}px")
    cmd = f"python -m decoct.data.resize {shlex.quote(str(source))} {shlex.quote(dst)} --size {size}"
    if channels != 3:
        cmd += f" --channels {channels}"
    raise ImageFolderError(
        f"{source}: images have different sizes (width x height {s1[2]}x{s1[1]} {f1}, {s2[2]}x{s2[1]} {f2}"
        f"{', ...' if len(first) > 2 else ''}); make a copy at one size with `{cmd}` and pass "
        f"--data-root {shlex.quote(dst)} (in Python: load_dataset(..., image_size={size}))")


def summary_line(label: str, classes: list[str] | tuple[str, ...], n_train: int, n_test: int,
                 skipped: int = 0) -> str:
    """One line saying what a tree held: ``imagefolder D: 10 classes (a, b, ...), N train / M test``."""
    shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
    line = f"{label}: {len(classes)} classes ({shown}), {n_train} train / {n_test} test images"
    return line + (f"; skipped {skipped} bad file(s)" if skipped else "")


def note(line: str) -> None:
    """Print an informational line to stderr (stdout stays for results); under torchrun only rank 0
    (``$RANK``) prints, so a line says what the data held once, not once per process."""
    if os.environ.get("RANK", "0") != "0":
        return
    print(line, file=sys.stderr, flush=True)
