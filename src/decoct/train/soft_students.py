"""Student training from soft labels: a stored FKD label store, or an online teacher.

Store mode replays every stored batch exactly (same images, same crop/flip/mix via
:func:`decoct.augment.recorded_views.apply_views`) and distils from its stored fp16 logits; which stored
batches make up each training epoch is :func:`decoct.formats.label_pruning.epoch_plan` (in order for a full
store, LPLD's improved label pool for a pruned one). Online mode draws fresh views every step and
asks the teacher (eval mode) for their logits: unlimited labels, which results must say.

Loss: ``KL(softmax(t/T) || softmax(s/T))`` averaged over the batch ("batchmean"), times T^2 where
the reference recipe has it. Recipes per dataset (:func:`soft_recipe_for`) come from the references:

* ``imagenet`` (>= 128 px) -- LPLD ImageNet-1K (docs/protocols.md, soft): ResNet-18, 300 epochs,
  batch 128, AdamW lr 1e-3 wd 0.01 (no decay on 1-D parameters), cosine per epoch, T=20 without T^2,
  RandomResizedCrop(0.08-1) + flip + CutMix(alpha 1).
* ``tiny`` (64 px) -- LPLD Tiny-ImageNet: ResNet-18 (CIFAR stem), 100 epochs, batch 64, SGD lr 0.2
  momentum 0.9 wd 1e-4 (no decay on 1-D parameters), 5 warm-up epochs from 0.01x then cosine, T=20
  with T^2, RandomResizedCrop(0.08-1) + flip, no CutMix (the config, docs/methods/lpld.md, Where
  decoct departs from the paper or the released code).
* ``cifar`` (<= 32 px) -- SRe2L/DWA CIFAR relabel (docs/protocols.md, soft; SRe2L relabel_cifar):
  ResNet-18 (CIFAR stem), 400 epochs, batch 128, AdamW lr 1e-3 wd 0.01 on all parameters, cosine per
  epoch, T=30 without T^2, RandomCrop(pad H/8) + flip + Mixup(alpha 0.8). The references only run
  this recipe with an online teacher; storing its views is our extension.

DWA's own student recipes (``soft_recipe_for(info, "dwa")``, ``decoct evaluate --recipe dwa``; its
paper trains every student against a live teacher, no stored labels):

* ``dwa-imagenet`` -- DWA ``validation_imgnet.py``: the ``imagenet`` values (300 epochs, batch 128,
  AdamW 1e-3, CutMix alpha 1 with a random partner).
* ``dwa-tiny`` -- DWA ``validation_tiny.py`` / ``run_tiny.sh``: 200 epochs, batch 64, SGD lr 0.2
  momentum 0.9 wd 1e-4 on every parameter (the torchvision reference's default), 5 warm-up epochs
  from 0.01x then cosine, T=20 with T^2, RandomResizedCrop(0.08-1) + flip + CutMix(alpha 1) on
  every batch, each image mixed with the previous one (torchvision's ``RandomCutmix``: ``roll(1, 0)``).
* ``dwa-cifar`` -- DWA ``validation_cifar.py`` / ``run_cifar.sh``: the ``cifar`` values (400 epochs,
  Mixup alpha 0.8 with a random partner, T=30).

Choices that differ from the official code: the teacher is always in eval mode (the CIFAR scripts
leave it in train mode, docs/methods/dwa.md, Where decoct departs from the paper or the released
code); every draw is seeded; the final epoch's accuracy is reported (the scripts report the best
test accuracy seen, which selects on the test set).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from decoct.augment.recorded_views import ViewRecipe, apply_views, draw_views, seeded_generator
from decoct.data.types import DatasetInfo, normalize
from decoct.formats.image_bank import ImageBank
from decoct.formats.label_pruning import GRANULARITIES, epoch_plan
from decoct.formats.label_store import LabelStore, LabelStoreError
from decoct.train.trainer import evaluate_accuracy, seeded_model

__all__ = [
    "FKDConfig",
    "SoftRecipe",
    "RECIPES",
    "RECIPE_FAMILIES",
    "fill_value",
    "fit_soft_students",
    "kd_loss",
    "lr_factor",
    "soft_recipe_for",
    "teacher_logits",
    "train_fkd",
]

SOFT_SCHEDULES = ("cosine", "warmup_cosine", "half_cosine", "constant")
SOFT_OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class SoftRecipe:
    """One reference recipe of the ``soft`` protocol (student, optimiser, schedule, views)."""

    name: str
    source: str
    model: str
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    no_decay_1d: bool
    schedule: str
    warmup_epochs: int
    temperature: float
    t2: bool
    view: ViewRecipe


def _recipes() -> dict[str, SoftRecipe]:
    return {
        "imagenet": SoftRecipe("imagenet", "LPLD ImageNet-1K (docs/protocols.md#soft)", "resnet18", 300, 128, "adamw", 1e-3,
                               0.9, 0.01, True, "cosine", 0, 20.0, False,
                               ViewRecipe(crop="rrc", mix="cutmix", mix_alpha=1.0)),
        "tiny": SoftRecipe("tiny", "LPLD Tiny-ImageNet (docs/protocols.md#soft)", "resnet18", 100, 64, "sgd", 0.2, 0.9, 1e-4,
                           True, "warmup_cosine", 5, 20.0, True, ViewRecipe(crop="rrc", mix="none")),
        "cifar": SoftRecipe("cifar", "SRe2L/DWA CIFAR (docs/protocols.md#soft)", "resnet18", 400, 128, "adamw", 1e-3, 0.9,
                            0.01, False, "cosine", 0, 30.0, False,
                            ViewRecipe(crop="pad", padding=4, mix="mixup", mix_alpha=0.8)),
        # DWA's released validation scripts (docs/methods/dwa.md, Evaluation), always with a live teacher
        "dwa-imagenet": SoftRecipe("dwa-imagenet", "DWA validation_imgnet.py, scripts/run_imgnet.sh "
                                   "(docs/methods/dwa.md#evaluation)", "resnet18", 300, 128, "adamw", 1e-3, 0.9,
                                   0.01, True, "cosine", 0, 20.0, False,
                                   ViewRecipe(crop="rrc", mix="cutmix", mix_alpha=1.0)),
        "dwa-tiny": SoftRecipe("dwa-tiny", "DWA validation_tiny.py, scripts/run_tiny.sh "
                               "(docs/methods/dwa.md#evaluation)", "resnet18", 200, 64, "sgd", 0.2, 0.9, 1e-4,
                               False, "warmup_cosine", 5, 20.0, True,
                               ViewRecipe(crop="rrc", mix="cutmix", mix_alpha=1.0, partner="roll")),
        "dwa-cifar": SoftRecipe("dwa-cifar", "DWA validation_cifar.py, scripts/run_cifar.sh "
                                "(docs/methods/dwa.md#evaluation)", "resnet18", 400, 128, "adamw", 1e-3, 0.9,
                                0.01, False, "cosine", 0, 30.0, False,
                                ViewRecipe(crop="pad", padding=4, mix="mixup", mix_alpha=0.8)),
        # RDED's released validation script for its factor-1 sizes (docs/methods/rded.md#students): the
        # whole image (RandomResizedCrop of scale (1/factor, 1) = (1, 1)), flip, CutMix, live teacher
        "rded-imagenet": SoftRecipe("rded-imagenet", "RDED validation/main.py, ImageNet-1K IPC 10 scripts "
                                    "(docs/methods/rded.md#students)", "resnet18", 300, 100, "adamw", 1e-3, 0.9,
                                    0.01, True, "half_cosine", 0, 20.0, False,
                                    ViewRecipe(crop="rrc", scale=(0.5, 1.0), mix="cutmix", mix_alpha=1.0, shuffle=2)),
        "rded-tiny": SoftRecipe("rded-tiny", "RDED validation/main.py, Tiny-ImageNet scripts "
                                "(docs/methods/rded.md#students)", "resnet18", 300, 100, "adamw", 1e-3, 0.9, 0.01,
                                True, "half_cosine", 0, 20.0, False,
                                ViewRecipe(crop="rrc", scale=(1.0, 1.0), mix="cutmix", mix_alpha=1.0)),
        "rded-cifar": SoftRecipe("rded-cifar", "RDED validation/main.py, CIFAR-10 IPC 10 scripts "
                                 "(docs/methods/rded.md#students)", "resnet18", 300, 50, "adamw", 1e-3, 0.9, 0.01,
                                 True, "half_cosine", 0, 20.0, False,
                                 ViewRecipe(crop="rrc", scale=(1.0, 1.0), mix="cutmix", mix_alpha=1.0)),
    }


RECIPES = _recipes()
RECIPE_FAMILIES = ("auto", "dwa", "rded")
"""What ``soft_recipe_for`` picks from: ``auto``, the relabel recipes above by image size
(``imagenet``/``tiny``/``cifar``); ``dwa``, DWA's own student recipes by image size
(``dwa-imagenet``/``dwa-tiny``/``dwa-cifar``), which its paper runs against a live teacher; ``rded``,
RDED's student script by image size (``rded-imagenet``/``rded-tiny``/``rded-cifar``), also live."""


