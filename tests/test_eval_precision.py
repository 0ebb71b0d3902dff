"""Evaluation trains its students in float32 unless --amp (CUDA only) asks for bf16 autocast; the
result records which, and the multi-student engine that actually ran (never ``auto``)."""

import json

import pytest
import torch
from torch import nn

import decoct.train.soft_students as soft_students
from decoct import api
from decoct.cli import main
from decoct.evaluation import protocols
from decoct.evaluation.protocols import evaluate, student_precision
from decoct.models import model_for
from decoct.train import resolve_engine

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(runs=1, epochs=1, device="cpu", progress=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("prec") / "run"
    api.select("random", dataset="digits", ipc=1, out=out, progress=False)
    return out


def test_student_precision_is_float32_unless_asked_and_amp_is_cuda_only():
    # the decision every protocol takes its precision from, CUDA branch included (no GPU needed)
    assert student_precision(False, torch.device("cpu")) == (False, False)
    assert student_precision(False, torch.device("cuda")) == (False, True)  # float32 on CUDA too
    assert student_precision(False, "cuda:1") == (False, True)
    assert student_precision(True, torch.device("cuda")) == (True, True)
    with pytest.raises(ValueError, match=r"^--amp \(bf16 autocast of the students\) is supported on CUDA only, "
                                         r"got device cpu; drop --amp"):
        student_precision(True, "cpu")


def test_both_protocol_kinds_take_their_precision_from_the_decision(run, digits, monkeypatch):
    """What reaches the trainers is student_precision's answer: float32 by default; with the decision
    answering autocast (as it does for --amp on CUDA) both trainers get it and the result says so."""
    seen = {}

    def fake_classic(factory, x, y, xt, yt, cfg, *, seeds, **kw):
        seen["classic"] = (cfg.amp, cfg.channels_last)
        return [0.5] * len(seeds)

    def fake_soft(factory, images, xt, yt, cfg, *, seeds, **kw):
        seen["soft"] = (cfg.amp, cfg.channels_last)
        return [0.5] * len(seeds)

    monkeypatch.setattr(protocols, "train_students", fake_classic)
    monkeypatch.setattr(soft_students, "fit_soft_students", fake_soft)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    art = run / "artifact"
    for amp_on in (False, True):
        if amp_on:
            monkeypatch.setattr(protocols, "student_precision", lambda amp, dev: (True, True))
        r = evaluate(art, "fast", dataset=digits, **FAST)
        s = evaluate(art, "soft", dataset=digits, model="mlp", batch_size=5, online_teacher=teacher, **FAST)
        assert seen == {"classic": (amp_on, amp_on), "soft": (amp_on, amp_on)}
        assert r.extra["amp"] is amp_on and s.extra["amp"] is amp_on


def test_result_records_float32_and_the_engine_that_ran(run, digits):
    art = run / "artifact"
    r = evaluate(art, "fast", dataset=digits, baseline="random", **FAST)
    assert r.extra["amp"] is False and r.baseline.extra["amp"] is False
    # "auto" is recorded as what it resolved to (sequential on CPU), for the set and its baseline
    probe = model_for("convnet", digits.info, width=128, norm="instance")
    assert r.engine == r.baseline.engine == resolve_engine("auto", probe, "cpu") == "sequential"
    # an engine asked for by name is recorded as such (vmap runs an MLP on CPU)
    v = evaluate(art, "fast", dataset=digits, model="mlp", engine="vmap", **FAST)
    assert v.engine == "vmap"
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    s = evaluate(art, "soft", dataset=digits, model="mlp", batch_size=5, online_teacher=teacher, **FAST)
    assert s.extra["amp"] is False and s.engine == "sequential"


def test_eval_file_records_amp_and_engine_and_reuse_respects_amp(run, tmp_path):
    r = api.evaluate_run(run, protocol="fast", epochs=1, runs=1, progress=False, device="cpu")
    path = run / "eval-fast-convnet-e1.json"
    saved = json.loads(path.read_text())
    assert saved["extra"]["amp"] is False and saved["engine"] == "sequential" and not saved["partial"]
    assert r.extra["amp"] is False
    again = api.evaluate_run(run, protocol="fast", epochs=1, runs=1, progress=False, device="cpu")
    assert again.extra["reused"] == str(path) and again.extra["amp"] is False
    # a stored result made under autocast is not a float32 result: evaluated afresh, not reused
    saved["extra"]["amp"] = True
    path.write_text(json.dumps(saved))
    fresh = api.evaluate_run(run, protocol="fast", epochs=1, runs=1, progress=False, device="cpu")
    assert "reused" not in fresh.extra and json.loads(path.read_text())["extra"]["amp"] is False


def test_saved_amp_of_files_written_before_it_was_recorded():
    from decoct.api import _saved_amp

    assert _saved_amp({"extra": {}}, "classic") is False  # classic/fast always trained in float32
    assert _saved_amp({"extra": {}}, "fast") is False
    assert _saved_amp({"extra": {}}, "soft") is None  # autocast on CUDA, float32 on CPU: unknown
    assert _saved_amp({"extra": {"amp": True}}, "soft") is True
    assert _saved_amp({"partial": True, "amp": False}, "soft") is False


def test_cli_amp_on_cpu_is_one_clear_line(run, capsys):
    before = sorted(p.name for p in run.iterdir())
    assert main(["evaluate", str(run), "--protocol", "fast", "--epochs", "1", "--runs", "1", "--amp",
                 "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("decoct evaluate: error: --amp (bf16 autocast of the students) is supported on CUDA only")
    assert sorted(p.name for p in run.iterdir()) == before  # refused before anything was written
