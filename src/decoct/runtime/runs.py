"""Run directories: resolved config, JSON-lines log, checkpoints, resume, progress bars.

Layout of a run directory::

    decoct-run.json    the run marker: written first, it says decoct made this directory
    config.yaml        the resolved config of the command that made it
    log.jsonl          one JSON object per event (time-stamped)
    checkpoint.pt      latest state for --resume (tensors only, loaded with weights_only=True)
    artifact/          the distilled set (see decoct.formats.artifact)
    grid.png           an image grid of the set
    eval-*.json        evaluation results (one file per protocol/model)
    DONE               written last: the run finished
    .lock              while a command writes the run: its owner (see decoct.runtime.runlock)

Nothing is overwritten or deleted by accident:

- decoct writes into, and ``force`` deletes, only a *decoct run*: a directory holding the marker
  (or a run made before markers existed: ``config.yaml`` plus a log, checkpoint or DONE and
  nothing but the files a run holds, see :func:`run_kind`), or an empty or absent one. Any other
  non-empty directory is refused, whatever the flags.
- Re-running a finished run is a no-op unless ``force``; an unfinished run needs ``resume``
  (continue from the checkpoint) or ``force`` (start over), except one whose last attempt stopped
  before any work (only ``config.yaml`` and ``log.jsonl``: bad data, divergence before the first
  checkpoint), which a plain re-run starts afresh with its new config. Both a re-run and ``resume`` compare
  the config with the run's ``config.yaml`` and refuse a difference, naming the keys; the keys in
  :data:`NON_IDENTITY_KEYS` (device, data root, checkpoint interval, ...) may differ, so a CPU
  run can be resumed on a GPU.
- A command holds the run's lock file while it writes it; a second command on the same directory
  is refused (see :mod:`decoct.runtime.runlock`). Under torchrun only rank 0 locks the shared directory.
- Opening a run finishes or undoes an artifact replacement a crash interrupted
  (:func:`decoct.runtime.io.recover_dir`), and a successful resume or finish deletes the temporaries a
  killed command left (``.<file>.*.tmp``, ``.<dir>.tmp-*``). A relabel's per-epoch work directory
  (``.artifact.relabel``) is resumable work, kept until that relabel finishes.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import yaml

from decoct.runtime.io import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    pending_replacement,
    recover_dir,
    safe_torch_load,
)
from decoct.runtime.progress import progress  # noqa: F401  (re-exported: callers import it from here)
from decoct.runtime.runlock import LOCK_NAME, RunLock, RunLockError, lock_owner, lock_stale


class RunError(RuntimeError):
    """A run directory is in a state the command cannot proceed from (the message says how)."""


MARKER = "decoct-run.json"
MARKER_FORMAT = "decoct-run"
MARKER_VERSION = 1

#: Config keys that do not make a run what it is, so ``--resume`` and a re-run of a finished run
#: accept a different value: where and how fast it runs (device, memory layout, data loader
#: workers), where its data is read from, how often it checkpoints or logs, where this call
#: stops, and the command line's own bookkeeping. Every other key (method, dataset, budget,
#: hyper-parameters, seed, teacher or experts, amp: it changes the arithmetic; DM's real_chunk:
#: the conv kernels' batch size, so the rounding of every step) is identity.
NON_IDENTITY_KEYS = frozenset({
    "device", "data_root", "download", "progress", "no_progress", "resume", "force", "config", "set", "command",
    "func", "out", "checkpoint_every", "max_iterations", "max_epochs", "log_every", "log_interval", "workers",
    "num_workers", "channels_last",
})

# what a run made before markers existed may hold (anything else makes a directory foreign)
_RUN_ENTRIES = frozenset({
    MARKER, LOCK_NAME, "config.yaml", "log.jsonl", "checkpoint.pt", "artifact", "grid.png", "DONE", "shards",
    "part.safetensors", "model.safetensors", "bn_stats.safetensors", "teacher.json",
})
_RUN_EVIDENCE = ("log.jsonl", "checkpoint.pt", "DONE")


def _decoct_temporary(name: str) -> bool:
    """A hidden name decoct's writers use: atomic-write temporaries, staged/backup/work dirs."""
    return name.startswith(".") and (name.endswith((".tmp", ".new", ".old", ".relabel")) or ".tmp-" in name
                                      or ".bak-" in name)


def _known_entry(name: str) -> bool:
    return name in _RUN_ENTRIES or (name.startswith("eval-") and name.endswith(".json")) or _decoct_temporary(name)


