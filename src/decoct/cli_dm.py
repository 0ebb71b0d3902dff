"""Commands of DM and the quantiser baselines: ``distill dm``, ``quantize``.

Thin: argument parsing only; the work is :func:`decoct.matching.dm.distill_dm` and
:func:`decoct.matching.palette.quantize.quantize_command` (the Python API). ``configs/dm/*.yaml`` hold the
paper's settings per table cell.
"""

from __future__ import annotations

import argparse
from typing import Any


def cmd_distill_dm(args: argparse.Namespace) -> int:
    from decoct.cli import resolved_config
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
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from decoct.cli import resolved_config
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
    """Add this family's commands to the ``decoct`` parser (see :class:`decoct.cli.CommandAdder`)."""
    from decoct.augment.dsa import DEFAULT_STRATEGY
    from decoct.matching.dm import INITS, PRESET_ITERATIONS
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
                   help="real images per no-grad forward (0 = measure the fastest on the device)")
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
