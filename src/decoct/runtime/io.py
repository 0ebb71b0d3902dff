"""Atomic writes and safe loads: every file decoct writes goes through here.

Why: a distillation run can be killed at any moment (pre-emption, OOM, Ctrl-C). Writing to a
temporary file in the target's directory, fsyncing it and then ``os.replace``-ing it over the
target means a reader only ever sees the old complete file or the new complete file, never a
half-written one. Loads never unpickle arbitrary objects: tensors go through safetensors, and
plain checkpoints through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as _st_load_bytes
from safetensors.torch import save as _st_save_bytes
from torch import Tensor

__all__ = [
    "atomic_save_tensors",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "backup_name",
    "fsync_dir",
    "fsync_paths",
    "load_tensors",
    "load_tensors_bytes",
    "load_tensors_metadata",
    "pending_replacement",
    "recover_dir",
    "replace_dir",
    "safe_torch_load",
    "sha256_bytes",
    "sha256_file",
    "staged_name",
    "tensors_to_bytes",
]

PathLike = str | os.PathLike[str]


def _current_umask() -> int:
    # os.umask can only be read by setting it; done once, at import time.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()
_FILE_MODE = 0o666 & ~_UMASK
_DIR_MODE = 0o777 & ~_UMASK


def fsync_dir(path: PathLike) -> None:
    """Flush a directory entry to disk so a rename inside it survives a crash (POSIX only)."""
    if os.name != "posix":
        return
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_paths(paths: Iterable[PathLike], workers: int = 8) -> None:
    """fsync many files (or directories) before they are published by a rename.

    Done from a small thread pool because the filesystem folds concurrent fsyncs into shared
    journal commits: on ext4 this is ~5x faster than one fsync per file in sequence, which
    matters for artifacts holding thousands of PNGs.
    """

    def one(p: PathLike) -> None:
        fd = os.open(os.fspath(p), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    paths = list(paths)
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        paths = [p for p in paths if not os.path.isdir(p)]
    if len(paths) <= 1 or workers <= 1:
        for p in paths:
            one(p)
        return
    with ThreadPoolExecutor(max_workers=min(workers, len(paths))) as pool:
        list(pool.map(one, paths))


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` so readers see either the old or the new file, never a mix."""
    target = Path(path)
    directory = target.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the final file the usual umask-based permissions.
        os.chmod(tmp_name, _FILE_MODE)
        os.replace(tmp_name, target)
    except BaseException as e:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.strerror and e.filename is None:
            e.filename = str(target)  # a full disk (ENOSPC from write/fsync) names no file: this one
        raise
    fsync_dir(directory)


def atomic_write_text(path: PathLike, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON (keys in insertion order, trailing newline), atomically.

    NaN/inf are rejected because they are not valid JSON and other tools would choke on them.
    """
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False)
    atomic_write_text(path, text + "\n")


def _prepare_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detach, move to CPU, make contiguous, and un-share storage (safetensors refuses aliases)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise ValueError(f"tensor names must be str, got {name!r}")
        if not isinstance(t, Tensor):
            raise ValueError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() > 0 and ptr in seen:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        out[name] = t
    return out


def tensors_to_bytes(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise tensors to safetensors bytes (so callers can hash/measure before writing)."""
    if metadata is not None:
        bad = {
            k: v for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)
        }
        if bad:
            raise ValueError(f"safetensors metadata must map str to str, got {bad!r}")
    return _st_save_bytes(_prepare_tensors(tensors), metadata=metadata)


def atomic_save_tensors(
    path: PathLike, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Save a flat dict of tensors as safetensors, atomically (no pickle, mmap-able, portable)."""
    atomic_write_bytes(path, tensors_to_bytes(tensors, metadata))


def load_tensors(path: PathLike) -> dict[str, Tensor]:
    """Load a safetensors file onto the CPU."""
    return load_tensors_bytes(Path(path).read_bytes())


def load_tensors_bytes(data: bytes) -> dict[str, Tensor]:
    """Load safetensors from bytes already in memory (e.g. after checking their hash)."""
    return _st_load_bytes(data)


def load_tensors_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata stored in a safetensors header ({} when there is none)."""
    with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
        return dict(f.metadata() or {})


def atomic_torch_save(path: PathLike, obj: Any) -> None:
    """``torch.save`` to ``path`` atomically.

    Only plain containers (dict/list/tuple) of tensors, numbers and strings should be saved this
    way, since :func:`safe_torch_load` will refuse anything else.
    """
    buf = BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def safe_torch_load(path: PathLike) -> Any:
    """``torch.load`` with ``weights_only=True`` onto the CPU: never runs pickled code.

    Raises ValueError naming the file when it holds anything but plain tensors/containers.
    """
    try:
        return torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path}: refusing to load; it holds objects other than plain tensors, numbers, "
            f"strings and containers (weights_only=True): {e}"
        ) from e


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of bytes in memory."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks so large files do not need to fit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def staged_name(final_dir: PathLike) -> Path:
    """Where :func:`replace_dir` puts a complete new directory before it takes ``final_dir``'s place."""
    final = Path(final_dir)
    return final.parent / f".{final.name}.new"


