"""Commands on sets and runs: ``quickstart``, ``select`` (the coreset family), ``evaluate``, ``info``,
``export``, ``report``.

Thin: argument parsing only; the work is :mod:`decoct.api` (select, evaluate_run, score_run, quickstart,
info), :meth:`decoct.formats.artifact.DistilledSet.export_imagefolder`,
:func:`decoct.formats.ddranking.export_ddranking` and :func:`decoct.report.write_report`.
"""

from __future__ import annotations

import argparse
import json
import sys

from decoct.cli.common import CommandAdder, resolved_config


def cmd_select(args: argparse.Namespace) -> int:
    from decoct.api import select

    out = select(args.method, dataset=args.dataset, ipc=args.ipc, out=args.out, seed=args.seed,
                 embed=args.embed, embed_model=args.embed_model, embed_epochs=args.embed_epochs,
                 data_root=args.data_root, download=args.download, device=args.device,
                 resume=args.resume, force=args.force, progress=args.progress, config=resolved_config(args))
    print(out.summary())
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from decoct.api import evaluate_run
    from decoct.cli.common import data_options

    if args.scores is not None:
        return _cmd_scores(args)
    result = evaluate_run(args.path, protocol=args.protocol, runs=args.runs, seed=args.seed, model=args.model,
                          epochs=args.epochs, batch_size=args.batch_size, baseline=args.baseline,
                          engine=args.engine, device=args.device,
                          data_root=args.data_root, resume=args.resume, force=args.force,
                          progress=args.progress, teacher=args.teacher, dataset=args.dataset,
                          download=args.download, save=args.save, data_options=data_options(args), amp=args.amp,
                          recipe=args.recipe, temperature=args.temperature)
    from decoct.runtime.distributed import rank

    if rank() != 0:  # torchrun: one report, from rank 0
        return 0
    print(result.summary("set"))
    if result.baseline is not None:
        b = result.baseline.extra
        label = (f"mediancut{b['colors']} ipc{b['ipc']}" if b.get("kind") == "mediancut" else f"random ipc{b['ipc']}")
        print(result.baseline.summary(label))
    if result.extra.get("reused"):
        print(f"(already evaluated: read from {result.extra['reused']}; --force evaluates again)")
    return 0


