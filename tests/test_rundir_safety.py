"""Run directories: only decoct runs are written or deleted, finished runs check their identity,
replacements survive a kill at any point, temporaries are swept, one writer at a time (issue 10)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from decoct.runtime import io as dio
from decoct.runtime.runlock import LOCK_NAME
from decoct.runtime.runs import (
    MARKER,
    NON_IDENTITY_KEYS,
    Run,
    RunError,
    clean_temporaries,
    config_changes,
    resolve_artifact,
    run_kind,
)

CFG = {"method": "random", "dataset": "digits", "ipc": 1, "seed": 0, "device": "auto", "out": "x"}


def _select(out, *extra: str) -> list[str]:
    return ["select", "random", "--dataset", "digits", "--ipc", "1", "--out", str(out), "--no-progress", *extra]


# ------------------------------------------------------------------ 1. foreign directories
@pytest.mark.parametrize("flags", [dict(force=True), dict(resume=True), dict()])
def test_foreign_directory_is_never_written_or_deleted(tmp_path, flags):
    d = tmp_path / "d"
    d.mkdir()
    (d / "thesis.tex").write_text("x")
    with pytest.raises(RunError, match=r"is not a decoct run directory .*thesis\.tex.*choose another --out"):
        Run.open(d, CFG, **flags)
    assert sorted(p.name for p in d.iterdir()) == ["thesis.tex"]  # no marker, lock or config written
    assert (d / "thesis.tex").read_text() == "x"


def test_cli_force_on_foreign_directory_and_cwd_refused(tmp_path, monkeypatch, capsys):
    from decoct.cli import main

    d = tmp_path / "d"
    d.mkdir()
    (d / "thesis.tex").write_text("x")
    assert main(_select(d, "--force")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a decoct run directory" in err and str(d) in err and "delete" in err
    assert (d / "thesis.tex").read_text() == "x"
    monkeypatch.chdir(d)  # --out . --force in a working directory
    assert main(_select(".", "--force")) == 2
    assert "not a decoct run directory" in capsys.readouterr().err
    assert sorted(p.name for p in d.iterdir()) == ["thesis.tex"]
    assert main(_select(d, "--resume")) == 2
    assert "refusing to write into it" in capsys.readouterr().err


def test_run_kind_and_legacy_runs(tmp_path):
    assert run_kind(tmp_path / "nope") == "absent"
    (tmp_path / "f").write_text("x")
    assert run_kind(tmp_path / "f") == "file"
    with pytest.raises(RunError, match="not a directory"):
        Run.open(tmp_path / "f", CFG, force=True)
    old = tmp_path / "old"  # a run made before markers: config.yaml, log, DONE, artifact, evals
    (old / "artifact").mkdir(parents=True)
    (old / "config.yaml").write_text("method: random\nipc: 1\n")
    (old / "log.jsonl").write_text("{}\n")
    (old / "DONE").write_text("t\n")
    (old / "eval-fast-convnet-e300.json").write_text("{}")
    assert run_kind(old) == "legacy"
    only = tmp_path / "only"  # a config.yaml alone is not a run
    only.mkdir()
    (only / "config.yaml").write_text("x: 1\n")
    assert run_kind(only) == "foreign"
    (only / "log.jsonl").write_text("{}\n")
    assert run_kind(only) == "legacy"
    (only / "notes.md").write_text("mine")  # anything a run never holds makes it foreign
    assert run_kind(only) == "foreign"
    with pytest.raises(RunError, match=r"it holds notes\.md\); refusing to delete it"):
        Run.open(only, {"x": 1}, force=True)
    assert (only / "notes.md").exists() and (only / "log.jsonl").exists()
    (tmp_path / "notmap").mkdir()
    (tmp_path / "notmap" / "config.yaml").write_text("- a list\n")
    (tmp_path / "notmap" / "DONE").write_text("")
    assert run_kind(tmp_path / "notmap") == "foreign"
    # the legacy run is adopted (marker written) and --force may replace it
    run = Run.open(old, {"method": "random", "ipc": 1})
    assert run.done and (old / MARKER).exists()
    run.close()
    again = Run.open(old, {"method": "random", "ipc": 2}, force=True)
    assert not again.done
    again.close()
    assert sorted(p.name for p in old.iterdir()) == ["config.yaml", MARKER]


def test_marker_written_and_force_keeps_only_the_new_run(tmp_path):
    run = Run.open(tmp_path / "r", CFG)
    marker = json.loads((tmp_path / "r" / MARKER).read_text())
    assert marker["format"] == "decoct-run" and marker["version"] == 1 and marker["created"] and "command" in marker
    run.log(event="x")
    (tmp_path / "r" / "mine.txt").write_text("inside a decoct run: --force deletes it")
    run.finish()
    Run.open(tmp_path / "r", CFG, force=True).close()
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["config.yaml", MARKER]


# ------------------------------------------------------------------ 2. identity of finished runs
def test_finished_run_with_other_config_is_refused_naming_keys(tmp_path):
    Run.open(tmp_path / "r", CFG).finish()
    with pytest.raises(RunError, match=r"finished run made with a different config .*dataset: 'digits' -> "
                                       r"'cifar10'; ipc: 1 -> 50\).*--force"):
        Run.open(tmp_path / "r", {**CFG, "dataset": "cifar10", "ipc": 50})
    # not identity: device, data root, checkpoint interval, progress, out, ...
    other = {**CFG, "device": "cuda", "data_root": "/elsewhere", "checkpoint_every": 7, "progress": False,
             "out": "moved", "max_iterations": 3, "channels_last": True}
    assert Run.open(tmp_path / "r", other).done
    assert not (tmp_path / "r" / LOCK_NAME).exists()  # released when the Run went away


def test_resume_on_another_device_and_missing_keys():
    assert config_changes({"ipc": 1, "device": "cpu"}, {"ipc": 1, "device": "cuda:0"}) == []
    assert {"device", "data_root", "checkpoint_every", "progress", "resume", "force"} <= NON_IDENTITY_KEYS
    # a key one side lacks: equal to None/False (an option that did not exist yet), else a change
    assert config_changes({"ipc": 1}, {"ipc": 1, "palette": None, "zca": False}) == []
    assert config_changes({"ipc": 1, "zca": False}, {"ipc": 1}) == []
    assert config_changes({"ipc": 1}, {"ipc": 1, "palette": 16}) == ["palette: (absent) -> 16"]
    assert config_changes({"ipc": 1, "lr": 0.5}, {"ipc": 1}) == ["lr: 0.5 -> (absent)"]
    assert config_changes({"sizes": [1, 2]}, {"sizes": (1, 2)}) == []  # compared as saved (YAML)
    assert config_changes({"x": "a" * 100}, {"x": "b"})[0].startswith("x: 'aaaa") and \
        len(config_changes({"x": "a" * 100}, {"x": "b"})[0]) < 60  # long values are cut short


def test_cli_rerun_of_finished_run_checks_identity(tmp_path, capsys):
    from decoct.cli import main

    run = tmp_path / "run"
    assert main(_select(run)) == 0
    capsys.readouterr()
    assert main(["select", "random", "--dataset", "digits", "--ipc", "2", "--out", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "finished run made with a different config" in err and "ipc: 1 -> 2" in err
    assert main(_select(run, "--device", "cpu")) == 0  # only a non-identity key differs: a no-op
    assert "already done" in capsys.readouterr().out
    assert main(["select", "random", "--dataset", "digits", "--ipc", "2", "--out", str(run), "--no-progress",
                 "--force"]) == 0


def test_cli_dm_finished_digits_run_refuses_cifar10(tmp_path, capsys):
    """The issue's case: a finished DM digits run re-run with cifar10 IPC 50 no longer returns the old set."""
    from decoct.cli import main

    run = tmp_path / "R"
    base = ["distill", "dm", "--out", str(run), "--iterations", "1", "--batch-real", "8", "--width", "8",
            "--device", "cpu", "--no-progress", "--real-chunk", "8"]
    assert main([*base, "--dataset", "digits", "--ipc", "2"]) == 0
    capsys.readouterr()
    assert main([*base, "--dataset", "cifar10", "--ipc", "50"]) == 2
    err = capsys.readouterr().err
    assert "dataset: 'digits' -> 'cifar10'" in err and "ipc: 2 -> 50" in err


