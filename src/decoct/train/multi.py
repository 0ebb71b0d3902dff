"""Train R evaluation students at once (the R seeds of a distilled-set evaluation).

Every engine reproduces R independent :func:`~decoct.train.trainer.train_model` runs:
student r is built by ``seeded_model(factory, seeds[r])`` and draws its minibatch order
and augmentation from the generators ``make_generators(seeds[r], device)``, exactly as
``train_model(seed=seeds[r])`` does; ``augment`` is called once per student per step with
that student's generator. The engines differ only in how the R forward/backward passes run:

* ``sequential``: R calls of ``train_model`` (any model).
* ``vmap``: ``torch.func.stack_module_state`` + ``vmap(functional_call)``: one batched
  forward/backward for all students (any model without running-stat buffers).
* ``grouped``: ConvNet only: :class:`GroupedConvNet` packs R ConvNets into grouped
  convolutions (student r's images in channel block r): plain modules, no functorch.

The stacked engines optimise the *sum* of the per-student losses, so each student's
gradient is exactly its own, and use one ``torch.optim`` optimizer over the stacked
parameters: SGD (momentum, weight decay) and AdamW are element-wise, so one optimizer over
stacked tensors performs exactly the arithmetic of R separate optimizers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from decoct.models.convnet import ConvNet
from decoct.runtime.progress import progress as progress_bar
from decoct.train.trainer import (
    Augment,
    TrainConfig,
    autocast,
    check_device,
    check_targets,
    lr_at,
    make_generators,
    make_optimizer,
    minibatches,
    seeded_model,
    target_loss,
    train_model,
)

__all__ = [
    "ENGINES",
    "GroupedConvNet",
    "fit_students",
    "resolve_engine",
    "train_students",
]

ENGINES = ("auto", "sequential", "vmap", "grouped")

# (B, C, H, W) shared test images -> (R, B, K) logits of every student.
Predict = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------------------------
# GroupedConvNet
# --------------------------------------------------------------------------------------


def _grouped_supported(model: nn.Module) -> bool:
    return isinstance(model, ConvNet) and model.config["norm"] in ("instance", "none")


class GroupedConvNet(nn.Module):
    """R ConvNets as one network: grouped convolutions, per-channel GroupNorm, batched head.

    Input (B, R*C, H, W) holds student r's images in channel block r; conv weights are
    (R*W, C, 3, 3) with ``groups=R`` and instance norm is ``GroupNorm(R*W, R*W)``, both
    per channel, hence per student. One call per layer instead of R pays off where per-call
    overhead dominates (small batches on a GPU); on a 2-core CPU it measured 12-23% slower
    than R separate ConvNets, which is why ``engine='auto'`` does not pick it there.
    """

    def __init__(self, nets: Sequence[ConvNet]) -> None:
        super().__init__()
        if not nets:
            raise ValueError("GroupedConvNet needs at least one ConvNet")
        first = nets[0]
        for net in nets:
            if not _grouped_supported(net):
                cfg = getattr(net, "config", None)
                raise ValueError(
                    f"GroupedConvNet supports ConvNet with norm 'instance' or 'none', got {type(net).__name__} {cfg}"
                )
            if net.config != first.config or net.classifier.weight.shape != first.classifier.weight.shape:
                raise ValueError("GroupedConvNet needs R ConvNets of one architecture")
        self.num_students = R = len(nets)
        self.in_channels = first.features[0].in_channels
        self.width = first.config["width"]
        layers: list[nn.Module] = []
        for i, layer in enumerate(first.features):
            parts = [net.features[i] for net in nets]
            if isinstance(layer, nn.Conv2d):
                conv = nn.Conv2d(
                    R * layer.in_channels, R * layer.out_channels, layer.kernel_size,
                    stride=layer.stride, padding=layer.padding, groups=R, bias=layer.bias is not None,
                )
                with torch.no_grad():
                    conv.weight.copy_(torch.cat([p.weight for p in parts]))
                    if conv.bias is not None:
                        conv.bias.copy_(torch.cat([p.bias for p in parts]))
                layers.append(conv)
            elif isinstance(layer, nn.GroupNorm):
                if layer.num_groups != layer.num_channels:
                    raise ValueError("GroupedConvNet needs per-channel GroupNorm (instance norm)")
                norm = nn.GroupNorm(R * layer.num_channels, R * layer.num_channels, layer.eps, layer.affine)
                if layer.affine:
                    with torch.no_grad():
                        norm.weight.copy_(torch.cat([p.weight for p in parts]))
                        norm.bias.copy_(torch.cat([p.bias for p in parts]))
                layers.append(norm)
            elif isinstance(layer, (nn.ReLU, nn.AvgPool2d, nn.MaxPool2d, nn.Identity)):
                layers.append(copy.deepcopy(layer))
            else:
                raise ValueError(f"GroupedConvNet cannot group layer {type(layer).__name__}")
        self.features = nn.Sequential(*layers)
        self.weight = nn.Parameter(torch.stack([net.classifier.weight.detach() for net in nets]).clone())
        self.bias = nn.Parameter(torch.stack([net.classifier.bias.detach() for net in nets]).clone())

    def _head(self, h: Tensor) -> Tensor:
        """(B, R*W, h, w) features -> (R, B, K) logits; per-student flatten order = ConvNet's."""
        B = h.shape[0]
        feat = h.reshape(B, self.num_students, -1)
        return torch.einsum("brf,rkf->rbk", feat, self.weight) + self.bias.unsqueeze(1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, R, C, H, W) or packed (B, R*C, H, W) per-student images -> (R, B, K) logits."""
        if x.dim() == 5:
            x = x.reshape(x.shape[0], -1, *x.shape[3:])
        return self._head(self.features(x))

    def forward_shared(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images seen by every student -> (R, B, K) logits.

        The first conv runs ungrouped on the shared input (same per-channel dot products as the
        grouped conv on R copies), which avoids replicating the input R times.
        """
        conv = self.features[0]
        h = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
        for layer in list(self.features)[1:]:
            h = layer(h)
        return self._head(h)

    @torch.no_grad()
    def copy_to(self, nets: Sequence[ConvNet]) -> list[ConvNet]:
        """Write student r's weights back into ``nets[r]`` (same architecture) and return them."""
        if len(nets) != self.num_students:
            raise ValueError(f"expected {self.num_students} ConvNets, got {len(nets)}")
        for i, layer in enumerate(self.features):
            for name, p in layer.named_parameters():
                for r, chunk in enumerate(p.chunk(self.num_students, dim=0)):
                    nets[r].features[i].get_parameter(name).copy_(chunk)
        for r, net in enumerate(nets):
            net.classifier.weight.copy_(self.weight[r])
            net.classifier.bias.copy_(self.bias[r])
        return list(nets)