def backup_name(final_dir: PathLike) -> Path:
    """Where :func:`replace_dir` keeps the replaced ``final_dir`` until the new one is in place."""
    final = Path(final_dir)
    return final.parent / f".{final.name}.old"


def _legacy_backups(final: Path) -> list[Path]:
    # decoct 0.1.0 named its backups .<name>.bak-<12 hex>; a kill between its renames left only that
    if not final.parent.is_dir():
        return []
    prefix = f".{final.name}.bak-"
    return sorted((p for p in final.parent.iterdir() if p.name.startswith(prefix) and p.is_dir()),
                  key=lambda p: p.stat().st_mtime)


def pending_replacement(final_dir: PathLike) -> bool:
    """True when a :func:`replace_dir` of ``final_dir`` was interrupted (see :func:`recover_dir`)."""
    final = Path(final_dir)
    return (staged_name(final).exists() or backup_name(final).exists()
            or bool(_legacy_backups(final)))


def recover_dir(final_dir: PathLike) -> str | None:
    """Finish or undo a :func:`replace_dir` of ``final_dir`` that a crash interrupted.

    Why: a kill between the renames of a replacement must never lose the directory. The rule
    is that a complete staged directory wins: ``.<name>.new`` only ever appears by renaming a
    fully written temporary directory, so when it exists the replacement is finished (the old
    directory moved to ``.<name>.old`` and then deleted). Otherwise a missing ``final_dir`` is
    restored from ``.<name>.old`` (or from a ``.<name>.bak-*`` left by an older decoct), and a
    backup beside an intact ``final_dir`` is deleted. Returns what was done ("finished",
    "restored", "cleaned") or None when nothing was pending. If finishing fails (say the disk
    refuses the rename), the old directory is put back and the staged one removed.
    """
    final = Path(final_dir)
    new, old = staged_name(final), backup_name(final)
    parent = final.parent
    if new.is_dir() and not new.is_symlink():
        try:
            if final.is_dir() and not final.is_symlink():
                if old.exists():
                    shutil.rmtree(old)  # final is complete, so an older backup is redundant
                os.rename(final, old)
            os.rename(new, final)
            fsync_dir(parent)
        except OSError:
            if not final.exists() and old.is_dir():
                os.rename(old, final)
            shutil.rmtree(new, ignore_errors=True)
            fsync_dir(parent)
            raise
        shutil.rmtree(old, ignore_errors=True)
        for b in _legacy_backups(final):
            shutil.rmtree(b, ignore_errors=True)
        return "finished"
    action = None
    legacy = _legacy_backups(final)
    if not final.exists() and not final.is_symlink():
        source = old if old.is_dir() else (legacy.pop() if legacy else None)  # the newest legacy backup
        if source is not None:
            os.rename(source, final)
            fsync_dir(parent)
            action = "restored"
    for b in [old, *legacy]:
        if b.exists():
            shutil.rmtree(b, ignore_errors=True)
            action = action or "cleaned"
    return action


def replace_dir(tmp_dir: PathLike, final_dir: PathLike) -> None:
    """Move a fully written ``tmp_dir`` to ``final_dir``, replacing any existing directory.

    POSIX cannot atomically swap two non-empty directories, so the swap is three renames with
    fixed names a later process can find: ``tmp_dir`` -> ``.<name>.new`` (the new contents are
    complete), ``final_dir`` -> ``.<name>.old``, ``.<name>.new`` -> ``final_dir``; then the backup
    is deleted. A kill at any point leaves a state :func:`recover_dir` completes (the run
    directory commands call it when they open a run), so ``final_dir`` is never lost; an
    exception here recovers at once. ``tmp_dir`` must live next to ``final_dir`` (same
    filesystem) so the renames are cheap and atomic. An interrupted earlier replacement of
    ``final_dir`` is recovered first.
    """
    tmp = Path(tmp_dir)
    final = Path(final_dir)
    if not tmp.is_dir():
        raise ValueError(f"replace_dir: {tmp} is not a directory")
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise ValueError(f"replace_dir: {final} exists and is not a directory")
    os.chmod(tmp, _DIR_MODE)  # mkdtemp makes 0700 directories
    recover_dir(final)
    new, old = staged_name(final), backup_name(final)
    parent = final.parent
    os.rename(tmp, new)  # from here on the new contents are complete and will win
    try:
        if final.exists():
            os.rename(final, old)
        os.rename(new, final)
        fsync_dir(parent)
    except BaseException:
        try:
            recover_dir(final)
        except OSError:
            pass  # the next command that opens the directory recovers it
        raise
    shutil.rmtree(old, ignore_errors=True)