# ------------------------------------------------------------------ 3. replacement survives a kill
class _Killed(BaseException):
    """The process dies here: nothing after it runs (not even except/finally clean-ups that touch disk)."""


def _kill_at(monkeypatch, point: str) -> None:
    """Die at ``point`` of replace_dir: "staged" (before the old dir moves away), "swap" (between the
    two renames that swap the directories), "cleanup" (before the backup is deleted). After the kill
    every rename and rmtree fails, as in a dead process."""
    real_rename, real_rmtree = os.rename, shutil.rmtree
    dead = {"yes": False}

    def rename(src, dst):
        s, d = Path(src).name, Path(dst).name
        if dead["yes"] or (point == "staged" and d.endswith(".old")) or \
                (point == "swap" and s.endswith(".new")):
            dead["yes"] = True
            raise _Killed(f"killed before {s} -> {d}")
        return real_rename(src, dst)

    def rmtree(path, *a, **k):
        if dead["yes"] or (point == "cleanup" and Path(path).name.endswith(".old")):
            dead["yes"] = True
            raise _Killed(f"killed before deleting {path}")
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(dio.os, "rename", rename)
    monkeypatch.setattr(dio.shutil, "rmtree", rmtree)


def _make(path: Path, content: str) -> Path:
    path.mkdir()
    (path / "f.txt").write_text(content)
    return path


