"""Diverging loops stop at once, name what diverged and where, and leave no result (issue 10, points 7, 15)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from decoct.runtime.health import (
    DivergedError,
    check_metrics,
    check_tensors,
    rerun_hint,
    saturation,
)
from decoct.runtime.runs import Run

pytestmark = pytest.mark.usefixtures("one_thread")


def _strict(path) -> list[dict]:
    def refuse(token: str):
        raise ValueError(f"log.jsonl holds the non-JSON token {token}")

    return [json.loads(line, parse_constant=refuse) for line in (path / "log.jsonl").read_text().splitlines()]


def test_saturation_counts_pixels_far_outside_the_valid_range():
    # normalised with mean 0.5, std 0.25: pixel p = 0.25 x + 0.5; p in [-1, 2] <=> x in [-6, 6]
    x = torch.tensor([-6.0, 6.0, -2.5, 5.9, 0.0, 100.0, -1e9, 6.1]).view(1, 1, 2, 4)
    assert saturation(x, [0.5], [0.25]) == pytest.approx(3 / 8)  # merely clipped pixels do not count
    assert saturation(x, [0.5], [0.25], margin=0.0) == pytest.approx(7 / 8)
    assert saturation(torch.zeros(0, 1, 2, 2), [0.5], [0.25]) == 0.0


def test_metric_and_tensor_checks_name_the_quantity():
    check_metrics({"loss": 1.0, "ce": 0.0}, "m", "iteration 1", "h")
    with pytest.raises(DivergedError, match="^m diverged at iteration 4: loss is nan; h$"):
        check_metrics({"ce": math.inf, "loss": math.nan}, "m", "iteration 4", "h")  # the loss is named first
    with pytest.raises(DivergedError, match="ce is -inf"):
        check_metrics({"loss": 1.0, "ce": -math.inf}, "m", "iteration 4", "h")
    check_tensors([("a", torch.ones(3)), ("idx", torch.arange(3))], "m", "iteration 1", "h")
    with pytest.raises(DivergedError, match="b is not finite"):
        check_tensors([("a", torch.ones(3)), ("b", torch.tensor([1.0, math.inf]))], "m", "iteration 1", "h")
    err = DivergedError("m", "epoch 2", "loss", math.nan, "h")
    assert err.event()["event"] == "diverged" and err.event()["value"] == "nan" and isinstance(err, RuntimeError)
    assert rerun_hint(("--lr", 0.05), ("--r-bn", 0.01)) == (
        "lower --lr (now 0.05) or --r-bn (now 0.01) and start over with --force "
        "(a run with changed settings cannot --resume)")


def test_teacher_training_stops_on_a_nan_loss(digits, tmp_path, monkeypatch):
    import decoct.decoupled.squeeze as sq

    real = sq.target_loss
    monkeypatch.setattr(sq, "target_loss", lambda *a, **kw: real(*a, **kw) * math.nan)
    out = tmp_path / "t"
    with pytest.raises(DivergedError, match=r"^squeeze diverged at epoch 1: the training loss is nan; "
                                            r"lower --lr \(now 0.05\)"):
        sq.squeeze(digits, "convnet_bn", out=out, epochs=3, model_kwargs=dict(width=8), device="cpu",
                   show_progress=False)
    assert not (out / "DONE").exists() and not (out / "model.safetensors").exists()
    assert _strict(out)[-1]["event"] == "diverged"


def test_expert_training_stops_on_a_nan_loss_and_keeps_no_expert(digits, tmp_path, monkeypatch):
    import torch.nn.functional as F

    from decoct.matching.experts import train_experts

    real = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda *a, **kw: real(*a, **kw) * math.nan)
    logged: list[dict] = []
    with pytest.raises(DivergedError, match=r"^expert training diverged at expert 0, epoch 1: the training loss "
                                            r"is nan; lower --lr \(now 0.01\)"):
        train_experts(digits, tmp_path / "e", num_experts=2, epochs=2, batch_size=512, device="cpu",
                      model_kwargs=dict(width=8, norm="instance"), progress=False, log=logged.append)
    assert not list((tmp_path / "e").glob("expert_*.safetensors"))
    assert logged[-1]["event"] == "diverged"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, digits):
    from decoct.decoupled.squeeze import squeeze

    out = tmp_path_factory.mktemp("health") / "teacher"
    squeeze(digits, "convnet_bn", out=out, epochs=1, model_kwargs=dict(width=8), device="cpu", show_progress=False)
    return out


def test_recover_stops_on_a_nan_loss(teacher, tmp_path, monkeypatch):
    import decoct.decoupled.recover as rec

    real = rec.bn_matching_loss
    calls: list[int] = []

    def nan_from_third(*a, **kw):
        calls.append(1)
        loss = real(*a, **kw)
        return loss * math.nan if len(calls) >= 3 else loss

    monkeypatch.setattr(rec, "bn_matching_loss", nan_from_third)
    out = tmp_path / "r"
    with pytest.raises(DivergedError, match=r"^sre2l diverged at iteration 3 \(batch 0\): loss is nan; "
                                            r"lower --lr \(now .*\) or --r-bn"):
        rec.recover("sre2l", teacher=str(teacher), ipc=1, out=str(out), iterations=5, device="cpu",
                    show_progress=False)
    assert not (out / "DONE").exists() and not (out / "artifact").exists()
    assert _strict(out)[-1]["event"] == "diverged"


def test_estimate_lands_in_the_run_log(tmp_path, monkeypatch):
    """run_method passes Run.log to the progress reporter: the long-run estimate is a log.jsonl event."""
    import decoct.runtime.progress as prog
    from decoct.data import DatasetInfo
    from decoct.formats.artifact import DistilledSet
    from decoct.methods.base import run_method

    info = DatasetInfo(name="toy", classes=["a", "b"], channels=1, height=4, width=4, mean=[0.5], std=[0.5])

    class Slow:
        name, iterations = "slow", 50

        def init(self, dataset, device):
            self.x = torch.zeros(2, 1, 4, 4)

        def step(self, it):
            return {"loss": 1.0}

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

        def result(self):
            return DistilledSet.from_float(info, self.x, torch.tensor([0, 1]), method="slow")

    monkeypatch.setattr(prog, "ESTIMATE_MIN_S", 0.0)
    monkeypatch.setattr(prog, "ESTIMATE_AFTER_S", 0.0)
    run = Run.open(tmp_path / "r", {"m": "slow"})
    run_method(Slow(), run, None, torch.device("cpu"), show_progress=False)
    est = [e for e in _strict(run.path) if e["event"] == "estimate"]
    assert len(est) == 1 and est[0]["what"] == "slow" and est[0]["span"] == "50 iterations"
