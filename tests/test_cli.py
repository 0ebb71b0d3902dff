"""End-to-end CLI runs on the real (bundled) digits data, and the bad-input paths."""

import json

import pytest

from decoct.cli import main


def _select(tmp_path, *extra):
    return main(["select", "herding", "--dataset", "digits", "--ipc", "2", "--out", str(tmp_path / "run"),
                 "--no-progress", *extra])


@pytest.mark.slow
def test_select_evaluate_report_export(tmp_path, capsys):
    assert _select(tmp_path) == 0
    run = tmp_path / "run"
    assert (run / "artifact" / "manifest.json").exists() and (run / "grid.png").exists()
    assert _select(tmp_path) == 0  # finished: a no-op
    assert "already done" in capsys.readouterr().out
    assert main(["evaluate", str(run), "--protocol", "fast", "--epochs", "60", "--runs", "2",
                 "--baseline", "random", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "random ipc2" in out
    ev = json.loads(next(run.glob("eval-fast-*.json")).read_text())
    assert len(ev["accuracies"]) == 2 and 0.3 < ev["mean"] <= 1.0 and not ev["partial"]
    assert ev["bytes_on_disk"] > 0 and ev["baseline"]["extra"]["ipc"] == 2
    # a failed attempt beside it (a run directory without a set) is skipped with a note, as
    # `decoct report runs/*` meets it, not an error that hides every other run
    assert main(["select", "random", "--dataset", "imagefolder", "--data-root", str(tmp_path / "nope"),
                 "--ipc", "1", "--out", str(tmp_path / "failed"), "--no-progress"]) == 2
    capsys.readouterr()
    assert main(["report", str(run), str(tmp_path / "failed"), "--out", str(tmp_path / "rep")]) == 0
    assert "skipping" in capsys.readouterr().err
    assert "| run |" in (tmp_path / "rep" / "report.md").read_text()
    assert (tmp_path / "rep" / "accuracy_vs_bytes.png").exists()
    assert main(["export", str(run), "--imagefolder", str(tmp_path / "exp")]) == 0
    assert len(list((tmp_path / "exp").rglob("*.png"))) == 20
    capsys.readouterr()
    assert main(["info", str(run)]) == 0
    assert json.loads(capsys.readouterr().out)["problems"] == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["select", "random", "--dataset", "nosuch", "--ipc", "1", "--out", "X"], "unknown dataset 'nosuch'"),
        (["select", "random", "--dataset", "digits", "--ipc", "500", "--out", "X"], "larger than class"),
        (["select", "random", "--dataset", "digits", "--ipc", "1", "--out", "X", "--set", "ipcc=2"],
         "unknown config key 'ipcc'"),
        (["select", "herding", "--dataset", "digits", "--ipc", "1", "--out", "X", "--embed-model", "vgg7"],
         "unknown model 'vgg7'"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, capsys, argv, message):
    argv = [a if a != "X" else str(tmp_path / "run") for a in argv]
    assert main(argv + ["--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_config_file_presets_and_unknown_keys(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ipc: 1\nseed: 3\n")
    assert main(["select", "random", "--dataset", "digits", "--ipc", "1", "--out", str(tmp_path / "r"),
                 "--config", str(cfg), "--no-progress"]) == 0
    assert "seed: 3" in (tmp_path / "r" / "config.yaml").read_text()
    cfg.write_text("ipc: 1\nlearning_rate: 3\n")
    assert main(["select", "random", "--dataset", "digits", "--ipc", "1", "--out", str(tmp_path / "r2"),
                 "--config", str(cfg), "--no-progress"]) == 2
    assert "unknown config key 'learning_rate'" in capsys.readouterr().err


def test_corrupted_png_is_reported_and_nothing_lost(tmp_path, capsys):
    assert _select(tmp_path) == 0
    png = sorted((tmp_path / "run" / "artifact" / "images").rglob("*.png"))[0]
    png.write_bytes(png.read_bytes()[:20])
    assert main(["evaluate", str(tmp_path / "run"), "--protocol", "fast", "--epochs", "1", "--runs", "1",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert png.name in err and ("sha256" in err or "corrupt" in err)
    assert (tmp_path / "run" / "config.yaml").exists() and (tmp_path / "run" / "artifact").exists()


@pytest.mark.slow
def test_interrupted_evaluation_resumes(tmp_path, capsys, monkeypatch):
    assert _select(tmp_path) == 0
    run = tmp_path / "run"
    import decoct.evaluation.protocols as ev

    real = ev.train_students
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ev, "train_students", flaky)
    args = ["evaluate", str(run), "--protocol", "fast", "--epochs", "20", "--runs", "2", "--no-progress"]
    from decoct import api

    with pytest.raises(KeyboardInterrupt):
        api.evaluate_run(run, protocol="fast", epochs=20, runs=2, chunk=1, progress=False)
    partial = json.loads(next(run.glob("eval-*.json")).read_text())
    assert partial["partial"] and len(partial["state"]["set"]) == 1
    assert main(args) == 2  # without --resume the partial evaluation is protected
    assert "--resume" in capsys.readouterr().err
    monkeypatch.setattr(ev, "train_students", real)
    first = partial["state"]["set"][0]
    r = api.evaluate_run(run, protocol="fast", epochs=20, runs=2, chunk=1, progress=False, resume=True)
    assert r.accuracies[0] == first and len(r.accuracies) == 2


def test_evaluate_writes_only_on_rank0(tmp_path, capsys, monkeypatch):
    """Under torchrun every rank evaluates, but only rank 0 writes eval-*.json and reports."""
    assert _select(tmp_path) == 0
    run = tmp_path / "run"
    monkeypatch.setenv("RANK", "1")
    capsys.readouterr()
    assert main(["evaluate", str(run), "--protocol", "fast", "--epochs", "2", "--runs", "1", "--no-progress"]) == 0
    assert not list(run.glob("eval-*.json")) and capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["evaluate", str(run), "--protocol", "fast", "--epochs", "2", "--runs", "1", "--no-progress"]) == 0
    assert len(list(run.glob("eval-*.json"))) == 1 and "%" in capsys.readouterr().out
