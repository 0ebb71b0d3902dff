"""Squeeze: train (or wrap) a BatchNorm teacher, then record its BN-input statistics.

A teacher directory, written by :func:`squeeze` and read by :func:`~decoct.formats.teacher.load_teacher`
(the format and its checks: :mod:`decoct.formats.teacher`)::

    model.safetensors     the model's state dict (parameters and BN running buffers)
    bn_stats.safetensors  per BN layer ``<name>.*`` (see below), float32
    teacher.json          format/version, model name + kwargs, dataset info, train config,
                          test accuracy, BN layer list, sha256 of both safetensors files
    config.yaml, log.jsonl, checkpoint.pt (while training), DONE     (a :class:`~decoct.runtime.runs.Run`)
    stats-part<rank>.pt   while a streamed statistics pass runs: its running sums, so a rerun with
                          --resume continues the pass (:func:`collect_bn_stats_stream`)

BN statistics (``bn_stats.safetensors``), one set per BN layer ``<name>`` in module order, all
measured on the *input* of the layer, per channel, over (samples, H, W), with the biased (1/n)
variance, during one pass over the training set with the teacher in eval mode (so the network's
outputs and running buffers are unchanged):

* ``<name>.class_mean`` / ``<name>.class_var`` (K x C): LPLD's class statistics, i.e. for every
  batch and every class present in it, the moments of that class's rows, folded in by an exponential
  moving average with momentum 0.1 from the initial values 0 / 1 (docs/methods/lpld.md, What it
  does; this is what LPLD's recover matches, so it is the default target);
* ``<name>.class_mean_exact`` / ``<name>.class_var_exact`` (K x C): the exact pooled moments of
  each class over the whole pass (Chan's parallel update; offered as an option);
* ``<name>.class_count`` (K,): rows (images) of each class seen;
* ``<name>.mean`` / ``<name>.var`` (C,): exact moments over the whole pass, all classes.

SRe2L and DWA match the teacher's own ``running_mean`` / ``running_var`` (in ``model.safetensors``),
not these (docs/methods/dwa.md, What it does). The pass uses the teacher's training augmentation by
default, as LPLD does (its one pass uses the training preset: RandomResizedCrop + flip);
``stats_augment="none"`` gives the plain images. Everything is vectorised over classes with
``index_add_``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from decoct.data import Dataset, DatasetInfo, load_dataset, normalize
from decoct.data.views import rrc_boxes
from decoct.formats.teacher import (
    TEACHER_FORMAT,
    TEACHER_VERSION,
    BNStats,
    Teacher,
    TeacherError,
    bn_layers,
    load_teacher_full,
    save_bn_stats,
)
from decoct.models import MODELS, model_for
from decoct.runtime.health import DivergedError, rerun_hint
from decoct.runtime.io import (
    atomic_save_tensors,
    atomic_torch_save,
    atomic_write_json,
    safe_torch_load,
    sha256_file,
)
from decoct.runtime.runs import Run, RunError, progress
from decoct.train.trainer import (
    TrainConfig,
    autocast,
    check_device,
    evaluate_split,
    lr_at,
    make_generators,
    make_optimizer,
    minibatches,
    seeded_model,
    target_loss,
)

__all__ = [
    "AUGMENTS",
    "collect_bn_stats",
    "squeeze",
    "teacher_augment",
]

AUGMENTS = ("auto", "crop_flip", "crop", "rrc_flip", "none")
PRETRAINED = ("torchvision",)


# ---------------------------------------------------------------------------------------------
# teacher-training augmentation (per sample, vectorised, drawn from a generator)
def _random_crop(x: Tensor, pad: int, g: torch.Generator) -> Tensor:
    """Zero-pad by ``pad`` and take a random HxW window per sample (RandomCrop(size, padding))."""
    n, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=g.device).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=g.device).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None])  # (N, H)
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None])  # (N, W)
    ni = torch.arange(n, device=x.device)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[ni, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous(memory_format=torch.contiguous_format)


def _random_flip(x: Tensor, g: torch.Generator) -> Tensor:
    flip = torch.rand(len(x), generator=g, device=g.device).to(x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def crop_resize(x: Tensor, boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Crop each sample to its box (top, left, height, width) and resize bilinearly to ``size``.

    Implemented with one ``grid_sample``, sampling exactly where ``F.interpolate(crop, size,
    mode="bilinear", align_corners=False)`` samples each crop (torchvision's tensor
    RandomResizedCrop; antialiasing only matters when shrinking, and crops are never larger than
    the output here), without a Python loop over samples.
    """
    n, _, h, w = x.shape
    b = boxes.to(x.device, torch.float32)
    top, left, bh, bw = b.unbind(1)
    oh, ow = size
    # pixel-centre coordinates of the output grid inside the crop, mapped to [-1, 1] of the input
    ys = (torch.arange(oh, device=x.device, dtype=torch.float32) + 0.5) / oh
    xs = (torch.arange(ow, device=x.device, dtype=torch.float32) + 0.5) / ow
    py = top[:, None] + ys[None] * bh[:, None]  # (N, oh) in input pixels (edge coordinates)
    px = left[:, None] + xs[None] * bw[:, None]
    # like interpolate, never sample outside the crop: clamp to its first/last pixel centre
    py = torch.minimum(torch.maximum(py, (top + 0.5)[:, None]), (top + bh - 0.5)[:, None])
    px = torch.minimum(torch.maximum(px, (left + 0.5)[:, None]), (left + bw - 0.5)[:, None])
    gy = py / h * 2 - 1
    gx = px / w * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(n, oh, ow), gy[:, :, None].expand(n, oh, ow)], -1)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)