def _nothing_done(content: list[Path]) -> bool:
    """True when an unfinished run holds only its config and log (plus temporaries): no
    checkpoint, artifact, shards or results, so starting it again loses no work."""
    return all(e.name in ("config.yaml", "log.jsonl") or _decoct_temporary(e.name) for e in content) \
        and not any(e.name.endswith((".new", ".old", ".relabel")) for e in content)


def _has_marker(p: Path) -> bool:
    try:
        info = json.loads((p / MARKER).read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("format") == MARKER_FORMAT


def run_kind(path: str | Path) -> str:
    """What ``path`` is to decoct: "absent", "file", "empty", "run" (holds the marker), "legacy"
    (a run made before markers existed) or "foreign" (anything else: never written into).

    A legacy run is recognised by its layout: a ``config.yaml`` that is a YAML mapping, at least
    one of ``log.jsonl``/``checkpoint.pt``/``DONE``, and no entry a run does not hold, so a
    directory that merely contains a ``config.yaml`` (or anything else) never qualifies.
    """
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        return "absent"
    if not p.is_dir():
        return "file"
    names = [e.name for e in p.iterdir()]
    if not names:
        return "empty"
    if _has_marker(p):
        return "run"
    if "config.yaml" in names and any(n in names for n in _RUN_EVIDENCE) and all(_known_entry(n) for n in names):
        try:
            cfg = yaml.safe_load((p / "config.yaml").read_text("utf-8"))
        except (OSError, ValueError, yaml.YAMLError):
            cfg = None
        if isinstance(cfg, dict):
            return "legacy"
    return "foreign"


def _foreign_error(p: Path, kind: str, *, resume: bool, force: bool) -> RunError:
    if kind == "file":
        return RunError(f"{p} exists and is not a directory; choose another --out")
    names = sorted(e.name for e in p.iterdir())
    unknown = [n for n in names if not _known_entry(n)]
    if "config.yaml" in names and unknown:  # an older run's layout, plus files a run never holds
        names = unknown
    shown = ", ".join(names[:3]) + (f", ... ({len(names)} entries)" if len(names) > 3 else "")
    verb = "delete" if force else "write into"
    where = f"{p} ({p.resolve()})" if Path(p).name in ("", ".", "..") else str(p)  # --out . names the directory
    return RunError(f"{where} is not a decoct run directory (no {MARKER}; it holds {shown}); refusing to {verb} it"
                    f"{' (--force replaces only a decoct run)' if force else ''}: choose another --out or empty "
                    "it yourself")


def _short(value: Any, limit: int = 40) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[:limit - 3] + "..."


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The identity keys whose values differ between a run's saved config and a new one, as
    ``"key: old -> new"`` (sorted by key); :data:`NON_IDENTITY_KEYS` are skipped.

    ``new`` is compared as it would be saved (a YAML round trip: tuples become lists). A key that
    only one side has (an option added or removed between decoct versions, or a caller that
    passes fewer keys) counts as a difference unless that side's value is None or False, the
    value an option that did not exist yet stands for; any other value could have changed the
    result, and the old default cannot be known from an old config.
    """
    new = yaml.safe_load(yaml.safe_dump(dict(new))) or {}
    missing = object()
    out = []
    for k in sorted(set(old) | set(new), key=str):
        if k in NON_IDENTITY_KEYS:
            continue
        a, b = old.get(k, missing), new.get(k, missing)
        if a is missing or b is missing:
            present = b if a is missing else a
            if present is None or present is False:
                continue
        elif a == b:
            continue
        out.append(f"{k}: {'(absent)' if a is missing else _short(a)} -> {'(absent)' if b is missing else _short(b)}")
    return out


def _marker_record() -> dict[str, Any]:
    from decoct import __version__

    return {"format": MARKER_FORMAT, "version": MARKER_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "decoct": __version__, "command": shlex.join(sys.argv)}


def _writable_error(p: Path, e: OSError) -> RunError:
    return RunError(f"cannot write the run directory {p} ({e.strerror or e}); choose a writable --out")


def _lock_rank0() -> bool:
    # torchrun ranks share one run directory; rank 0 (RANK unset outside torchrun) owns its lock
    return os.environ.get("RANK", "0") == "0"


def lock_run(path: str | Path) -> RunLock:
    """Take the lock of the run directory ``path`` (a :class:`RunLock`; release it, or use ``with``).

    Raises :class:`RunError` naming the owner when another live process holds it.
    """
    lock = RunLock(path)
    try:
        return lock.acquire()
    except RunLockError as e:
        raise RunError(str(e)) from None


def clean_temporaries(path: str | Path) -> list[str]:
    """Delete what killed writers left in the run directory ``path`` (and its sub-runs, e.g.
    ``shards/rank*``): atomic-write temporaries ``.<file>.*.tmp`` and half-written directories
    ``.<dir>.tmp-*``. Call it only while holding the run's lock. Returns the names deleted.
    """
    p = Path(path)
    gone: list[str] = []

    def sweep(d: Path, depth: int) -> None:
        try:
            entries = list(d.iterdir())
        except OSError:
            return
        for e in entries:
            n = e.name
            if n.startswith(".") and e.is_file() and not e.is_symlink() and n.endswith(".tmp"):
                e.unlink(missing_ok=True)
                gone.append(str(e.relative_to(p)))
            elif n.startswith(".") and ".tmp-" in n and e.is_dir() and not e.is_symlink():
                shutil.rmtree(e, ignore_errors=True)
                gone.append(str(e.relative_to(p)))
            elif depth < 2 and e.is_dir() and not e.is_symlink() and n != "artifact" and not n.startswith(".") \
                    and (n == "shards" or (e / MARKER).exists()):
                sweep(e, depth + 1)

    sweep(p, 0)
    return gone


def recover_run(path: str | Path) -> str | None:
    """Finish or undo an interrupted replacement of ``path``/artifact (see :func:`decoct.runtime.io.recover_dir`)."""
    return recover_dir(Path(path) / "artifact")


class Run:
    """One run directory. ``Run.open(...)`` decides between fresh, resumed, already-done.

    A run from ``Run.open`` holds the directory's lock until :meth:`finish`, :meth:`close`, the
    end of a ``with`` block, the object's garbage collection or interpreter exit, whichever is
    first. ``Run(path)`` alone only reads and appends (no lock, no checks).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock: RunLock | None = None

    # --- lifecycle -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, config: dict[str, Any], *, resume: bool = False, force: bool = False,
             lock: bool | None = None) -> Run:
        """Open ``path`` for a command with ``config`` (see the module docstring for the rules).

        Fresh (absent or empty directory): create it with the marker and ``config.yaml``. A
        decoct run: finished -> returned as is (check ``run.done``) if the config agrees;
        unfinished -> needs ``resume`` (config must agree) or ``force``. ``force`` deletes the
        run's contents first. ``lock`` (default: outside torchrun, or on rank 0) takes the
        directory's lock. Raises :class:`RunError` saying what to do otherwise.
        """
        run = cls(Path(path))
        p = run.path
        kind = run_kind(p)
        if kind in ("file", "foreign"):
            raise _foreign_error(p, kind, resume=resume, force=force)
        try:
            if kind in ("absent", "empty"):
                p.mkdir(parents=True, exist_ok=True)
                if not (p / MARKER).exists():
                    atomic_write_json(p / MARKER, _marker_record())
        except OSError as e:
            raise _writable_error(p, e) from None
        if lock if lock is not None else _lock_rank0():
            try:
                run._lock = lock_run(p)
            except RunError:
                raise
            except OSError as e:
                if not (run.done and not force):
                    raise _writable_error(p, e) from None
                # a finished run on a read-only disk: opening it only reads
        if run._lock is not None:
            weakref.finalize(run, run._lock.release)
        try:
            run._open_locked(config, resume=resume, force=force)
        except BaseException:
            run.close()
            raise
        return run

    def _open_locked(self, config: dict[str, Any], *, resume: bool, force: bool) -> None:
        p = self.path
        if self._lock is None and (self.done and not force):
            return  # read-only finished run (or a torchrun rank > 0): nothing to write
        kind = run_kind(p)  # again, under the lock: another process may have changed it
        if kind in ("file", "foreign"):
            raise _foreign_error(p, kind, resume=resume, force=force)
        if kind == "absent":
            raise RunError(f"{p} disappeared while it was being opened; run the command again")
        if pending_replacement(p / "artifact"):
            recover_run(p)
        if kind == "legacy" or not (p / MARKER).exists():
            atomic_write_json(p / MARKER, _marker_record())  # adopt a run made before markers
        content = [e for e in p.iterdir() if e.name not in (MARKER, LOCK_NAME)]
        if force and content:
            for e in content:
                if e.is_dir() and not e.is_symlink():
                    shutil.rmtree(e)
                else:
                    e.unlink()
            atomic_write_json(p / MARKER, _marker_record())
        elif content and not self.done and not resume and _nothing_done(content):
            # the last attempt stopped before any work (bad data, a refused option, divergence
            # before the first checkpoint): nothing to lose, so this command starts it afresh
            atomic_write_text(p / "config.yaml", yaml.safe_dump(config, sort_keys=False))
            self.log(event="restarted", reason="the previous attempt left no checkpoint or results")
            clean_temporaries(p)
        elif content:
            if self.done or resume:
                self._check_identity(config, finished=self.done)
            if self.done:
                return
            if not resume:
                raise RunError(
                    f"{p} already holds an unfinished run; pass --resume to continue it "
                    "or --force to start over"
                )
            clean_temporaries(p)
        if not (p / "config.yaml").exists():
            atomic_write_text(p / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def _check_identity(self, config: dict[str, Any], *, finished: bool) -> None:
        cfg_path = self.path / "config.yaml"
        if not cfg_path.exists():
            return
        try:
            old = yaml.safe_load(cfg_path.read_text("utf-8")) or {}
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise RunError(f"{cfg_path} is unreadable ({e}); use --force to start over") from None
        if not isinstance(old, dict):
            raise RunError(f"{cfg_path} is not a mapping of config keys; use --force to start over")
        changed = config_changes(old, config)
        if not changed:
            return
        what = "; ".join(changed[:8]) + (f"; ... ({len(changed)} keys)" if len(changed) > 8 else "")
        if finished:
            raise RunError(f"{self.path} holds a finished run made with a different config than this command "
                           f"(changed: {what}); pass --force to replace it, or choose another --out")
        raise RunError(f"--resume with a different config than {cfg_path} (changed: {what}); "
                       "use --force to start over")

    def close(self) -> None:
        """Release the run's lock (idempotent); the run stays as it is on disk."""
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def done(self) -> bool:
        return (self.path / "DONE").exists()

    def finish(self) -> None:
        """Mark the run finished: DONE, checkpoint and temporaries removed, lock released."""
        atomic_write_text(self.path / "DONE", time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
        ckpt = self.path / "checkpoint.pt"
        if ckpt.exists():
            ckpt.unlink()
        clean_temporaries(self.path)
        self.close()

    @property
    def artifact_dir(self) -> Path:
        return self.path / "artifact"

    # --- logging ---------------------------------------------------------------------------
    def log(self, **event: Any) -> None:
        event = {"time": round(time.time(), 3), **event}
        # strict JSON: a NaN/inf metric (a diverging run) is written as the string "nan"/"inf"/"-inf"
        line = json.dumps(json_safe(event), default=str, allow_nan=False)
        with open(self.path / "log.jsonl", "a") as f:
            f.write(line + "\n")

    def read_log(self) -> list[dict]:
        p = self.path / "log.jsonl"
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    # --- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_torch_save(self.path / "checkpoint.pt", state)

    def load_checkpoint(self) -> dict[str, Any] | None:
        p = self.path / "checkpoint.pt"
        return safe_torch_load(p) if p.exists() else None


def _recover_artifact(final: Path, run_dir: Path | None) -> None:
    """Recover an interrupted replacement of ``final``, under ``run_dir``'s lock when it is a run."""
    if not pending_replacement(final):
        return
    if run_dir is not None and run_kind(run_dir) in ("run", "legacy"):
        with lock_run(run_dir):
            recover_dir(final)
    else:
        recover_dir(final)


def resolve_artifact(path: str | Path) -> Path:
    """Accept a run directory (holding ``artifact/``) or an artifact directory itself.

    An artifact replacement a crash interrupted is finished or undone first (under the run's
    lock; :class:`RunError` while another command is writing the run).
    """
    p = Path(path)
    _recover_artifact(p / "artifact", p)
    _recover_artifact(p, p.parent if p.name == "artifact" else None)
    if (p / "manifest.json").exists():
        return p
    if (p / "artifact" / "manifest.json").exists():
        return p / "artifact"
    if run_kind(p) in ("run", "legacy"):  # a run with no set yet: say which state it is in
        owner = lock_owner(p)
        if owner is not None and not lock_stale(p):
            raise RunError(f"{p} is a decoct run still in progress (pid {owner.get('pid', '?')}, started "
                           f"{owner.get('started', '?')}); its set appears when it finishes")
        how = ("continue it with the same command plus --resume" if (p / "checkpoint.pt").exists()
               else "it stopped before saving any work; run its command again")
        raise RunError(f"{p} is an unfinished decoct run with no set yet: {how} (see {p / 'log.jsonl'})")
    raise FileNotFoundError(f"{p} is neither a distilled-set artifact nor a run directory holding one "
                            "(no manifest.json found)")


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``"nan"``, ``"inf"`` or ``"-inf"`` (nested too).

    ``json.dumps`` would write the bare tokens ``NaN``/``Infinity``, which strict JSON readers (jq,
    JavaScript, ``json.loads(parse_constant=...)``) reject, so one diverged metric made log.jsonl unreadable.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
