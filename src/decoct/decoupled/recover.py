"""Recover: synthesise images from a BatchNorm teacher (SRe2L), with DWA and LPLD as options.

One implementation, three presets (``METHODS`` names ``sre2l``, ``dwa``, ``lpld``):

* **SRe2L** — images start as N(0, 1) noise in normalised space; each batch holds one image of
  each of up to ``batch_size`` classes (one IPC index at a time) and minimises
  ``CE(f(A(x)), y) + r_bn * sum_l w_l (||mu_l(A(x)) - mu_l|| + r_var ||var_l(A(x)) - var_l||)``
  where ``mu_l, var_l`` are the per-channel mean and *biased* variance of the *input* of BN layer
  ``l`` over (batch, H, W), the targets are the teacher's running statistics, the norms are plain
  (unsquared) L2 norms, ``w_1 = first_bn_multiplier`` (10) for the first BN layer in module order
  and 1 otherwise, and ``r_var = 1``. Adam (betas 0.5, 0.9, eps 1e-8) on the pixels, learning
  rate ``0.5 (1 + cos(pi t / T)) lr`` set every iteration, the pixels clamped to the valid
  [0, 1] range after every step, the last iterate kept. ``A`` is one batch-shared augmentation per
  iteration: RandomResizedCrop (scale 0.08-1) + flip when ``crop``/``flip``, then a circular roll
  by (dy, dx) drawn in [0, J] (``jitter_mode="nonneg"``) or [-J, J] (``"symmetric"``).
* **DWA** (Du et al., NeurIPS 2024) — real-image initialisation, a separate coefficient ``r_var`` on
  the variance term, and before each batch a *directed weight adjustment*: a copy of the teacher is
  moved by ``dwa_steps`` (K) normalised gradient-*ascent* steps of size rho/K on the cross-entropy
  of the batch's real images (one augmentation draw, reused for all K steps),
  ``theta <- theta + (rho/K) g / (||g|| + 1e-12)`` with ``g`` the gradient w.r.t. *all* parameters
  and ``||g||`` one global L2 norm; the adjusted copy is then frozen for the whole batch and the BN
  targets stay the original teacher's running statistics (docs/methods/dwa.md, What it does).
* **LPLD** (Xiao & He, NeurIPS 2024) — batches of one class (all IPC images of the class, or
  ``batch_size`` of them), matched against that class's BN statistics recorded by
  :func:`decoct.decoupled.squeeze.squeeze` (no global term), N(0, 1) initialisation
  (docs/methods/lpld.md, What it does).

Choices where the official code differs from the papers or has bugs (not copied):

* DWA's released ImageNet script never resets the teacher between the class-batches of one IPC index
  (the adjustments accumulate) and uses stale weight gradients; here every batch starts from the
  original teacher, as the paper describes (docs/methods/dwa.md, Where decoct departs from the paper
  or the released code). The K adjustment backward passes do not leak CE gradients into the first
  image update either (same section).
* DWA's "random real subset": the code uses the batch's own real initial images; so do we (they
  are a random real sample, one per class and IPC index). With ``init="noise"`` the same real
  images still drive the adjustment.
* The reference codes save JPEG (quality 75) with a truncating uint8 cast; decoct stores lossless
  PNG rounded to 8 bits (or floats when asked), and accounts for exactly those bytes.
* Teacher weights are frozen during synthesis (the DWA code leaves them trainable and wastes a
  weight backward per iteration; results are unchanged).
* With per-class BN targets and a batch holding several classes, the target is the moment of the
  class mixture (``mean of mu_c``; ``mean of (var_c + mu_c^2) - mu^2``); for LPLD's one-class
  batches this is exactly the class's statistics.
* CIFAR-10 DWA settings are not published; CIFAR-100's are used (docs/methods/dwa.md, Where decoct
  departs from the paper or the released code). LPLD published no CIFAR settings; the ``small``
  preset is SRe2L's CIFAR recipe with LPLD's class batches and class statistics.

Per-batch randomness (noise init, augmentation, DWA's draw) comes from a generator seeded by
``(seed, batch index)`` only, so a batch's result does not depend on which process computes it:
recovery shards by batch (by class for LPLD) across torchrun ranks.

Under torchrun (``torchrun --nproc_per_node N decoct distill sre2l|dwa|lpld ...``, N copies of the
command; :func:`recover_distributed`) each rank synthesises a contiguous block of batches (whole
classes for LPLD), checkpointing in its own sub-run ``<out>/shards/rank<r>-of<N>/`` and finishing
with ``part.safetensors`` (the image indices and float images it made); rank 0 then checks that the
parts cover every image exactly once (:func:`merge_parts`) and writes the one artifact, grid and log
of ``<out>``. The merged set equals a 1-process run with the same seed (given the same numeric
kernels). ``--resume`` resumes every shard; a finished shard is not recomputed. Rank, world size,
barrier and the process group come from :mod:`decoct.runtime.distributed`.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from decoct.data import Dataset, DatasetInfo, normalize, to_uint8
from decoct.data.views import rrc_boxes as _rrc_boxes
from decoct.decoupled.squeeze import crop_resize
from decoct.formats.artifact import DistilledSet
from decoct.formats.teacher import (
    BNStats,
    Teacher,
    TeacherError,
    bn_layers,
    check_teacher_dataset,
    load_teacher_full,
)
from decoct.methods.base import METHODS
from decoct.runtime.distributed import (
    barrier,
    init_process_group,
    rank,
    rank_device,
    resolve_device,
    shard_dir,
    shard_range,
    world_size,
)
from decoct.runtime.health import check_metrics, check_tensors, rerun_hint

__all__ = [
    "FAMILIES",
    "PRESETS",
    "RECOVER_METHODS",
    "Recover",
    "RecoverConfig",
    "batch_moments",
    "bn_matching_loss",
    "directed_weight_adjustment",
    "family_for",
    "mixture_targets",
    "plan_batches",
]

RECOVER_METHODS = ("sre2l", "dwa", "lpld")
FAMILIES = ("small", "tiny", "imagenet")
INITS = ("noise", "real")
BATCHINGS = ("ipc", "class")
BN_TARGETS = ("running", "global", "class")
CLASS_STATS = ("ema", "exact")
JITTER_MODES = ("nonneg", "symmetric")
FLOAT_STORAGE = {None: None, "none": None, "float16": torch.float16, "float32": torch.float32}

_SRE2L = dict(first_bn_multiplier=10.0, r_var=1.0, dwa_steps=0, dwa_rho=0.0, init="noise",
              batching="ipc", bn_target="running")
_DWA = dict(first_bn_multiplier=10.0, dwa_steps=12, dwa_rho=0.015, init="real", batching="ipc",
            bn_target="running")
_LPLD = dict(first_bn_multiplier=10.0, r_var=1.0, dwa_steps=0, dwa_rho=0.0, init="noise",
             batching="class", bn_target="class")

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # batch_size: classes per batch (ipc batching) or images per batch (class batching); None = all
    "sre2l": {
        # SRe2L recover_cifar.sh: lr 0.25, 1000 it, r_bn 0.01, roll [0, 4], no crop, batch 100
        "small": dict(_SRE2L, iterations=1000, lr=0.25, r_bn=0.01, jitter=4, jitter_mode="nonneg",
                      crop=False, flip=False, batch_size=100),
        # SRe2L recover_tiny.py (+ docs/methods/sre2l.md, Hyper-parameters of recover): 4000 it, lr
        # 0.1, r_bn 1, RRC + flip, roll [-4, 4], batch 100
        "tiny": dict(_SRE2L, iterations=4000, lr=0.1, r_bn=1.0, jitter=4, jitter_mode="symmetric",
                     crop=True, flip=True, batch_size=100),
        # SRe2L recover.sh: 4000 it, lr 0.25, r_bn 0.01, RRC + flip, roll [0, 32], batch 100
        "imagenet": dict(_SRE2L, iterations=4000, lr=0.25, r_bn=0.01, jitter=32, jitter_mode="nonneg",
                         crop=True, flip=True, batch_size=100),
    },
    "dwa": {
        # docs/methods/dwa.md, Hyper-parameters (CIFAR-100; CIFAR-10 unpublished, same values used)
        "small": dict(_DWA, iterations=1000, lr=0.25, r_bn=0.01, r_var=11.0, jitter=4, jitter_mode="nonneg",
                      crop=False, flip=False, batch_size=None),
        "tiny": dict(_DWA, iterations=2000, lr=0.1, r_bn=0.01, r_var=11.0, jitter=4, jitter_mode="nonneg",
                     crop=True, flip=True, batch_size=None),
        "imagenet": dict(_DWA, iterations=2000, lr=0.25, r_bn=0.01, r_var=2.0, jitter=32, jitter_mode="nonneg",
                         crop=True, flip=True, batch_size=100, dwa_steps=15),
    },
    "lpld": {
        # no LPLD CIFAR recipe: SRe2L's CIFAR recipe with class batches and class statistics
        "small": dict(_LPLD, iterations=1000, lr=0.25, r_bn=0.01, jitter=4, jitter_mode="nonneg",
                      crop=False, flip=False, batch_size=None),
        # docs/methods/lpld.md, Hyper-parameters: Tiny 4000 it, lr 0.1, r_bn 0.05, roll [-4, 4],
        # batch min(100, IPC)
        "tiny": dict(_LPLD, iterations=4000, lr=0.1, r_bn=0.05, jitter=4, jitter_mode="symmetric",
                     crop=True, flip=True, batch_size=100),
        # ImageNet-1K: 4000 it, lr 0.25, r_bn 0.01, roll [0, 32], batch = IPC
        "imagenet": dict(_LPLD, iterations=4000, lr=0.25, r_bn=0.01, jitter=32, jitter_mode="nonneg",
                         crop=True, flip=True, batch_size=None),
    },
}


def family_for(info: DatasetInfo) -> str:
    """Preset family from the image size: ``small`` (<= 32 px), ``tiny`` (<= 64 px), ``imagenet``."""
    return "small" if info.height <= 32 else "tiny" if info.height <= 64 else "imagenet"


@dataclass
class RecoverConfig:
    """Options of one recover run; ``None`` means "the preset of ``method`` for this image size"."""

    teacher: str
    ipc: int
    method: str = "sre2l"
    iterations: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    r_bn: float | None = None
    r_var: float | None = None
    first_bn_multiplier: float | None = None
    init: str | None = None
    batching: str | None = None
    bn_target: str | None = None
    class_stats: str = "ema"
    dwa_steps: int | None = None
    dwa_rho: float | None = None
    jitter: int | None = None
    jitter_mode: str | None = None
    crop: bool | None = None
    flip: bool | None = None
    crop_scale_min: float = 0.08
    seed: int = 0
    amp: bool = False
    channels_last: bool = False
    float_storage: str | None = None

    def resolved(self, info: DatasetInfo) -> RecoverConfig:
        """A copy with every ``None`` filled from the preset, validated (raises naming the option)."""
        if self.method not in RECOVER_METHODS:
            raise ValueError(f"unknown recover method {self.method!r}; known: {', '.join(RECOVER_METHODS)}")
        fam = family_for(info)
        preset = dict(PRESETS[self.method][fam])
        if fam == "small" and info.height < 32 and preset.get("jitter"):
            preset["jitter"] = max(1, round(preset["jitter"] * info.height / 32))  # e.g. 8x8 digits -> 1
        values = asdict(self)
        for k, v in preset.items():
            if values.get(k) is None:
                values[k] = v
        cfg = RecoverConfig(**values)
        cfg.validate(info)
        return cfg

    def validate(self, info: DatasetInfo) -> None:
        def choice(name: str, allowed: tuple) -> None:
            v = getattr(self, name)
            if v not in allowed:
                raise ValueError(f"unknown {name} {v!r}; known: {', '.join(map(str, allowed))}")

        if self.ipc < 1:
            raise ValueError(f"ipc must be >= 1, got {self.ipc}")
        choice("init", INITS)
        choice("batching", BATCHINGS)
        choice("bn_target", BN_TARGETS)
        choice("class_stats", CLASS_STATS)
        choice("jitter_mode", JITTER_MODES)
        if self.float_storage not in FLOAT_STORAGE:
            raise ValueError(f"unknown float_storage {self.float_storage!r}; known: none, float16, float32")
        if self.iterations is None or self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("lr", "r_bn", "r_var", "first_bn_multiplier", "dwa_rho"):
            v = getattr(self, name)
            if v is None or v < 0 or (name == "lr" and v == 0):
                raise ValueError(f"{name} must be {'> 0' if name == 'lr' else '>= 0'}, got {v}")
        if self.dwa_steps is None or self.dwa_steps < 0:
            raise ValueError(f"dwa_steps must be >= 0, got {self.dwa_steps}")
        if self.dwa_steps > 0 and self.dwa_rho == 0:
            raise ValueError("dwa_steps > 0 needs dwa_rho > 0 (the radius of the weight adjustment)")
        if self.jitter is None or self.jitter < 0 or self.jitter >= min(info.height, info.width):
            raise ValueError(f"jitter must be in [0, {min(info.height, info.width)}), got {self.jitter}")
        if not 0 < self.crop_scale_min <= 1:
            raise ValueError(f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        if self.crop is None or self.flip is None:
            raise ValueError("crop and flip must be resolved to True/False")


# ---------------------------------------------------------------------------------------------
# the pieces, each testable on its own
def batch_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased (1/n) variance of a BN input over (batch, spatial), float32."""
    x = x.float()
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dim=dims)
    # centred two-pass form: same values as x.var(unbiased=False), ~1.8x faster forward+backward on CPU
    var = (x - mean.view(1, -1, *([1] * (x.dim() - 2)))).square().mean(dim=dims)
    return mean, var


