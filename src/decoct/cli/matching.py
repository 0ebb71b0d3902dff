"""Commands of the matching family: ``distill dm``, ``quantize``, ``experts``, ``distill tm``.

Thin: argument parsing only; the work is :func:`decoct.matching.dm.distill_dm`,
:func:`decoct.matching.palette.quantize.quantize_command`, :func:`decoct.matching.experts.train_experts`
and :func:`decoct.matching.tm.distill_tm` (the Python API). ``configs/dm/*.yaml`` and
``configs/tm/*.yaml`` hold the papers' settings per table cell.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any


def cmd_distill_dm(args: argparse.Namespace) -> int:
    from decoct.cli.common import resolved_config
    from decoct.matching.dm import DMConfig, distill_dm
    from decoct.runtime.runs import Run

    if not args.dataset:
        raise ValueError("distill dm needs --dataset (on the command line or in the --config preset)")
    # --max-iterations only says where this call stops; it is not part of the run's identity
    config = {k: v for k, v in resolved_config(args).items() if k != "max_iterations"}
    flags = {k: config[k] for k in args._palette_keys if k != "palette" and k in config}
    dm_config = DMConfig.from_dict({**config, "palette_flags": flags})
    dset = distill_dm(args.dataset, args.out, config=dm_config, run_config=config, device=args.device,
                      data_root=args.data_root, download=args.download, resume=args.resume, force=args.force,
                      progress=args.progress, checkpoint_every=args.checkpoint_every,
                      stop_after=args.max_iterations)
    run = Run(args.out)
    if not run.done:
        ckpt = run.load_checkpoint()
        print(f"dm: stopped at iteration {ckpt['iteration'] if ckpt else '?'} of {dm_config.iterations} "
              "(checkpointed); continue with the same command plus --resume")
        return 0
    st = dset.storage(run.artifact_dir)
    print(f"dm: {len(dset)} images ({dset.meta.get('images_per_class')} per class) -> {args.out}  "
          f"{st['bytes_on_disk']['total']:,} B on disk, {st['raw_bytes']['total']:,} B raw; "
          f"evaluate with: decoct evaluate {args.out}")
    if dm_config.palette:  # not silent: without a warm-up DM's first step collapses a fresh palette network
        from decoct.matching.palette.quantize import palette_collapse_note

        warm = dm_config.palette_flags.get("palette_warmup")
        hint = ("a longer --palette-warmup" if warm else "DM needs --palette-warmup (the AutoPalette-DM presets set "
                "1563, two epochs of CIFAR at batch 64)")
        note = palette_collapse_note(dset.images, dm_config.palette, hint)
        if note:
            print(note, file=sys.stderr)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from decoct.cli.common import resolved_config
    from decoct.matching.palette.quantize import quantize_command, quantize_grid

    common = dict(dataset=args.dataset, ipc=args.ipc, seed=args.seed, data_root=args.data_root,
                  download=args.download, device=args.device, resume=args.resume, force=args.force)
    config = resolved_config(args)
    if len(args.colors) == 1 and len(args.method) == 1:
        config.update(colors=args.colors[0], method=args.method[0])
        summaries = [quantize_command(args.src, colors=args.colors[0], method=args.method[0], out=args.out,
                                      config=config, **common)]
    else:
        summaries = quantize_grid(args.src, colors=args.colors, methods=args.method, out=args.out, config=config,
                                  **common)
    for s in summaries:
        print(s.summary())
    return 0


def _dests(p: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in p._actions}


def register(cli: Any) -> None:
    """Add this family's commands to the ``decoct`` parser (see :class:`decoct.cli.common.CommandAdder`)."""
    _register_dm(cli)
    _register_tm(cli)