def resolve_augment(augment: str, info: DatasetInfo) -> str:
    """``auto``: random crop (pad H/8) + flip up to 32 px (CIFAR recipe), RandomResizedCrop +
    flip above (Tiny/ImageNet recipe); no flip for 1-channel data (digits are not mirror-symmetric)."""
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment {augment!r}; known: {', '.join(AUGMENTS)}")
    if augment != "auto":
        return augment
    if info.channels == 1:
        return "crop"
    return "crop_flip" if info.height <= 32 else "rrc_flip"


def teacher_augment(kind: str, info: DatasetInfo):
    """The per-sample augmentation ``f(x, generator) -> x`` for teacher training / the stats pass."""
    kind = resolve_augment(kind, info)
    pad = max(1, info.height // 8)

    def crop_flip(x: Tensor, g: torch.Generator) -> Tensor:
        return _random_flip(_random_crop(x, pad, g), g)

    def crop(x: Tensor, g: torch.Generator) -> Tensor:
        return _random_crop(x, pad, g)

    def rrc_flip(x: Tensor, g: torch.Generator) -> Tensor:
        boxes = rrc_boxes(len(x), x.shape[2], x.shape[3], g)
        return _random_flip(crop_resize(x, boxes, (x.shape[2], x.shape[3])), g)

    return {"crop_flip": crop_flip, "crop": crop, "rrc_flip": rrc_flip, "none": None}[kind]


# ---------------------------------------------------------------------------------------------
# BN statistics


def _moments(x: Tensor, y: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class (count of values, mean, M2 = sum of squared deviations) of a BN input, per channel.

    ``x`` (N, C, *spatial) float, ``y`` (N,) labels. Returns n (K,), mean (K, C), M2 (K, C),
    float64; classes absent from the batch have n = 0, mean = 0, M2 = 0. Per sample and channel
    only two cheap reductions are taken (the sum and the sum of squares, as a squared vector norm:
    ~10x faster on CPU than ``var_mean``), the within-sample M2 is formed in float64, and the
    per-sample moments are pooled per class with ``index_add_`` (Chan's formula): no loop over
    classes. The float32 sum of squares loses ~1e-7 of ``mean^2`` per value to cancellation, an
    absolute error far below anything the BN-matching loss can notice.
    """
    x = x.float()
    per = x[0, 0].numel()  # values per channel per sample
    flat = x.flatten(2) if x.dim() > 2 else x.unsqueeze(2)  # (N, C, per)
    s_i = flat.sum(2).double()
    q_i = torch.linalg.vector_norm(flat, 2, dim=2).double().square()
    m_i = s_i / per
    m2_i = (q_i - s_i * m_i).clamp(min=0)
    k, c = num_classes, x.shape[1]
    cnt = torch.zeros(k, device=x.device, dtype=torch.float64).index_add_(
        0, y, torch.ones_like(y, dtype=torch.float64)) * per
    tot = torch.zeros(k, c, device=x.device, dtype=torch.float64).index_add_(0, y, m_i * per)
    mean = tot / cnt.clamp(min=1)[:, None]
    dev = m_i - mean[y]
    m2 = torch.zeros(k, c, device=x.device, dtype=torch.float64).index_add_(0, y, m2_i + per * dev.square())
    return cnt, mean, m2


def _chan(n_a: Tensor, mean_a: Tensor, m2_a: Tensor, n_b: Tensor, mean_b: Tensor, m2_b: Tensor):
    """Combine two sets of moments (Chan et al.'s parallel update), vectorised over rows."""
    n = n_a + n_b
    safe = n.clamp(min=1)[..., None]
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b[..., None] / safe)
    m2 = m2_a + m2_b + delta.square() * (n_a * n_b)[..., None] / safe
    return n, mean, m2


def ema_plan(ordered_labels: Tensor, batch_size: int, num_classes: int) -> tuple[Tensor, Tensor]:
    """For LPLD's per-class EMA over the batches of one pass, in closed form.

    ``ordered_labels`` (N,) are the labels in the pass's order, cut into batches of ``batch_size``.
    Returns ``after`` (B, K) int32: for batch b and class c, how many *later* batches hold class c;
    and ``updates`` (K,): how many batches hold class c. The sequential update
    ``ema <- (1 - m) ema + m v_b`` over the batches holding c equals
    ``(1 - m)^updates_c ema_0 + sum_b m (1 - m)^after[b, c] v_b[c]``: each batch's term depends only on
    the labels, so any process can fold in any batch in any order and the sums add up across
    torchrun ranks to exactly the single-process EMA.
    """
    n = len(ordered_labels)
    nb = -(-n // batch_size)
    bidx = torch.arange(n) // batch_size
    present = torch.zeros(nb, num_classes, dtype=torch.int32)
    present[bidx, ordered_labels.long()] = 1
    updates = present.sum(0)
    after = updates[None, :] - present.cumsum(0)
    return after, updates


class _StatsCollector:
    """Forward pre-hooks on every BN layer that fold the layer's input moments into running sums.

    Before each forward pass set ``labels`` (the batch's, on the device) and ``batch`` (its number
    in the pass, for the EMA weights of :func:`ema_plan`). :meth:`reduce` sums the parts of a
    sharded pass across ranks.
    """

    def __init__(self, model: nn.Module, num_classes: int, momentum: float, device: torch.device,
                 after: Tensor, updates: Tensor) -> None:
        self.layers = bn_layers(model)
        if not self.layers:
            raise TeacherError("the model has no BatchNorm layers: there are no BN statistics to record "
                               "(use a BN model, e.g. convnet_bn or resnet18)")
        self.k, self.m = num_classes, momentum
        self.labels: Tensor | None = None
        self.after, self.updates = after, updates
        self.device = device
        self._batch = 0
        self._ema_weight = torch.zeros(num_classes, device=device, dtype=torch.float64)  # set with each batch
        self.acc: dict[str, dict[str, Tensor]] = {}
        for name, mod in self.layers:
            c = mod.num_features
            z = lambda *s: torch.zeros(*s, device=device, dtype=torch.float64)  # noqa: E731
            self.acc[name] = dict(n=z(num_classes), mean=z(num_classes, c), m2=z(num_classes, c),
                                  ema_mean=z(num_classes, c), ema_var=z(num_classes, c), rows=z(num_classes))
        self.handles = [mod.register_forward_pre_hook(self._hook(name)) for name, mod in self.layers]

    @property
    def batch(self) -> int:
        """The number in the pass of the batch being forwarded."""
        return self._batch

    @batch.setter
    def batch(self, b: int) -> None:
        # the batch's EMA weight per class, m (1 - m)^after (ema_plan): once per batch, not per BN layer
        self._batch = b
        self._ema_weight = self.m * (1 - self.m) ** self.after[b].to(self.device, torch.float64)

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            if self.labels is None:
                return
            x, y = inputs[0], self.labels
            a = self.acc[name]
            n_b, mean_b, m2_b = _moments(x, y, self.k)
            a["n"], a["mean"], a["m2"] = _chan(a["n"], a["mean"], a["m2"], n_b, mean_b, m2_b)
            a["rows"] += torch.bincount(y, minlength=self.k).to(torch.float64)
            present = (n_b > 0).to(torch.float64)
            w = (present * self._ema_weight)[:, None]
            a["ema_mean"] += w * mean_b
            a["ema_var"] += w * (m2_b / n_b.clamp(min=1)[:, None])
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def reduce(self) -> None:
        """Sum every rank's part (torch.distributed, one group): exact pooled moments, EMA sums."""
        import torch.distributed as dist

        for name, _ in self.layers:
            a = self.acc[name]
            for key in ("ema_mean", "ema_var", "rows"):
                dist.all_reduce(a[key])
            n_all = a["n"].clone()
            dist.all_reduce(n_all)
            total = a["mean"] * a["n"][:, None]
            dist.all_reduce(total)
            mean = total / n_all.clamp(min=1)[:, None]
            m2 = a["m2"] + a["n"][:, None] * (a["mean"] - mean).square()
            dist.all_reduce(m2)
            a["n"], a["mean"], a["m2"] = n_all, mean, m2

    def result(self) -> BNStats:
        stats: dict[str, dict[str, Tensor]] = {}
        decay = ((1 - self.m) ** self.updates.to(torch.float64))[:, None]
        for name, _ in self.layers:
            a = self.acc[name]
            n_all = a["n"].sum()
            tot_mean = (a["mean"] * a["n"][:, None]).sum(0) / n_all.clamp(min=1)
            m2_all = (a["m2"] + a["n"][:, None] * (a["mean"] - tot_mean).square()).sum(0)
            ema_mean = a["ema_mean"].cpu()  # + decay * 0 (the EMA starts from mean 0 ...)
            ema_var = a["ema_var"].cpu() + decay  # ... and variance 1)
            stats[name] = dict(
                mean=tot_mean.float().cpu(), var=(m2_all / n_all.clamp(min=1)).float().cpu(),
                class_mean=ema_mean.float(), class_var=ema_var.float(),
                class_mean_exact=a["mean"].float().cpu(),
                class_var_exact=(a["m2"] / a["n"].clamp(min=1)[:, None]).float().cpu(),
                class_count=a["rows"].round().long().cpu())
        return BNStats([n for n, _ in self.layers], stats, self.k, self.m)


def _check_labels(labels: Tensor, info: DatasetInfo) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= info.num_classes):
        raise ValueError(f"labels must lie in [0, {info.num_classes}), got [{int(labels.min())}, {int(labels.max())}]")


def _prepare_model(model: nn.Module, dev: torch.device, amp: bool, channels_last: bool) -> None:
    if amp and dev.type != "cuda":
        raise ValueError(f"amp (bf16 autocast) is supported on CUDA only, got device {dev}")
    model.to(dev).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)


def _forward(model: nn.Module, col: _StatsCollector, x: Tensor, y: Tensor, batch: int, amp: bool,
             channels_last: bool) -> None:
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    col.labels, col.batch = y, batch
    ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if amp else _null()
    with ctx:
        model(x)


@torch.no_grad()
def collect_bn_stats(model: nn.Module, images: Tensor, labels: Tensor, info: DatasetInfo, *,
                     batch_size: int = 256, augment: str = "none", momentum: float = 0.1, seed: int = 0,
                     device: torch.device | str = "cpu", amp: bool = False, channels_last: bool = False,
                     show_progress: bool = False) -> BNStats:
    """One pass over uint8 ``images`` with ``model`` in eval mode, recording BN-input statistics.

    Batches follow a seeded random order (as LPLD's sampler shuffles), which matters only for
    the EMA class statistics; the exact ones do not depend on the order. The model's outputs
    and its running buffers are left untouched (eval mode).
    """
    dev = torch.device(device)
    _check_labels(labels, info)
    _prepare_model(model, dev, amp, channels_last)
    perm_gen, aug_gen = make_generators(seed, dev)
    aug = teacher_augment(augment, info)
    order = torch.randperm(len(labels), generator=perm_gen)
    after, updates = ema_plan(labels[order], batch_size, info.num_classes)
    col = _StatsCollector(model, info.num_classes, momentum, dev, after, updates)
    try:
        bar = progress(total=len(labels), desc="bn stats", enabled=show_progress, unit="img")
        for b, (start, stop) in enumerate(minibatches(len(labels), batch_size)):
            idx = order[start:stop]
            x = normalize(images[idx], info, dev)
            if aug is not None:
                x = aug(x, aug_gen)
            _forward(model, col, x, labels[idx].to(dev), b, amp, channels_last)
            bar.update(stop - start)
        bar.close()
    finally:
        col.labels = None
        col.remove()
    return col.result()


STREAM_VIEWS = {"rrc_flip": "train", "none": "val"}


@torch.no_grad()
def collect_bn_stats_stream(model: nn.Module, split: Any, info: DatasetInfo, *, batch_size: int = 256,
                            augment: str = "rrc_flip", momentum: float = 0.1, seed: int = 0,
                            device: torch.device | str = "cpu", amp: bool = False, channels_last: bool = False,
                            workers: int | None = None, show_progress: bool = False,
                            checkpoint: str | Path | None = None, checkpoint_every: int = 200,
                            stop_after: int | None = None) -> BNStats | None:
    """:func:`collect_bn_stats` over a streamed split (:class:`decoct.data.stream.StreamSplit`).

    ``augment``: ``rrc_flip`` decodes the references' training view (RandomResizedCrop + flip,
    LPLD's statistics pass), ``none`` the validation view. The order is the same seeded
    permutation as in memory. Under torchrun (a joined process group of W ranks) rank r reads the
    batches r, r + W, ... and the parts are summed (:meth:`_StatsCollector.reduce`): every rank
    returns the statistics one process computes, up to float64 rounding. Returns BNStats.

    ``checkpoint`` (a file, one per rank): the pass saves its running sums there (atomically,
    float64 tensors only) every ``checkpoint_every`` of this rank's batches, and a pass that finds
    the file continues after the batches it holds, giving the statistics an uninterrupted pass gives
    bit for bit; a file of another pass (batch size, seed, view, momentum, ranks, layers) is refused
    with a ValueError. ``stop_after`` ends the pass after that many batches of this call, saving the
    checkpoint, and returns None (tests; an interruption).
    """
    import torch.distributed as dist

    if augment not in STREAM_VIEWS:
        raise ValueError(f"a streamed statistics pass supports augment {' or '.join(STREAM_VIEWS)}, got {augment!r} "
                         "(the crop/pad recipes are for small in-memory images)")
    dev = torch.device(device)
    labels = split.labels
    _check_labels(labels, info)
    _prepare_model(model, dev, amp, channels_last)
    perm_gen, _ = make_generators(seed, "cpu")
    order = torch.randperm(len(labels), generator=perm_gen)
    after, updates = ema_plan(labels[order], batch_size, info.num_classes)
    sharded = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    r, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    n_batches = len(after)
    mine = range(r, n_batches, world)
    col = _StatsCollector(model, info.num_classes, momentum, dev, after, updates)
    key = dict(num_images=len(labels), batch_size=batch_size, seed=seed, augment=augment, momentum=momentum,
               rank=r, world=world, layers=[n for n, _ in col.layers])
    start = _resume_stats(col, Path(checkpoint), key) if checkpoint is not None else 0
    todo = mine[start:]
    loader = split.loader(STREAM_VIEWS[augment], batch_size=batch_size, order=order, batches=todo, seed=seed,
                          workers=workers)
    sizes = [min(batch_size, len(labels) - b * batch_size) for b in mine]
    stopped = False
    try:
        bar = progress(total=sum(sizes), initial=sum(sizes[:start]), desc="bn stats", enabled=show_progress,
                       unit="img")
        for done, (x, y, pos) in enumerate(loader, start + 1):
            _forward(model, col, normalize(x, info, dev), y.to(dev), int(pos[0]) // batch_size, amp, channels_last)
            bar.update(len(y))
            stopped = stop_after is not None and done - start >= stop_after and done < len(mine)
            if checkpoint is not None and done < len(mine) and (done % checkpoint_every == 0 or stopped):
                atomic_torch_save(checkpoint, {**key, "done": done, "acc": col.acc})
            if stopped:
                break
        bar.close()
    finally:
        col.labels = None
        col.remove()
    if stopped:
        return None
    if sharded:
        col.reduce()
    return col.result()


def _resume_stats(col: _StatsCollector, path: Path, key: dict[str, Any]) -> int:
    """Load a statistics-pass checkpoint into ``col``; the number of this rank's batches it holds
    (0 when there is none). A checkpoint of another pass is refused, naming what differs."""
    if not path.exists():
        return 0
    state = safe_torch_load(path)
    if not isinstance(state, dict) or "acc" not in state or "done" not in state:
        raise ValueError(f"{path}: not a statistics-pass checkpoint; delete it to start the pass over")
    differs = {k: (state.get(k), v) for k, v in key.items() if state.get(k) != v}
    if differs:
        what = ", ".join(f"{k} {a!r} (now {b!r})" for k, (a, b) in differs.items())
        raise ValueError(f"{path} holds a statistics pass with other settings: {what}; delete it to start over")
    for name, parts in col.acc.items():
        for k, t in parts.items():
            saved = state["acc"][name][k]
            if saved.shape != t.shape:
                raise ValueError(f"{path}: layer {name} {k} has shape {tuple(saved.shape)}, the model needs "
                                 f"{tuple(t.shape)}")
            t.copy_(saved)
    return int(state["done"])


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ---------------------------------------------------------------------------------------------
@dataclass
class SqueezeConfig:
    """Everything that defines a squeeze run (saved in config.yaml / teacher.json)."""

    dataset: str
    model: str = "convnet_bn"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    weights: str | None = None
    epochs: int = 30
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    schedule: str = "cosine"
    optimizer: str = "sgd"
    label_smoothing: float = 0.0
    augment: str = "auto"
    stats_augment: str = "train"
    stats_batch_size: int = 256
    stats_momentum: float = 0.1
    seed: int = 0
    amp: bool = False
    channels_last: bool = False

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, lr=self.lr, momentum=self.momentum,
                           weight_decay=self.weight_decay, batch_size=self.batch_size, schedule=self.schedule,
                           optimizer=self.optimizer, label_smoothing=self.label_smoothing, amp=self.amp,
                           channels_last=self.channels_last)


_TRAINING_ONLY = ("pretrained", "weights", "epochs", "lr", "momentum", "weight_decay", "batch_size", "schedule",
                  "optimizer", "label_smoothing", "augment")
"""SqueezeConfig keys that only training uses: teacher.json leaves them out of ``train`` for a teacher
wrapped from --weights / --pretrained (its ``weights`` / ``pretrained`` keys say where it came from)."""


def _check_config(cfg: SqueezeConfig) -> None:
    if cfg.model not in MODELS:
        raise ValueError(f"unknown model {cfg.model!r}; known: {', '.join(MODELS.names())}")
    if cfg.pretrained is not None and cfg.weights is not None:
        raise ValueError("pass either --pretrained or --weights FILE, not both")
    if cfg.pretrained is not None and cfg.pretrained not in PRETRAINED:
        raise ValueError(f"unknown pretrained source {cfg.pretrained!r}; known: {', '.join(PRETRAINED)}")
    if cfg.augment not in AUGMENTS:
        raise ValueError(f"unknown augment {cfg.augment!r}; known: {', '.join(AUGMENTS)}")
    if cfg.stats_augment not in ("train", *AUGMENTS):
        raise ValueError(f"unknown stats_augment {cfg.stats_augment!r}; known: train, {', '.join(AUGMENTS)}")
    if cfg.stats_batch_size < 1:
        raise ValueError(f"stats_batch_size must be >= 1, got {cfg.stats_batch_size}")
    if not 0 < cfg.stats_momentum <= 1:
        raise ValueError(f"stats_momentum must be in (0, 1], got {cfg.stats_momentum}")
    cfg.train_config()  # validates epochs, lr, ...


def _torchvision_weights(model_name: str) -> tuple[Path, str]:
    """Path of torchvision's cached ImageNet checkpoint for ``model_name`` (never downloads)."""
    import torchvision

    weights = {"resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
               "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1}
    if model_name not in weights:
        raise ValueError(f"--pretrained torchvision exists for {', '.join(weights)}, not {model_name!r}")
    url = weights[model_name].url
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    return path, url


def _check_imagenet_model(model: nn.Module, cfg: SqueezeConfig, info: DatasetInfo, what: str) -> None:
    if info.channels != 3:
        raise ValueError(f"{what} take RGB input; dataset {info.name!r} has {info.channels} channel(s)")
    if not hasattr(model, "net") or getattr(model, "config", {}).get("stem") != "imagenet":
        raise ValueError(f"{what} fit torchvision's resnet18/resnet50 with the ImageNet stem: pass --model resnet18 "
                         "or resnet50 (the ImageNet stem is chosen for images larger than 64 px, or --model-kwargs "
                         "stem=imagenet)")


def _fit_classes(state: Any, info: DatasetInfo, subset_of: tuple[int, ...] | None, what: str) -> None:
    """Keep the classifier rows of a class subset (``subset_of``: the classes' indices in the full tree)."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(f"{what}: not a state dict of tensors (torchvision's published .pth files are)")
    w = state.get("fc.weight")
    if w is None or w.shape[0] == info.num_classes:
        return
    if subset_of is None or len(subset_of) != info.num_classes or max(subset_of) >= w.shape[0]:
        raise ValueError(f"{what} classify {w.shape[0]} classes, the dataset has {info.num_classes}; for a class "
                         "subset of the weights' tree pass --classes A:B on that tree")
    rows = torch.as_tensor(subset_of, dtype=torch.long)
    state["fc.weight"] = w[rows].contiguous()
    if "fc.bias" in state:
        state["fc.bias"] = state["fc.bias"][rows].contiguous()


def _load_state(model: nn.Module, state: dict[str, Tensor], what: str) -> None:
    try:
        model.net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()
        raise ValueError(f"{what} do not fit the model: {' '.join(first[:3])[:400]}") from None


def _load_pretrained(model: nn.Module, cfg: SqueezeConfig, info: DatasetInfo,
                     subset_of: tuple[int, ...] | None = None) -> None:
    path, url = _torchvision_weights(cfg.model)
    what = "torchvision's ImageNet weights"
    _check_imagenet_model(model, cfg, info, what)
    if not path.exists():
        raise FileNotFoundError(f"torchvision weights for {cfg.model} are not cached at {path}; decoct never "
                                f"downloads them itself: fetch {url} into that directory (or set TORCH_HOME), "
                                "or pass the file with --weights FILE")
    state = torch.load(path, map_location="cpu", weights_only=True)
    _fit_classes(state, info, subset_of, what)
    _load_state(model, state, what)


def load_weights_file(model: nn.Module, path: str | Path, cfg: SqueezeConfig, info: DatasetInfo,
                      subset_of: tuple[int, ...] | None = None) -> None:
    """Load a torchvision ResNet state dict from ``path`` (``.safetensors``, or a ``.pth``/``.pt`` read with
    ``weights_only=True``: never unpickled) into ``model``.

    A 1000-way classifier is cut to a class subset's rows (``subset_of``, from ``--classes`` on the
    ImageNet tree). Raises FileNotFoundError / ValueError naming the file and what does not fit.
    """
    p = Path(path).expanduser()
    what = f"weights {p}"
    if not p.is_file():
        raise FileNotFoundError(f"--weights {p}: no such file (torchvision's resnet18-f37072fd.pth, "
                                "resnet50-0676ba61.pth, or a .safetensors of the same state dict)")
    _check_imagenet_model(model, cfg, info, what)
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(p))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{what}: not a readable safetensors file ({e})") from None
    else:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses anything but tensors and plain containers
            raise ValueError(f"{what}: not a weights-only torch checkpoint ({str(e).splitlines()[0][:200]})") from None
    _fit_classes(state, info, subset_of, what)
    _load_state(model, state, what)


def _train_teacher(model: nn.Module, data: Dataset, cfg: SqueezeConfig, run: Run, dev: torch.device, *,
                   checkpoint_every: int, stop_after: int | None, show_progress: bool) -> tuple[bool, float]:
    """Train with the trainer's schedule/optimizer/loss, checkpointing every ``checkpoint_every`` epochs.

    A loop of its own (not :func:`decoct.train.train_model`) so it can checkpoint and resume to a
    bit-identical result: model, optimizer and both generators' states are saved. Returns
    (finished, seconds spent).
    """
    tc = cfg.train_config()
    check_device(tc, dev)
    info = data.info
    model.to(dev)
    if tc.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], tc)
    perm_gen, aug_gen = make_generators(cfg.seed, dev)
    aug = teacher_augment(cfg.augment, info)
    images = data.train.images.to(dev) if dev.type == "cuda" else data.train.images
    labels = data.train.labels.to(dev)
    start, elapsed = 0, 0.0
    ckpt = run.load_checkpoint()
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        perm_gen.set_state(ckpt["perm_gen"])
        aug_gen.set_state(ckpt["aug_gen"].to(aug_gen.get_state().device))
        start, elapsed = int(ckpt["epoch"]), float(ckpt["elapsed"])
        run.log(event="resumed", epoch=start)
    t0 = time.perf_counter()
    n = len(labels)
    # one bar over every image of every epoch (progress inside an epoch: a CPU epoch takes minutes)
    bar = progress(total=tc.epochs * n, initial=start * n, desc="squeeze", enabled=show_progress, unit="img",
                   span=f"{tc.epochs - start} epochs", log=run.log)
    hint = rerun_hint(("--lr", tc.lr))
    post: dict[str, str] = {}
    done_here = 0
    for epoch in range(start, tc.epochs):
        model.train()
        lr = lr_at(tc, epoch)
        for g in opt.param_groups:
            g["lr"] = lr
        perm = torch.randperm(n, generator=perm_gen)
        total = torch.zeros((), device=dev)
        post["epoch"] = f"{epoch + 1}/{tc.epochs}"  # the epoch under way; loss and lr: the last finished one
        bar.set_postfix(post, refresh=False)
        for step, (s, e) in enumerate(minibatches(n, tc.batch_size)):
            idx = perm[s:e]
            xb = normalize(images[idx.to(images.device)], info, dev)
            if aug is not None:
                xb = aug(xb, aug_gen)
            if tc.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with autocast(tc, dev):
                out = model(xb)
            loss = target_loss(out, labels[idx.to(dev)], tc, len(idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
            bar.update(e - s)
            if step % 20 == 19 and not bool(torch.isfinite(total)):  # a cheap sync every 20 batches
                _diverged(run, bar, f"epoch {epoch + 1}, batch {step + 1}", float(total), hint)
        steps = math.ceil(n / tc.batch_size)
        mean_loss = total.item() / max(1, steps)
        run.log(event="epoch", epoch=epoch + 1, lr=lr, loss=mean_loss)
        if not math.isfinite(mean_loss):
            _diverged(run, bar, f"epoch {epoch + 1}", mean_loss, hint)
        post.update(loss=f"{mean_loss:.4f}", lr=f"{lr:.3g}")
        done_here += 1
        last = epoch + 1 == tc.epochs
        stop = stop_after is not None and done_here >= stop_after and not last
        if not last and ((epoch + 1) % checkpoint_every == 0 or stop):
            run.save_checkpoint({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                                 "perm_gen": perm_gen.get_state(), "aug_gen": aug_gen.get_state().cpu(),
                                 "elapsed": elapsed + time.perf_counter() - t0})
        if stop:
            bar.close()
            run.log(event="stopped", epoch=epoch + 1)
            return False, elapsed + time.perf_counter() - t0
    bar.close()
    return True, elapsed + time.perf_counter() - t0


def _diverged(run: Run, bar: Any, where: str, loss: float, hint: str) -> None:
    """Stop teacher training: a non-finite loss would only give a NaN teacher (logged, no checkpoint)."""
    err = DivergedError("squeeze", where, "the training loss", loss, hint)
    bar.close()
    run.log(**err.event())
    raise err


def squeeze(dataset: str | Dataset, model: str = "convnet_bn", *, out: str | Path, epochs: int = 30,
            lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 128,
            schedule: str = "cosine", optimizer: str = "sgd", label_smoothing: float = 0.0,
            augment: str = "auto", model_kwargs: dict[str, Any] | None = None, pretrained: str | None = None,
            weights: str | None = None, stats_augment: str = "train", stats_batch_size: int = 256,
            stats_momentum: float = 0.1, seed: int = 0, device: str | torch.device = "auto", amp: bool = False,
            channels_last: bool = False, data_root: str | None = None, download: bool = False,
            data_options: dict[str, Any] | None = None, resume: bool = False, force: bool = False,
            show_progress: bool = True, checkpoint_every: int = 1, stop_after: int | None = None,
            config: dict[str, Any] | None = None) -> Teacher | None:
    """Train a teacher on ``dataset`` (or wrap ImageNet weights) and record BN stats.

    Writes the teacher directory ``out`` (see the module docstring) and returns the loaded
    :class:`Teacher`. Defaults are a CPU-sized ConvNet-BN recipe; DWA's CIFAR teacher is
    ``model="resnet18", epochs=200, lr=0.1, batch_size=128, weight_decay=5e-4`` (configs/decoupled).
    ``weights`` (a local torchvision state-dict file) or ``pretrained="torchvision"`` (torch hub's
    cache) wrap ImageNet weights without training. ``data_options`` go to
    :func:`~decoct.data.load_dataset` (``data_mode``, ``classes``, ``workers`` for ``imagenet``).
    A streamed dataset is validated and its statistics collected per batch
    (:func:`collect_bn_stats_stream`); under torchrun both passes are sharded across the ranks and
    rank 0 writes the teacher (other ranks return None).
    A finished directory is reused unless ``force``; an interrupted one needs ``resume``.
    ``stop_after`` ends training after that many epochs of this call with a checkpoint (tests).
    """
    from decoct.data import is_streamed
    from decoct.runtime.distributed import (
        barrier,
        init_process_group,
        rank,
        rank_device,
        resolve_device,
        world_size,
    )

    name = dataset if isinstance(dataset, str) else dataset.info.name
    cfg = SqueezeConfig(dataset=name, model=model, model_kwargs=dict(model_kwargs or {}), pretrained=pretrained,
                        weights=str(weights) if weights is not None else None,
                        epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay, batch_size=batch_size,
                        schedule=schedule, optimizer=optimizer, label_smoothing=label_smoothing, augment=augment,
                        stats_augment=stats_augment, stats_batch_size=stats_batch_size,
                        stats_momentum=stats_momentum, seed=seed, amp=amp, channels_last=channels_last)
    _check_config(cfg)
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    world = world_size()
    if world > 1:
        dev = rank_device(str(device))
    else:
        dev = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    if amp and dev.type != "cuda":
        raise ValueError(f"amp (bf16 autocast) is supported on CUDA only, got device {dev}")
    run_cfg = config if config is not None else asdict(cfg)
    done = (Path(out) / "DONE").exists() and not force
    if done:
        if world > 1 and rank() != 0:
            return None
        run = Run.open(out, run_cfg, resume=resume, force=force)
        return load_teacher_full(run.path, dev)
    # everything that can fail on bad input fails here, before the run directory is created
    data = dataset if isinstance(dataset, Dataset) else load_dataset(name, root=data_root, download=download,
                                                                   **(data_options or {}))
    info = data.info
    net = seeded_model(lambda: model_for(cfg.model, info, **cfg.model_kwargs), seed)
    if not bn_layers(net):
        raise ValueError(f"model {cfg.model!r} {cfg.model_kwargs} has no BatchNorm layer; squeeze needs one "
                         "(e.g. convnet_bn, resnet18)")
    wrapped = cfg.pretrained or cfg.weights
    if cfg.weights:
        load_weights_file(net, cfg.weights, cfg, info, data.subset_of)
    elif pretrained:
        _load_pretrained(net, cfg, info, data.subset_of)
    streamed = is_streamed(data)
    if streamed and not wrapped:
        raise ValueError("training a teacher on a streamed dataset is not supported: pass --weights FILE "
                         "(torchvision's ImageNet weights) or --pretrained torchvision, or --data-mode memory")
    if world > 1 and not streamed:
        raise ValueError("squeeze under torchrun needs streamed data (it shards the streamed passes of a "
                         "--weights/--pretrained teacher): add --data-mode stream (--data-mode auto holds a dataset "
                         "this small in memory), or run an in-memory squeeze in one process")
    st_aug = cfg.augment if cfg.stats_augment == "train" else cfg.stats_augment
    if streamed:  # the streamed pass decodes the references' views: RandomResizedCrop + flip, or plain
        st_aug = "rrc_flip" if st_aug == "auto" else st_aug
        if st_aug not in STREAM_VIEWS:
            raise ValueError(f"a streamed statistics pass supports --stats-augment rrc_flip or none (or auto/train), "
                             f"got {st_aug!r}: the crop/pad recipes are for small in-memory images")
    lead = world == 1 or rank() == 0
    if world > 1:
        init_process_group(dev)
    try:
        run = Run.open(out, run_cfg, resume=resume, force=force) if lead else None
        if world > 1:
            barrier()
        if wrapped:
            finished, seconds = True, 0.0
            if run is not None:
                run.log(event="pretrained", source=cfg.weights or pretrained, model=cfg.model, world=world)
        else:
            run.log(event="start", model=cfg.model, epochs=cfg.epochs, dataset=info.name)
            finished, seconds = _train_teacher(net, data, cfg, run, dev, checkpoint_every=checkpoint_every,
                                               stop_after=stop_after, show_progress=show_progress)
        if not finished:
            return Teacher(net.eval(), info, {"unfinished": True, "model": cfg.model}, None, run.path)
        acc = None
        t_val = time.perf_counter()
        if len(data.test):
            acc = evaluate_split(net, data.test, info, cfg.stats_batch_size, dev, amp=amp, channels_last=channels_last,
                                 show_progress=show_progress and lead)
        val_seconds = time.perf_counter() - t_val
        if run is not None:
            run.log(event="trained", test_accuracy=acc, seconds=round(seconds, 2), val_seconds=round(val_seconds, 2))
        t1 = time.perf_counter()
        if streamed:  # hours at ImageNet scale: each rank checkpoints its part of the pass in the run directory
            part = Path(out) / f"stats-part{rank() if world > 1 else 0}.pt"
            stats = collect_bn_stats_stream(net, data.train, info, batch_size=cfg.stats_batch_size, augment=st_aug,
                                            momentum=cfg.stats_momentum, seed=seed + 1, device=dev, amp=amp,
                                            channels_last=channels_last, show_progress=show_progress and lead,
                                            checkpoint=part)
            part.unlink(missing_ok=True)
        else:
            stats = collect_bn_stats(net, data.train.images, data.train.labels, info,
                                     batch_size=cfg.stats_batch_size, augment=st_aug, momentum=cfg.stats_momentum,
                                     seed=seed + 1, device=dev, amp=amp, channels_last=channels_last,
                                     show_progress=show_progress)
        stats_seconds = time.perf_counter() - t1
        if run is None:
            barrier()
            return None
        net = net.to("cpu").to(memory_format=torch.contiguous_format).eval()
        p = run.path
        atomic_save_tensors(p / "model.safetensors", net.state_dict(), metadata={"format": TEACHER_FORMAT})
        save_bn_stats(p / "bn_stats.safetensors", stats, cfg.model)
        meta = {
            "format": TEACHER_FORMAT, "version": TEACHER_VERSION, "model": cfg.model,
            "model_kwargs": cfg.model_kwargs, "dataset": info.to_dict(), "pretrained": pretrained,
            "weights": str(Path(cfg.weights).resolve()) if cfg.weights else None,
            "weights_sha256": sha256_file(Path(cfg.weights)) if cfg.weights else None,
            # a wrapped teacher was never trained here: only what made its BN statistics is recorded
            "train": {k: v for k, v in asdict(cfg).items() if k not in ("model", "model_kwargs", "dataset")
                      and not (wrapped and k in _TRAINING_ONLY)},
            "resolved_augment": None if wrapped else resolve_augment(cfg.augment, info),
            "stats_augment": resolve_augment(st_aug, info),
            "test_accuracy": acc, "train_seconds": round(seconds, 2), "stats_seconds": round(stats_seconds, 2),
            "val_seconds": round(val_seconds, 2), "streamed": streamed, "world_size": world,
            "num_train_images": len(data.train), "bn_layers": [[n, stats.channels(n)] for n in stats.layers],
            "files": {f: sha256_file(p / f) for f in ("model.safetensors", "bn_stats.safetensors")},
            "data_source": data.source,  # how distill/relabel find this data again (decoct.data.provenance)
        }
        atomic_write_json(p / "teacher.json", meta)
        run.log(event="finished", test_accuracy=acc, seconds=round(seconds + stats_seconds + val_seconds, 2))
        run.finish()
        if world > 1:
            barrier()
        return Teacher(net, info, meta, stats, p)
    finally:
        import torch.distributed as dist

        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


__all__ += ["SqueezeConfig", "RunError", "crop_resize", "rrc_boxes"]
