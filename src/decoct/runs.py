"""Run directories: resolved config, JSON-lines log, checkpoints, resume, progress bars.

Layout of a run directory::

    config.yaml        the resolved config of the command that made it
    log.jsonl          one JSON object per event (time-stamped)
    checkpoint.pt      latest state for --resume (tensors only, loaded with weights_only=True)
    artifact/          the distilled set (see decoct.artifact)
    grid.png           an image grid of the set
    eval-*.json        evaluation results (one file per protocol/model)
    DONE               written last: the run finished

Re-running a finished run is a no-op unless ``force``; an unfinished run needs ``resume``
(continue from the checkpoint) or ``force`` (start over), so nothing is overwritten by accident.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from .io import atomic_torch_save, atomic_write_text, safe_torch_load


class RunError(RuntimeError):
    """A run directory is in a state the command cannot proceed from (the message says how)."""


class Run:
    """One run directory. ``Run.open(...)`` decides between fresh, resumed, already-done."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    # --- lifecycle -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, config: dict[str, Any], *, resume: bool = False, force: bool = False) -> Run:
        run = cls(Path(path))
        p = run.path
        if p.exists() and any(p.iterdir()):
            if force:
                shutil.rmtree(p)
            elif run.done:
                return run
            elif not resume:
                raise RunError(
                    f"{p} already holds an unfinished run; pass --resume to continue it "
                    "or --force to start over"
                )
            elif (p / "config.yaml").exists():
                old = yaml.safe_load((p / "config.yaml").read_text()) or {}
                changed = {k for k in config if k not in ("resume", "force") and old.get(k) != config[k]}
                if changed:
                    raise RunError(
                        f"--resume with a different config than {p}/config.yaml (changed: "
                        f"{', '.join(sorted(changed))}); use --force to start over"
                    )
        elif resume and not p.exists():
            pass  # nothing to resume: start fresh, as torchvision's references do
        p.mkdir(parents=True, exist_ok=True)
        if not (p / "config.yaml").exists():
            atomic_write_text(p / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        return run

    @property
    def done(self) -> bool:
        return (self.path / "DONE").exists()

    def finish(self) -> None:
        atomic_write_text(self.path / "DONE", time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
        ckpt = self.path / "checkpoint.pt"
        if ckpt.exists():
            ckpt.unlink()

    @property
    def artifact_dir(self) -> Path:
        return self.path / "artifact"

    # --- logging ---------------------------------------------------------------------------
    def log(self, **event: Any) -> None:
        event = {"time": round(time.time(), 3), **event}
        with open(self.path / "log.jsonl", "a") as f:
            f.write(json.dumps(event, default=str) + "\n")

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


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             enabled: bool = True, **kw: Any) -> tqdm:
    """A tqdm bar (stderr), off when ``enabled`` is False or when output is not a terminal in CI."""
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False, **kw)


def resolve_artifact(path: str | Path) -> Path:
    """Accept a run directory (holding ``artifact/``) or an artifact directory itself."""
    p = Path(path)
    if (p / "manifest.json").exists():
        return p
    if (p / "artifact" / "manifest.json").exists():
        return p / "artifact"
    raise FileNotFoundError(f"{p} is neither a distilled-set artifact nor a run directory holding one "
                            "(no manifest.json found)")
