"""The Python API behind the CLI: select a coreset into a run, evaluate a run, quickstart."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import tempfile
import time
from pathlib import Path
from typing import Any

from decoct.data import load_dataset
from decoct.evaluation.protocols import EvalResult, evaluate
from decoct.formats.artifact import DistilledSet
from decoct.methods.base import RunSummary, run_summary
from decoct.report import save_grid
from decoct.runtime.config import RANGES
from decoct.runtime.distributed import resolve_device
from decoct.runtime.io import atomic_write_json
from decoct.runtime.runs import Run, RunError, lock_run, resolve_artifact, run_kind


def select(method: str, *, dataset: str, ipc: int, out: str | Path, seed: int = 0, embed: str = "random",
           embed_model: str = "convnet", embed_epochs: int = 5, data_root: str | None = None,
           download: bool = False, device: str = "auto", resume: bool = False, force: bool = False,
           progress: bool = True, config: dict[str, Any] | None = None) -> RunSummary:
    """Select ``ipc`` real images per class with a coreset rule and save them as a run."""
    from decoct.coreset.select import select_coreset

    config = config or dict(method=method, dataset=dataset, ipc=ipc, seed=seed, embed=embed,
                            embed_model=embed_model, embed_epochs=embed_epochs)
    run = Run.open(out, config, resume=resume, force=force)
    if run.done:
        return run_summary(run, skipped=True)
    data = load_dataset(dataset, root=data_root, download=download)
    dev = resolve_device(device)
    t0 = time.perf_counter()
    idx = select_coreset(data, method, ipc, seed=seed, embed=embed, model=embed_model, embed_epochs=embed_epochs,
                         device=dev, progress=progress)
    seconds = time.perf_counter() - t0
    dset = DistilledSet(info=data.info, images=data.train.images[idx], labels=data.train.labels[idx],
                        method=f"coreset-{method}", config=config,
                        meta=dict(ipc=ipc, seed=seed, seconds=round(seconds, 3), source_indices=idx.tolist(),
                                  data_source=data.source))
    dset.save(run.artifact_dir, overwrite=True)
    save_grid(dset.images, dset.labels, run.path / "grid.png")
    run.log(event="selected", method=method, ipc=ipc, seconds=round(seconds, 3), num_images=len(dset))
    run.finish()
    return run_summary(run, skipped=False)


def eval_filename(protocol: str, model: str, epochs: int | None, baseline: str | None) -> str:
    """``eval-<protocol>-<model>-e<epochs>[-<baseline>].json``: one file per protocol, model, epochs and baseline
    (``-random``, ``-mediancut``), so a set's evaluations with different baselines sit side by side."""
    return f"eval-{protocol}-{model}-e{epochs if epochs is not None else 'auto'}{'-' + baseline if baseline else ''}.json"