# --------------------------------------------------------------------------------------
# Engine choice
# --------------------------------------------------------------------------------------


def _check_vmap_supported(model: nn.Module) -> None:
    """vmap cannot update running statistics per student: refuse such models up front."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            raise ValueError(
                f"engine 'vmap' does not support modules with running statistics "
                f"({name or 'model'}: {type(m).__name__}); use engine 'sequential' "
                f"or a ConvNet with norm='instance'"
            )


def resolve_engine(engine: str, model: nn.Module, device: torch.device | str) -> str:
    """The concrete engine for ``engine`` given a sample student and the device.

    ``auto``: on CUDA, ``vmap`` for models without running-stat buffers (one batched kernel
    per layer instead of R small launches), else ``sequential``. On CPU always
    ``sequential``: CPU training of these students is compute/memory bound, not call-overhead
    bound, so batching students buys nothing, and oneDNN's grouped convolutions are slower
    than R plain ones (benchmarks/bench_multi_student.py, 2-core Xeon, R=5 ConvNet-D3 with
    DSA: grouped 0.77-0.88x and vmap 0.48-0.66x the speed of sequential at IPC 1 and 10,
    with or without channels_last).
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
    if engine != "auto":
        return engine
    if torch.device(device).type != "cuda":
        return "sequential"
    try:
        _check_vmap_supported(model)
    except ValueError:
        return "sequential"
    return "vmap"


