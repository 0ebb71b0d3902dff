"""Commands of the decoupled family: ``squeeze``, ``distill sre2l|dwa|lpld|rded``.

Thin wrappers: the work is :func:`decoct.decoupled.squeeze.squeeze`, :func:`decoct.decoupled.recover.recover`
and :func:`decoct.decoupled.rded.rded`. Options left unset on the command line (``None``) take the preset
of the method for the dataset's image size (:data:`decoct.decoupled.recover.PRESETS`,
:data:`decoct.decoupled.rded.PRESETS`); ``configs/decoupled/*.yaml`` hold the papers' settings per table cell.
"""

from __future__ import annotations

import argparse
from typing import Any

_RECOVER_HELP = {
    "sre2l": "SRe2L recover: synthesise images from a BN teacher (CE + BN-statistics matching).",
    "dwa": "DWA: SRe2L recover from real images with directed weight adjustment of the teacher per batch.",
    "lpld": "LPLD recover: one class per batch, matched against that class's BN statistics.",
}


def parse_model_kwargs(value: Any) -> dict[str, Any]:
    """``"width=64,depth=3"`` (or a YAML mapping) -> dict, values parsed as YAML scalars."""
    from decoct.runtime.config import short, yaml_scalar

    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return dict(value)
    out: dict[str, Any] = {}
    for item in str(value).split(","):
        if "=" not in item:
            raise ValueError(f"--model-kwargs expects key=value[,key=value...], got {short(item)}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml_scalar(v)  # 1e-5 is a float, as in --set
    return out


def cmd_squeeze(args: argparse.Namespace) -> int:
    from decoct.cli.common import data_options, resolved_config
    from decoct.decoupled.squeeze import squeeze
    from decoct.runtime import distributed

    cfg = resolved_config(args)
    for k in ("max_epochs", "device", "download", "data_root", "checkpoint_every", "workers"):
        cfg.pop(k, None)
    t = squeeze(args.dataset, args.model, out=args.out, epochs=args.epochs, lr=args.lr, momentum=args.momentum,
                weight_decay=args.weight_decay, batch_size=args.batch_size, schedule=args.schedule,
                optimizer=args.optimizer, label_smoothing=args.label_smoothing, augment=args.augment,
                model_kwargs=parse_model_kwargs(args.model_kwargs), pretrained=args.pretrained,
                weights=args.weights, data_options=data_options(args), stats_augment=args.stats_augment, stats_batch_size=args.stats_batch_size,
                stats_momentum=args.stats_momentum, seed=args.seed, device=args.device, amp=args.amp,
                channels_last=args.channels_last, data_root=args.data_root, download=args.download,
                resume=args.resume, force=args.force, show_progress=args.progress,
                checkpoint_every=args.checkpoint_every, stop_after=args.max_epochs, config=cfg)
    if t is None or distributed.rank() != 0:
        return 0
    if t.meta.get("unfinished"):
        print(f"squeeze stopped early; continue with: decoct squeeze ... --out {args.out} --resume")
        return 0
    acc = t.meta.get("test_accuracy")
    acc_s = f"{100 * acc:.2f}%" if acc is not None else "n/a"
    print(f"teacher {t.meta['model']} on {t.info.name}: test accuracy {acc_s}, "
          f"{len(t.stats.layers)} BN layers with global and per-class statistics -> {args.out}")
    return 0


def _recover_options(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("iterations", "batch_size", "lr", "r_bn", "r_var", "first_bn_multiplier", "init", "batching",
            "bn_target", "class_stats", "dwa_steps", "dwa_rho", "jitter", "jitter_mode", "crop", "flip",
            "crop_scale_min", "seed", "amp", "channels_last", "float_storage")
    return {k: getattr(args, k) for k in keys}


def cmd_recover(args: argparse.Namespace) -> int:
    from decoct.cli.common import data_options, resolved_config
    from decoct.decoupled.recover import recover
    from decoct.runtime import distributed

    extra = {"data_options": data_options(args)} if data_options(args) else {}
    dset = recover(args.method, teacher=args.teacher, ipc=args.ipc, out=args.out, dataset=args.dataset,
                   data_root=args.data_root, download=args.download, device=args.device, resume=args.resume,
                   force=args.force, show_progress=args.progress, checkpoint_every=args.checkpoint_every,
                   stop_after=args.max_iterations, config=resolved_config(args), **_recover_options(args), **extra)
    if distributed.rank() != 0:
        return 0
    if dset is None or not dset.meta.get("complete", True):
        print(f"{args.method}: stopped early; continue with --resume (run directory {args.out})")
        return 0
    st = dset.storage()
    print(f"{args.method}: {len(dset)} images ({dset.meta.get('ipc')} per class) -> {args.out}  "
          f"{st['bytes_on_disk']['total']:,} B on disk, {st['raw_bytes']['total']:,} B raw  "
          f"[{dset.meta.get('seconds', 0):.1f}s]")
    return 0


def cmd_rded(args: argparse.Namespace) -> int:
    from decoct.cli.common import data_options, resolved_config
    from decoct.decoupled.rded import rded

    dset = rded(args.teacher, args.ipc, args.out, dataset=args.dataset, data_root=args.data_root,
                download=args.download, data_options=data_options(args) or None, seed=args.seed, device=args.device,
                resume=args.resume, force=args.force, show_progress=args.progress,
                checkpoint_every=args.checkpoint_every, stop_after=args.max_iterations, config=resolved_config(args),
                candidates=args.candidates, crops=args.crops, factor=args.factor,
                crop_scale_min=args.crop_scale_min, batch_size=args.batch_size, amp=args.amp)
    if not dset.meta.get("complete", True):
        print(f"rded: stopped early; continue with --resume (run directory {args.out})")
        return 0
    st = dset.storage()
    loss = dset.meta.get("teacher_loss", {})
    print(f"rded: {len(dset)} images ({dset.meta.get('ipc')} per class, factor {dset.meta.get('factor')}) -> "
          f"{args.out}  {st['bytes_on_disk']['total']:,} B on disk, {st['raw_bytes']['total']:,} B raw  "
          f"teacher CE kept {loss.get('kept')} vs all crops {loss.get('all_crops')}  "
          f"[{dset.meta.get('seconds', 0):.1f}s]")
    return 0


def register(cli: Any) -> None:
    """Add this family's commands to the ``decoct`` parser (see :class:`decoct.cli.common.CommandAdder`)."""
    from decoct.decoupled.squeeze import AUGMENTS, PRETRAINED

    p = cli.command("squeeze", cmd_squeeze,
                    "Train a BatchNorm teacher (or wrap torchvision's ImageNet weights) and record its "
                    "BN-input statistics, global and per class.")
    p.add_argument("--dataset", required=True, help="registered dataset name")
    p.add_argument("--model", default="convnet_bn", help="teacher model (needs BatchNorm: convnet_bn, resnet18, ...)")
    p.add_argument("--model-kwargs", default=None, metavar="K=V,...",
                   help="model options, e.g. width=64 or stem=imagenet")
    p.add_argument("--out", required=True, help="teacher directory to create")
    p.add_argument("--pretrained", default=None, choices=PRETRAINED,
                   help="use torchvision's ImageNet weights (must be cached locally; never downloaded)")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="wrap a torchvision resnet18/resnet50 state dict from this local file (.pth read "
                        "weights-only, or .safetensors; e.g. resnet18-f37072fd.pth): no training, never downloaded")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "step", "constant"])
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--augment", default="auto", choices=AUGMENTS,
                   help="auto: random crop + flip up to 32 px, RandomResizedCrop + flip above, no flip for grey")
    p.add_argument("--stats-augment", default="train", choices=("train", *AUGMENTS),
                   help="augmentation of the BN-statistics pass (train: as in training, like LPLD)")
    p.add_argument("--stats-batch-size", type=int, default=256)
    p.add_argument("--stats-momentum", type=float, default=0.1, help="EMA momentum of LPLD's class statistics")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=1, help="epochs between checkpoints")
    p.add_argument("--max-epochs", type=int, default=None,
                   help="stop after this many epochs of this call (checkpointed; continue with --resume)")
    cli.data_flags(p)

    for method, help_ in _RECOVER_HELP.items():
        p = cli.distill(method, cmd_recover, help_)
        p.set_defaults(method=method)
        p.add_argument("--teacher", required=True, help="teacher directory made by `decoct squeeze`")
        p.add_argument("--ipc", type=int, required=True, help="images per class")
        p.add_argument("--out", required=True, help="run directory to create")
        p.add_argument("--dataset", default=None, help="dataset (default: the teacher's)")
        p.add_argument("--iterations", type=int, default=None,
                       help="optimisation steps per batch (preset); the run's log.jsonl and progress bar count "
                            "steps over all batches, batches x this")
        p.add_argument("--batch-size", type=int, default=None,
                       help="classes per batch (sre2l/dwa) or images per batch (lpld); preset")
        p.add_argument("--lr", type=float, default=None, help="Adam learning rate, cosine to 0 (preset)")
        p.add_argument("--r-bn", type=float, default=None, help="weight of the BN-matching loss (preset)")
        p.add_argument("--r-var", type=float, default=None, help="extra weight of the variance term (DWA; preset)")
        p.add_argument("--first-bn-multiplier", type=float, default=None, help="weight of the first BN layer (10)")
        p.add_argument("--init", default=None, choices=["noise", "real"], help="initialisation (preset)")
        p.add_argument("--batching", default=None, choices=["ipc", "class"],
                       help="ipc: one image per class per batch (SRe2L/DWA); class: one class per batch (LPLD)")
        p.add_argument("--bn-target", default=None, choices=["running", "global", "class"],
                       help="BN statistics matched: teacher's running stats, squeeze-pass global, per class")
        p.add_argument("--class-stats", default="ema", choices=["ema", "exact"],
                       help="per-class statistics: LPLD's EMA (ema) or exact pooled moments")
        p.add_argument("--dwa-steps", type=int, default=None, help="K steps of directed weight adjustment (0: off)")
        p.add_argument("--dwa-rho", type=float, default=None, help="radius rho of the weight adjustment")
        p.add_argument("--jitter", type=int, default=None, help="maximum roll in pixels (preset)")
        p.add_argument("--jitter-mode", default=None, choices=["nonneg", "symmetric"])
        p.add_argument("--crop", default=None, action=argparse.BooleanOptionalAction,
                       help="batch-shared RandomResizedCrop each iteration (preset)")
        p.add_argument("--flip", default=None, action=argparse.BooleanOptionalAction,
                       help="batch-shared random flip each iteration (preset)")
        p.add_argument("--crop-scale-min", type=float, default=0.08)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
        p.add_argument("--channels-last", action="store_true")
        p.add_argument("--float-storage", default=None, choices=["float16", "float32"],
                       help="store float images instead of 8-bit PNGs")
        p.add_argument("--checkpoint-every", type=int, default=100, help="iterations between checkpoints")
        p.add_argument("--max-iterations", type=int, default=None,
                       help="stop after this many iterations of this call (checkpointed; continue with --resume)")
        cli.data_flags(p)

    p = cli.distill("rded", cmd_rded,
                    "RDED: keep the random crops of real images the teacher is most confident on (lowest "
                    "cross-entropy), stitched factor x factor per image; no optimisation, no stored labels.")
    p.add_argument("--teacher", required=True, help="teacher directory made by `decoct squeeze`")
    p.add_argument("--ipc", type=int, required=True, help="images per class")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--dataset", default=None, help="dataset (default: the teacher's)")
    p.add_argument("--candidates", type=int, default=None,
                   help="real images scored per class (preset: 300; all of a smaller class)")
    p.add_argument("--crops", type=int, default=None, help="random crops scored per candidate image (preset: 5)")
    p.add_argument("--factor", type=int, default=None,
                   help="patches per side of each image (preset: 1 up to 64 px, 2 above)")
    p.add_argument("--crop-scale-min", type=float, default=0.08, help="smallest crop area fraction")
    p.add_argument("--batch-size", type=int, default=100,
                   help="candidate images per teacher pass (x crops forwards)")
    p.add_argument("--seed", type=int, default=0, help="seeds the candidates and crops of every class")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for the teacher (CUDA only)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="classes between checkpoints")
    p.add_argument("--max-iterations", type=int, default=None,
                   help="stop after this many classes of this call (checkpointed; continue with --resume)")
    cli.data_flags(p)
