"""torchrun helpers: rank/world from the environment, process group, sharded recover.

``torchrun --nproc_per_node N decoct distill sre2l|dwa|lpld ...`` runs N copies of the command.
Each rank synthesises a contiguous block of batches (whole classes for LPLD), checkpointing in
its own sub-run ``<out>/shards/rank<r>-of<N>/`` and finishing with ``part.safetensors`` (the image
indices and float images it made); rank 0 then checks that the parts cover every image exactly
once and writes the one artifact, grid and log of ``<out>``. Every batch draws its randomness from
``(seed, batch index)`` only, so the merged set equals a 1-process run with the same seed (given
the same numeric kernels). ``--resume`` resumes every shard; a finished shard is not recomputed.
The backend is gloo on CPU and NCCL on CUDA (each rank then uses ``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .io import atomic_save_tensors, load_tensors

__all__ = ["barrier", "init_process_group", "local_rank", "merge_parts", "rank", "recover_distributed",
           "shard_dir", "shard_range", "world_size"]


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


def _rank_device(device: str) -> torch.device:
    from .evaluation import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def _run_shard(rec: Any, run: Any, data: Any, dev: torch.device, *, checkpoint_every: int,
               stop_after: int | None, show_progress: bool) -> bool:
    """Run one rank's batches with checkpoints; write ``part.safetensors``. True when finished."""
    from .runs import progress

    part = run.path / "part.safetensors"
    if run.done and part.exists():
        return True
    rec.init(data, dev)
    start, elapsed = 0, 0.0
    ckpt = run.load_checkpoint()
    if ckpt is not None:
        rec.load_state_dict(ckpt["method"])
        start, elapsed = int(ckpt["iteration"]), float(ckpt.get("elapsed", 0.0))
        run.log(event="resumed", iteration=start)
    else:
        run.log(event="start", method=rec.name, iterations=rec.iterations, rank=rec.rank, world=rec.world)
    t0 = time.perf_counter()

    def checkpoint(it: int) -> None:
        run.save_checkpoint({"iteration": it, "method": rec.state_dict(),
                             "elapsed": elapsed + time.perf_counter() - t0})

    bar = progress(total=rec.iterations, initial=start, desc=f"{rec.name}[{rec.rank}]", enabled=show_progress)
    done_here = 0
    for it in range(start, rec.iterations):
        metrics = rec.step(it)
        bar.update(1)
        if (it + 1) % 10 == 0 or it + 1 == rec.iterations:
            run.log(event="step", iteration=it + 1, **metrics)
        done_here += 1
        last = it + 1 == rec.iterations
        if not last and (it + 1) % checkpoint_every == 0:
            checkpoint(it + 1)
        if stop_after is not None and done_here >= stop_after and not last:
            checkpoint(it + 1)
            bar.close()
            run.log(event="stopped", iteration=it + 1)
            return False
    bar.close()
    idx, images = rec.part()
    seconds = elapsed + time.perf_counter() - t0
    metrics = json.dumps({str(k): v for k, v in rec.last_metrics.items()})
    atomic_save_tensors(part, {"indices": idx, "images": images},
                        metadata={"rank": str(rec.rank), "world": str(rec.world), "seconds": f"{seconds:.3f}",
                                  "metrics": metrics})
    run.log(event="finished", seconds=round(seconds, 3), images=len(idx))
    run.finish()
    return True


