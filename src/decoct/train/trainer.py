"""One trainer for teachers and evaluation students (the DC/DM/MTT evaluation protocol).

Data is held as whole tensors on the device (distilled sets are tiny; teachers' real sets
fit too), so an epoch is a permutation plus slicing: no DataLoader, no worker processes.
All randomness of a run (minibatch order, augmentation draws) comes from private
generators seeded from ``seed``, never from the global RNG, so the multi-student engines
in :mod:`decoct.train.multi` can reproduce a :func:`train_model` run exactly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from decoct.runtime.progress import progress as progress_bar

__all__ = [
    "SCHEDULES",
    "OPTIMIZERS",
    "Augment",
    "TrainConfig",
    "train_model",
    "evaluate_accuracy",
    "seeded_model",
    "lr_at",
    "make_generators",
    "make_optimizer",
    "target_loss",
]

SCHEDULES = ("step", "cosine", "constant")
OPTIMIZERS = ("sgd", "adamw")

# ``augment(x, generator) -> x``: per-sample random augmentation drawing from ``generator``.
Augment = Callable[[Tensor, torch.Generator], Tensor]

# Offset between the permutation and augmentation seeds, so the two streams differ.
_AUG_SEED_OFFSET = 0x9E3779B9


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run; defaults are the DC/DM evaluation protocol."""

    epochs: int = 1000
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    schedule: str = "step"
    optimizer: str = "sgd"
    label_smoothing: float = 0.0
    soft_temperature: float = 1.0
    amp: bool = False
    channels_last: bool = False
    eval_batch_size: int = 1024

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.momentum < 0 or self.weight_decay < 0:
            raise ValueError(f"momentum and weight_decay must be >= 0, got {self.momentum}, {self.weight_decay}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_size}, {self.eval_batch_size}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.soft_temperature <= 0:
            raise ValueError(f"soft_temperature must be > 0, got {self.soft_temperature}")


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate of (0-based) ``epoch``; a function so every engine follows one schedule.

    ``step``: x0.1 from epoch ``epochs // 2`` on (DC/DM; never for a 1-epoch run);
    ``cosine``: half-cosine from ``lr`` towards 0; ``constant``: ``lr``.
    """
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        return cfg.lr * (0.1 if epoch >= max(1, cfg.epochs // 2) else 1.0)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / max(1, cfg.epochs)))
    raise ValueError(f"unknown schedule {cfg.schedule!r}; known: {', '.join(SCHEDULES)}")


def make_optimizer(params: list[Tensor], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The run's optimizer; both are element-wise, which the stacked multi-student engines rely on."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; known: {', '.join(OPTIMIZERS)}")


def make_generators(seed: int, device: torch.device | str) -> tuple[torch.Generator, torch.Generator]:
    """(permutation generator on CPU, augmentation generator on ``device``) for ``seed``.

    The permutation is drawn on CPU so a run's minibatch order does not depend on the device;
    augmentation draws live on the device so per-sample parameters need no host transfer.
    """
    perm = torch.Generator(device="cpu")
    perm.manual_seed(int(seed))
    aug = torch.Generator(device=torch.device(device))
    aug.manual_seed((int(seed) + _AUG_SEED_OFFSET) % (2**63))
    return perm, aug


def seeded_model(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build ``factory()`` under ``torch.manual_seed(seed)`` without disturbing the global RNG.

    Every engine builds student r this way, so initialisation is identical across engines.
    """
    with torch.random.fork_rng():
        torch.manual_seed(int(seed))
        return factory()


def check_targets(images: Tensor, targets: Tensor) -> None:
    """Reject shapes/dtypes the loss would silently misread."""
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be float (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if len(targets) != len(images):
        raise ValueError(f"targets ({len(targets)}) and images ({len(images)}) differ in length")
    if targets.dim() == 1:
        if targets.is_floating_point():
            raise ValueError(f"hard labels must be integer (N,), got {targets.dtype}")
    elif targets.dim() == 2:
        if not targets.is_floating_point():
            raise ValueError(f"soft targets must be float (N, K), got {targets.dtype}")
    else:
        raise ValueError(f"targets must be (N,) labels or (N, K) soft targets, got {tuple(targets.shape)}")


def check_device(cfg: TrainConfig, device: torch.device | str) -> torch.device:
    """Resolve ``device``; refuse bf16 autocast off CUDA (about 20x slower on CPU here)."""
    dev = torch.device(device)
    if cfg.amp and dev.type != "cuda":
        raise ValueError(f"amp (bf16 autocast) is supported on CUDA only, got device {dev}")
    return dev


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast when ``cfg.amp`` (CUDA), else a no-op."""
    if cfg.amp:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def target_loss(out: Tensor, targets: Tensor, cfg: TrainConfig, batch: int) -> Tensor:
    """Summed per-sample loss divided by ``batch``.

    Written as a sum so that R students' outputs flattened to (R*B, K) give the sum of the
    R per-student batch means: each student's gradient is then exactly its own.
    Hard labels: cross-entropy (with label smoothing). Soft targets ``t`` are logits:
    ``KL(softmax(t/T) || softmax(out/T)) * T^2`` per sample (to train on probabilities ``p``
    at T=1 pass ``p.log()``; one-hot ``p`` then gives exactly cross-entropy).
    """
    out = out.float()
    if targets.dim() == 1:
        return F.cross_entropy(out, targets, label_smoothing=cfg.label_smoothing, reduction="sum") / batch
    if cfg.label_smoothing:
        raise ValueError("label_smoothing applies to hard labels only, got soft targets")
    T = cfg.soft_temperature
    p = F.softmax(targets.float() / T, dim=-1)
    log_q = F.log_softmax(out / T, dim=-1)
    return F.kl_div(log_q, p, reduction="sum") * (T * T) / batch


def minibatches(n: int, batch_size: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of each minibatch; the last, smaller one is kept (DC/DM do the same)."""
    for start in range(0, n, batch_size):
        yield start, min(start + batch_size, n)


def _format(x: Tensor, cfg: TrainConfig) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x


def train_model(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    cfg: TrainConfig,
    *,
    augment: Augment | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
    log: Callable[[dict], None] | None = None,
) -> nn.Module:
    """Train ``model`` in place on normalised ``images`` with hard labels or soft targets.

    The caller seeds and builds the model (see :func:`seeded_model`); ``seed`` only drives
    the minibatch order and ``augment(xb, generator)`` draws. ``log`` receives
    ``{"epoch", "lr", "loss"}`` after every epoch (``loss``: mean over minibatches).
    """
    check_targets(images, targets)
    dev = check_device(cfg, device)
    model.to(dev)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    x_all = images.to(dev, torch.float32)
    t_all = targets.to(dev)
    if t_all.is_floating_point():
        t_all = t_all.float()
    n = len(x_all)
    perm_gen, aug_gen = make_generators(seed, dev)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    model.train()
    want_loss = progress or log is not None
    # one bar over every image of every epoch: progress shows inside an epoch of a large set too
    bar = progress_bar(total=cfg.epochs * n, desc="train", enabled=progress, unit="img", span=f"{cfg.epochs} epochs")
    post: dict[str, str] = {}
    for epoch in range(cfg.epochs):
        post["epoch"] = f"{epoch + 1}/{cfg.epochs}"  # the epoch under way; loss and lr: the last finished one
        bar.set_postfix(post, refresh=False)
        lr = lr_at(cfg, epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        perm = torch.randperm(n, generator=perm_gen).to(dev)
        total = torch.zeros((), device=dev)
        steps = 0
        for start, stop in minibatches(n, cfg.batch_size):
            idx = perm[start:stop]
            xb, tb = x_all[idx], t_all[idx]
            if augment is not None:
                xb = augment(xb, aug_gen)
            with autocast(cfg, dev):
                out = model(_format(xb, cfg))
            loss = target_loss(out, tb, cfg, len(idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if want_loss:
                total += loss.detach()
            steps += 1
            bar.update(stop - start)
        if want_loss:
            mean_loss = total.item() / max(1, steps)
            post.update(loss=f"{mean_loss:.4f}", lr=f"{lr:.3g}")
            if log is not None:
                log({"epoch": epoch, "lr": lr, "loss": mean_loss})
    bar.close()
    return model


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    images_norm: Tensor,
    labels: Tensor,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    *,
    amp: bool = False,
    channels_last: bool = False,
) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (eval mode) on normalised images, batched."""
    dev = torch.device(device)
    if amp and dev.type != "cuda":
        raise ValueError(f"amp (bf16 autocast) is supported on CUDA only, got device {dev}")
    model.to(dev)
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=dev)
    for start, stop in minibatches(len(images_norm), batch_size):
        xb = images_norm[start:stop].to(dev, torch.float32)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with ctx:
            pred = model(xb).argmax(dim=-1)
        correct += (pred == labels[start:stop].to(dev)).sum()
    model.train(was_training)
    return correct.item() / max(1, len(images_norm))


@torch.no_grad()
def evaluate_split(model: nn.Module, split: Any, info: Any, batch_size: int = 256,
                   device: torch.device | str = "cpu", *, amp: bool = False, channels_last: bool = False,
                   workers: int | None = None, show_progress: bool = False) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on a test split, in memory or streamed.

    An in-memory :class:`~decoct.data.types.ImageSplit` goes through :func:`evaluate_accuracy`
    (normalised per batch). A streamed split (:class:`decoct.data.stream.StreamSplit`) is read
    through its validation view (Resize + CenterCrop) by DataLoader workers; under torchrun (a
    joined process group) rank r reads batches r, r + W, ... and the correct/total counts are
    summed with an all-reduce, so every rank returns exactly the single-process accuracy.
    """
    import torch.distributed as dist

    from decoct.data.types import normalize

    dev = torch.device(device)
    if not getattr(split, "streamed", False):
        correct = 0
        model_was = model.training
        for start, stop in minibatches(len(split), max(batch_size, 1)):
            x = normalize(split.images[start:stop], info, dev)
            correct += round(evaluate_accuracy(model, x, split.labels[start:stop], batch_size, dev, amp=amp,
                                               channels_last=channels_last) * (stop - start))
        model.train(model_was)
        return correct / max(1, len(split))
    if amp and dev.type != "cuda":
        raise ValueError(f"amp (bf16 autocast) is supported on CUDA only, got device {dev}")
    sharded = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    r, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    n_batches = -(-len(split) // batch_size)
    model.to(dev)
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.long, device=dev)
    bar = progress_bar(total=len(split), desc="validate", enabled=show_progress and r == 0, unit="img")
    for x, y, _ in split.loader("val", batch_size=batch_size, batches=range(r, n_batches, world), workers=workers):
        xb = normalize(x, info, dev)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with ctx:
            pred = model(xb).argmax(dim=-1)
        counts[0] += (pred == y.to(dev)).sum()
        counts[1] += len(y)
        bar.update(len(y) * world)
    bar.close()
    model.train(was_training)
    if sharded:
        dist.all_reduce(counts)
    return int(counts[0]) / max(1, int(counts[1]))