def bn_matching_loss(feats: list[tuple[Tensor, Tensor]], targets: list[tuple[Tensor, Tensor]], *,
                     first_bn_multiplier: float = 10.0, r_var: float = 1.0) -> Tensor:
    """``sum_l w_l (||mu_l - mu^_l||_2 + r_var ||var_l - var^_l||_2)``, layers in module order.

    Plain (unsquared) Euclidean norms per layer, ``w_1 = first_bn_multiplier``, ``w_l = 1`` after
    (SRe2L's ``BNFeatureHook`` with DWA's decoupled ``r_var``; ``r_var = 1`` is SRe2L/LPLD).
    """
    if len(feats) != len(targets) or not feats:
        raise ValueError(f"need one target per BN layer, got {len(feats)} features and {len(targets)} targets")
    total = feats[0][0].new_zeros(())
    for i, ((m, v), (mt, vt)) in enumerate(zip(feats, targets, strict=True)):
        w = first_bn_multiplier if i == 0 else 1.0
        total = total + w * (torch.linalg.vector_norm(m - mt) + r_var * torch.linalg.vector_norm(v - vt))
    return total


def mixture_targets(class_mean: Tensor, class_var: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of the mixture of the classes in ``labels`` (one component per image).

    For a batch of one class this is exactly ``(class_mean[c], class_var[c])`` (LPLD).
    """
    if bool((labels == labels[0]).all()):
        c = int(labels[0])
        return class_mean[c].clone(), class_var[c].clone()
    m = class_mean.double()[labels]
    v = class_var.double()[labels]
    mu = m.mean(0)
    var = (v + m.square()).mean(0) - mu.square()
    return mu.to(class_mean.dtype), var.clamp(min=0).to(class_var.dtype)


def directed_weight_adjustment(model: nn.Module, x: Tensor, y: Tensor, steps: int, rho: float,
                               eps: float = 1e-12) -> float:
    """DWA: ``steps`` normalised gradient-ascent steps of size ``rho / steps`` on CE(model(x), y).

    Every parameter moves, with one global L2 norm of the gradient (SAM's first step, repeated;
    docs/methods/dwa.md, What it does). ``model`` is modified in place and should be in eval mode
    (BN uses its running statistics, which are buffers and do not move). Returns the norm of the
    total displacement.
    """
    params = [p for p in model.parameters()]
    start = [p.detach().clone() for p in params]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        for _ in range(steps):
            loss = F.cross_entropy(model(x).float(), y)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            scale = (rho / steps) / (norm + eps)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.add_(g * scale)
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
    with torch.no_grad():
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p - s)
                                                           for p, s in zip(params, start, strict=True)])))


@dataclass(frozen=True)
class Batch:
    """One synthesis problem: image ``i`` of the batch is slot ``slots[i]`` of class ``classes[i]``."""

    index: int
    classes: Tensor
    slots: Tensor

    def image_index(self, ipc: int) -> Tensor:
        """Positions in the final class-major set (class c, slot k -> c * ipc + k)."""
        return self.classes * ipc + self.slots


def plan_batches(num_classes: int, ipc: int, batching: str, batch_size: int | None) -> list[Batch]:
    """All batches of a run, in a fixed order that depends only on (K, IPC, batching, batch size).

    ``ipc`` batching (SRe2L, DWA): for each IPC index, the classes in chunks of ``batch_size``
    (one image per class). ``class`` batching (LPLD): for each class, its IPC slots in chunks.
    """
    out: list[Batch] = []
    if batching == "ipc":
        bs = min(batch_size or num_classes, num_classes)
        for k in range(ipc):
            for start in range(0, num_classes, bs):
                cls = torch.arange(start, min(start + bs, num_classes))
                out.append(Batch(len(out), cls, torch.full_like(cls, k)))
    elif batching == "class":
        bs = min(batch_size or ipc, ipc)
        for c in range(num_classes):
            for start in range(0, ipc, bs):
                slots = torch.arange(start, min(start + bs, ipc))
                out.append(Batch(len(out), torch.full_like(slots, c), slots))
    else:
        raise ValueError(f"unknown batching {batching!r}; known: {', '.join(BATCHINGS)}")
    return out


def batch_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of batch ``index``: depends on (seed, index) only, never on the rank."""
    g = torch.Generator(device="cpu")
    g.manual_seed((int(seed) * 1_000_003 + 7919 * (int(index) + 1)) % (2**63 - 1))
    return g


def real_assignment(labels: Tensor, num_classes: int, ipc: int, seed: int) -> Tensor:
    """For each (class, slot) the index of a real training image: (K, IPC) long.

    A seeded random order of each class (vectorised: sort by label + uniform key); slot k takes the
    k-th image of its class (cycling when a class has fewer than IPC images), so the IPC slots of
    a class are distinct images whenever the class has enough.
    """
    counts = torch.bincount(labels, minlength=num_classes)
    if bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten().tolist()[:10]
        raise ValueError(f"classes {empty} have no training images; real initialisation needs them")
    g = torch.Generator().manual_seed(int(seed) + 12345)
    keys = torch.rand(len(labels), generator=g, dtype=torch.float64)
    order = torch.argsort(labels.double() + keys * 0.5)
    starts = torch.cumsum(counts, 0) - counts
    k = torch.arange(ipc)
    pos = starts[:, None] + k[None] % counts[:, None]
    return order[pos]


# ---------------------------------------------------------------------------------------------
class _BNHooks:
    """Forward pre-hooks recording each BN layer's input moments while ``active``."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [n for n, _ in bn_layers(model)]
        self.active = False
        self.feats: dict[str, tuple[Tensor, Tensor]] = {}
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in bn_layers(model)]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            if self.active:
                self.feats[name] = batch_moments(inputs[0])
        return hook

    def collect(self) -> list[tuple[Tensor, Tensor]]:
        missing = [n for n in self.layers if n not in self.feats]
        if missing:
            raise RuntimeError(f"BN layers {missing[:3]} were not run in the forward pass")
        out = [self.feats[n] for n in self.layers]
        self.feats = {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class Recover:
    """SRe2L recover with DWA and LPLD as options; see the module docstring.

    ``iterations`` (for :func:`decoct.methods.base.run_method`) is ``batches x config.iterations``
    of this shard; ``shard=(rank, world)`` restricts the run to a contiguous block of batches.
    """

    def __init__(self, config: RecoverConfig, *, teacher: Teacher | None = None,
                 shard: tuple[int, int] = (0, 1)) -> None:
        self.teacher = teacher if teacher is not None else load_teacher_full(config.teacher, "cpu")
        if self.teacher.stats is None:
            raise TeacherError(f"teacher {config.teacher} has no BN statistics loaded")
        self.info = self.teacher.info
        self.config = config.resolved(self.info)
        cfg = self.config
        self.name = cfg.method
        self.layers = [n for n, _ in bn_layers(self.teacher.model)]
        self.teacher.stats.check_model(self.teacher.model)
        self.batches_all = plan_batches(self.info.num_classes, cfg.ipc, cfg.batching, cfg.batch_size)
        self.rank, self.world = shard
        self.mine = [self.batches_all[i] for i in shard_range(len(self.batches_all), self.rank, self.world)]
        self.iterations = len(self.mine) * cfg.iterations
        self.n_images = self.info.num_classes * cfg.ipc
        self._ready = False

    # ------------------------------------------------------------------ setup
    def init(self, dataset: Dataset | None, device: torch.device) -> None:
        cfg = self.config
        self.device = torch.device(device)
        if cfg.amp and self.device.type != "cuda":
            raise ValueError(f"amp (bf16 autocast) is supported on CUDA only, got device {self.device}")
        needs_real = cfg.init == "real" or cfg.dwa_steps > 0
        if dataset is not None:
            check_teacher_dataset(self.info, dataset.info, cfg.teacher)
        elif needs_real:
            raise ValueError(f"{cfg.method}: init={cfg.init!r} / dwa_steps={cfg.dwa_steps} need the real dataset")
        self.dataset = dataset
        self.assign = real_assignment(dataset.train.labels, self.info.num_classes, cfg.ipc, cfg.seed) \
            if needs_real else None
        model = self.teacher.model.to(self.device).eval()
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        for p in model.parameters():
            p.requires_grad_(False)
        self.base = model
        self.work = copy.deepcopy(model) if cfg.dwa_steps > 0 else model
        self.work.eval()
        self.hooks = _BNHooks(self.work)
        st: BNStats = self.teacher.stats
        mods = dict(self.base.named_modules())
        suffix = "" if cfg.class_stats == "ema" else "_exact"
        self.targets_running = [(mods[n].running_mean.float(), mods[n].running_var.float()) for n in self.layers]
        self.targets_global = [(st.stats[n]["mean"].to(self.device), st.stats[n]["var"].to(self.device))
                               for n in self.layers]
        self.class_stats = [(st.stats[n]["class_mean" + suffix].to(self.device),
                             st.stats[n]["class_var" + suffix].to(self.device)) for n in self.layers]
        c, h, w = self.info.image_shape
        mean = torch.tensor(self.info.mean, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(self.info.std, device=self.device).view(1, -1, 1, 1)
        self.lo, self.hi = (0 - mean) / std, (1 - mean) / std
        # finished images are kept as they will be stored: uint8 (4x smaller than float32 in memory
        # and in checkpoints) unless float storage was asked for
        self.store_dtype = FLOAT_STORAGE[cfg.float_storage] or torch.uint8
        self.out = torch.zeros(self.n_images, c, h, w, dtype=self.store_dtype)
        self.done = torch.zeros(self.n_images, dtype=torch.bool)
        self.cur: dict[str, Any] | None = None
        self.last_metrics: dict[int, dict[str, float]] = {}
        self._ready = True

    def _real(self, batch: Batch) -> Tensor:
        """The batch's real images, normalised. A streamed split decodes just these files, resized
        to the set's size without a crop (DWA's real initialisation, docs/methods/dwa.md)."""
        idx = self.assign[batch.classes, batch.slots]
        train = self.dataset.train
        pixels = train.load(idx, view="resize") if getattr(train, "streamed", False) else train.images[idx]
        return normalize(pixels, self.info, self.device)

    def _targets(self, batch: Batch) -> list[tuple[Tensor, Tensor]]:
        cfg = self.config
        if cfg.bn_target == "running":
            return self.targets_running
        if cfg.bn_target == "global":
            return self.targets_global
        y = batch.classes.to(self.device)
        return [mixture_targets(m, v, y) for m, v in self.class_stats]

    def _augment(self, x: Tensor, g: torch.Generator) -> Tensor:
        """One batch-shared draw: RandomResizedCrop, flip, then a circular roll (SRe2L's multi-crop)."""
        cfg = self.config
        n, _, h, w = x.shape
        if cfg.crop:
            box = _rrc_boxes(1, h, w, g, scale=(cfg.crop_scale_min, 1.0))
            x = crop_resize(x, box.expand(n, 4), (h, w))
        if cfg.flip and bool(torch.rand(1, generator=g) < 0.5):
            x = x.flip(3)
        if cfg.jitter:
            j = cfg.jitter
            lo = 0 if cfg.jitter_mode == "nonneg" else -j
            dy, dx = torch.randint(lo, j + 1, (2,), generator=g).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        return x

    def _fmt(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.config.channels_last else x

    def _start_batch(self, local: int, state: dict[str, Any] | None = None) -> None:
        cfg = self.config
        batch = self.mine[local]
        g = batch_generator(cfg.seed, batch.index)
        c, h, w = self.info.image_shape
        n = len(batch.classes)
        y = batch.classes.to(self.device)
        adjust = 0.0
        if cfg.dwa_steps > 0:
            with torch.no_grad():
                for pw, pb in zip(self.work.parameters(), self.base.parameters(), strict=True):
                    pw.copy_(pb)
        if state is None:
            if cfg.init == "real":
                x = self._real(batch)
            else:
                x = torch.randn(n, c, h, w, generator=g).to(self.device)
            if cfg.dwa_steps > 0:
                real = x if cfg.init == "real" else self._real(batch)
                xa = self._fmt(self._augment(real, g))
                adjust = directed_weight_adjustment(self.work, xa, y, cfg.dwa_steps, cfg.dwa_rho)
        else:
            x = state["x"].to(self.device)
            g.set_state(state["gen"])
            if cfg.dwa_steps > 0:
                with torch.no_grad():
                    for p, v in zip(self.work.parameters(), state["work"], strict=True):
                        p.copy_(v.to(self.device))
            adjust = float(state.get("adjust", 0.0))
        x = x.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=cfg.lr, betas=(0.5, 0.9), eps=1e-8)
        if state is not None:
            opt.load_state_dict(state["opt"])
        self.cur = dict(local=local, batch=batch, x=x, opt=opt, gen=g, y=y, targets=self._targets(batch),
                        adjust=adjust)

    # ------------------------------------------------------------------ the loop
    def step(self, it: int) -> dict[str, float]:
        if not self._ready:
            raise RuntimeError("call init(dataset, device) before step()")
        cfg = self.config
        local, t = divmod(it, cfg.iterations)
        if self.cur is None or self.cur["local"] != local:
            self._start_batch(local)
        cur = self.cur
        x, opt, g, y = cur["x"], cur["opt"], cur["gen"], cur["y"]
        lr = 0.5 * (1 + math.cos(math.pi * t / cfg.iterations)) * cfg.lr
        for group in opt.param_groups:
            group["lr"] = lr
        xj = self._fmt(self._augment(x, g))
        self.hooks.active = True
        try:
            if cfg.amp:
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    out = self.work(xj)
            else:
                out = self.work(xj)
        finally:
            self.hooks.active = False
        ce = F.cross_entropy(out.float(), y)
        bn = bn_matching_loss(self.hooks.collect(), cur["targets"], first_bn_multiplier=cfg.first_bn_multiplier,
                              r_var=cfg.r_var)
        loss = ce + cfg.r_bn * bn
        metrics = {"loss": float(loss.detach()), "ce": float(ce.detach()), "bn": float(bn.detach()), "batch": float(cur["batch"].index)}
        # checked here, not only by run_method, so the torchrun shards (recover_distributed) stop too;
        # the loss before the update (a NaN gradient never reaches the images), the images after it
        where = f"iteration {it + 1} (batch {cur['batch'].index})"
        check_metrics(metrics, self.name, where, self.divergence_hint)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            x.copy_(torch.maximum(torch.minimum(x, self.hi), self.lo))
        check_tensors([("the synthetic images", x.detach())], self.name, where, self.divergence_hint)
        if cfg.dwa_steps > 0:
            metrics["adjust"] = cur["adjust"]
        if t == cfg.iterations - 1:
            idx = cur["batch"].image_index(cfg.ipc)
            xf = x.detach().float()
            self.out[idx] = (to_uint8(xf, self.info) if self.store_dtype == torch.uint8
                             else xf.to(self.store_dtype)).cpu()
            self.done[idx] = True
            self.last_metrics[cur["batch"].index] = {k: v for k, v in metrics.items() if k != "batch"}
            self.cur = None
        return metrics

    @property
    def divergence_hint(self) -> str:
        """What to change when the loss or the images stop being finite."""
        cfg = self.config
        return rerun_hint(("--lr", cfg.lr), ("--r-bn", cfg.r_bn))

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"out": self.out.clone(), "done": self.done.clone(),
                                 "last_metrics": {str(k): v for k, v in self.last_metrics.items()}}
        cur = self.cur
        if cur is not None:
            state["cur"] = {"local": cur["local"], "x": cur["x"].detach().cpu().clone(),
                            "opt": cur["opt"].state_dict(), "gen": cur["gen"].get_state(),
                            "adjust": cur["adjust"]}
            if self.config.dwa_steps > 0:
                state["cur"]["work"] = [p.detach().cpu().clone() for p in self.work.parameters()]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.out = state["out"].clone()
        self.done = state["done"].clone()
        self.last_metrics = {int(k): v for k, v in state.get("last_metrics", {}).items()}
        self.cur = None
        if "cur" in state:
            self._start_batch(int(state["cur"]["local"]), state["cur"])

    # ------------------------------------------------------------------ output
    def labels(self) -> Tensor:
        return torch.arange(self.info.num_classes).repeat_interleave(self.config.ipc)

    def part(self) -> tuple[Tensor, Tensor]:
        """(image indices, float images) this shard has finished (for merging across ranks)."""
        idx = torch.nonzero(self.done).flatten()
        return idx, self.out[idx].clone()

    def describe(self) -> dict[str, Any]:
        t = self.teacher
        return dict(teacher=str(t.path) if t.path else self.config.teacher, teacher_model=t.meta.get("model"),
                    teacher_test_accuracy=t.meta.get("test_accuracy"),
                    teacher_sha256=t.meta.get("files", {}).get("model.safetensors"),
                    family=family_for(self.info), batches=len(self.batches_all), ipc=self.config.ipc,
                    resolved=asdict(self.config))

    def result(self) -> DistilledSet:
        cfg = self.config
        meta = self.describe()
        meta["complete"] = bool(self.done.all())
        meta["final_batch_metrics"] = {str(k): v for k, v in sorted(self.last_metrics.items())}
        source = getattr(getattr(self, "dataset", None), "source", None)
        if source:  # how later commands (evaluate) find this data again
            meta["data_source"] = source
        kw = dict(method=cfg.method, config=asdict(cfg), meta=meta)
        if self.store_dtype == torch.uint8:
            return DistilledSet(self.info, self.out.clone(), self.labels(), **kw)
        return DistilledSet.from_float(self.info, self.out.float(), self.labels(), float_storage=self.store_dtype, **kw)