# --------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------


@dataclass
class _Fitted:
    models: list[nn.Module]
    predict: Predict


def _fit_sequential(
    models: list[nn.Module], images: Tensor, targets: Tensor, cfg: TrainConfig, seeds: list[int],
    augment: Augment | None, dev: torch.device, progress: bool,
) -> _Fitted:
    for model, seed in zip(models, seeds, strict=True):
        train_model(model, images, targets, cfg, augment=augment, seed=seed, device=dev, progress=progress)

    def predict(x: Tensor) -> Tensor:
        return torch.stack([m(x) for m in models])

    return _Fitted(models, predict)


def _fit_stacked(
    forward: Callable[[Tensor], Tensor],
    params: list[Tensor],
    set_train: Callable[[bool], None],
    images: Tensor,
    targets: Tensor,
    cfg: TrainConfig,
    seeds: list[int],
    augment: Augment | None,
    dev: torch.device,
    progress: bool,
) -> None:
    """The shared loop of the stacked engines.

    ``forward`` maps (B, R, C, H, W) (student r's minibatch at [:, r]) to (R, B, K) logits.
    """
    R = len(seeds)
    x_all = images.to(dev, torch.float32)
    t_all = targets.to(dev)
    if t_all.is_floating_point():
        t_all = t_all.float()
    n = len(x_all)
    gens = [make_generators(s, dev) for s in seeds]
    opt = make_optimizer(params, cfg)
    set_train(True)
    # one bar over every image of every epoch (per student): progress shows inside an epoch of a large set
    bar = progress_bar(total=cfg.epochs * n, desc=f"train x{R}", enabled=progress, unit="img",
                       span=f"{cfg.epochs} epochs of {R} students")
    for epoch in range(cfg.epochs):
        lr = lr_at(cfg, epoch)
        bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", refresh=False)
        for group in opt.param_groups:
            group["lr"] = lr
        perms = torch.stack([torch.randperm(n, generator=perm_gen) for perm_gen, _ in gens]).to(dev)
        for start, stop in minibatches(n, cfg.batch_size):
            idx = perms[:, start:stop]  # (R, B)
            B = stop - start
            if augment is None:
                xb = x_all[idx.t()]  # (B, R, C, H, W)
            else:
                xb = torch.stack([augment(x_all[idx[r]], gens[r][1]) for r in range(R)], dim=1)
            tb = t_all[idx]  # (R, B) or (R, B, K)
            with autocast(cfg, dev):
                out = forward(xb)
            loss = target_loss(out.reshape(R * B, -1), tb.reshape(R * B, *tb.shape[2:]), cfg, B)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(B)
    bar.close()


def _fit_vmap(
    models: list[nn.Module], images: Tensor, targets: Tensor, cfg: TrainConfig, seeds: list[int],
    augment: Augment | None, dev: torch.device, progress: bool,
) -> _Fitted:
    _check_vmap_supported(models[0])
    for m in models:
        m.to(dev)
    params, buffers = stack_module_state(models)  # new leaf tensors (R, ...), requires_grad
    base = copy.deepcopy(models[0]).to("meta")

    def one(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(base, (p, b), (x,))

    batched = vmap(one, in_dims=(0, 0, 1))  # x: (B, R, C, H, W), student r at [:, r]
    shared = vmap(one, in_dims=(0, 0, None))

    def forward(x: Tensor) -> Tensor:
        if cfg.channels_last:
            # Store (B, R, C, H, W) as (B, H, W, R, C): when vmap's conv rule folds R into
            # the channels, (B, R*C, H, W) is then a channels_last view, no copy needed.
            x = x.permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2)
        return batched(params, buffers, x)

    trainable = [p for p in params.values() if p.requires_grad]
    _fit_stacked(forward, trainable, base.train, images, targets, cfg, seeds, augment, dev, progress)
    with torch.no_grad():
        for name, p in params.items():
            for r, m in enumerate(models):
                m.get_parameter(name).copy_(p[r])

    def predict(x: Tensor) -> Tensor:
        base.eval()
        return shared(params, buffers, x)

    return _Fitted(models, predict)


