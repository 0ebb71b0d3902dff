"""Device resolution and torchrun process-group helpers: rank/world from the environment, barrier.

``torchrun --nproc_per_node N decoct ...`` runs N copies of a command; the stages that shard their
work (recover, relabel, the soft protocol) ask these helpers which rank they are and how many
there are, and split their batches or classes with :func:`shard_range`. The backend is gloo on CPU
and NCCL on CUDA (each rank then uses ``cuda:LOCAL_RANK``, :func:`rank_device`).
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = ["barrier", "init_process_group", "join_torchrun", "local_rank", "rank", "rank_device", "resolve_device", "shard_dir",
           "shard_range", "world_size"]


def world_size() -> int:
    """``WORLD_SIZE`` set by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def shard_range(n: int, rank: int, world: int) -> range:
    """Contiguous, balanced block of ``range(n)`` for ``rank`` of ``world`` (e.g. batches or classes)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def init_process_group(device: torch.device) -> None:
    """Join torchrun's group (gloo for CPU, nccl for CUDA); a no-op when already joined.

    The timeout is long (``DECOCT_DIST_TIMEOUT`` seconds, default 24 h) because ranks wait at a
    barrier for the slowest shard of a recover run.
    """
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=float(os.environ.get("DECOCT_DIST_TIMEOUT", 24 * 3600)))
    dist.init_process_group(backend=backend, timeout=timeout)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shard_dir(out: str | Path, r: int, world: int) -> Path:
    return Path(out) / "shards" / f"rank{r:03d}-of{world:03d}"


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda[:N]``; anything else raises."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for, but CUDA is not available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda[:N]")
    return torch.device(device)


def rank_device(device: str) -> torch.device:
    """This rank's device: ``cuda`` becomes ``cuda:LOCAL_RANK`` (and the current CUDA device)."""
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def join_torchrun(device: str | torch.device) -> torch.device:
    """Under torchrun (WORLD_SIZE > 1): join the process group and return this rank's device
    (``cuda:LOCAL_RANK`` for CUDA); otherwise just resolve ``device``."""
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    if world_size() > 1:
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank())
            torch.cuda.set_device(dev)
        init_process_group(dev)
    return dev