def merge_parts(out: str | Path, world: int, n_images: int) -> tuple[torch.Tensor, list[float], dict[int, Any]]:
    """Stack every rank's ``part.safetensors`` into (N, C, H, W); each index exactly once.

    Also returns each rank's seconds and the merged per-batch final metrics.
    """
    from .io import load_tensors_metadata

    images: torch.Tensor | None = None
    seen = torch.zeros(n_images, dtype=torch.long)
    seconds = []
    metrics: dict[int, Any] = {}
    for r in range(world):
        p = shard_dir(out, r, world) / "part.safetensors"
        if not p.exists():
            raise RuntimeError(f"rank {r} wrote no part ({p}); rerun with --resume")
        t = load_tensors(p)
        idx, x = t["indices"].long(), t["images"]
        if images is None:
            images = torch.zeros(n_images, *x.shape[1:], dtype=x.dtype)
        images[idx] = x
        seen.index_add_(0, idx, torch.ones_like(idx))
        meta = load_tensors_metadata(p)
        seconds.append(float(meta.get("seconds", 0.0)))
        metrics.update({int(k): v for k, v in json.loads(meta.get("metrics", "{}")).items()})
    if images is None or bool((seen != 1).any()):
        bad = torch.nonzero(seen != 1).flatten().tolist()[:10]
        raise RuntimeError(f"the ranks' parts do not cover every image exactly once (e.g. images {bad})")
    return images, seconds, metrics


def recover_distributed(method: str, *, teacher: str, ipc: int, out: str, dataset: str | None = None,
                        data_root: str | None = None, download: bool = False, device: str = "auto",
                        resume: bool = False, force: bool = False, show_progress: bool = True,
                        checkpoint_every: int = 100, stop_after: int | None = None,
                        config: dict[str, Any] | None = None, **options: Any):
    """The torchrun path of :func:`decoct.methods.recover.recover` (see the module docstring)."""
    from .artifact import DistilledSet
    from .methods.recover import RUNTIME_KEYS, prepare
    from .report import save_grid
    from .runs import Run, resolve_artifact

    r, world = rank(), world_size()
    rec, data = prepare(method, teacher=teacher, ipc=ipc, dataset=dataset, data_root=data_root,
                        download=download, shard=(r, world), **options)  # every rank validates first
    dev = _rank_device(device)
    init_process_group(dev)
    try:
        run_cfg = dict(config) if config is not None else dict(method=method, teacher=str(teacher), ipc=ipc,
                                                                 out=str(out), dataset=dataset, **options)
        for k in RUNTIME_KEYS:
            run_cfg.pop(k, None)
        # rank 0 alone opens (checks, clears with --force, locks) the shared directory; it keeps
        # this Run, whose lock lasts until run.finish() or the end of the command
        run = Run.open(out, run_cfg, resume=resume, force=force) if r == 0 else None
        if run is not None and not run.done:
            run.log(event="start", method=method, world=world, batches=len(rec.batches_all))
        barrier()
        if run is None:
            run = Run(Path(out))
        if run.done:
            barrier()
            return DistilledSet.load(resolve_artifact(out)) if r == 0 else None
        sub = Run.open(shard_dir(out, r, world), run_cfg, resume=True, lock=True)  # each rank owns its shard
        finished = _run_shard(rec, sub, data, dev, checkpoint_every=checkpoint_every, stop_after=stop_after,
                              show_progress=show_progress and r == 0)
        flags = torch.tensor([1 if finished else 0], device=dev if dev.type == "cuda" else "cpu")
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)  # gloo: CPU tensor, nccl: CUDA tensor
        if int(flags) == 0:
            if r == 0:
                run.log(event="stopped", reason="a shard stopped early; rerun with --resume")
            barrier()
            return None
        result = None
        if r == 0:
            images, seconds, metrics = merge_parts(out, world, rec.n_images)
            rec.out = images
            rec.done = torch.ones(rec.n_images, dtype=torch.bool)
            rec.last_metrics = metrics
            result = rec.result()
            result.meta["world_size"] = world
            result.meta["seconds_per_rank"] = [round(s, 3) for s in seconds]
            result.meta["seconds"] = round(max(seconds), 3)
            result.save(run.artifact_dir, overwrite=True)
            save_grid(result.images, result.labels, run.path / "grid.png")
            run.log(event="finished", world=world, seconds=result.meta["seconds"], num_images=len(result))
            run.finish()
        barrier()
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
