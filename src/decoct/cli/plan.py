"""``decoct plan``: configurations of a method family that fit a byte budget, ranked; ``--sweep`` builds them.

Thin: argument parsing only; the work is :func:`decoct.plan.make_plan`, :func:`decoct.plan.sweep` and
:func:`decoct.report.write_report` (docs/plan.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_plan(args: argparse.Namespace) -> int:
    from decoct.plan import (
        SweepOptions,
        default_palette_warmup,
        make_plan,
        parse_budget,
        plan_table,
        sweep,
        write_plan,
    )

    budget = parse_budget(args.budget)  # one line and exit 2 for a bad budget, before any data is read
    if args.sweep and not args.out:
        raise ValueError("--sweep needs --out DIR (one run directory per configuration is made there)")
    out = Path(args.out) if args.out else None
    run_dirs = list(args.runs or [])
    if out is not None and out.is_dir():
        run_dirs.append(str(out))

    def plan_now() -> Any:
        return make_plan(args.dataset, args.family, budget, methods=args.methods, ipcs=args.ipc, colors=args.palette,
                         labels=args.labels, prunes=args.prune, label_formats=args.label_formats,
                         label_epochs=args.label_epochs, label_batch=args.label_batch, runs=run_dirs,
                         protocol=args.protocol, keep=args.keep, sample=args.sample, seed=args.seed,
                         data_root=args.data_root, download=args.download, teacher=args.teacher,
                         model=args.eval_model)

    plan = plan_now()
    if args.sweep:
        opts = SweepOptions(out=out, dataset=args.dataset, protocol=args.protocol, eval_runs=args.eval_runs,
                            eval_epochs=args.eval_epochs, eval_model=args.eval_model, baseline=args.baseline,
                            iterations=args.iterations, palette_warmup=(
                                args.palette_warmup if args.palette_warmup is not None
                                else default_palette_warmup(plan.train_images)),
                            teacher=args.teacher, label_batch=args.label_batch, seed=args.seed, device=args.device,
                            data_root=args.data_root)
        from decoct.cli import main

        ran = sweep(plan, opts, runner=main)
        print(f"sweep: ran {len(ran)} command{'s' if len(ran) != 1 else ''} "
              f"({'nothing new: every listed configuration was already measured' if not ran else 'see above'})")
        if str(out) not in run_dirs:
            run_dirs.append(str(out))
        plan = plan_now()
    for line in plan_table(plan):
        print(line)
    if out is not None:
        js, md = write_plan(plan, out)
        print(f"wrote {js} and {md}")
        measured = [r.run for r in plan.rows if r.accuracy is not None and r.run]
        if args.sweep and measured:
            from decoct.report import write_report

            rep = write_report(sorted(set(measured)), out / "report")
            print(f"frontier: {rep} (accuracy_vs_bytes.png, bytes_breakdown.png)")
    return 0


def register(cli: Any) -> None:
    """Add ``decoct plan`` to the parser (see :class:`decoct.cli.common.CommandAdder`)."""
    from decoct.formats.label_pruning import PRUNE_FACTORS
    from decoct.plan import FAMILIES

    methods = sorted({m for ms in FAMILIES.values() for m in ms})
    p = cli.command(
        "plan", cmd_plan,
        "List the configurations of a method family that fit a byte budget (images per class, colours K with "
        "AutoPalette's storage rule or median cut, hard or soft labels, LPLD pruning, label format), with bytes "
        "estimated from real images of the dataset encoded as the artifact stores them; ranked by the accuracy of "
        "matching runs under --runs, the others marked unmeasured. --sweep builds and evaluates the unmeasured ones "
        "(one run directory each under --out; a rerun skips finished ones) and reports the frontier. docs/plan.md",
        run=False)
    p.add_argument("--dataset", required=True, help="registered dataset name (held in memory: digits, cifar10, ...)")
    p.add_argument("--family", required=True, choices=list(FAMILIES),
                   help="coreset (select, + median cut with K colours), matching (dm, dm+mediancut, autopalette-dm), "
                        "decoupled (sre2l, dwa, lpld, rded; soft labels by relabel)")
    p.add_argument("--budget", required=True,
                   help="bytes on disk: 200KB, 1.5MB, 64KiB or 50000; KB/MB/GB are decimal (1 KB = 1000 B), "
                        "KiB/MiB/GiB binary (1 KiB = 1024 B), a bare number is bytes")
    p.add_argument("--methods", nargs="+", default=None, choices=methods,
                   help="methods of the family to plan (default: coreset random; matching all three; decoupled lpld)")
    p.add_argument("--ipc", type=int, nargs="+", default=[1, 2, 5, 10, 20, 50, 100],
                   help="full-colour images per class to consider; with K colours each becomes "
                        "IPC x 2^(8 - ceil(log2 K)) (AutoPalette's rule)")
    p.add_argument("--colors", "--palette", dest="palette", type=int, nargs="+", default=[0, 256, 64, 16],
                   metavar="K", help="colours per image: 0 = 8-bit PNG, 2..256 = palette PNG (median cut, or "
                                     "AutoPalette); config key: palette")
    p.add_argument("--labels", nargs="+", default=None, choices=["hard", "soft"],
                   help="hard (no label bytes) and/or soft (an FKD label store; default for decoupled)")
    p.add_argument("--prune", type=int, nargs="+", default=[1, 10], choices=list(PRUNE_FACTORS),
                   help="LPLD pruning factors of soft-label stores (1 = the full store)")
    p.add_argument("--label-formats", nargs="+", default=["fp16"], metavar="FORMAT",
                   help="soft-label store formats, as relabel's encodings name them: fp16 (all C logits), q8, q4 "
                        "(per-row quantised, --label-bits), top<K>-<zero|spread>-<fp16|q8|q4> (--label-topk K "
                        "--label-fill F), e.g. top5-zero-fp16")
    p.add_argument("--label-epochs", type=int, default=None,
                   help="stored epochs of soft-label stores (needed with --labels soft; LPLD: 300 ImageNet, 100 Tiny)")
    p.add_argument("--label-batch", type=int, default=None,
                   help="relabel batch size (default: the dataset's soft recipe, as relabel)")
    p.add_argument("--teacher", default=None, help="teacher directory (decoct squeeze): decoupled and soft-label sweeps")
    p.add_argument("--runs", nargs="+", default=None, metavar="DIR",
                   help="run directories, or folders of them (two levels deep), whose sets are matched to "
                        "configurations by their manifests; --out is searched too")
    p.add_argument("--protocol", default="fast", choices=["classic", "fast"],
                   help="protocol that measures hard-label configurations (soft-label ones: the soft protocol)")
    p.add_argument("--keep", default="largest", choices=["largest", "all"],
                   help="largest: per recipe only the largest image count that fits (and every measured run); "
                        "all: every fitting configuration")
    p.add_argument("--sample", type=int, default=16, help="real images per class encoded to estimate bytes")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample, and of every command of the sweep")
    p.add_argument("--out", default=None,
                   help="directory for plan.json/plan.md and, with --sweep, one run per configuration and report/")
    p.add_argument("--sweep", action="store_true",
                   help="build and evaluate the unmeasured configurations that fit, then report the frontier")
    p.add_argument("--iterations", type=int, default=None,
                   help="sweep: iterations of dm and of the recover methods (default: each command's)")
    p.add_argument("--eval-runs", type=int, default=3, help="sweep: students per evaluation")
    p.add_argument("--eval-epochs", type=int, default=None, help="sweep: student epochs (default: the protocol's)")
    p.add_argument("--palette-warmup", type=int, default=None,
                   help="sweep: palette warm-up steps of autopalette-dm (distill dm --palette-warmup; default: two "
                        "epochs of the training set at batch 64, as the AutoPalette-DM presets; 0 = none, which "
                        "collapses DM's palette to 2-3 colours)")
    p.add_argument("--eval-model", default=None,
                   help="student model of the sweep's evaluations, and the only one whose accuracies the plan "
                        "ranks (default: each protocol's: ConvNet for classic/fast, ResNet-18 for soft)")
    p.add_argument("--baseline", default=None, choices=["random"],
                   help="sweep: also evaluate random real images of equal storage beside every set")