def _fit_grouped(
    models: list[nn.Module], images: Tensor, targets: Tensor, cfg: TrainConfig, seeds: list[int],
    augment: Augment | None, dev: torch.device, progress: bool,
) -> _Fitted:
    net = GroupedConvNet(models).to(dev)  # raises for anything but instance/no-norm ConvNets
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)

    def forward(x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], -1, *x.shape[3:])  # (B, R*C, H, W): a view, no copy
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return net(x)

    trainable = [p for p in net.parameters() if p.requires_grad]
    _fit_stacked(forward, trainable, net.train, images, targets, cfg, seeds, augment, dev, progress)
    net.copy_to([m.to(dev) for m in models])

    def predict(x: Tensor) -> Tensor:
        net.eval()
        return net.forward_shared(x)

    return _Fitted(models, predict)


_ENGINES = {"sequential": _fit_sequential, "vmap": _fit_vmap, "grouped": _fit_grouped}


def _fit(
    factory: Callable[[], nn.Module], images: Tensor, targets: Tensor, cfg: TrainConfig,
    seeds: list[int], augment: Augment | None, engine: str, device: torch.device | str, progress: bool,
) -> _Fitted:
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
    if not seeds:
        raise ValueError("seeds must name at least one student")
    check_targets(images, targets)
    dev = check_device(cfg, device)
    models = [seeded_model(factory, s) for s in seeds]
    name = resolve_engine(engine, models[0], dev)
    return _ENGINES[name](models, images, targets, cfg, list(seeds), augment, dev, progress)


def fit_students(
    factory: Callable[[], nn.Module],
    images: Tensor,
    targets: Tensor,
    cfg: TrainConfig,
    *,
    seeds: list[int],
    augment: Augment | None = None,
    engine: str = "auto",
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> list[nn.Module]:
    """Train one student per seed and return the trained models (on ``device``).

    Whatever the engine, student r equals ``train_model(seeded_model(factory, seeds[r]), ...,
    seed=seeds[r])`` up to floating-point summation order. See :func:`resolve_engine` for
    what ``engine='auto'`` picks.
    """
    return _fit(factory, images, targets, cfg, seeds, augment, engine, device, progress).models


@torch.no_grad()
def _evaluate_all(
    predict: Predict, images: Tensor, labels: Tensor, cfg: TrainConfig, dev: torch.device, R: int
) -> list[float]:
    """Per-student accuracy, all students per test batch (one pass over the test set)."""
    correct = torch.zeros(R, dtype=torch.long, device=dev)
    for start, stop in minibatches(len(images), cfg.eval_batch_size):
        xb = images[start:stop].to(dev, torch.float32)
        if cfg.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast(cfg, dev):
            pred = predict(xb).argmax(dim=-1)  # (R, B)
        correct += (pred == labels[start:stop].to(dev)).sum(dim=1)
    return [c / max(1, len(images)) for c in correct.tolist()]


def train_students(
    factory: Callable[[], nn.Module],
    images: Tensor,
    targets: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    cfg: TrainConfig,
    *,
    seeds: list[int],
    augment: Augment | None = None,
    engine: str = "auto",
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> list[float]:
    """Final-epoch test accuracy (in [0, 1]) of each of the ``len(seeds)`` students.

    The usual way to score a distilled set: mean and std over students of these numbers.
    """
    fitted = _fit(factory, images, targets, cfg, seeds, augment, engine, device, progress)
    dev = torch.device(device)
    for m in fitted.models:
        m.eval()
    try:
        return _evaluate_all(fitted.predict, test_images, test_labels, cfg, dev, len(fitted.models))
    finally:
        for m in fitted.models:
            m.train()
