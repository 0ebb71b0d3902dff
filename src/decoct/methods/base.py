"""The interface every iterative distillation method implements, and the one loop that runs it.

A method is an object with::

    name: str                                   # e.g. "dm", "tm", "sre2l"
    iterations: int                             # total steps of a full run
    init(dataset, device) -> None               # build the synthetic set (e.g. from real images)
    step(it) -> dict[str, float]                # one optimisation step; returns metrics ("loss", ...)
    state_dict() -> dict[str, Any]              # tensors / numbers only (loaded with weights_only=True)
    load_state_dict(state) -> None              # restore exactly what state_dict saved
    result() -> DistilledSet                    # the set as it would be stored
    warm_start(show_progress) -> dict[str, float]   # optional: one-off preparation of a fresh run
    check(it) -> None                           # optional: raise DivergedError when a learned quantity
                                                #   is invalid after step ``it`` (see decoct.runtime.health)
    divergence_hint: str                        # optional: what to change when the run diverges

``warm_start`` runs once, after ``init`` and before the first step, only when the run starts
from scratch: on resume its effect is already in the checkpoint, so it is not repeated. Its
metrics go to the log as a ``warm_start`` event.

:func:`run_method` gives every method resume, checkpoints, a JSON-lines log, a progress bar
(iteration, loss, images/s), the artifact and its grid for free, so a new method is one file
plus a registry line. It also checks every step's metrics (the loss first) for NaN/inf, and calls the
method's ``check`` after every step: a diverged run stops at once with a
:class:`~decoct.runtime.health.DivergedError` (iteration, quantity, hint) logged as a ``diverged`` event,
without writing the artifact or ``DONE``; the last checkpoint is kept. Resuming restores the method state *and* the global torch RNG states, so an
interrupted run that is resumed ends with the same result as an uninterrupted run of the same seed
(methods that keep their own ``torch.Generator`` put its state in ``state_dict``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from decoct.data import Dataset
from decoct.formats.artifact import DistilledSet
from decoct.report import save_grid
from decoct.runtime.health import DivergedError, check_metrics
from decoct.runtime.registry import Registry
from decoct.runtime.runs import Run, progress

METHODS: Registry[Any] = Registry("distillation method")
"""name -> factory ``(config: dict) -> DistillMethod``; filled by each method module."""


@dataclass
class RunSummary:
    path: Path
    method: str
    num_images: int
    bytes_on_disk: int
    raw_bytes: int
    seconds: float
    skipped: bool = False

    def summary(self) -> str:
        state = "already done (use --force to redo)" if self.skipped else f"{self.seconds:.1f}s"
        return (f"{self.method}: {self.num_images} images -> {self.path}  "
                f"{self.bytes_on_disk:,} B on disk, {self.raw_bytes:,} B raw  [{state}]")


def run_summary(run: Run, skipped: bool) -> RunSummary:
    """The summary of a finished run: its artifact's images, bytes on disk and raw bytes, time."""
    dset = DistilledSet.load(run.artifact_dir)
    st = dset.storage(run.artifact_dir)
    seconds = float(dset.meta.get("seconds", 0.0))
    return RunSummary(run.path, dset.method, len(dset), st["bytes_on_disk"]["total"], st["raw_bytes"]["total"],
                      seconds, skipped)



