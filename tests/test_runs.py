import pytest
import torch

from decoct.runtime.runs import Run, RunError, resolve_artifact


def test_fresh_done_and_guarded(tmp_path):
    cfg = {"ipc": 1}
    run = Run.open(tmp_path / "r", cfg)
    run.log(event="start", step=0)
    run.save_checkpoint({"step": torch.tensor(3), "x": torch.ones(2)})
    # an unfinished run is protected unless --resume or --force
    with pytest.raises(RunError, match="--resume"):
        Run.open(tmp_path / "r", cfg)
    again = Run.open(tmp_path / "r", cfg, resume=True)
    assert int(again.load_checkpoint()["step"]) == 3
    with pytest.raises(RunError, match="different config"):
        Run.open(tmp_path / "r", {"ipc": 2}, resume=True)
    again.finish()
    assert again.done and again.load_checkpoint() is None
    assert Run.open(tmp_path / "r", cfg).done  # finished: a no-op
    assert [e["event"] for e in again.read_log()] == ["start"]
    assert not Run.open(tmp_path / "r", cfg, force=True).done  # --force starts over
    assert again.read_log() == []


def test_resolve_artifact(tmp_path):
    (tmp_path / "run" / "artifact").mkdir(parents=True)
    (tmp_path / "run" / "artifact" / "manifest.json").write_text("{}")
    assert resolve_artifact(tmp_path / "run") == tmp_path / "run" / "artifact"
    assert resolve_artifact(tmp_path / "run" / "artifact") == tmp_path / "run" / "artifact"
    with pytest.raises(FileNotFoundError, match="manifest"):
        resolve_artifact(tmp_path)