@pytest.mark.parametrize("point", ["staged", "swap", "cleanup"])
def test_replace_dir_killed_anywhere_is_recovered(tmp_path, monkeypatch, point):
    final = _make(tmp_path / "final", "old")
    with monkeypatch.context() as m:
        _kill_at(m, point)
        with pytest.raises(_Killed):
            dio.replace_dir(_make(tmp_path / "tmp", "new"), final)
    if point == "swap":
        assert not final.exists()  # the state the old code left for good (only a hidden backup)
    assert dio.pending_replacement(final)
    assert dio.recover_dir(final) in ("finished", "cleaned")
    assert (final / "f.txt").read_text() == "new"  # the complete staged directory wins
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert dio.recover_dir(final) is None


def test_recover_restores_backup_and_legacy_backup(tmp_path):
    final = tmp_path / "artifact"
    _make(tmp_path / ".artifact.old", "old")  # only the backup: restore it
    assert dio.recover_dir(final) == "restored" and (final / "f.txt").read_text() == "old"
    shutil.rmtree(final)
    _make(tmp_path / ".artifact.bak-0123456789ab", "legacy")  # left by decoct 0.1.0's replace_dir
    assert dio.recover_dir(final) == "restored" and (final / "f.txt").read_text() == "legacy"
    _make(tmp_path / ".artifact.bak-ba9876543210", "stale")  # beside an intact final: deleted
    assert dio.recover_dir(final) == "cleaned" and sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