@runtime_checkable
class DistillMethod(Protocol):
    name: str
    iterations: int

    def init(self, dataset: Dataset, device: torch.device) -> None: ...

    def step(self, it: int) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def result(self) -> DistilledSet: ...


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_method(method: DistillMethod, run: Run, dataset: Dataset, device: torch.device, *,
               seed: int = 0, checkpoint_every: int = 100, log_every: int = 10, show_progress: bool = True,
               images_per_step: int | None = None, stop_after: int | None = None) -> DistilledSet:
    """Run ``method`` to ``method.iterations`` in ``run``; resume from ``run``'s checkpoint if any.

    ``stop_after`` ends the loop early after that many iterations *of this call*, with a checkpoint
    written, as an interruption would (used by tests and by ``--max-iterations``); the run then stays
    unfinished and ``--resume`` continues it.
    """
    torch.manual_seed(seed)
    method.init(dataset, device)
    hint = getattr(method, "divergence_hint", None) or (
        "lower the learning rate(s) and start over with --force (a run with changed settings cannot --resume)")
    check = getattr(method, "check", None)
    start, elapsed = 0, 0.0
    ckpt = run.load_checkpoint()
    if ckpt is not None:
        method.load_state_dict(ckpt["method"])
        _set_rng_state(ckpt["rng"])
        start = int(ckpt["iteration"])
        elapsed = float(ckpt.get("elapsed", 0.0))
        run.log(event="resumed", iteration=start)
    else:
        run.log(event="start", method=method.name, iterations=method.iterations)
        warm_start = getattr(method, "warm_start", None)
        if warm_start is not None:
            tw = time.perf_counter()
            warm = warm_start(show_progress)
            if warm:
                run.log(event="warm_start", seconds=round(time.perf_counter() - tw, 3), **warm)
                try:
                    check_metrics(warm, method.name, "the warm start", hint)
                except DivergedError as e:
                    run.log(**e.event())
                    raise

    def checkpoint(it: int) -> None:
        run.save_checkpoint({"iteration": it, "method": method.state_dict(), "rng": _rng_state(),
                             "elapsed": elapsed + time.perf_counter() - t0})

    t0 = time.perf_counter()
    bar = progress(total=method.iterations, initial=start, desc=method.name, enabled=show_progress,
                   span=f"{method.iterations - start} iterations", log=run.log)
    done_here = 0
    it = start
    for it in range(start, method.iterations):
        ts = time.perf_counter()
        metrics: dict[str, float] | None = None
        try:  # a method may detect divergence inside its step (before a NaN update), or after it
            metrics = method.step(it)
            dt = time.perf_counter() - ts
            check_metrics(metrics, method.name, f"iteration {it + 1}", hint)
            if check is not None:
                check(it)
        except DivergedError as e:
            bar.close()
            if metrics is not None:  # the offending step, for the record
                run.log(event="step", iteration=it + 1, seconds=round(time.perf_counter() - ts, 4),
                        **{k: float(v) for k, v in metrics.items()})
            run.log(**e.event())
            raise
        post = {k: f"{v:.4g}" for k, v in metrics.items()}
        if images_per_step:
            post["img/s"] = f"{images_per_step / max(dt, 1e-9):.0f}"
        bar.set_postfix(post, refresh=False)
        bar.update(1)
        if (it + 1) % log_every == 0 or it + 1 == method.iterations:
            run.log(event="step", iteration=it + 1, seconds=round(dt, 4), **{k: float(v) for k, v in metrics.items()})
        done_here += 1
        if (it + 1) % checkpoint_every == 0 and it + 1 < method.iterations:
            checkpoint(it + 1)
        if stop_after is not None and done_here >= stop_after and it + 1 < method.iterations:
            checkpoint(it + 1)
            bar.close()
            run.log(event="stopped", iteration=it + 1)
            return method.result()
    bar.close()
    seconds = elapsed + time.perf_counter() - t0
    dset = method.result()
    dset.meta.setdefault("seconds", round(seconds, 3))
    if getattr(dataset, "source", None):  # how later commands (evaluate) find this data again
        dset.meta.setdefault("data_source", dataset.source)
    dset.save(run.artifact_dir, overwrite=True)
    save_grid(dset.images, dset.labels, run.path / "grid.png")
    run.log(event="finished", iterations=method.iterations, seconds=round(seconds, 3), num_images=len(dset))
    run.finish()
    return dset


__all__ = ["METHODS", "DistillMethod", "DivergedError", "run_method"]