def evaluate_run(path: str | Path, *, protocol: str = "classic", runs: int = 5, seed: int = 0,
                 model: str | None = None, epochs: int | None = None, baseline: str | None = None,
                 engine: str = "auto", device: str = "auto", data_root: str | None = None,
                 resume: bool = False, force: bool = False, progress: bool = True,
                 chunk: int | None = None, teacher: str | Path | None = None, dataset: str | None = None,
                 download: bool = False, save: bool = True, data_options: dict[str, Any] | None = None,
                 amp: bool = False, recipe: str | None = None, batch_size: int | None = None,
                 temperature: float | None = None) -> EvalResult:
    """Evaluate a run (or artifact) and store ``eval-*.json`` in the run directory.

    The test data is found from the source the set recorded (registry name and data root);
    ``dataset``/``data_root`` override it. Before any student trains, the run directory is checked
    to be writable; ``save=False`` writes nothing (for a read-only run).

    Accuracies are written after every chunk of students (``partial: true``), so ``--resume``
    continues an interrupted evaluation; a finished evaluation is reused unless ``force``.
    ``teacher`` (a teacher directory) makes the ``soft`` protocol label online instead of from the store;
    ``recipe`` (``dwa``, ``rded``; needs ``teacher``) trains with that method's own student recipe, stored as
    ``eval-soft-online-<recipe>-...``. ``batch_size`` overrides the protocol's (or the recipe's) student
    batch, stored as ``eval-<protocol>-b<batch>-...``; a label store fixes its own batch and refuses another.
    ``temperature`` (soft protocol) overrides the recipe's distillation temperature, stored as ``...-T<t>-...``.
    ``data_options`` (``data_mode``, ``classes``, ``workers``) override how the recorded data is loaded.
    Students train in float32 unless ``amp`` (bf16 autocast, CUDA only); a stored result is reused
    only when made with the same choice.
    Under torchrun every rank trains (DDP) but only rank 0 writes the result and the log line.
    """
    from decoct.evaluation.protocols import protocol_config, student_precision
    from decoct.runtime.distributed import rank

    student_precision(amp, resolve_device(device))  # --amp off CUDA: refused before anything is read
    recipe = None if recipe == "auto" else recipe
    if batch_size is not None and batch_size < 2:
        raise ValueError(f"batch_size must be >= 2, got {batch_size}")
    if temperature is not None:  # the config's own rule (RANGES), so the API and the CLI agree
        t_ok = RANGES["temperature"]
        if protocol != "soft" or not math.isfinite(temperature) or not t_ok.ok(temperature):
            raise ValueError(f"temperature applies to the soft protocol only, as {t_ok.text(False)} "
                             f"(got {temperature} with {protocol!r})")
    art = resolve_artifact(path)
    cfg = protocol_config(protocol, model=model, epochs=epochs, recipe=recipe, batch_size=batch_size,
                          temperature=temperature)
    run_dir = art.parent if art.name == "artifact" else None
    tag = f"{protocol}-online" if teacher is not None else protocol
    tag += f"-{recipe}" if recipe is not None else ""  # another recipe, another result file
    tag += f"-b{batch_size}" if batch_size is not None else ""  # and another batch
    tag += f"-T{temperature:g}" if temperature is not None else ""  # or temperature
    target = run_dir / eval_filename(tag, cfg["model"], cfg["epochs"], baseline) if run_dir else None
    writer = rank() == 0 and save
    state: dict[str, list[float]] = {}
    # the test data asked for: a stored result is reused only for the same data (an override
    # with --dataset/--data-root evaluates afresh, and refuses data that does not fit the set)
    data = {"dataset": dataset, "data_root": str(Path(data_root).expanduser().absolute()) if data_root else None}
    data.update({k: v for k, v in (data_options or {}).items() if k != "workers"})  # workers change no pixel
    if target is not None and target.exists() and not force:
        saved = json.loads(target.read_text())
        same = (saved.get("seed") == seed and saved.get("requested_runs") == runs
                and saved.get("data", {"dataset": None, "data_root": None}) == data
                and _saved_amp(saved, protocol) == amp)
        if not saved.get("partial") and same:
            reused = _result_from_dict(saved)
            reused.extra = {**reused.extra, "amp": amp, "reused": str(target)}
            return reused
        if saved.get("partial") and not resume:
            raise RuntimeError(f"{target} holds an interrupted evaluation; pass --resume to continue it "
                               "or --force to start over")
        if saved.get("partial") and same:
            state = saved.get("state", {})
    reused_set = _set_accuracies_without_baseline(run_dir, tag, cfg, baseline, seed, runs, data, amp, protocol)
    if reused_set is not None and not force and not state.get("set"):
        state = {**state, "set": reused_set[1]}  # the set's own students are not trained again
    lock: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if target is not None and writer:
        check_writable(run_dir)
        if run_kind(run_dir) in ("run", "legacy"):
            lock = lock_run(run_dir)  # one writer of eval-*.json and log.jsonl at a time

    def checkpoint(st: dict[str, list[float]]) -> None:
        if target is not None and writer:
            atomic_write_json(target, dict(partial=True, seed=seed, requested_runs=runs, data=data, amp=amp, state=st))

    with lock:
        result = evaluate(art, protocol, runs=runs, seed=seed, dataset=dataset, data_root=data_root,
                          download=download, device=device, engine=engine,
                          baseline=baseline, progress=progress, chunk=chunk, state=state, on_progress=checkpoint,
                          model=model, epochs=epochs, online_teacher=teacher, data_options=data_options, amp=amp,
                          recipe=recipe, batch_size=batch_size, temperature=temperature)
        if reused_set is not None and not force and result.accuracies == reused_set[1]:
            result.extra["set_accuracies_from"] = reused_set[0]
        if target is not None and writer:
            atomic_write_json(target, dict(result.to_dict(), partial=False, seed=seed, requested_runs=runs,
                                           data=data))
            Run(run_dir).log(event="evaluated", protocol=protocol, model=result.model, mean=result.mean,
                             std=result.std, runs=runs, seconds=round(result.seconds, 2))
    return result


