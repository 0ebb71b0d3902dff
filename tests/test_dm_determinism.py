"""Same seed, same artifact: DM's real-image chunk comes from sizes alone, never from timing, and is
part of a run's identity (it sets the conv kernels' batch size, so the float rounding)."""

import hashlib
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from decoct.matching.dm import REAL_CHUNK_CAP, DistributionMatching, DMConfig, real_chunk_for
from decoct.runtime.runs import NON_IDENTITY_KEYS, Run, RunError, config_changes

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def test_rule_depends_on_sizes_only():
    # CIFAR-10 ConvNet width 128: 512 KiB per float32 activation map -> 32 images in 16 MiB
    assert real_chunk_for((3, 32, 32), 128, CPU, amp=False, max_images=2560) == 32
    assert real_chunk_for((3, 64, 64), 128, CPU, amp=False, max_images=2560) == 8
    assert real_chunk_for((3, 128, 128), 128, "cpu", amp=False, max_images=2560) == 2
    assert real_chunk_for((3, 32, 32), 128, CPU, amp=True, max_images=2560) == 64  # bf16: half the bytes
    assert real_chunk_for((1, 8, 8), 128, CPU, amp=False, max_images=1437) == REAL_CHUNK_CAP["cpu"]
    assert real_chunk_for((1, 8, 8), 128, CPU, amp=False, max_images=100) == 100  # one forward holds all
    assert real_chunk_for((3, 512, 512), 512, CPU, amp=False, max_images=9) == 1  # never below one image


def test_cuda_rule_uses_the_devices_total_memory_not_its_load(monkeypatch):
    calls = []

    def props(dev):
        calls.append(dev)
        return SimpleNamespace(total_memory=16 * 2**30)

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    cuda = torch.device("cuda")
    # 16 GiB / 32 = 512 MiB: 1024 CIFAR images in float32, 2048 under bf16, capped at 4096
    assert real_chunk_for((3, 32, 32), 128, cuda, amp=False, max_images=10**6) == 1024
    assert real_chunk_for((3, 32, 32), 128, cuda, amp=True, max_images=10**6) == 2048
    assert real_chunk_for((1, 8, 8), 128, cuda, amp=True, max_images=10**6) == REAL_CHUNK_CAP["cuda"]
    assert calls and all(torch.device(d).type == "cuda" for d in calls)


def test_dm_resolves_the_chunk_at_init_from_the_rule(digits):
    m = DistributionMatching(DMConfig(ipc=1, iterations=1, width=16, batch_real=100, seed=0))
    m.init(digits, CPU)
    # 10 classes x min(100, class size) real images per iteration
    assert m.real_chunk == real_chunk_for((1, 8, 8), 16, CPU, amp=False, max_images=1000) == 512
    explicit = DistributionMatching(DMConfig(ipc=1, iterations=1, width=16, real_chunk=7))
    explicit.init(digits, CPU)
    assert explicit.real_chunk == 7


def _files(artifact):
    """Every file of an artifact by path: bytes, the manifest with its wall-clock ``meta.seconds`` out."""
    out = {}
    for p in sorted(artifact.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "manifest.json":
                m = json.loads(data)
                assert isinstance(m["meta"].pop("seconds"), float)  # how long it took: a measurement
                data = json.dumps(m, sort_keys=True).encode()
            out[str(p.relative_to(artifact))] = hashlib.sha256(data).hexdigest()
    return out


# a fresh process running `decoct distill dm` under a clock that disagrees with the other run's
# (a loaded machine times things differently): argv[1] picks the clock, the rest is the command line
_FRESH_RUN = """
import itertools, sys, time
clock = itertools.count(0.0, 1.0) if sys.argv[1] == "even" else (1e-3 * k**3 for k in itertools.count())
time.perf_counter = lambda: next(clock)
from decoct.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_two_fresh_runs_of_one_seed_write_identical_artifacts(tmp_path):
    """Two fresh processes, one seed, clocks that disagree: the same files. Nothing on the path from
    seed to pixels reads the clock (the timing autotune chose 64 in one run and 512 in another)."""
    arts = []
    for clock in ("even", "growing"):
        out = tmp_path / clock
        cmd = [sys.executable, "-c", _FRESH_RUN, clock, "distill", "dm", "--dataset", "digits", "--ipc", "1",
               "--iterations", "2", "--width", "16", "--seed", "5", "--device", "cpu", "--no-progress",
               "--out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        arts.append(out / "artifact")
    a, b = (_files(p) for p in arts)
    assert len(a) == 11 and a == b  # 10 PNGs + the manifest
    meta = json.loads((arts[0] / "manifest.json").read_text())["meta"]
    assert meta["real_chunk"] == 512  # the rule's choice, recorded: 10 x min(256, class) = 1437 images of 8x8


def test_real_chunk_is_part_of_a_runs_identity(digits, tmp_path):
    assert "real_chunk" not in NON_IDENTITY_KEYS
    assert config_changes({"ipc": 1, "real_chunk": 0}, {"ipc": 1, "real_chunk": 64}) == ["real_chunk: 0 -> 64"]
    cfg = {"method": "dm", "dataset": "digits", "ipc": 1, "real_chunk": 0}
    Run.open(tmp_path / "r", cfg).finish()
    with pytest.raises(RunError, match=r"real_chunk: 0 -> 64"):
        Run.open(tmp_path / "r", {**cfg, "real_chunk": 64})