def _register_dm(cli: Any) -> None:
    from decoct.augment.dsa import DEFAULT_STRATEGY
    from decoct.matching.dm import INITS, PALETTE_RECIPES, PRESET_ITERATIONS
    from decoct.matching.palette import add_palette_args
    from decoct.matching.palette.quantize import QUANTIZERS

    p = cli.distill("dm", cmd_distill_dm,
                    "Distribution matching (DM): match per-class mean embeddings of real and synthetic images "
                    "under freshly initialised ConvNets, with siamese DSA. --palette K gives AutoPalette on DM.")
    p.add_argument("--dataset", default=None, help="registered dataset name (required; may come from --config)")
    p.add_argument("--ipc", type=int, default=10, help="images per class (the budget; AutoPalette fits more)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--iterations", type=int, default=PRESET_ITERATIONS, help="DM iterations (the paper: 20000)")
    p.add_argument("--batch-real", type=int, default=256, help="real images per class per iteration")
    p.add_argument("--lr-img", type=float, default=None,
                   help="SGD lr of the synthetic images (default: 1; 10 at IPC >= 50 with --palette, "
                        "AutoPalette Table 9)")
    p.add_argument("--momentum", type=float, default=0.5, help="SGD momentum of the synthetic images")
    p.add_argument("--zca", action=argparse.BooleanOptionalAction, default=False,
                   help="ZCA-whiten real and synthetic images (off for DM; AutoPalette's DM runs use it)")
    p.add_argument("--model", default="convnet", help="embedding net, fresh every iteration (depth from image size)")
    p.add_argument("--width", type=int, default=128, help="embedding ConvNet width")
    p.add_argument("--norm", default="instance", choices=["instance", "none"],
                   help="embedding ConvNet norm (per-sample norms only: classes share forwards)")
    p.add_argument("--dsa", default=DEFAULT_STRATEGY, help="DSA strategy (one shared draw per class), or 'none'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast of the embedding forwards (default: on for CUDA; CUDA only)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on; measured faster on CPU and GPU)")
    p.add_argument("--real-chunk", type=int, default=0,
                   help="real images per no-grad forward (0 = from the image size and the device's memory, never "
                        "from timing; part of the run's identity: it changes the float rounding)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the embedding net (inductor fuses norm, ReLU and pooling; needs a C++ "
                        "compiler on CPU; compiles once at the first iteration). Same RNG use as eager, results "
                        "equal up to float32 rounding; part of the run's identity")
    p.add_argument("--checkpoint-every", type=int, default=100, help="iterations between checkpoints")
    p.add_argument("--max-iterations", type=int, default=None,
                   help="stop after this many iterations of this call (checkpointed; --resume continues)")
    before = _dests(p)
    add_palette_args(p)
    after = _dests(p)
    if "--init" not in p._option_string_actions:
        p.add_argument("--init", default="real", choices=list(INITS),
                       help="initial images: random real, Gaussian noise, or graph cut on 8-bit images "
                            "(with --palette, --palette-init chooses between real and graph cut; noise "
                            "applies to both)")
    p.set_defaults(_palette_keys=sorted(after - before - {"init"}))
    p.add_argument("--palette-recipe", default="paper", choices=list(PALETTE_RECIPES),
                   help="AutoPalette-DM variant (with --palette K). paper: as the paper's text: hard labels, siamese "
                        "DSA, the K-colour images are stored and evaluated. authors-code: as the authors' dm_quant.py: "
                        "fixed soft labels = logits of expert 0 (final epoch, from --experts) on the initial images, "
                        "DSA drawn independently for real and synthetic, and the un-quantised images are stored "
                        "(8-bit RGB, counted at their full-colour bytes) and evaluated; the manifest records which")
    p.add_argument("--experts", default=None,
                   help="expert directory (decoct experts) whose expert 0 labels the set: --palette-recipe "
                        "authors-code only")

    p = cli.command("quantize", cmd_quantize,
                    "Colour-quantise a distilled set (SRC: a run or artifact) or random real images "
                    "(--dataset, --ipc) with median cut, octree or k-means into a palette artifact "
                    "(AutoPalette's Table 8 baselines); bytes are the palette PNGs'.")
    p.add_argument("src", nargs="?", default=None, help="run directory or artifact to quantise")
    p.add_argument("--colors", type=int, nargs="+", required=True,
                   help="colours per image, 2..256; several values (and methods) make one run per cell in "
                        "OUT/<method>-k<K>, e.g. --colors 2 4 8 16 32 64 --method mediancut octree (Table 8)")
    p.add_argument("--method", nargs="+", default=["mediancut"], choices=list(QUANTIZERS),
                   help="mediancut / octree: Pillow, no dithering; kmeans: per-image Lloyd on RGB, seeded")
    p.add_argument("--out", required=True, help="run directory to create (the parent of the cells for a grid)")
    p.add_argument("--dataset", default=None, help="quantise random real images of this dataset instead of SRC")
    p.add_argument("--ipc", type=int, default=None, help="with --dataset: random real images per class")
    p.add_argument("--seed", type=int, default=0, help="random real images and k-means seeding")


# ---------------------------------------------------------------------------------- trajectory matching
CONVNET_MODELS = ("convnet", "convnetd3", "convnetd4", "convnetd5", "convnet_bn")