def _set_accuracies_without_baseline(run_dir: Path | None, tag: str, cfg: dict[str, Any], baseline: str | None,
                                     seed: int, runs: int, data: dict[str, Any], amp: bool,
                                     protocol: str) -> tuple[str, list[float]] | None:
    """(file name, accuracies) of the set's own students from a finished evaluation of the same protocol,
    model, epochs, seed, runs, test data and precision made without a baseline, so that ``--baseline``
    trains only the baseline's students. Each student is a function of its seed (every engine reproduces
    the sequential result), so training them again would give the same numbers. None when there is none."""
    if baseline is None or run_dir is None:
        return None
    plain = run_dir / eval_filename(tag, cfg["model"], cfg["epochs"], None)
    if not plain.exists():
        return None
    try:
        saved = json.loads(plain.read_text())
    except (OSError, ValueError):
        return None
    same = (not saved.get("partial") and saved.get("seed") == seed and saved.get("requested_runs") == runs
            and saved.get("data", {"dataset": None, "data_root": None}) == data and _saved_amp(saved, protocol) == amp
            and isinstance(saved.get("accuracies"), list) and len(saved["accuracies"]) == runs)
    return (plain.name, [float(a) for a in saved["accuracies"]]) if same else None


def _saved_amp(saved: dict[str, Any], protocol: str) -> bool | None:
    """Whether a stored ``eval-*.json`` trained its students under bf16 autocast; None when unknown.

    Files written before the choice was recorded: classic/fast always trained in float32; soft
    trained under autocast on CUDA and in float32 on CPU, which the file does not say."""
    if "amp" in saved:
        return bool(saved["amp"])
    if "amp" in saved.get("extra", {}):
        return bool(saved["extra"]["amp"])
    return False if protocol in ("classic", "fast") else None


SCORE_SYSTEMS = ("ddranking",)


def score_run(path: str | Path, *, scores: str = "ddranking", protocol: str = "classic", runs: int = 5,
              seed: int = 0, model: str | None = None, epochs: int | None = None, engine: str = "auto",
              device: str = "auto", data_root: str | None = None, dataset: str | None = None,
              download: bool = False, teacher: Any = None, force: bool = False, progress: bool = True,
              save: bool = True, data_options: dict[str, Any] | None = None, amp: bool = False) -> dict[str, Any]:
    """DD-Ranking's scores of a run (HLR, IOR, LRS, ARS; docs/scores.md), from students trained
    with decoct's ``classic``/``fast`` protocol, stored as ``eval-<protocol>-<model>-e<epochs>-ddranking.json``
    in the run directory: the set's own result (as ``eval-*.json``) plus ``ddranking`` (the scores,
    every accuracy they come from, the cache of the full-data accuracy).

    A finished result for the same seed, runs, data, precision and teacher is reused unless
    ``force``; the full-data accuracy is cached across sets (:func:`decoct.evaluation.scores.full_data_accuracy`).
    ``teacher`` (a teacher directory or module) labels the random real images of a set that
    carries soft labels.
    """
    from decoct.evaluation.protocols import protocol_config, student_precision
    from decoct.evaluation.scores import ddranking_scores
    from decoct.runtime.distributed import rank

    if scores not in SCORE_SYSTEMS:
        raise ValueError(f"unknown scores {scores!r}; known: {', '.join(SCORE_SYSTEMS)}")
    student_precision(amp, resolve_device(device))
    art = resolve_artifact(path)
    cfg = protocol_config(protocol, model=model, epochs=epochs)
    run_dir = art.parent if art.name == "artifact" else None
    name = eval_filename(protocol, cfg["model"], cfg["epochs"], None).removesuffix(".json") + f"-{scores}.json"
    target = run_dir / name if run_dir else None
    data = {"dataset": dataset, "data_root": str(Path(data_root).expanduser().absolute()) if data_root else None}
    data.update({k: v for k, v in (data_options or {}).items() if k != "workers"})
    tdesc: Any = None
    if isinstance(teacher, (str, Path)):
        tdesc = str(Path(teacher).expanduser().absolute())
    elif teacher is not None:  # a module: known by its weights
        from decoct.decoupled.relabel import teacher_fingerprint

        tdesc = {"module": type(teacher).__name__, "fingerprint": teacher_fingerprint(teacher)}
    params = dict(seed=seed, requested_runs=runs, data=data, amp=amp, teacher=tdesc)
    if target is not None and target.exists() and not force:
        saved = json.loads(target.read_text())
        if scores in saved and not saved.get("partial") and all(saved.get(k) == v for k, v in params.items()):
            the_set = {k: v for k, v in saved.items() if k not in (scores, "partial", *params)}
            return {"set": the_set, **saved[scores], "reused": str(target)}
    writer = rank() == 0 and save
    lock: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if target is not None and writer:
        check_writable(run_dir)
        if run_kind(run_dir) in ("run", "legacy"):
            lock = lock_run(run_dir)
    with lock:
        res = ddranking_scores(art, protocol, runs=runs, seed=seed, dataset=dataset, data_root=data_root,
                               download=download, device=device, engine=engine, progress=progress, teacher=teacher,
                               data_options=data_options, amp=amp, model=model, epochs=epochs)
        if target is not None and writer:
            atomic_write_json(target, dict(res["set"], partial=False, **params,
                                           **{scores: {k: v for k, v in res.items() if k != "set"}}))
            s = res["scores"]
            Run(run_dir).log(event="scored", scores=scores, protocol=protocol, model=res["model"],
                             hlr=s["hlr"]["mean"], ior=s["ior"]["mean"], lrs=s["lrs"]["mean"],
                             ars=s["ars"]["mean"] if "ars" in s else None, runs=runs, seconds=res["seconds"])
    return res