def _cmd_scores(args: argparse.Namespace) -> int:
    """``decoct evaluate RUN --scores ddranking``: DD-Ranking's scores (docs/scores.md)."""
    from decoct.api import score_run
    from decoct.cli.common import data_options
    from decoct.evaluation.scores import format_scores
    from decoct.runtime.distributed import rank

    if args.recipe != "auto":
        raise ValueError("--recipe chooses the soft protocol's student recipe; --scores trains classic/fast students: "
                         "drop --recipe")
    if args.temperature is not None:
        raise ValueError("--temperature is a soft-protocol option; --scores trains classic/fast students: drop it")
    if args.batch_size is not None:
        raise ValueError("--batch-size does not apply to --scores (its students train with the protocol's batch); "
                         "drop --batch-size")
    if args.baseline is not None:
        raise ValueError("--scores trains its own random-real baseline (the set's IPC, the set's labels, a fresh "
                         "subset per round); drop --baseline")
    if args.resume:
        raise ValueError("--resume does not apply to --scores (nothing is checkpointed; the full-data accuracy is "
                         "cached, so a rerun trains only the set's and the random students again); drop --resume")
    res = score_run(args.path, scores=args.scores, protocol=args.protocol, runs=args.runs, seed=args.seed,
                    model=args.model, epochs=args.epochs, engine=args.engine, device=args.device,
                    data_root=args.data_root, dataset=args.dataset, download=args.download, teacher=args.teacher,
                    force=args.force, progress=args.progress, save=args.save, data_options=data_options(args),
                    amp=args.amp)
    if rank() != 0:
        return 0
    for line in format_scores(res):
        print(line)
    if res.get("reused"):
        print(f"(already scored: read from {res['reused']}; --force scores again)")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from decoct.api import quickstart

    quickstart(out=args.out, method=args.method, ipc=args.ipc, runs=args.runs, epochs=args.epochs,
               iterations=args.iterations, device=args.device, force=args.force, progress=args.progress)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from decoct.api import info

    report = info(args.path)
    print(json.dumps(report, indent=2))
    problems = report["problems"]
    if problems:  # exit 2 exactly when loading the set would fail
        print(f"decoct info: error: {report['path']} failed its integrity check ({len(problems)} "
              f"problem{'s' if len(problems) > 1 else ''}); the set will not load:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 2
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from decoct.formats.artifact import EXPORT_MARKER, DistilledSet
    from decoct.runtime.runs import resolve_artifact

    if (args.imagefolder is None) == (args.ddranking is None):
        raise ValueError("give one output: --imagefolder DIR (an ImageFolder tree) or --ddranking DIR "
                         "(DD-Ranking's tensor form)")
    dset = DistilledSet.load(resolve_artifact(args.path))
    if args.ddranking is not None:
        from pathlib import Path

        from decoct.formats.ddranking import DDRANKING_JSON, DDRANKING_TENSORS, export_ddranking

        export_ddranking(dset, args.ddranking, overwrite=args.force)
        desc = json.loads((Path(args.ddranking) / DDRANKING_JSON).read_text())
        print(f"wrote {len(dset)} images ({desc['ipc']} per class, class-major, normalised) as DD-Ranking's "
              f"interchange form: {Path(args.ddranking) / DDRANKING_TENSORS} ({', '.join(desc['tensors'])}) and "
              f"{DDRANKING_JSON}")
        for line in desc["usage"] + desc["notes"]:
            print(f"  {line}")
        return 0
    dset.export_imagefolder(args.imagefolder, overwrite=args.force)
    print(f"wrote {len(dset)} images as an ImageFolder tree to {args.imagefolder}, with {EXPORT_MARKER}")
    print("to train on it as decoct evaluates it:")
    for line in dset.export_notes():
        print(f"  - {line}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from decoct.report import write_report

    md = write_report(args.paths, args.out)
    print(f"wrote {md}")
    return 0


def register(cli: CommandAdder) -> None:
    """Add the commands on sets and runs to the ``decoct`` parser (see :class:`decoct.cli.common.CommandAdder`)."""
    from decoct.api import QUICKSTART_METHODS
    from decoct.coreset.select import CORESET_METHODS
    from decoct.data import list_datasets

    p = cli.command("quickstart", cmd_quickstart,
            "Offline demo: distil the bundled 8x8 digits with the best available method, evaluate it "
            "against random real images of equal storage, print accuracy and bytes (< 3 min on a CPU).")
    p.add_argument("--out", default="runs/quickstart", help="run directory")
    p.add_argument("--method", default="dm", choices=QUICKSTART_METHODS,
                   help="dm (distribution matching, the best measured on digits) or a coreset")
    p.add_argument("--iterations", type=int, default=200, help="DM iterations")
    p.add_argument("--ipc", type=int, default=2, help="images per class")
    p.add_argument("--runs", type=int, default=3, help="students trained per set")
    p.add_argument("--epochs", type=int, default=300, help="student epochs (the fast protocol)")

    p = cli.command("select", cmd_select, "Select a coreset of real images (random, herding, k-center, graph-cut).")
    p.add_argument("method", choices=CORESET_METHODS)
    p.add_argument("--dataset", required=True,
                   help=f"registered dataset name: {', '.join(list_datasets())} (imagefolder: your own "
                        "train/<class>/ + test/<class>/ tree, given as --data-root)")
    p.add_argument("--ipc", type=int, required=True, help="images per class")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--embed", default="random", choices=["random", "trained"],
                   help="embedding net for herding/k-center/graph-cut: freshly initialised or trained on real data")
    p.add_argument("--embed-model", default="convnet", help="model used for embeddings")
    p.add_argument("--embed-epochs", type=int, default=5, help="epochs of real-data training when --embed trained")

    p = cli.command("evaluate", cmd_evaluate, "Train students on a distilled set; report accuracy mean ± std and bytes.")
    p.add_argument("path", help="run directory or artifact directory")
    p.add_argument("--protocol", default="classic", choices=["classic", "fast", "soft"],
                   help="classic: 1000 epochs, the matching papers' recipe; fast: 300 epochs for CPU smoke runs; "
                        "soft: KD from the set's FKD label store (decoct relabel), or from a live --teacher, with the "
                        "decoupled papers' recipe (--recipe)")
    p.add_argument("--model", default=None, help="student model (default: the protocol's: ConvNet for classic/fast, ResNet-18 for soft)")
    p.add_argument("--runs", type=int, default=5, help="students (independent initialisations and augmentations)")
    p.add_argument("--epochs", type=int, default=None, help="override the protocol's epochs")
    p.add_argument("--batch-size", type=int, default=None,
                   help="override the student batch (classic/fast: 256; soft: the recipe's, or the label store's, "
                        "which cannot change), e.g. RDED's 10 at IPC 1 and 100 at IPC 50 on CIFAR")
    p.add_argument("--temperature", type=float, default=None,
                   help="soft protocol: distillation temperature instead of the recipe's (30 CIFAR-size, 20 "
                        "Tiny/ImageNet-size); e.g. 1 for top-k zero-fill stores (LPQLD), docs/label-store.md")
    p.add_argument("--seed", type=int, default=0, help="seed of the first student (the others follow)")
    p.add_argument("--baseline", default=None, choices=["random", "mediancut"],
                   help="also evaluate, with the same protocol and seeds: random = random real full-colour images of "
                        "equal raw storage; mediancut (palette sets, classic/fast) = random real images, as many per "
                        "class as the set has, median-cut to the set's K colours (AutoPalette's equal-bytes "
                        "baseline: x4 images at K=64). Stored in eval-...-<baseline>.json; decoct report shows it "
                        "beside the set with both byte counts")
    p.add_argument("--engine", default="auto", choices=["auto", "sequential", "vmap", "grouped"],
                   help="multi-student engine")
    p.add_argument("--teacher", default=None,
                   help="soft protocol only: teacher directory labelling fresh views online (unlimited labels; a "
                        "label store the set carries is then neither used nor counted); with --scores: labels the random real images of a set that carries soft labels")
    p.add_argument("--recipe", default="auto", choices=["auto", "dwa", "rded"],
                   help="soft protocol: the student recipe. auto: by image size, the SRe2L/LPLD relabel recipes "
                        "(docs/protocols.md#soft); dwa: DWA's own validation recipes, which its paper runs against a "
                        "live teacher (needs --teacher): CIFAR 400 epochs with Mixup, Tiny-ImageNet 200 epochs with "
                        "CutMix, ImageNet 300 epochs with CutMix (docs/methods/dwa.md#evaluation); rded: RDED's "
                        "student script (needs --teacher): 300 epochs, AdamW 1e-3 half-cosine, flip and CutMix; whole "
                        "images at CIFAR/Tiny sizes (batch 50/100), 2x2 strip shuffle and crops of scale 0.5-1 at "
                        "ImageNet sizes (batch 100) (docs/methods/rded.md#students)")
    p.add_argument("--amp", action="store_true",
                   help="train the students under bf16 autocast (CUDA only; default float32, as the references; "
                        "the result records which)")
    p.add_argument("--dataset", default=None,
                   help="registered dataset of the test data (default: the one the set records; with --data-root "
                        "to evaluate on data that has moved)")
    p.add_argument("--scores", default=None, choices=["ddranking"],
                   help="also train what DD-Ranking's scores need and report HLR, IOR, LRS, ARS (classic/fast "
                        "protocol; the full-data accuracy is cached in $DECOCT_CACHE; docs/scores.md); with "
                        "--teacher for a set with soft labels")
    p.add_argument("--no-save", dest="save", action="store_false",
                   help="write nothing (no eval-*.json, no log line): for a read-only run")
    cli.data_flags(p)

    p = cli.command("info", cmd_info, "Show a distilled set's manifest summary, storage and integrity.", run=False)
    p.add_argument("path", help="run directory or artifact directory")

    p = cli.command("export", cmd_export,
            "Export a distilled set as a plain ImageFolder tree (<out>/<class>/<k>.png), with what evaluation "
            "applies to it beside the tree: decoct-export.json (class order, file of every row, hard labels, "
            "normalisation mean/std, learned lr, what to apply), labels.safetensors (soft-label sets: "
            "'soft_labels' logits, row i = files[i]) and zca.safetensors (ZCA sets: 'mean', 'W'; "
            "x' = (x.flatten() - mean) @ W after normalising). Prints what a consumer must apply. "
            "Or, with --ddranking DIR, the tensor form DD-Ranking's compute_metrics takes.",
            run=False)
    p.add_argument("path", help="run directory or artifact directory")
    p.add_argument("--imagefolder", default=None,
                   help="output directory: new, empty, or an earlier decoct export (with --force)")
    p.add_argument("--ddranking", default=None, metavar="DIR",
                   help="instead of --imagefolder: DD-Ranking's interchange form in DIR, ddranking.safetensors "
                        "('images' class-major float32 normalised with the dataset's mean/std, 'hard_labels', "
                        "'soft_labels' logits when the set has them) + ddranking.json (what compute_metrics needs; "
                        "docs/scores.md)")
    p.add_argument("--force", "--overwrite", dest="force", action="store_true",
                   help="replace an earlier decoct export in --imagefolder (never a directory decoct did not "
                        "export)")

    p = cli.command("report", cmd_report,
                    "Markdown table of a set of runs, accuracy against bytes on disk with each run's baseline as its "
                    "own series and the Pareto frontier marked (per dataset, protocol and student), and a stacked "
                    "images/palettes/labels bytes breakdown per run (docs/plan.md).", run=False)
    p.add_argument("paths", nargs="+", help="run directories")
    p.add_argument("--out", default="report", help="output directory")