def soft_recipe_for(info: DatasetInfo, family: str = "auto", factor: int | None = None) -> SoftRecipe:
    """The reference recipe for a dataset, chosen by image size (padding scaled as H/8).

    ``family`` ``auto``: the SRe2L/LPLD relabel recipes (``imagenet`` >= 128 px, ``tiny`` 33-127 px,
    ``cifar`` <= 32 px); ``dwa``: DWA's validation recipes for the same sizes (``dwa-tiny`` differs
    from ``tiny``: 200 epochs, CutMix with the previous image of the batch, weight decay on every
    parameter; ``dwa-imagenet`` and ``dwa-cifar`` hold the same values as ``imagenet`` and ``cifar``).
    ``rded``: RDED's validation script (AdamW 1e-3 with the half-cosine schedule, KL at T = 20
    without T², CutMix): at its factor 1 (CIFAR, Tiny-ImageNet) on whole images, batch 50 (CIFAR, its
    IPC 10 scripts; IPC 1 uses 10 and IPC 50 uses 100: pass ``--batch-size``) or 100 (Tiny); at
    ImageNet sizes its factor 2 (ShufflePatches of the 2 x 2 strips, RandomResizedCrop of scale
    (0.5, 1)), batch 100 (its 1000-class IPC 10 scripts; IPC 50 uses 200). The factor is the set's
    (``factor``, as ``decoct distill rded`` records it), else the one its presets give the image size
    (1 up to 64 px, 2 above); factor f > 1 shuffles f x f strips and crops a scale of (1/f, 1).
    Raises ValueError for an unknown family, or a factor given to another family or below 1.
    """
    if family not in RECIPE_FAMILIES:
        raise ValueError(f"unknown soft recipe {family!r}; known: {', '.join(RECIPE_FAMILIES)}")
    prefix = "" if family == "auto" else f"{family}-"
    size = max(info.height, info.width)
    if factor is not None and (family != "rded" or factor < 1):
        raise ValueError(f"factor {factor} applies to the rded recipe only, as an integer >= 1")
    if family == "rded":
        f = factor if factor is not None else (1 if size <= 64 else 2)
        if f > 1:
            r = RECIPES["rded-imagenet"]
            return replace(r, view=replace(r.view, shuffle=f, scale=(1.0 / f, 1.0)))
        return RECIPES["rded-tiny" if size > 32 else "rded-cifar"]
    if size >= 128:
        return RECIPES[prefix + "imagenet"]
    if size > 32:
        return RECIPES[prefix + "tiny"]
    r = RECIPES[prefix + "cifar"]
    return replace(r, view=replace(r.view, padding=max(1, size // 8)))


@dataclass
class FKDConfig:
    """Hyper-parameters of one soft-label student run (see :func:`soft_recipe_for`)."""

    epochs: int
    batch_size: int | None = None
    optimizer: str = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.01
    no_decay_1d: bool = True
    schedule: str = "cosine"
    warmup_epochs: int = 0
    warmup_start: float = 0.01
    temperature: float = 20.0
    t2: bool = False
    granularity: str = "auto"
    amp: bool = False
    channels_last: bool = False
    eval_batch_size: int = 1024
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size is not None and self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {self.batch_size}")
        if self.optimizer not in SOFT_OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; known: {', '.join(SOFT_OPTIMIZERS)}")
        if self.schedule not in SOFT_SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; known: {', '.join(SOFT_SCHEDULES)}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; known: {', '.join(GRANULARITIES)}")
        if self.lr <= 0 or self.temperature <= 0:
            raise ValueError(f"lr and temperature must be > 0, got {self.lr}, {self.temperature}")
        if self.weight_decay < 0 or self.momentum < 0 or self.warmup_epochs < 0:
            raise ValueError("weight_decay, momentum and warmup_epochs must be >= 0")

    @classmethod
    def from_recipe(cls, recipe: SoftRecipe, **overrides) -> FKDConfig:
        base = dict(epochs=recipe.epochs, batch_size=recipe.batch_size, optimizer=recipe.optimizer, lr=recipe.lr,
                    momentum=recipe.momentum, weight_decay=recipe.weight_decay, no_decay_1d=recipe.no_decay_1d,
                    schedule=recipe.schedule, warmup_epochs=recipe.warmup_epochs,
                    temperature=recipe.temperature, t2=recipe.t2)
        unknown = set(overrides) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown soft-training option(s) {sorted(unknown)}")
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


def lr_factor(cfg: FKDConfig, epoch: int) -> float:
    """Multiplier of the base lr at (0-based) ``epoch``, stepped once per epoch as the references.

    ``cosine``: ½(1+cos(π e/E)); ``half_cosine`` (RDED's validation script): ½(1+cos(π e/(2E))), a
    quarter period that ends at half the base lr; ``warmup_cosine`` (torchvision reference, LPLD Tiny):
    linear from ``warmup_start`` to 1 over the warm-up epochs, then cosine to 0 over the remaining ones.
    """
    e, n = epoch, cfg.epochs
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * e / n))
    if cfg.schedule == "half_cosine":
        return 0.5 * (1.0 + math.cos(math.pi * e / (2 * n)))
    w = min(cfg.warmup_epochs, n - 1)
    if e < w:
        return cfg.warmup_start + (1.0 - cfg.warmup_start) * e / w
    return 0.5 * (1.0 + math.cos(math.pi * (e - w) / max(1, n - w)))


def kd_loss(student: Tensor, teacher: Tensor, temperature: float, t2: bool) -> Tensor:
    """KL(softmax(t/T) || softmax(s/T)), batch mean, times T^2 when ``t2`` (teacher in fp32)."""
    T = float(temperature)
    loss = F.kl_div(F.log_softmax(student.float() / T, dim=-1), F.log_softmax(teacher.float() / T, dim=-1),
                    reduction="batchmean", log_target=True)
    return loss * (T * T) if t2 else loss


def fill_value(info: DatasetInfo, device: torch.device | str = "cpu") -> Tensor:
    """The normalised black pixel (C,): what zero padding becomes after normalisation."""
    return normalize(torch.zeros(1, info.channels, 1, 1, dtype=torch.uint8), info, device).view(-1)


def _amp(enabled: bool, device: torch.device) -> contextlib.AbstractContextManager:
    if enabled:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def teacher_logits(teacher: nn.Module, x: Tensor, *, amp: bool = False, channels_last: bool = False) -> Tensor:
    """The teacher's logits (float32) for a batch of views; the teacher must be in eval mode."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with _amp(amp, x.device):
        out = teacher(x)
    return out.float()


def _optimizer(model: nn.Module, cfg: FKDConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.no_decay_1d:
        groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
    else:
        groups = [{"params": params, "weight_decay": cfg.weight_decay}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def train_fkd(
    model: nn.Module,
    images: Tensor | ImageBank,
    cfg: FKDConfig,
    *,
    store: LabelStore | None = None,
    teacher: nn.Module | None = None,
    view: ViewRecipe | None = None,
    fill: Tensor | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
    log: Callable[[dict], None] | None = None,
    ddp: bool | None = None,
    info: DatasetInfo | None = None,
) -> dict:
    """Train ``model`` in place on ``images`` from a label store or an online teacher.

    ``images`` are either the set's uint8 pixels (N, C, H, W) with ``info`` (its mean/std): kept as
    uint8 on ``device`` and normalised batch by batch, a quarter of the memory of a float32 copy of
    the set; or an :class:`~decoct.formats.image_bank.ImageBank` (a set larger than
    :func:`~decoct.formats.image_bank.max_set_bytes`: each batch decoded from the set's files; ``info``
    defaults to the bank's); or, as before, already normalised float images (then ``info`` is not
    needed). All give the same student bit for bit (normalising is per element, so normalising a
    batch equals taking the batch of the normalised set).

    Exactly one of ``store`` / ``teacher``. ``fill`` is the padding value of padded crops (see
    :func:`fill_value`). Returns ``{"steps", "label_source", "stored_batches_used", "ranks"}``; ``log``
    receives ``{"epoch", "lr", "loss"}`` after every epoch. A store read per epoch
    (:meth:`LabelStore.from_label_files` of a loaded set) is read as the plan goes: a training epoch
    that replays one stored epoch reads that file, one that draws batches from a pool reads just
    those batches' rows (:meth:`LabelStore.read_batch`).

    ``ddp`` (default: when a torch.distributed group with more than one rank is joined): every rank
    builds the same views of the whole batch (mix partners need the whole batch), keeps a contiguous
    1/world slice, and DistributedDataParallel averages the gradients of the slices' batch-mean
    losses: the full-batch gradient when the batch divides evenly. BN statistics are per rank, as
    with the reference's DataParallel (docs/methods/lpld.md, Where decoct departs from the paper or
    the released code).
    """
    from decoct.runtime.runs import progress as bar_of

    if (store is None) == (teacher is None):
        raise ValueError("train_fkd needs exactly one of store= (stored labels) or teacher= (online)")
    dev = torch.device(device)
    if cfg.amp and dev.type != "cuda":
        raise ValueError(f"amp (bf16 autocast) is supported on CUDA only, got device {dev}")
    shape, fetch = _replay_images(images, info, dev)
    n, c, h, w = shape
    fill_t = (torch.zeros(c) if fill is None else fill).to(dev)
    g = seeded_generator(seed, "student-plan")
    if store is not None:
        if cfg.batch_size is not None and cfg.batch_size != store.batch:
            raise LabelStoreError(
                f"the label store holds batches of {store.batch} images; the student must train with that batch "
                f"size (asked for {cfg.batch_size}) because each stored view is tied to its batch (CutMix/Mixup "
                "partners, BN statistics)")
        if int(store.header["num_images"]) != n:
            raise LabelStoreError(f"the label store is for {store.header['num_images']} images, got {n}")
        plan = epoch_plan(store, cfg.epochs, cfg.granularity, g)
    else:
        bs = cfg.batch_size or 128
        view = view or ViewRecipe()
    model.to(dev)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if teacher is not None:
        teacher.to(dev).eval()
    rank, world = 0, 1
    dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
    if ddp is None:
        ddp = dist_on and torch.distributed.get_world_size() > 1
    net: nn.Module = model
    if ddp:
        if not dist_on:
            raise ValueError("ddp=True needs a joined torch.distributed process group (launch with torchrun)")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        smallest = store.batch if store is not None else min(bs, n)
        if smallest < world:
            raise ValueError(f"DDP over {world} ranks needs batches of at least {world} images, got {smallest}")
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    opt = _optimizer(model, cfg)
    model.train()
    steps, used = 0, set()
    if store is not None:
        n_batches = sum(len(plan[e]) for e in range(cfg.epochs))
    else:  # the online batches: full ones, plus the last one unless it holds a single image
        n_batches = cfg.epochs * (n // bs + (1 if n % bs > 1 else 0))
    # one bar over every batch of every epoch: progress shows inside an epoch of a large set too
    bar = bar_of(total=n_batches, desc="soft", enabled=progress, unit="batch", span=f"{cfg.epochs} epochs")
    post: dict[str, str] = {}
    for epoch in range(cfg.epochs):
        post["epoch"] = f"{epoch + 1}/{cfg.epochs}"  # the epoch under way; loss and lr: the last finished one
        bar.set_postfix(post, refresh=False)
        lr = cfg.lr * lr_factor(cfg, epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=dev)
        if store is not None:
            batches = plan[epoch]
            # a whole stored epoch in order: read that epoch's file; batches drawn from a pool: their rows only
            e0 = batches[0][0] if batches else 0
            whole = batches == [(e0, p) for p in range(store.epoch_len(e0))] if batches else False
            read = store.batch_at if whole else store.read_batch
        else:
            perm = torch.randperm(n, generator=g)
            batches = [perm[s:s + bs] for s in range(0, n, bs)]
            batches = [b for b in batches if len(b) > 1]  # a 1-image batch breaks BN students
        for item in batches:
            if store is not None:
                e, p = item
                idx, rec, t_logits = read(e, p)
                used.add(item)
                xb = apply_views(fetch(idx), rec, fill_t)
                t_logits = t_logits.to(dev)
            else:
                rec = draw_views(len(item), h, w, view, g)
                xb = apply_views(fetch(item), rec, fill_t)
                t_logits = None  # the teacher labels only this rank's slice, below
            if world > 1:
                part = torch.tensor_split(torch.arange(len(xb), device=dev), world)[rank]
                xb = xb[part]
                if t_logits is not None:
                    t_logits = t_logits[part]
            if t_logits is None:
                t_logits = teacher_logits(teacher, xb, amp=cfg.amp, channels_last=cfg.channels_last)
            if cfg.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with _amp(cfg.amp, dev):
                out = net(xb)
            loss = kd_loss(out, t_logits, cfg.temperature, cfg.t2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
            steps += 1
            bar.update(1)
        if world > 1 and (log is not None or progress):
            torch.distributed.all_reduce(total)
            total /= world
        if log is not None or progress:
            mean = total.item() / max(1, len(batches))
            post.update(loss=f"{mean:.4f}", lr=f"{lr:.3g}")
            if log is not None:
                log({"epoch": epoch, "lr": lr, "loss": mean})
    bar.close()
    return {"steps": steps, "label_source": "store" if store is not None else "online_teacher",
            "stored_batches_used": len(used), "ranks": world}


def _replay_images(images: Tensor | ImageBank, info: DatasetInfo | None, dev: torch.device
                   ) -> tuple[tuple[int, int, int, int], Callable[[Tensor], Tensor]]:
    """(N, C, H, W) of the set, and what gives the normalised float32 batch of some image indices on ``dev``.

    uint8 pixels stay uint8 on ``dev`` (normalised per batch with ``info``); an :class:`ImageBank`
    decodes each batch from the set's files (normalised likewise); float images are taken as already
    normalised (converted to float32 once, as before). Anything else is refused.
    """
    if isinstance(images, ImageBank):
        if info is not None and info.image_shape != images.info.image_shape:
            raise ValueError(f"the image bank holds {images.info.image_shape} images, info says {info.image_shape}")
        binfo = info or images.info
        return images.shape, lambda idx: normalize(images.batch(idx.cpu()).to(dev), binfo)
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (N, C, H, W) tensor or an ImageBank, got {type(images).__name__} "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else ''}")
    shape = tuple(int(s) for s in images.shape)
    if images.dtype == torch.uint8:
        if info is None:
            raise ValueError("uint8 images need info= (the dataset's mean/std) to be normalised per batch; "
                             "or pass normalised float images")
        if tuple(images.shape[1:]) != info.image_shape:
            raise ValueError(f"images have shape (C, H, W) = {tuple(images.shape[1:])}, dataset "
                             f"{info.name!r} needs {info.image_shape}")
        x = images.to(dev)
        return shape, lambda idx: normalize(x[idx.to(dev)], info)  # type: ignore[return-value]
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 pixels (with info=) or normalised float images, got {images.dtype}")
    xf = images.to(dev, torch.float32)
    return shape, lambda idx: xf[idx.to(dev)]  # type: ignore[return-value]


def fit_soft_students(
    factory: Callable[[], nn.Module],
    images: Tensor | ImageBank,
    test_images: Tensor | None,
    test_labels: Tensor | None,
    cfg: FKDConfig,
    *,
    seeds: list[int],
    store: LabelStore | None = None,
    teacher: nn.Module | None = None,
    view: ViewRecipe | None = None,
    fill: Tensor | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    info: DatasetInfo | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
) -> list[float]:
    """Train one student per seed (initialisation and plan draws from the seed); final test accuracies.

    The test accuracy is ``evaluate(model)`` when given (a streamed validation split:
    :func:`decoct.train.trainer.evaluate_split`), else measured on normalised ``test_images``.

    ``images`` as :func:`train_fkd` takes them: uint8 pixels with ``info`` (normalised per batch), an
    :class:`~decoct.formats.image_bank.ImageBank`, or normalised float images.
    """
    accs = []
    for s in seeds:
        model = seeded_model(factory, s)
        train_fkd(model, images, cfg, store=store, teacher=teacher, view=view, fill=fill, seed=s, device=device,
                  progress=progress, info=info)
        if evaluate is not None:
            accs.append(evaluate(model))
            continue
        if test_images is None or test_labels is None:
            raise ValueError("fit_soft_students needs test_images and test_labels, or evaluate=")
        accs.append(evaluate_accuracy(model, test_images, test_labels, cfg.eval_batch_size, device,
                                      amp=cfg.amp, channels_last=cfg.channels_last))
    return accs
