"""The shared distillation loop: checkpoints, resume to an identical result, artifact + grid."""

import json

import pytest
import torch

from decoct.data import DatasetInfo
from decoct.formats.artifact import DistilledSet
from decoct.methods.base import DistillMethod, run_method
from decoct.runtime.runs import Run

INFO = DatasetInfo(name="toy", classes=["a", "b"], channels=1, height=4, width=4, mean=[0.5], std=[0.5])


class Toy:
    """Noisy gradient steps on a 2-image set: uses the global RNG, so resume must restore it."""

    name = "toy"

    def __init__(self, iterations: int = 20) -> None:
        self.iterations = iterations

    def init(self, dataset, device) -> None:
        self.x = torch.zeros(2, 1, 4, 4)

    def step(self, it: int) -> dict[str, float]:
        self.x = self.x + 0.01 * torch.randn_like(self.x)
        return {"loss": float(self.x.abs().mean())}

    def state_dict(self):
        return {"x": self.x.clone()}

    def load_state_dict(self, state) -> None:
        self.x = state["x"].clone()

    def result(self) -> DistilledSet:
        return DistilledSet.from_float(INFO, self.x, torch.tensor([0, 1]), method="toy")


def test_toy_is_a_method():
    assert isinstance(Toy(), DistillMethod)


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    full = run_method(Toy(), Run.open(tmp_path / "a", {"m": "toy"}), None, torch.device("cpu"),
                      seed=3, checkpoint_every=5, show_progress=False)
    run = Run.open(tmp_path / "b", {"m": "toy"})
    run_method(Toy(), run, None, torch.device("cpu"), seed=3, checkpoint_every=5, show_progress=False,
               stop_after=7)
    assert not run.done and (run.path / "checkpoint.pt").exists()
    run = Run.open(tmp_path / "b", {"m": "toy"}, resume=True)
    resumed = run_method(Toy(), run, None, torch.device("cpu"), seed=3, checkpoint_every=5,
                         show_progress=False)
    assert run.done and not (run.path / "checkpoint.pt").exists()
    assert torch.equal(full.images, resumed.images)
    assert (tmp_path / "b" / "grid.png").exists()
    events = [e["event"] for e in run.read_log()]
    assert "stopped" in events and "resumed" in events and events[-1] == "finished"
    loaded = DistilledSet.load(tmp_path / "b" / "artifact")
    assert torch.equal(loaded.images, full.images)


class WarmToy(Toy):
    """A Toy with a one-off preparation whose effect lives in the checkpoint."""

    def __init__(self, iterations: int = 20) -> None:
        super().__init__(iterations)
        self.warm_calls = 0

    def warm_start(self, show_progress: bool) -> dict[str, float]:
        self.warm_calls += 1
        self.x = self.x + 1.0
        return {"shift": 1.0}


def test_warm_start_runs_once_on_a_fresh_run_and_not_on_resume(tmp_path):
    full = WarmToy()
    a = run_method(full, Run.open(tmp_path / "a", {"m": "toy"}), None, torch.device("cpu"), seed=3,
                   checkpoint_every=5, show_progress=False)
    assert full.warm_calls == 1
    warm = [e for e in Run(tmp_path / "a").read_log() if e["event"] == "warm_start"]
    assert len(warm) == 1 and warm[0]["shift"] == 1.0
    first = WarmToy()
    run_method(first, Run.open(tmp_path / "b", {"m": "toy"}), None, torch.device("cpu"), seed=3,
               checkpoint_every=5, show_progress=False, stop_after=7)
    again = WarmToy()
    b = run_method(again, Run.open(tmp_path / "b", {"m": "toy"}, resume=True), None, torch.device("cpu"), seed=3,
                   checkpoint_every=5, show_progress=False)
    assert first.warm_calls == 1 and again.warm_calls == 0  # the checkpoint already holds its effect
    assert torch.equal(a.images, b.images)


# ---------------------------------------------------------------------- divergence (issue 10, points 7 and 15)
class Diverging(Toy):
    """A Toy whose metric ``key`` becomes ``value`` at step ``at`` (0-based), or whose check() refuses it."""

    def __init__(self, at: int, key: str = "loss", value: float = float("nan"), via_check: bool = False) -> None:
        super().__init__(20)
        self.at, self.key, self.value, self.via_check = at, key, value, via_check
        self.divergence_hint = "lower --lr-toy (now 7) and start over with --force"

    def step(self, it: int) -> dict[str, float]:
        metrics = super().step(it)
        if it >= self.at and not self.via_check:
            metrics[self.key] = self.value
        return metrics

    def check(self, it: int) -> None:
        from decoct.runtime.health import DivergedError

        if self.via_check and it >= self.at:
            raise DivergedError("toy", f"iteration {it + 1}", "the toy step size", -1.0, self.divergence_hint)


@pytest.mark.parametrize("case", [dict(key="loss", value=float("nan")), dict(key="loss", value=float("inf")),
                                  dict(key="grad_norm", value=-float("inf")), dict(via_check=True)])
def test_a_diverged_step_stops_at_once_without_artifact_or_done(tmp_path, case):
    from decoct.runtime.health import DivergedError

    run = Run.open(tmp_path / "r", {"m": "toy"})
    with pytest.raises(DivergedError) as err:
        run_method(Diverging(at=6, **case), run, None, torch.device("cpu"), seed=3, checkpoint_every=5,
                   show_progress=False)
    msg = str(err.value)
    assert msg.startswith("toy diverged at iteration 7: ") and "lower --lr-toy (now 7)" in msg and "--force" in msg
    quantity = "the toy step size" if case.get("via_check") else case["key"]
    assert quantity in msg and "\n" not in msg
    assert not run.done and not run.artifact_dir.exists() and not (run.path / "grid.png").exists()
    assert int(run.load_checkpoint()["iteration"]) == 5  # the last good checkpoint is kept
    lines = (run.path / "log.jsonl").read_text().splitlines()

    def refuse(token: str):
        raise ValueError(token)

    events = [json.loads(line, parse_constant=refuse) for line in lines]  # strict JSON, even after a NaN
    assert events[-1]["event"] == "diverged" and events[-1]["at"] == "iteration 7" and events[-1]["message"] == msg
    assert events[-2]["event"] == "step" and events[-2]["iteration"] == 7  # the offending step is logged


def test_default_hint_says_how_to_start_over(tmp_path):
    from decoct.runtime.health import DivergedError

    method = Diverging(at=0)
    del method.divergence_hint
    with pytest.raises(DivergedError, match="lower the learning rate.*--force"):
        run_method(method, Run.open(tmp_path / "r", {"m": "toy"}), None, torch.device("cpu"), show_progress=False)