def check_writable(run_dir: Path) -> None:
    """Raise :class:`RunError` unless results can be written to ``run_dir`` (an eval-*.json is
    created there and log.jsonl appended to), so a read-only run fails before hours of training.

    Creates and removes a probe file: permission bits alone do not tell (root ignores them, a
    read-only mount or an ACL does not show in them)."""
    try:
        fd, probe = tempfile.mkstemp(dir=run_dir, prefix=".decoct-write-probe-")
        os.close(fd)
        os.unlink(probe)
        log = run_dir / "log.jsonl"
        if log.exists():
            with open(log, "a"):
                pass
    except OSError as e:
        raise RunError(f"cannot write results to {run_dir} ({e.strerror or e}): pass --no-save to print the "
                       f"accuracy without saving it, or make the run writable first "
                       f"(chmod -R u+w {shlex.quote(str(run_dir))})") from None


def _result_from_dict(d: dict[str, Any]) -> EvalResult:
    keys = ("protocol", "model", "accuracies", "bytes_on_disk", "raw_bytes", "seconds", "num_images", "engine",
            "epochs", "extra")
    base = _result_from_dict(d["baseline"]) if d.get("baseline") else None
    return EvalResult(**{k: d[k] for k in keys}, baseline=base)


def info(path: str | Path) -> dict[str, Any]:
    """Integrity check and summary of a set: ``problems`` (empty exactly when the set loads)
    and, for an intact set, its contents and storage *measured* from the files (sizes from disk,
    hashes from content), never copied from the manifest's own claims."""
    from decoct.formats.artifact import inspect

    return inspect(resolve_artifact(path))


QUICKSTART_METHODS = ("dm", "random", "herding", "kcenter", "graphcut")


def quickstart(out: str | Path = "runs/quickstart", method: str = "dm", ipc: int = 2, runs: int = 3,
               epochs: int = 300, iterations: int = 200, device: str = "auto", force: bool = False,
               progress: bool = True) -> EvalResult:
    """Distil the offline ``digits`` default, evaluate it against random real of equal storage.

    The default is the best method measured on digits at IPC 2 (fast protocol, 3 students):
    DM 200 iterations 93.4 ± 0.2 %, k-center 92.0, herding 90.1, random real 84.4.
    """
    if method not in QUICKSTART_METHODS:
        raise ValueError(f"quickstart method {method!r} unknown; known: {', '.join(QUICKSTART_METHODS)}")
    t0 = time.perf_counter()
    what = f"DM, {iterations} iterations" if method == "dm" else f"{method} selection"
    print(f"quickstart: digits (8x8, bundled), {what}, IPC {ipc} -> {out}", flush=True)
    print(f"then {runs} student{'s' if runs != 1 else ''} x {epochs} epochs on it and on random real images of "
          "equal storage; 1-2 minutes on 2 idle CPU cores", flush=True)
    if method == "dm":
        from decoct.matching.dm import distill_dm

        dset = distill_dm("digits", out, ipc=ipc, iterations=iterations, device=device, force=force,
                          progress=progress)
        st = dset.storage(Path(out) / "artifact")
        print(f"dm: {len(dset)} images -> {out}  {st['bytes_on_disk']['total']:,} B on disk, "
              f"{st['raw_bytes']['total']:,} B raw", flush=True)
    else:
        print(select(method, dataset="digits", ipc=ipc, out=out, device=device, force=force,
                     progress=progress).summary(), flush=True)
    # results are flushed as they come: with `> log 2>&1` they interleave with the progress lines in order
    r = evaluate_run(out, protocol="fast", runs=runs, epochs=epochs, baseline="random", device=device,
                     force=force, progress=progress)
    print(r.summary(method), flush=True)
    if r.baseline is not None:
        print(r.baseline.summary("random real"), flush=True)
        print(f"improvement over random real of equal storage: {100 * (r.mean - r.baseline.mean):+.2f} points", flush=True)
    print(f"quickstart done in {time.perf_counter() - t0:.0f}s; run directory: {out}", flush=True)
    return r
