"""A user's own image-folder tree, end to end: every command finds its data again.

Runs and teachers record the registry name and data root they were made from
(``data_source``); ``--dataset``/``--data-root`` override it and must match the set's classes and
image shape. Also: ``evaluate`` on a read-only run fails before training any student, and
``--no-save`` (the advice) evaluates it without writing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from decoct.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 60, 220)}
FAST = ["--protocol", "fast", "--epochs", "20", "--runs", "1", "--no-progress"]


def make_tree(root: Path, classes: dict[str, tuple[int, int, int]] = COLOURS, size: int = 16,
              train: int = 12, test: int = 4) -> Path:
    """train/<class>/*.png and test/<class>/*.png: one noisy colour per class (a student learns it)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for c, rgb in classes.items():
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = np.clip(np.array(rgb)[None, None] + rng.normal(0, 25, (size, size, 3)), 0, 255)
                Image.fromarray(a.astype(np.uint8)).save(d / f"{i:03d}.png")
    return root


@pytest.fixture
def tree(tmp_path, tmp_cache) -> Path:
    return make_tree(tmp_path / "flowers")


def _select(tree: Path, out: Path, *extra: str) -> int:
    return main(["select", "random", "--dataset", "imagefolder", "--data-root", str(tree), "--ipc", "1",
                 "--out", str(out), "--no-progress", *extra])


def _meta(run: Path) -> dict:
    return json.loads((run / "artifact" / "manifest.json").read_text())["meta"]


def _eval_json(run: Path) -> dict:
    return json.loads(next(run.glob("eval-fast-*.json")).read_text())


@pytest.mark.slow
def test_select_then_evaluate_finds_the_tree_again(tree, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)  # a relative --data-root is recorded as an absolute path
    assert _select(Path(tree.name), run) == 0
    src = _meta(run)["data_source"]
    assert src["registry"] == "imagefolder" and Path(src["root"]).resolve() == tree.resolve()
    # the fault: `unknown dataset 'flowers'` (the folder name looked up as a registry name)
    assert main(["evaluate", str(run), *FAST]) == 0
    assert "set" in capsys.readouterr().out
    assert _eval_json(run)["mean"] > 0.5  # three colours: well above chance (1/3)
    # the data moved: the recorded root is gone, --data-root finds the copy
    moved = shutil.move(str(tree), str(tmp_path / "elsewhere"))
    assert main(["evaluate", str(run), *FAST, "--force"]) == 2
    err = capsys.readouterr().err
    assert "does not exist any more" in err and str(tree) in err and "--data-root" in err
    assert main(["evaluate", str(run), *FAST, "--force", "--data-root", moved]) == 0
    assert main(["evaluate", str(run), *FAST, "--force", "--dataset", "imagefolder", "--data-root", moved]) == 0
    assert _eval_json(run)["mean"] > 0.5


@pytest.mark.parametrize("override, words", [
    (["--dataset", "digits"], ["'flowers' with 3 classes", "'digits' with 10"]),
    (["--data-root", "OTHER"], ["'flowers' with 3 classes", "'other' with 4", "index 0"]),
    (["--data-root", "SMALL"], ["(3, 16, 16)", "(3, 8, 8)"]),
    (["--dataset", "nosuch"], ["unknown dataset 'nosuch'"]),
])
def test_data_that_does_not_match_the_set_is_refused(tree, tmp_path, capsys, override, words):
    """An override with other classes or another image size is an error naming both."""
    run = tmp_path / "run"
    assert _select(tree, run) == 0
    make_tree(tmp_path / "other", {"amber": (200, 150, 0), **COLOURS})
    make_tree(tmp_path / "small", size=8)
    override = [{"OTHER": str(tmp_path / "other"), "SMALL": str(tmp_path / "small")}.get(a, a) for a in override]
    capsys.readouterr()
    assert main(["evaluate", str(run), *FAST, *override]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # the lines before it: the classes found in each tree loaded
    assert last.startswith("decoct evaluate: error: ") and "Traceback" not in err
    for w in words:
        assert w in last
    assert not list(run.glob("eval-*.json"))


def test_sets_without_a_recorded_source(tree, tmp_path, capsys, digits):
    """Old sets: a registered name still works, a tree's folder name says which flags to pass."""
    from decoct.data import load_dataset
    from decoct.evaluation.protocols import evaluate
    from decoct.formats.artifact import DistilledSet

    data = load_dataset("imagefolder", root=tree)
    old = DistilledSet(info=data.info, images=data.train.images[::12], labels=data.train.labels[::12],
                       method="old")
    old.save(tmp_path / "old")
    assert main(["evaluate", str(tmp_path / "old"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "'flowers'" in err and "pass --dataset imagefolder --data-root DIR" in err
    # the advice, as typed
    assert main(["evaluate", str(tmp_path / "old"), *FAST, "--dataset", "imagefolder", "--data-root",
                 str(tree)]) == 0
    # a set made by the CLI before the record existed: its saved config names the data
    DistilledSet(info=data.info, images=old.images, labels=old.labels, method="old",
                 config={"dataset": "imagefolder", "data_root": str(tree)}).save(tmp_path / "old-cli")
    assert main(["evaluate", str(tmp_path / "old-cli"), *FAST]) == 0
    # a registered dataset's name is its registry name
    dig = DistilledSet(info=digits.info, images=digits.train.images[:10], labels=digits.train.labels[:10],
                       method="old")
    r = evaluate(dig, "fast", runs=1, epochs=2, progress=False)
    assert len(r.accuracies) == 1
    # a damaged record is refused with its key named
    bad = DistilledSet(info=data.info, images=old.images, labels=old.labels, method="old",
                       meta={"data_source": "imagefolder"})
    with pytest.raises(ValueError, match="'data_source' must be"):
        evaluate(bad, "fast", runs=1, epochs=2, progress=False)


@pytest.mark.slow
def test_dm_and_quantize_record_their_data(tree, tmp_path, capsys):
    """Every command that makes a set from data records where the data was."""
    want = {"registry": "imagefolder", "root": str(tree)}
    dm, q = tmp_path / "dm", tmp_path / "q"
    assert main(["distill", "dm", "--dataset", "imagefolder", "--data-root", str(tree), "--ipc", "1",
                 "--iterations", "2", "--out", str(dm), "--no-progress"]) == 0
    assert main(["quantize", "--dataset", "imagefolder", "--data-root", str(tree), "--ipc", "1", "--colors", "4",
                 "--out", str(q), "--no-progress"]) == 0
    assert main(["quantize", str(dm), "--colors", "4", "--out", str(tmp_path / "dmq"), "--no-progress"]) == 0
    for run in (dm, q, tmp_path / "dmq"):
        assert _meta(run)["data_source"] == want, run
        assert main(["evaluate", str(run), "--protocol", "fast", "--epochs", "2", "--runs", "1",
                     "--no-progress"]) == 0


@pytest.mark.slow
def test_squeeze_sre2l_relabel_soft_on_a_tree(tree, tmp_path, capsys):
    """squeeze -> distill sre2l (no --dataset) -> relabel -> evaluate --protocol soft."""
    teacher, run = tmp_path / "teacher", tmp_path / "sre2l"
    assert main(["squeeze", "--dataset", "imagefolder", "--data-root", str(tree), "--model", "convnet_bn",
                 "--epochs", "1", "--batch-size", "12", "--out", str(teacher), "--no-progress"]) == 0
    meta = json.loads((teacher / "teacher.json").read_text())
    assert meta["data_source"] == {"registry": "imagefolder", "root": str(tree)}
    # the fault: the teacher's folder name 'flowers' was looked up as a registry name
    recover = ["distill", "sre2l", "--teacher", str(teacher), "--ipc", "2", "--iterations", "3", "--no-progress"]
    assert main([*recover, "--out", str(run)]) == 0
    assert _meta(run)["data_source"] == meta["data_source"]
    assert main(["relabel", str(run), "--teacher", str(teacher), "--epochs", "2", "--no-progress"]) == 0
    assert main(["evaluate", str(run), "--protocol", "soft", "--runs", "1", "--no-progress"]) == 0
    assert "soft" in capsys.readouterr().out
    ev = json.loads(next(run.glob("eval-soft-*.json")).read_text())
    assert len(ev["accuracies"]) == 1 and ev["extra"]["label_source"] == "store"

    # --dataset/--data-root override the teacher's record; other data is refused naming both
    copy = shutil.copytree(tree, tmp_path / "copy")
    assert main([*recover, "--out", str(tmp_path / "r2"), "--data-root", str(copy)]) == 0
    assert _meta(tmp_path / "r2")["data_source"]["root"] == str(copy)
    assert main([*recover, "--out", str(tmp_path / "r3"), "--dataset", "digits"]) == 2
    err = capsys.readouterr().err
    assert "'flowers'" in err and "'digits'" in err and not (tmp_path / "r3").exists()
    # a teacher made before the record existed: the error gives flags that work as typed
    del meta["data_source"]
    (teacher / "teacher.json").write_text(json.dumps(meta))
    assert main([*recover, "--out", str(tmp_path / "r4")]) == 2
    assert "pass --dataset imagefolder --data-root DIR" in capsys.readouterr().err
    assert main([*recover, "--out", str(tmp_path / "r4"), "--dataset", "imagefolder", "--data-root", str(tree)]) == 0


@pytest.mark.slow
def test_experts_and_tm_on_a_tree_and_its_copy(tree, tmp_path, capsys):
    """The hint printed by `experts` works as typed; TM on a copy of the tree (another folder name)
    uses the same experts; evaluate finds the copy from the TM run's record."""
    import shlex

    experts = tmp_path / "experts"
    assert main(["experts", "--dataset", "imagefolder", "--data-root", str(tree), "--out", str(experts),
                 "--num-experts", "1", "--epochs", "2", "--no-progress"]) == 0
    hint = capsys.readouterr().out.split("use them with: ")[1].strip()
    assert f"--data-root {tree}" in hint
    copy = shutil.copytree(tree, tmp_path / "copy")
    run = tmp_path / "tm"
    argv = shlex.split(hint.replace("RUN", str(run)).replace(" N ", " 1 "))[1:]
    argv = [str(copy) if a == str(tree) else a for a in argv]
    assert main([*argv, "--iterations", "2", "--max-start-epoch", "1", "--expert-epochs", "1", "--syn-steps", "2",
                 "--lr-img", "10", "--no-progress"]) == 0
    assert Path(_meta(run)["data_source"]["root"]) == Path(copy)
    assert main(["evaluate", str(run), "--protocol", "fast", "--epochs", "2", "--runs", "1", "--no-progress"]) == 0


# ------------------------------------------------------------------------------------------
# evaluate on a read-only run: refused before any student trains; --no-save works as advised
def _read_only_probe(monkeypatch):
    import decoct.api

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(decoct.api.tempfile, "mkstemp", refuse)


def test_evaluate_read_only_run_fails_before_training(tree, tmp_path, capsys, monkeypatch):
    import decoct.evaluation.protocols

    run = tmp_path / "run"
    assert _select(tree, run) == 0
    before = sorted(p.name for p in run.iterdir()), (run / "log.jsonl").read_text()

    def no_training(*a, **k):
        raise AssertionError("a student was trained before the run was found read-only")

    with monkeypatch.context() as m:
        _read_only_probe(m)
        m.setattr(decoct.evaluation.protocols, "train_students", no_training)
        capsys.readouterr()
        assert main(["evaluate", str(run), *FAST]) == 2
        err = capsys.readouterr().err
        assert err.startswith("decoct evaluate: error: cannot write results to ") and err.count("\n") == 1
        assert "--no-save" in err and f"chmod -R u+w {run}" in err
        # the advice, as typed: --no-save trains and prints, and writes nothing
        m.undo()
        _read_only_probe(m)
        assert main(["evaluate", str(run), *FAST, "--no-save"]) == 0
    assert "set " in capsys.readouterr().out
    assert (sorted(p.name for p in run.iterdir()), (run / "log.jsonl").read_text()) == before
    # a writable run is unaffected: the probe leaves nothing behind
    assert main(["evaluate", str(run), *FAST]) == 0
    assert not list(run.glob(".decoct-write-probe-*")) and list(run.glob("eval-*.json"))


@pytest.mark.slow
def test_evaluate_really_read_only_run(tree, tmp_path, capsys):
    """The same with real permissions (as root: in one child without the capability to ignore them)."""
    run = tmp_path / "run"
    assert _select(tree, run) == 0
    argv = ["evaluate", str(run), *FAST]
    for p in [run, *run.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        if os.geteuid() != 0:
            capsys.readouterr()
            rcs = [main(argv), main([*argv, "--no-save"])]
            out = capsys.readouterr()
            err, stdout = out.err, out.out
        else:
            if not shutil.which("setpriv"):
                pytest.skip("running as root without setpriv: permissions cannot be enforced")
            code = (f"import sys; from decoct.cli import main; argv = {argv!r}\n"
                    "rcs = [main(argv), main(argv + ['--no-save'])]\nprint('RCS', *rcs)")
            r = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--",
                                sys.executable, "-c", code], capture_output=True, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
            if "RCS" not in r.stdout:
                pytest.skip(f"setpriv cannot drop capabilities here: {r.stderr.strip()[-300:]}")
            rcs = [int(v) for v in r.stdout.split("RCS")[1].split()]
            err, stdout = r.stderr, r.stdout
        assert rcs == [2, 0], err
        assert "cannot write results to" in err and "Traceback" not in err
        assert "set " in stdout and not list(run.glob("eval-*.json"))
    finally:
        for p in [run, *run.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)


def test_a_stored_result_is_reused_only_for_the_same_data(tree, tmp_path, capsys):
    """A finished eval-*.json answers a repeat of the same command (and says so), never an
    evaluation asked on other data: `--dataset digits` must not print the tree's old accuracy."""
    run = tmp_path / "run"
    assert _select(tree, run) == 0
    assert main(["evaluate", str(run), *FAST]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), *FAST]) == 0
    assert "already evaluated" in capsys.readouterr().out
    assert main(["evaluate", str(run), *FAST, "--dataset", "digits"]) == 2
    assert "'digits' with 10" in capsys.readouterr().err
    assert _eval_json(run)["data"] == {"dataset": None, "data_root": None}