def _model_kwargs(model: str, width: int, norm: str) -> dict[str, Any]:
    """Options of the expert architecture (width/norm apply to the ConvNet family, width to MLP)."""
    name = model.lower()
    if name in CONVNET_MODELS:
        return {"width": width, "norm": norm} if name != "convnet_bn" else {"width": width}
    if name == "mlp":
        return {"width": width}
    if (width, norm) != (128, "instance"):
        raise ValueError(f"--width/--norm apply to the ConvNet family and mlp, not to --model {model}")
    return {}


def cmd_experts(args: argparse.Namespace) -> int:
    from decoct.formats.expert_set import describe
    from decoct.matching.experts import train_experts

    es = train_experts(args.dataset, args.out, num_experts=args.num_experts, epochs=args.epochs, model=args.model,
                       model_kwargs=_model_kwargs(args.model, args.width, args.norm), lr=args.lr,
                       momentum=args.momentum, weight_decay=args.weight_decay, batch_size=args.batch_size,
                       zca=args.zca, augment=args.augment, seed=args.seed, device=args.device,
                       data_root=args.data_root, download=args.download, amp=args.amp,
                       channels_last=args.channels_last, force=args.force, progress=args.progress)
    print(describe(es))
    root = f" --data-root {shlex.quote(args.data_root)}" if args.data_root else ""
    print(f"experts in {args.out}; use them with: decoct distill tm --dataset {args.dataset}{root} "
          f"--experts {shlex.quote(str(args.out))} --ipc N --out RUN")
    return 0


def _palette_keys(p: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in p._actions}


def cmd_distill_tm(args: argparse.Namespace) -> int:
    from decoct.cli.common import resolved_config
    from decoct.matching.tm import TMConfig, distill_tm

    # --max-iterations only says where this call stops; it is not part of the run's identity
    config = {k: v for k, v in resolved_config(args).items() if k != "max_iterations"}
    flags = {k: config[k] for k in args._palette_keys if k != "palette" and k in config}
    tm_config = TMConfig.from_dict({**config, "palette_flags": flags})
    dset = distill_tm(args.dataset, args.out, args.experts, config=tm_config, run_config=config,
                      device=args.device, data_root=args.data_root, download=args.download, resume=args.resume,
                      force=args.force, progress=args.progress, checkpoint_every=args.checkpoint_every,
                      stop_after=args.max_iterations)
    from decoct.runtime.runs import Run

    run = Run(args.out)
    if not run.done:
        ckpt = run.load_checkpoint()
        print(f"tm: stopped at iteration {ckpt['iteration'] if ckpt else '?'} of {tm_config.iterations} "
              f"(checkpointed); continue with the same command plus --resume")
        return 0
    st = dset.storage(run.artifact_dir)
    print(f"tm: {len(dset)} images -> {args.out}  {st['raw_bytes']['total']:,} B raw; learned step size "
          f"{dset.meta.get('syn_lr', float('nan')):.4g}; evaluate with: decoct evaluate {args.out}")
    return 0


