"""Expert trajectories for trajectory matching (MTT, Cazenavette et al. 2022): training them.

An *expert* is a network trained on the full real training set; its *trajectory* is its flattened
parameter vector before training and after every epoch. Trajectory matching (``decoct.matching.tm``)
starts a student at epoch ``t`` of a random expert and asks the synthetic set to move it, in a few
steps, to where the expert was at epoch ``t + M``.

Recipe (MTT ``buffer.py``; docs/methods/tm.md, Experts): the protocol ConvNet for the image size
(depth from the size, width 128, instance norm), plain SGD with lr 0.01 (the *teacher lr*), momentum
0, weight decay 0, batch 256, no lr decay, DSA augmentation on every minibatch
(``color_crop_cutout_flip_scale_rotate``, one family per call, per-sample draws; scale and rotate
resampled with ``align_corners=True`` as MTT's ``utils.py``), 50 epochs, 100
experts; ZCA whitening where the papers use it (CIFAR-10/100), fitted as MTT fits kornia's
``ZCAWhitening(eps=0.1)``: on the [0, 1] training images, not the normalised ones (:mod:`decoct.augment.zca`;
the expert, the distillation and the evaluation share that one transform). One deliberate difference,
recorded in the manifest:

* MTT's ``buffer.py`` draws its randomness from the wall clock; here expert ``k`` is seeded with
  ``seed + k`` (initialisation, minibatch order, augmentation), so experts are reproducible.

The directory it writes (and extends) is an expert set, whose format, loading and checks are
:mod:`decoct.formats.expert_set`. An interrupted ``train_experts`` keeps the finished experts: calling
it again with the same settings trains the missing ones (a half-trained expert restarts from its seed),
and a larger ``num_experts`` extends the set. Different settings in an existing directory are refused
unless ``force``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from decoct.augment import DSA, ZCA
from decoct.augment.dsa import DEFAULT_STRATEGY, MTT_PARAMS, parse_strategy
from decoct.data import Dataset, load_dataset, normalize
from decoct.formats.expert_set import (
    FORMAT,
    FORMAT_VERSION,
    ExpertMismatchError,
    ExpertSet,
    default_zca,
    load_experts,
    load_zca,
    read_manifest,
)
from decoct.models import model_for
from decoct.models.flat_params import FlatParams
from decoct.runtime.health import DivergedError, rerun_hint
from decoct.runtime.io import atomic_save_tensors, atomic_write_json, sha256_file
from decoct.train import evaluate_accuracy, seeded_model
from decoct.train.trainer import make_generators, minibatches

DEFAULT_MODEL_KWARGS: dict[str, Any] = {"width": 128, "norm": "instance"}

# Settings that must agree for an existing expert directory to be reused or extended.
_SETTING_KEYS = ("dataset", "image_shape", "num_classes", "model", "model_kwargs", "zca", "epochs", "lr",
                 "momentum", "weight_decay", "batch_size", "augment", "seed")


# ------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------


def _train_expert(net: FlatParams, model: nn.Module, x: Tensor, y: Tensor, xt: Tensor, yt: Tensor, *,
                  epochs: int, lr: float, momentum: float, weight_decay: float, batch_size: int,
                  augment: Callable[[Tensor, torch.Generator], Tensor] | None, seed: int, device: torch.device,
                  amp: bool, channels_last: bool, progress: Callable[[int, float], None] | None,
                  on_batch: Callable[[int], None] | None = None, hint: str = "", label: str = "expert"
                  ) -> tuple[Tensor, list[float], list[float]]:
    """Train one expert; return (trajectory (E+1, P), test accuracy per saved point, train loss per epoch).

    ``on_batch(images)`` after every minibatch, ``progress(epoch, loss)`` after every epoch; a
    non-finite loss raises :class:`~decoct.runtime.health.DivergedError` at once (checked every 20 batches and
    at each epoch's end), naming ``label`` and saying what to change (``hint``).
    """
    traj = torch.empty(epochs + 1, net.num_params)
    traj[0] = net.flatten(model).cpu()
    accs = [evaluate_accuracy(model, xt, yt, device=device, amp=amp, channels_last=channels_last)]
    losses: list[float] = []
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    perm_gen, aug_gen = make_generators(seed, device)
    n = len(x)
    model.train()
    for e in range(epochs):
        perm = torch.randperm(n, generator=perm_gen).to(device)
        total = torch.zeros((), device=device)
        steps = 0
        for start, stop in minibatches(n, batch_size):
            idx = perm[start:stop]
            xb = x[idx]
            if augment is not None:
                xb = augment(xb, aug_gen)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = model(xb)
            loss = F.cross_entropy(out.float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
            steps += 1
            if on_batch is not None:
                on_batch(stop - start)
            if steps % 20 == 0 and not bool(torch.isfinite(total)):  # a cheap sync every 20 batches
                raise DivergedError("expert training", f"{label}, epoch {e + 1}, batch {steps}",
                                    "the training loss", float(total), hint)
        traj[e + 1] = net.flatten(model).cpu()
        losses.append(total.item() / max(1, steps))
        if not math.isfinite(losses[-1]):
            raise DivergedError("expert training", f"{label}, epoch {e + 1}", "the training loss", losses[-1], hint)
        accs.append(evaluate_accuracy(model, xt, yt, device=device, amp=amp, channels_last=channels_last))
        if progress is not None:
            progress(e + 1, losses[-1])
    return traj, accs, losses


def train_experts(dataset: str | Dataset, out: str | Path, *, num_experts: int, epochs: int = 50,
                  model: str = "convnet", model_kwargs: dict[str, Any] | None = None, lr: float = 0.01,
                  momentum: float = 0.0, weight_decay: float = 0.0, batch_size: int = 256,
                  zca: bool | None = None, augment: str = DEFAULT_STRATEGY, seed: int = 0,
                  device: str | torch.device = "auto", data_root: str | None = None, download: bool = False,
                  amp: bool = False, channels_last: bool = False, force: bool = False,
                  progress: bool = True, log: Callable[[dict[str, Any]], None] | None = None) -> ExpertSet:
    """Train ``num_experts`` expert trajectories of ``epochs`` epochs into ``out`` (resumable).

    ``dataset``: a registered name or a loaded :class:`~decoct.data.Dataset`. ``zca=None`` means
    "as the papers" (on for CIFAR-10/100). ``augment``: a DSA strategy or ``"none"``.
    Already finished experts with the same settings are kept; ``force`` deletes them first.
    Returns the :class:`ExpertSet` (see :func:`load_experts`).
    """
    from decoct.runtime.distributed import resolve_device
    from decoct.runtime.runs import progress as progress_bar

    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if lr <= 0 or momentum < 0 or weight_decay < 0 or batch_size < 1:
        raise ValueError(f"need lr > 0, momentum >= 0, weight_decay >= 0, batch_size >= 1; got lr={lr}, "
                         f"momentum={momentum}, weight_decay={weight_decay}, batch_size={batch_size}")
    parse_strategy(augment)  # a typo fails here, not after the first expert
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    if amp and dev.type != "cuda":
        raise ValueError(f"amp (bf16 autocast) is supported on CUDA only, got device {dev}")
    data = dataset if isinstance(dataset, Dataset) else load_dataset(dataset, root=data_root, download=download)
    info = data.info
    use_zca = default_zca(info.name) if zca is None else bool(zca)
    kwargs = dict(DEFAULT_MODEL_KWARGS if model_kwargs is None else model_kwargs)
    model_name = model.lower()

    def factory() -> nn.Module:
        return model_for(model_name, info, **kwargs)

    net = FlatParams(factory())
    settings = dict(dataset=info.name, image_shape=list(info.image_shape), num_classes=info.num_classes,
                    model=model_name, model_kwargs=kwargs, zca=use_zca, epochs=int(epochs), lr=float(lr),
                    momentum=float(momentum), weight_decay=float(weight_decay), batch_size=int(batch_size),
                    augment=augment, seed=int(seed))
    root = Path(out)
    manifest: dict[str, Any] | None = None
    if (root / "manifest.json").exists():
        if force:
            _remove_experts(root)
        else:
            manifest = read_manifest(root)
            old = manifest["settings"]
            changed = [k for k in _SETTING_KEYS if old.get(k) != settings[k]]
            if changed:
                diff = ", ".join(f"{k}: {old.get(k)!r} -> {settings[k]!r}" for k in changed)
                raise ExpertMismatchError(f"{root} holds experts with other settings ({diff}); use another --out, "
                                          "or --force to delete them and start over")
    root.mkdir(parents=True, exist_ok=True)
    if manifest is None:
        manifest = dict(format=FORMAT, version=FORMAT_VERSION, dataset=info.to_dict(), settings=settings,
                        num_params=net.num_params, param_layout=net.layout(),
                        zca_file="zca.safetensors" if use_zca else None,
                        notes=("ZCA (kornia's recipe, eps 0.1) fitted on the [0, 1] training pixels; expert k is seeded "
                               "with seed + k; trajectory row e = parameters after e epochs (row 0 = init)"),
                        experts=[])
    x = normalize(data.train.images, info, dev)
    xt = normalize(data.test.images, info, dev)
    y, yt = data.train.labels.to(dev), data.test.labels.to(dev)
    zca_obj: ZCA | None = None
    if use_zca:
        zpath = root / "zca.safetensors"
        if zpath.exists():
            zca_obj = load_zca(root, manifest)
        else:
            zca_obj = ZCA().fit(x, input_mean=info.mean, input_std=info.std)  # on [0, 1] pixels, as MTT
            atomic_save_tensors(zpath, zca_obj.state_dict())
        manifest["zca_sha256"] = sha256_file(zpath)  # load_experts checks it
        zca_obj.to(dev)
        x, xt = zca_obj.transform(x), zca_obj.transform(xt)
    atomic_write_json(root / "manifest.json", manifest)

    dsa = DSA(augment, MTT_PARAMS) if parse_strategy(augment) else None  # align_corners=True, as MTT's buffer.py
    aug_fn = (lambda xb, gen: dsa(xb, generator=gen)) if dsa is not None else None  # noqa: E731
    done = {int(e["index"]) for e in manifest["experts"]}
    todo = [k for k in range(num_experts) if k not in done]
    # one bar over every image of every epoch of every expert still to train (progress inside an epoch)
    bar = progress_bar(total=len(todo) * epochs * len(x), desc="experts", enabled=progress, unit="img",
                       span=f"{len(todo)} experts x {epochs} epochs",
                       log=(lambda **ev: log(ev)) if log is not None else None)
    hint = rerun_hint(("--lr", lr))
    for k in todo:
        t0 = time.perf_counter()
        s = int(seed) + k
        m = seeded_model(factory, s).to(dev)
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
        bar.set_postfix(expert=k, epoch=f"1/{epochs}", refresh=False)

        def tick(epoch: int, loss: float, k: int = k) -> None:
            bar.set_postfix(expert=k, epoch=f"{min(epoch + 1, epochs)}/{epochs}", loss=f"{loss:.3f}", refresh=False)

        try:
            traj, accs, losses = _train_expert(net, m, x, y, xt, yt, epochs=epochs, lr=lr, momentum=momentum,
                                               weight_decay=weight_decay, batch_size=batch_size, augment=aug_fn,
                                               seed=s, device=dev, amp=amp, channels_last=channels_last,
                                               progress=tick, on_batch=bar.update, hint=hint, label=f"expert {k}")
            if not torch.isfinite(traj).all():
                raise DivergedError("expert training", f"expert {k}", "the trajectory", "not finite (NaN or inf)",
                                    hint)
        except DivergedError as err:
            bar.close()
            if log is not None:
                log(err.event())
            raise
        fname = f"expert_{k:04d}.safetensors"
        atomic_save_tensors(root / fname, {"trajectory": traj},
                            metadata={"format": FORMAT, "index": str(k), "seed": str(s)})
        entry = dict(index=k, file=fname, seed=s, sha256=sha256_file(root / fname),
                     test_accuracy=[round(a, 6) for a in accs], train_loss=[round(v, 6) for v in losses],
                     seconds=round(time.perf_counter() - t0, 3))
        manifest["experts"] = sorted(manifest["experts"] + [entry], key=lambda e: e["index"])
        atomic_write_json(root / "manifest.json", manifest)
        if log is not None:
            log(dict(event="expert", index=k, final_accuracy=accs[-1], seconds=entry["seconds"]))
    bar.close()
    return load_experts(root)


def _remove_experts(root: Path) -> None:
    """Delete what :func:`train_experts` wrote (and nothing else) before a forced restart."""
    for p in root.glob("expert_*.safetensors"):
        p.unlink()
    for name in ("manifest.json", "zca.safetensors"):
        if (root / name).exists():
            (root / name).unlink()


__all__ = ["DEFAULT_MODEL_KWARGS", "train_experts"]