def _factory(method: str):
    def make(config: dict[str, Any]) -> Recover:
        known = {f.name for f in fields(RecoverConfig)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"{method}: unknown option(s) {unknown}; known: {sorted(known)}")
        return Recover(RecoverConfig(**{**config, "method": method}))
    return make


for _m in RECOVER_METHODS:
    METHODS.register(_m)(_factory(_m))



# ---------------------------------------------------------------------------------------------
RUNTIME_KEYS = ("max_iterations", "checkpoint_every", "device", "download", "data_root")
"""CLI keys that do not change the result and may differ between a run and its --resume."""


def prepare(method: str, *, teacher: str, ipc: int, dataset: str | None = None, data_root: str | None = None,
            download: bool = False, shard: tuple[int, int] = (0, 1), data_options: dict[str, Any] | None = None,
            **options: Any) -> tuple[Recover, Dataset]:
    """Build and validate a recover run *before any work*: teacher, statistics, dataset, options.

    Raises a clear error for an unknown method or option, a teacher directory that is missing or
    corrupted, BN statistics that do not fit the teacher's architecture, or a dataset whose classes
    or image shape differ from the teacher's. Without ``dataset`` the data is the teacher's: found
    from the source its teacher.json records (registry name and root), ``data_root`` overriding the root.
    """
    from decoct.data.provenance import SOURCE_KEY, load_for, read_source

    if method not in RECOVER_METHODS:
        raise ValueError(f"unknown recover method {method!r}; known: {', '.join(RECOVER_METHODS)}")
    known = {f.name for f in fields(RecoverConfig)} - {"teacher", "ipc", "method"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{method}: unknown option(s) {unknown}; known: {sorted(known)}")
    t = load_teacher_full(teacher, "cpu")
    cfg = RecoverConfig(teacher=str(teacher), ipc=ipc, method=method, **options)
    rec = Recover(cfg, teacher=t, shard=shard)
    recorded = read_source(t.meta.get(SOURCE_KEY), f"{teacher}/teacher.json")
    data = load_for(t.info, recorded, dataset=dataset, data_root=data_root, download=download,
                    what=f"teacher {teacher}", options=data_options)
    check_teacher_dataset(t.info, data.info, teacher)
    return rec, data


def recover(method: str, *, teacher: str, ipc: int, out: str, dataset: str | None = None,
            data_root: str | None = None, download: bool = False, device: str = "auto", resume: bool = False,
            force: bool = False, show_progress: bool = True, checkpoint_every: int = 100,
            stop_after: int | None = None, config: dict[str, Any] | None = None, **options: Any) -> DistilledSet | None:
    """Run SRe2L / DWA / LPLD recover into the run directory ``out``; the API behind ``decoct distill``.

    Under ``torchrun`` (``WORLD_SIZE > 1``) the batches are sharded across ranks and rank 0 merges
    them (:func:`recover_distributed`); the result is the same set a single
    process makes with the same seed. Returns the set (``None`` on ranks other than 0).
    """
    from decoct.methods.base import run_method
    from decoct.runtime.runs import Run

    if world_size() > 1:
        return recover_distributed(
            method, teacher=teacher, ipc=ipc, out=out, dataset=dataset, data_root=data_root, download=download,
            device=device, resume=resume, force=force, show_progress=show_progress,
            checkpoint_every=checkpoint_every, stop_after=stop_after, config=config, **options)
    rec, data = prepare(method, teacher=teacher, ipc=ipc, dataset=dataset, data_root=data_root,
                        download=download, **options)
    dev = resolve_device(device)
    run_cfg = dict(config) if config is not None else dict(method=method, teacher=str(teacher), ipc=ipc,
                                                             out=str(out), dataset=dataset, **options)
    for k in RUNTIME_KEYS:
        run_cfg.pop(k, None)
    run = Run.open(out, run_cfg, resume=resume, force=force)
    if run.done:
        from decoct.runtime.runs import resolve_artifact

        return DistilledSet.load(resolve_artifact(run.path))
    n = len(rec.batches_all[0].classes)
    return run_method(rec, run, data, dev, seed=rec.config.seed, checkpoint_every=checkpoint_every,
                      show_progress=show_progress, images_per_step=n, stop_after=stop_after)



# ---------------------------------------------------------------------------------------------
# torchrun: each rank recovers a block of batches into its own shard run, rank 0 merges

def _run_shard(rec: Any, run: Any, data: Any, dev: torch.device, *, checkpoint_every: int,
               stop_after: int | None, show_progress: bool) -> bool:
    """Run one rank's batches with checkpoints; write ``part.safetensors``. True when finished."""
    from decoct.runtime.io import atomic_save_tensors
    from decoct.runtime.runs import progress

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
    from decoct.runtime.io import load_tensors, load_tensors_metadata

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
    """The torchrun path of :func:`recover` (see the torchrun section of the module docstring)."""
    import torch.distributed as dist

    from decoct.report import save_grid
    from decoct.runtime.runs import Run, resolve_artifact

    r, world = rank(), world_size()
    rec, data = prepare(method, teacher=teacher, ipc=ipc, dataset=dataset, data_root=data_root,
                        download=download, shard=(r, world), **options)  # every rank validates first
    dev = rank_device(device)
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


__all__ += ["prepare", "recover", "recover_distributed", "merge_parts", "shard_range", "batch_generator",
            "real_assignment", "Batch", "RUNTIME_KEYS"]
