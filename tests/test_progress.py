"""Progress output that suits its destination, the one-off run-time estimate, and strict-JSON logs."""

from __future__ import annotations

import io
import json
import math
import sys

import pytest

from decoct.runtime.progress import (
    ESTIMATE_MIN_S,
    MAX_LINE,
    format_count,
    format_seconds,
    progress,
    resolve_mode,
)
from decoct.runtime.runs import Run, json_safe


class Clock:
    """A fake perf_counter: each test decides how long every update takes."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _no_forced_mode(monkeypatch):
    monkeypatch.delenv("DECOCT_PROGRESS", raising=False)


def _run(total: int, seconds_each: float, file, **kw) -> tuple[Clock, list]:
    clock, logged = Clock(), []
    bar = progress(total=total, desc="job", file=file, clock=clock, log=lambda **e: logged.append(e), **kw)
    for i in range(total):
        clock.t += seconds_each
        bar.set_postfix(loss=1.0 / (i + 1), refresh=False)
        bar.update(1)
    bar.close()
    return clock, logged


def test_plain_lines_in_a_file_one_per_tenth_with_rate_and_eta():
    out = io.StringIO()
    _run(1000, 0.1, out, unit="img")  # 100 s in all
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and "\x1b" not in text  # no redraws, no terminal escapes
    assert 9 <= len(lines) <= 12, lines
    assert all(len(line) <= MAX_LINE for line in lines)
    assert lines[0].startswith("job:  10% 100/1000 img") and "10 img/s" in lines[0] and "ETA 1m30s" in lines[0]
    assert "loss=" in lines[0]
    assert lines[-1].startswith("job: 100% 1000/1000 img") and "ETA" not in lines[-1]


def test_short_loops_print_nothing_and_lines_are_spaced():
    out = io.StringIO()
    _run(50, 0.09, out)  # 4.5 s: no line at all
    assert out.getvalue() == ""
    out = io.StringIO()
    _run(100, 0.15, out)  # 15 s: a 10 % step every 1.5 s, but lines at least QUIET_S = 5 s apart
    assert 2 <= len(out.getvalue().splitlines()) <= 4


def test_a_long_step_still_prints_signs_of_life(monkeypatch):
    """Without a total (or with 10 % steps of hours) a line still comes every LINE_EVERY_S seconds."""
    out, clock = io.StringIO(), Clock()
    bar = progress(desc="job", file=out, clock=clock)
    for _ in range(10):
        clock.t += 50
        bar.update(1)
    assert len(out.getvalue().splitlines()) == 3  # at 150, 300, 450 s (LINE_EVERY_S = 120)
    assert "3 it" in out.getvalue().splitlines()[0]


def test_long_lines_are_cut():
    out = io.StringIO()
    clock = Clock()
    bar = progress(total=10, desc="job", file=out, clock=clock)
    bar.set_postfix(note="x" * 1000)
    for _ in range(10):
        clock.t += 5
        bar.update(1)
    bar.close()
    assert out.getvalue() and all(len(line) <= MAX_LINE for line in out.getvalue().splitlines())


def test_estimate_printed_once_and_logged_when_long():
    out = io.StringIO()
    _, logged = _run(2000, 1.0, out, span="30 epochs", unit="img")  # ~33 min
    est = [line for line in out.getvalue().splitlines() if "to go" in line]
    assert len(est) == 1 and est[0].startswith("job: ~33m") and "for 30 epochs at 1 img/s" in est[0], est
    assert len(logged) == 1 and logged[0]["event"] == "estimate" and logged[0]["span"] == "30 epochs"
    assert 1900 < logged[0]["seconds_left"] < 2000


def test_no_estimate_for_a_short_loop_but_a_resumed_one_counts_what_is_left():
    _, logged = _run(100, 1.0, io.StringIO())  # 100 s < ESTIMATE_MIN_S
    assert ESTIMATE_MIN_S > 100 and logged == []
    clock, logged, out = Clock(), [], io.StringIO()
    bar = progress(total=1000, initial=900, desc="job", file=out, clock=clock, log=lambda **e: logged.append(e))
    for _ in range(100):
        clock.t += 3.0
        bar.update(1)
    assert len(logged) == 1 and logged[0]["seconds_left"] < 300  # 100 left at 3 s each, not 1000


def test_terminal_gets_a_bar_and_the_estimate_above_it():
    out = TTY()
    _, logged = _run(500, 1.0, out)
    text = out.getvalue()
    assert "\r" in text  # tqdm redraws on a terminal
    assert text.count("to go for") == 1 and len(logged) == 1


def test_disabled_prints_nothing_but_still_logs_the_estimate():
    out = io.StringIO()
    _, logged = _run(500, 1.0, out, enabled=False)
    assert out.getvalue() == "" and len(logged) == 1


def test_mode_follows_destination_and_env(monkeypatch):
    assert resolve_mode(True, TTY()) == "bar"
    assert resolve_mode(True, io.StringIO()) == "lines"
    assert resolve_mode(False, TTY()) == "off"
    monkeypatch.setenv("DECOCT_PROGRESS", "lines")
    assert resolve_mode(True, TTY()) == "lines"
    monkeypatch.setenv("DECOCT_PROGRESS", "fancy")
    with pytest.raises(ValueError, match="DECOCT_PROGRESS"):
        resolve_mode(True, TTY())


def test_iterating_wraps_the_iterable_and_closes():
    out, clock = io.StringIO(), Clock()
    seen = []
    bar = progress(range(5), desc="job", file=out, clock=clock)
    for i in bar:
        clock.t += 1
        seen.append(i)
    assert seen == [0, 1, 2, 3, 4] and bar.closed and bar.n == 5 and len(bar) == 5


def test_formats():
    assert [format_seconds(s) for s in (3725, 125, 45, 7.25, math.inf)] == ["1h02m", "2m05s", "45s", "7.2s", "?"]
    assert [format_count(n) for n in (5, 1234, 12345, 150000, 1.5e6)] == ["5", "1234", "12.3k", "150k", "1.5M"]


# ---------------------------------------------------------------------- log.jsonl
def _strict(line: str) -> dict:
    def refuse(token: str):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(line, parse_constant=refuse)


def test_log_jsonl_stays_strict_json_after_nan_and_inf(tmp_path):
    run = Run.open(tmp_path / "r", {"m": "x"})
    run.log(event="step", loss=float("nan"), grad=float("inf"), low=-math.inf, nested={"v": [1.0, math.nan]})
    run.log(event="fine", loss=0.5)
    lines = (tmp_path / "r" / "log.jsonl").read_text().splitlines()
    first = _strict(lines[0])
    assert first["loss"] == "nan" and first["grad"] == "inf" and first["low"] == "-inf"
    assert first["nested"] == {"v": [1.0, "nan"]}
    assert _strict(lines[1])["loss"] == 0.5
    assert [e["event"] for e in run.read_log()] == ["step", "fine"]
    assert json_safe((1, math.nan)) == [1, "nan"]


# ---------------------------------------------------------------------- the CLI into a file
@pytest.mark.slow
def test_quickstart_redirected_to_a_file_leaves_a_small_readable_log(tmp_path, monkeypatch):
    """`decoct quickstart > log 2>&1` (issue 10: 189 KB, one line 170 KB long): small, line by line."""
    from decoct.cli import main

    log = tmp_path / "log"
    with open(log, "w") as f:
        monkeypatch.setattr(sys, "stdout", f)
        monkeypatch.setattr(sys, "stderr", f)
        rc = main(["quickstart", "--out", str(tmp_path / "q"), "--iterations", "5", "--epochs", "2", "--runs", "1",
                   "--device", "cpu"])
    text = log.read_text()
    assert rc == 0, text
    assert len(text.encode()) < 10_000 and "\r" not in text
    assert all(len(line) <= MAX_LINE for line in text.splitlines()), max(text.splitlines(), key=len)
    assert text.startswith("quickstart: digits (8x8, bundled), DM, 5 iterations, IPC 2")  # before the data loads
    assert "dm: 20 images" in text and "improvement over random real" in text and "quickstart done" in text
    assert (tmp_path / "q" / "DONE").exists()


@pytest.mark.slow
def test_teacher_experts_and_relabel_show_progress_inside_an_epoch(digits, tmp_path, monkeypatch, capsys):
    """Issue 10: `decoct squeeze` showed `0/30` for minutes; each long loop now counts images."""
    import torch

    import decoct.runtime.progress as prog
    from decoct.decoupled.relabel import relabel_set
    from decoct.decoupled.squeeze import squeeze
    from decoct.formats.artifact import DistilledSet
    from decoct.matching.experts import train_experts

    monkeypatch.setattr(prog, "QUIET_S", 0.0)  # tiny loops: print every 10 % line
    n = len(digits.train)
    squeeze(digits, "convnet_bn", out=tmp_path / "t", epochs=2, batch_size=256, model_kwargs=dict(width=8),
            device="cpu", show_progress=True)
    train_experts(digits, tmp_path / "e", num_experts=1, epochs=2, batch_size=256, device="cpu", progress=True,
                  model_kwargs=dict(width=8, norm="instance"))
    idx = torch.cat([digits.train.class_indices(c)[:2] for c in range(digits.info.num_classes)])
    dset = DistilledSet(digits.info, digits.train.images[idx], digits.train.labels[idx], method="coreset-random")
    relabel_set(dset, tmp_path / "t", epochs=3, batch_size=5, device="cpu", progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    for desc, total, epoch_size in (("squeeze", 2 * n, n), ("experts", 2 * n, n), ("relabel", 60, 20)):
        lines = [line for line in err.splitlines() if line.startswith(f"{desc}:")]
        assert len(lines) >= 5, (desc, err)
        count = int(lines[0].split("%", 1)[1].split("/", 1)[0])
        assert f"/{total} img" in lines[0] and 0 < count < epoch_size, lines[0]  # inside the first epoch
        assert "epoch=1/" in lines[0], lines[0]