def _register_tm(cli: Any) -> None:
    from decoct.augment.dsa import DEFAULT_STRATEGY
    from decoct.matching.palette import INIT_METHODS, add_palette_args

    p = cli.command("experts", cmd_experts,
                    "Train expert trajectories for trajectory matching (MTT buffer.py recipe): N networks on "
                    "the full training set, parameters saved after every epoch (safetensors). Reusable; "
                    "rerunning continues an interrupted set or extends it to more experts.", run=False)
    p.add_argument("--dataset", required=True, help="registered dataset name")
    p.add_argument("--out", required=True, help="expert directory (created, or continued when it holds experts "
                                                "with the same settings)")
    p.add_argument("--num-experts", type=int, default=10, help="number of experts (the papers use 100)")
    p.add_argument("--epochs", type=int, default=50, help="epochs per expert (the papers use 50)")
    p.add_argument("--model", default="convnet", help="expert (and student) architecture")
    p.add_argument("--width", type=int, default=128, help="ConvNet/MLP width")
    p.add_argument("--norm", default="instance", choices=["instance", "batch", "none"], help="ConvNet norm")
    p.add_argument("--lr", type=float, default=0.01, help="teacher SGD learning rate")
    p.add_argument("--momentum", type=float, default=0.0, help="teacher SGD momentum (MTT: 0)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="teacher weight decay (MTT: 0)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--zca", action=argparse.BooleanOptionalAction, default=None,
                   help="ZCA-whiten the data (default: on for cifar10/cifar100, as the papers)")
    p.add_argument("--augment", default=DEFAULT_STRATEGY, help="DSA strategy during expert training, or 'none'")
    p.add_argument("--seed", type=int, default=0, help="expert k uses seed + k")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (CUDA)")
    p.add_argument("--force", action="store_true", help="delete the experts already in --out and start over")

    p = cli.distill("tm", cmd_distill_tm,
                    "Trajectory matching (MTT) against stored experts, with an exact constant-activation-memory "
                    "gradient (or TESLA's identity, or the unrolled reference). Needs `decoct experts` first.")
    p.add_argument("--dataset", required=True, help="registered dataset name")
    p.add_argument("--ipc", type=int, default=1, help="images per class (the budget; AutoPalette fits more)")
    p.add_argument("--experts", default=None, help="expert directory made by `decoct experts`")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--syn-steps", type=int, default=20, help="student steps on synthetic data per iteration (N)")
    p.add_argument("--expert-epochs", type=int, default=2, help="expert epochs matched (M)")
    p.add_argument("--max-start-epoch", type=int, default=20, help="start epoch drawn from [min, max)")
    p.add_argument("--min-start-epoch", type=int, default=0)
    p.add_argument("--current-max-start-epoch", type=int, default=0,
                   help="DATM: initial upper bound of the start window, growing to --max-start-epoch (0 = off)")
    p.add_argument("--expansion-end-epoch", type=int, default=0,
                   help="DATM: iteration at which the start window reaches --max-start-epoch")
    p.add_argument("--lr-img", type=float, default=1000.0, help="SGD lr of the synthetic images")
    p.add_argument("--lr-lr", type=float, default=1e-5, help="SGD lr of the learnable step size")
    p.add_argument("--lr-teacher", type=float, default=0.01, help="initial synthetic step size")
    p.add_argument("--batch-syn", type=int, default=0, help="synthetic minibatch (0 = all images)")
    p.add_argument("--iterations", type=int, default=5000)
    p.add_argument("--grad", default="exact", choices=["exact", "tesla", "unrolled"],
                   help="exact: adjoint sweep, constant activation memory, equals unrolled; tesla: TESLA's "
                        "first-order identity, constant memory; unrolled: MTT's graph (memory grows with steps)")
    p.add_argument("--unrolled", dest="grad", action="store_const", const="unrolled", default="exact",
                   help="shorthand for --grad unrolled (MTT's reference implementation)")
    p.add_argument("--snapshot-every", type=int, default=1,
                   help="exact grad: keep the student parameters every K steps, recompute the rest "
                        "(1 = keep all, 0 = sqrt(syn-steps))")
    p.add_argument("--soft-labels", action="store_true",
                   help="learnable soft labels initialised from an expert's logits (DATM/AutoPalette)")
    p.add_argument("--lr-labels", type=float, default=2.0, help="SGD lr of the soft labels (DATM lr_y)")
    p.add_argument("--threshold", type=float, default=0.0,
                   help="DATM: skip updates when the matching loss exceeds this (0 = off)")
    p.add_argument("--lr-decay", action=argparse.BooleanOptionalAction, default=None,
                   help="AutoPalette's schedules: image lr x0.1 after iterations/3 accepted updates, palette "
                        "lr x0.1 after iterations/2 (default: on with --palette; needs --palette)")
    p.add_argument("--zca", action=argparse.BooleanOptionalAction, default=None,
                   help="require experts trained with (or without) ZCA; default: whatever the experts used")
    p.add_argument("--dsa", default=DEFAULT_STRATEGY, help="DSA strategy in the student steps, or 'none'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action="store_true", help="bf16 autocast in the student forwards (CUDA only)")
    p.add_argument("--channels-last", action="store_true", help="channels_last student inputs (CUDA only)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="iterations between checkpoints")
    p.add_argument("--max-iterations", type=int, default=None,
                   help="stop after this many iterations of this call (checkpointed; --resume continues)")
    before = _palette_keys(p)
    add_palette_args(p)
    after = _palette_keys(p)
    if "palette_aux_images" in after:
        p.set_defaults(palette_aux_images=50)  # AutoPalette's TM code uses 50 images (DM 64)
    if "--init" not in p._option_string_actions:
        p.add_argument("--init", default="real", choices=list(INIT_METHODS),
                       help="initial images without --palette: random real, or graph cut on 8-bit images")
    p.set_defaults(_palette_keys=sorted(after - before - {"init"}))
