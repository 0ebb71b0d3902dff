"""The lock file of a run directory: one writer at a time.

Why: two commands writing one ``--out`` (a second terminal, a job resubmitted while the first still
runs) would interleave checkpoints and logs and could replace each other's artifact. While a
command writes a run directory it holds ``<run>/.lock``: a small JSON file (owner pid, host, start
time, command line) with an exclusive ``flock`` on it. A second process gets a :class:`RunLockError`
naming the owner. The kernel drops a ``flock`` when its process dies, however it dies (``kill -9``
included), so a lock file left behind by a dead process is recognised as stale and taken over with
a note on stderr; where ``fcntl`` is missing (Windows) a lock whose pid no longer runs on this host
is stale. The lock is re-entrant within one process (the API may open the same run twice) and is
released when its last holder releases it, and at interpreter exit.
"""

from __future__ import annotations

import atexit
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"

__all__ = ["LOCK_NAME", "RunLock", "RunLockError", "lock_owner"]


class RunLockError(RuntimeError):
    """Another live process holds the lock of a run directory."""


class _Held:
    """The process-wide record of one held lock file (shared by re-entrant holders)."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd, self.path, self.count, self.pid = fd, path, 0, os.getpid()


_HELD: dict[str, _Held] = {}


def _key(directory: Path) -> str:
    return os.path.realpath(directory)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by another user
    except OSError:
        return True
    return True


def _stale_by_pid(info: dict[str, Any] | None) -> bool:
    """Without flock: a lock is stale only when its pid runs no more on this very host."""
    if not info or info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return False
    return not _pid_alive(info["pid"])


def lock_owner(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The owner recorded in ``directory``'s lock file ({} when unreadable), None without one."""
    path = Path(directory) / LOCK_NAME
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        info = json.loads(text)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def lock_stale(directory: str | os.PathLike[str]) -> bool:
    """True unless a live process holds ``directory``'s lock (no lock file counts as stale).

    Probes with a non-blocking flock that is released at once; where flock is unavailable the
    recorded pid decides (see :func:`_stale_by_pid`). Only for messages: it takes nothing."""
    try:
        fd = os.open(Path(directory) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return True
    try:
        flocked = _try_flock(fd)
        if flocked is None:
            return _stale_by_pid(lock_owner(directory))
        return bool(flocked)
    finally:
        os.close(fd)  # closing drops a flock we took


def _describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "another process (its lock file names no owner)"
    host = info.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return f"pid {info.get('pid', '?')}{where} (started {info.get('started', '?')})"


def _owner_record() -> bytes:
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": shlex.join(sys.argv)}
    return (json.dumps(info) + "\n").encode("utf-8")


def _try_flock(fd: int) -> bool | None:
    """Take an exclusive flock without waiting: True taken, False held by another open file,
    None where flock is unavailable (no fcntl, or a filesystem without it)."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class RunLock:
    """An exclusive lock on one run directory, held by this process (see the module docstring).

    ``acquire()`` raises :class:`RunLockError` when another live process holds it; ``release()``
    is idempotent. Also a context manager.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.held = False
        self.note: str | None = None  # set when a stale lock was taken over

    @property
    def path(self) -> Path:
        return self.directory / LOCK_NAME

    def acquire(self) -> RunLock:
        if self.held:
            return self
        key = _key(self.directory)
        rec = _HELD.get(key)
        if rec is not None and rec.pid == os.getpid():
            rec.count += 1
            self.held = True
            return self
        path = self.path
        for _ in range(20):  # retries only when a holder releases at the same moment
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                fd = self._take_stale(path)
                if fd is None:
                    continue
            else:
                if _try_flock(fd) is False:  # someone found our fresh file and locked it first
                    os.close(fd)
                    continue
            self._write_owner(fd)
            held = _Held(fd, path)
            held.count = 1
            _HELD[key] = held
            self.held = True
            return self
        raise RunLockError(f"could not lock {self.directory}: its lock file {path} keeps changing; "
                           "is another decoct starting on it?")

    def _take_stale(self, path: Path) -> int | None:
        """The fd of a stale lock file now flocked by us; None to retry; raises when it is live."""
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return None  # released just now
        flocked = _try_flock(fd)
        if flocked is False:
            os.close(fd)
            raise RunLockError(self._in_use(lock_owner(self.directory)))
        if not _same_file(fd, path):  # the holder unlinked it between our open and our flock
            os.close(fd)
            return None
        info = lock_owner(self.directory)
        if flocked is None and not _stale_by_pid(info):
            os.close(fd)
            raise RunLockError(self._in_use(info))
        self.note = (f"note: {self.directory} had a stale lock of {_describe(info)}, a process that is gone; "
                     "taking it over")
        print(self.note, file=sys.stderr)
        return fd

    def _in_use(self, info: dict[str, Any] | None) -> str:
        return (f"run {self.directory} is in use by {_describe(info)}; wait for it to finish, or remove "
                f"{self.path} if that process is gone")

    @staticmethod
    def _write_owner(fd: int) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, _owner_record(), 0)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        key = _key(self.directory)
        rec = _HELD.get(key)
        if rec is None or rec.pid != os.getpid():
            return
        rec.count -= 1
        if rec.count <= 0:
            _drop(key, rec)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _drop(key: str, rec: _Held) -> None:
    """Unlink the lock file (while still flocked, so no one can take the old inode) and close it."""
    _HELD.pop(key, None)
    try:
        if _same_file(rec.fd, rec.path):
            rec.path.unlink()
    except OSError:
        pass  # the directory is gone (e.g. a refused run removed it) or read-only
    try:
        os.close(rec.fd)
    except OSError:
        pass


@atexit.register
def _release_all() -> None:
    for key, rec in list(_HELD.items()):
        if rec.pid == os.getpid():
            _drop(key, rec)