def test_replace_dir_exception_between_renames_recovers_at_once(tmp_path, monkeypatch):
    final = _make(tmp_path / "final", "old")
    real = os.rename
    calls = {"n": 0}

    def rename(src, dst):
        if Path(src).name.endswith(".new") and calls["n"] == 0:
            calls["n"] += 1
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(dio.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        dio.replace_dir(_make(tmp_path / "tmp", "new"), final)
    assert (final / "f.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def _finished_run_with_artifact(path: Path) -> Path:
    run = Run.open(path, CFG)
    (path / "artifact").mkdir()
    (path / "artifact" / "manifest.json").write_text('{"v": "old"}')
    run.finish()
    return path


@pytest.mark.parametrize("opener", ["run_open", "resume", "resolve_artifact"])
def test_next_open_of_a_run_recovers_a_killed_artifact_replacement(tmp_path, monkeypatch, opener):
    r = _finished_run_with_artifact(tmp_path / "r")
    tmp = tmp_path / "r" / ".artifact.tmp-abc"
    tmp.mkdir()
    (tmp / "manifest.json").write_text('{"v": "new"}')
    with monkeypatch.context() as m:
        _kill_at(m, "swap")
        with pytest.raises(_Killed):
            dio.replace_dir(tmp, r / "artifact")
    assert not (r / "artifact").exists()
    from decoct.formats.artifact import DistilledSet
    from decoct.formats.errors import ArtifactError

    with pytest.raises(ArtifactError, match="interrupted.*decoct info"):  # not a bare "no manifest"
        DistilledSet.load(r / "artifact")
    if opener == "run_open":
        Run.open(r, CFG).close()
    elif opener == "resume":
        (r / "DONE").unlink()
        Run.open(r, CFG, resume=True).close()
    else:
        assert resolve_artifact(r) == r / "artifact"
    assert json.loads((r / "artifact" / "manifest.json").read_text()) == {"v": "new"}
    assert not [p.name for p in r.iterdir() if p.name.startswith(".artifact")]


def test_cli_in_place_relabel_killed_between_renames_is_recovered(digits, tmp_path, monkeypatch, capsys):
    """`decoct relabel RUN --teacher T` killed between its two renames: the next command finds the
    relabelled artifact (not a run marked done without artifact/), and the relabel's leftovers go."""
    from decoct.cli import main
    from decoct.decoupled.squeeze import squeeze
    from decoct.formats.artifact import DistilledSet
    from decoct.formats.label_store import LabelStore

    squeeze(digits, model="convnet_bn", model_kwargs=dict(width=8), out=tmp_path / "teacher", epochs=1,
            show_progress=False, device="cpu")
    run = tmp_path / "run"
    assert main(_select(run, "--ipc", "2")) == 0
    relabel = ["relabel", str(run), "--teacher", str(tmp_path / "teacher"), "--epochs", "2", "--batch-size", "8",
               "--device", "cpu", "--no-progress"]
    with monkeypatch.context() as m:
        _kill_at(m, "swap")
        with pytest.raises(_Killed):
            main(relabel)
    assert (run / "DONE").exists() and not (run / "artifact").exists()
    assert (run / ".artifact.new").is_dir() and (run / ".artifact.relabel").is_dir()
    (run / ".grid.png.k1ll3d.tmp").write_bytes(b"half")  # an atomic write the kill cut short
    capsys.readouterr()
    assert main(["info", str(run)]) == 0  # the next command that opens the run finishes the swap
    store = LabelStore.from_set(DistilledSet.load(run / "artifact"))
    assert store.header["epochs"] == 2
    assert main(relabel) == 0  # same settings: kept; the relabel's work dir and temporaries are swept
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [], list(run.iterdir())


# ------------------------------------------------------------------ leftover temporaries
def test_resume_and_finish_sweep_temporaries_but_keep_relabel_work(tmp_path):
    r = tmp_path / "r"
    run = Run.open(r, CFG)
    run.save_checkpoint({"iteration": 1})
    run.close()
    shard = r / "shards" / "rank000-of002"
    Run.open(shard, CFG).close()
    litter = [r / ".checkpoint.pt.x1y2z3.tmp", r / ".log.jsonl.abc.tmp", shard / ".part.safetensors.q.tmp"]
    for p in litter:
        p.write_bytes(b"partial")
    (r / ".artifact.tmp-k9").mkdir()
    (r / ".artifact.tmp-k9" / "00000.png").write_bytes(b"p")
    (r / ".artifact.relabel").mkdir()  # an unfinished relabel's epochs: resumable, kept
    (r / ".artifact.relabel" / "e00000.safetensors").write_bytes(b"e")
    (r / "artifact").mkdir()
    (r / "artifact" / ".x.tmp").write_bytes(b"inside the artifact: not decoct's to sweep")
    with pytest.raises(RunError, match="--resume"):
        Run.open(r, CFG)
    assert all(p.exists() for p in litter)  # a refused open touches nothing
    run = Run.open(r, CFG, resume=True)
    assert not any(p.exists() for p in litter) and not (r / ".artifact.tmp-k9").exists()
    assert (r / ".artifact.relabel" / "e00000.safetensors").exists() and (r / "artifact" / ".x.tmp").exists()
    (r / ".DONE.zz.tmp").write_bytes(b"")
    run.finish()
    assert not (r / ".DONE.zz.tmp").exists() and run.done
    assert clean_temporaries(r) == []


# ------------------------------------------------------------------ 4. lock
_HOLDER = textwrap.dedent("""
    import sys, time
    from decoct.runtime.runs import Run
    run = Run.open(sys.argv[1], {"method": "random", "ipc": 1}, **{sys.argv[2]: True})
    print("ready", flush=True)
    time.sleep(120)
""")


def _hold(path: Path, how: str = "resume") -> subprocess.Popen:
    """A second process that opens the run (``how``: resume or force) and keeps it open."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), how], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "ready", line
    return proc


@pytest.mark.slow
def test_second_process_is_refused_then_stale_lock_taken_over(tmp_path, capsys, monkeypatch):
    from decoct.cli import main

    r = tmp_path / "r"
    proc = _hold(r)
    try:
        owner = json.loads((r / LOCK_NAME).read_text())
        assert owner["pid"] == proc.pid and owner["host"] and owner["started"]
        with pytest.raises(RunError, match=rf"run {r} is in use by pid {proc.pid} \(started .*\); wait for it "
                                           rf"to finish, or remove {r}/\.lock if that process is gone"):
            Run.open(r, {"method": "random", "ipc": 1}, resume=True)
        with pytest.raises(RunError, match="in use"):  # --force does not get past a live writer either
            Run.open(r, {"method": "random", "ipc": 1}, force=True)
        assert (r / "config.yaml").exists()
        assert main(_select(r, "--resume")) == 2
        assert f"is in use by pid {proc.pid}" in capsys.readouterr().err
        monkeypatch.setenv("RANK", "1")  # a torchrun rank > 0 shares rank 0's directory: takes no lock
        Run.open(r, {"method": "random", "ipc": 1}, resume=True).close()
        monkeypatch.delenv("RANK")
    finally:
        proc.kill()  # kill -9: no atexit, the lock file stays behind
        proc.wait()
    assert (r / LOCK_NAME).exists()
    run = Run.open(r, {"method": "random", "ipc": 1}, resume=True)
    assert "stale lock" in capsys.readouterr().err
    assert json.loads((r / LOCK_NAME).read_text())["pid"] == os.getpid()
    run.close()
    assert not (r / LOCK_NAME).exists()


def test_lock_released_on_finish_error_and_interrupt(tmp_path, monkeypatch, capsys):
    from decoct.cli import main
    from decoct.runtime import runlock

    run = Run.open(tmp_path / "r", CFG)
    again = Run.open(tmp_path / "r", CFG, resume=True)  # re-entrant within a process
    again.close()
    assert (tmp_path / "r" / LOCK_NAME).exists()
    run.finish()
    assert not (tmp_path / "r" / LOCK_NAME).exists() and not runlock._HELD
    with pytest.raises(RunError):
        Run.open(tmp_path / "r", {**CFG, "ipc": 9})
    assert not (tmp_path / "r" / LOCK_NAME).exists() and not runlock._HELD

    import decoct.coreset.select as coreset

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(coreset, "select_coreset", interrupted)
    assert main(_select(tmp_path / "c")) == 130
    assert not (tmp_path / "c" / LOCK_NAME).exists() and not runlock._HELD


def test_an_attempt_that_did_no_work_is_restarted_by_a_plain_rerun(tmp_path):
    """A command that failed before any checkpoint (bad data, divergence at once) leaves only
    config and log: re-running it (even with a corrected config) needs no --resume/--force."""
    p = tmp_path / "r"
    run = Run.open(p, {"ipc": 1, "lr": 1e12})
    run.log(event="diverged", iteration=3)
    run.close()
    again = Run.open(p, {"ipc": 1, "lr": 0.1})
    assert yaml.safe_load((p / "config.yaml").read_text())["lr"] == 0.1
    events = [e["event"] for e in again.read_log()]
    assert events == ["diverged", "restarted"]  # the failed attempt's log is kept
    again.save_checkpoint({"it": torch.tensor(1)})
    again.close()
    with pytest.raises(RunError, match="--resume"):  # real work now: protected again
        Run.open(p, {"ipc": 1, "lr": 0.1})


_LOCKER = """
import sys, time
from decoct.runtime.runlock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.slow
def test_evaluate_refuses_a_run_another_process_writes(tmp_path, capsys, monkeypatch):
    """eval-*.json and log.jsonl have one writer: evaluate on a locked run stops before training."""
    import decoct.evaluation.protocols as evaluation
    from decoct.cli import main

    r = tmp_path / "r"
    assert main(_select(r)) == 0
    proc = subprocess.Popen([sys.executable, "-c", _LOCKER, str(r)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"

        def no_training(*a, **k):
            raise AssertionError("a student was trained on a locked run")

        monkeypatch.setattr(evaluation, "evaluate", no_training)
        monkeypatch.setattr("decoct.api.evaluate", no_training)
        assert main(["evaluate", str(r), "--protocol", "fast", "--runs", "1", "--epochs", "1", "--no-progress"]) == 2
        assert f"in use by pid {proc.pid}" in capsys.readouterr().err
        assert not list(r.glob("eval-*.json"))
    finally:
        proc.kill()
        proc.wait()


def test_a_run_without_a_set_says_which_state_it_is_in(tmp_path):
    """info/evaluate on a run with no set: in progress (a live lock), resumable, or to re-run."""
    r = tmp_path / "r"
    run = Run.open(r, CFG)
    run.close()
    with pytest.raises(RunError, match="stopped before saving any work; run its command again"):
        resolve_artifact(r)
    run = Run.open(r, CFG, resume=True)
    run.save_checkpoint({"it": torch.tensor(1)})
    run.close()
    with pytest.raises(RunError, match="plus --resume"):
        resolve_artifact(r)
    proc = subprocess.Popen([sys.executable, "-c", _LOCKER, str(r)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(RunError, match=rf"still in progress \(pid {proc.pid},"):
            resolve_artifact(r)
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(RunError, match="plus --resume"):  # a dead holder's lock is stale
        resolve_artifact(r)
