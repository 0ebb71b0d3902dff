"""torchrun recover: 2 gloo processes on CPU make exactly the set a single process makes."""

import os
import socket
import subprocess
import sys

import pytest
import torch

from decoct.cli import main
from decoct.decoupled.recover import merge_parts
from decoct.decoupled.squeeze import squeeze
from decoct.formats.artifact import DistilledSet
from decoct.runtime.distributed import shard_dir
from decoct.runtime.io import atomic_save_tensors


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_merge_parts_refuses_incomplete_cover(tmp_path):
    for r, idx in enumerate(([0, 1], [1])):
        p = shard_dir(tmp_path, r, 2) / "part.safetensors"
        p.parent.mkdir(parents=True)
        i = torch.tensor(idx)
        atomic_save_tensors(p, {"indices": i, "images": torch.zeros(len(i), 1, 2, 2)})
    with pytest.raises(RuntimeError, match="exactly once"):
        merge_parts(tmp_path, 2, 3)
    with pytest.raises(RuntimeError, match="wrote no part"):
        merge_parts(tmp_path, 3, 3)


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(tmp_path, digits):
    t = tmp_path / "teacher"
    squeeze(digits, "convnet_bn", out=t, epochs=1, model_kwargs=dict(width=8), device="cpu", show_progress=False)
    args = ["distill", "dwa", "--teacher", str(t), "--ipc", "2", "--iterations", "3", "--batching", "class",
            "--no-progress", "--device", "cpu"]
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels as each torchrun rank (OMP_NUM_THREADS=1)
    try:
        assert main([*args, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(n)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "decoct.cli", *args, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = DistilledSet.load(tmp_path / "one" / "artifact")
    two = DistilledSet.load(tmp_path / "two" / "artifact")
    assert DistilledSet.verify(tmp_path / "two" / "artifact") == []
    assert len(two) == 20 and two.meta["world_size"] == 2 and two.meta["complete"]
    assert torch.equal(one.images, two.images) and torch.equal(one.labels, two.labels)
    assert one.meta["final_batch_metrics"] == two.meta["final_batch_metrics"]
    for r in range(2):  # each rank wrote its own part: 5 of the 10 one-class batches
        part = shard_dir(tmp_path / "two", r, 2)
        assert (part / "DONE").exists() and (part / "part.safetensors").exists()
    assert (tmp_path / "two" / "DONE").exists() and (tmp_path / "two" / "grid.png").exists()
