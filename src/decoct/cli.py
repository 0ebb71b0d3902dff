"""``decoct`` command line: a thin layer over the Python API.

Every command takes ``--config FILE.yaml`` and ``--set key=value`` (see :mod:`decoct.runtime.config`);
the resolved config is saved in the run directory.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from decoct.runtime.config import (
    ConfigError,
    check_value,
    clip,
    key_specs,
    load_yaml,
    merge,
    split_overrides,
)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults only where they say something (not for switches, not for None)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


META_KEYS = {"command", "config", "set", "func", "resume", "force", "progress"}


def _common(p: argparse.ArgumentParser, *, run: bool = True) -> None:
    g = p.add_argument_group("common")
    g.add_argument("--config", help="YAML file of key: value presets (keys as the long flags, '-' -> '_')")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable); applied after --config and flags")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    g.add_argument("--data-root", default=None,
                   help="directory (or archive, for imagefolder) holding the dataset, the only root "
                        "searched when given; without it $DECOCT_DATA, ./data, ../shared/datasets")
    g.add_argument("--download", action="store_true", help="download the dataset if missing (torchvision sets)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    if run:
        g.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
        g.add_argument("--force", action="store_true", help="start over even if the run directory holds a run")


def _resolve(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse: defaults <- YAML <- typed flags <- --set, every key typed and checked by its flag.

    The type, choices and range of each key come from its flag (:func:`decoct.runtime.config.key_specs`
    and :data:`decoct.runtime.config.RANGES`), so ``--runs 0``, ``--set runs=0`` and ``runs: 0`` in a
    preset are refused alike, naming the flag or key.
    """
    args = parser.parse_args(argv)
    sub = args._sub
    specs = key_specs(sub._actions, skip=META_KEYS)
    known = {k: sub.get_default(k) for k in specs}
    typed = vars(args)
    for key, spec in specs.items():
        if typed.get(key) != known[key]:  # typed on the command line (argparse converted it)
            typed[key] = check_value(spec, typed[key])
    if args.config:
        preset = merge(known, load_yaml(args.config), f"--config {args.config}", specs)
        for key, value in preset.items():
            # a preset only replaces values the user did not type on the command line
            if typed.get(key) == known[key]:
                typed[key] = value
    overrides = merge({k: typed[k] for k in known}, split_overrides(args.set), "--set", specs, raw=True)
    typed.update(overrides)
    return args


def resolved_config(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in META_KEYS and not k.startswith("_")}


# ----------------------------------------------------------------------------------------------
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

    result = evaluate_run(args.path, protocol=args.protocol, runs=args.runs, seed=args.seed, model=args.model,
                          epochs=args.epochs, baseline=args.baseline, engine=args.engine, device=args.device,
                          data_root=args.data_root, resume=args.resume, force=args.force,
                          progress=args.progress, teacher=args.teacher, dataset=args.dataset,
                          download=args.download, save=args.save)
    from decoct.runtime.distributed import rank

    if rank() != 0:  # torchrun: one report, from rank 0
        return 0
    print(result.summary("set"))
    if result.baseline is not None:
        print(result.baseline.summary(f"random ipc{result.baseline.extra['ipc']}"))
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

    dset = DistilledSet.load(resolve_artifact(args.path))
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


# ----------------------------------------------------------------------------------------------
PLUGINS = ("decoct.cli_dm", "decoct.cli_tm", "decoct.cli_decoupled", "decoct.cli_labels")
"""Modules that add commands: each defines ``register(cli: CommandAdder) -> None``."""


class CommandAdder:
    """Handed to plugin modules so they add top-level commands and ``distill`` methods."""

    def __init__(self, add: Callable[..., argparse.ArgumentParser], distill_subs: Any) -> None:
        self._add = add
        self._distill = distill_subs

    def command(self, name: str, func: Callable[[argparse.Namespace], int], help: str,
                run: bool = True) -> argparse.ArgumentParser:
        """A top-level command ``decoct <name>`` with the common flags."""
        return self._add(name, func, help, run)

    def distill(self, method: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        """A method of ``decoct distill <method>`` with the common flags."""
        p = self._distill.add_parser(method, help=help, description=help,
                                     formatter_class=_HelpFormatter)
        p.set_defaults(func=func, _sub=p)
        _common(p, run=True)
        return p


def build_parser() -> argparse.ArgumentParser:
    from decoct.api import QUICKSTART_METHODS
    from decoct.coreset.select import CORESET_METHODS
    from decoct.data import list_datasets

    parser = argparse.ArgumentParser(
        prog="decoct", description="Dataset distillation with exact storage accounting.",
        formatter_class=_HelpFormatter)
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str, run: bool = True):
        p = subs.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)
        p.set_defaults(func=func, _sub=p)
        _common(p, run=run)
        return p

    p = add("quickstart", cmd_quickstart,
            "Offline demo: distil the bundled 8x8 digits with the best available method, evaluate it "
            "against random real images of equal storage, print accuracy and bytes (< 3 min on a CPU).")
    p.add_argument("--out", default="runs/quickstart", help="run directory")
    p.add_argument("--method", default="dm", choices=QUICKSTART_METHODS,
                   help="dm (distribution matching, the best measured on digits) or a coreset")
    p.add_argument("--iterations", type=int, default=200, help="DM iterations")
    p.add_argument("--ipc", type=int, default=2, help="images per class")
    p.add_argument("--runs", type=int, default=3, help="students trained per set")
    p.add_argument("--epochs", type=int, default=300, help="student epochs (the fast protocol)")

    p = add("select", cmd_select, "Select a coreset of real images (random, herding, k-center, graph-cut).")
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

    p = add("evaluate", cmd_evaluate, "Train students on a distilled set; report accuracy mean ± std and bytes.")
    p.add_argument("path", help="run directory or artifact directory")
    p.add_argument("--protocol", default="classic", choices=["classic", "fast", "soft"],
                   help="classic: 1000 epochs, the matching papers' recipe; fast: 300 epochs for CPU smoke runs; "
                        "soft: KD from the set's FKD label store (decoct relabel) with the decoupled papers' recipe")
    p.add_argument("--model", default=None, help="student model (default: the protocol's: ConvNet for classic/fast, ResNet-18 for soft)")
    p.add_argument("--runs", type=int, default=5, help="students (independent initialisations and augmentations)")
    p.add_argument("--epochs", type=int, default=None, help="override the protocol's epochs")
    p.add_argument("--seed", type=int, default=0, help="seed of the first student (the others follow)")
    p.add_argument("--baseline", default=None, choices=["random"],
                   help="also evaluate random real images of equal storage")
    p.add_argument("--engine", default="auto", choices=["auto", "sequential", "vmap", "grouped"],
                   help="multi-student engine")
    p.add_argument("--teacher", default=None,
                   help="soft protocol only: teacher directory labelling fresh views online (unlimited labels)")
    p.add_argument("--dataset", default=None,
                   help="registered dataset of the test data (default: the one the set records; with --data-root "
                        "to evaluate on data that has moved)")
    p.add_argument("--no-save", dest="save", action="store_false",
                   help="write nothing (no eval-*.json, no log line): for a read-only run")

    p = add("info", cmd_info, "Show a distilled set's manifest summary, storage and integrity.", run=False)
    p.add_argument("path", help="run directory or artifact directory")

    p = add("export", cmd_export,
            "Export a distilled set as a plain ImageFolder tree (<out>/<class>/<k>.png), with what evaluation "
            "applies to it beside the tree: decoct-export.json (class order, file of every row, hard labels, "
            "normalisation mean/std, learned lr, what to apply), labels.safetensors (soft-label sets: "
            "'soft_labels' logits, row i = files[i]) and zca.safetensors (ZCA sets: 'mean', 'W'; "
            "x' = (x.flatten() - mean) @ W after normalising). Prints what a consumer must apply.",
            run=False)
    p.add_argument("path", help="run directory or artifact directory")
    p.add_argument("--imagefolder", required=True,
                   help="output directory: new, empty, or an earlier decoct export (with --force)")
    p.add_argument("--force", "--overwrite", dest="force", action="store_true",
                   help="replace an earlier decoct export in --imagefolder (never a directory decoct did not "
                        "export)")

    p = add("report", cmd_report, "Markdown table and accuracy-vs-bytes plot for a set of runs.", run=False)
    p.add_argument("paths", nargs="+", help="run directories")
    p.add_argument("--out", default="report", help="output directory")

    distill = subs.add_parser("distill", help="Distil a dataset with an iterative method (see decoct distill -h).",
                              description="Distil a dataset into a few synthetic images per class.")
    dsubs = distill.add_subparsers(dest="method", required=True, metavar="METHOD")
    adder = CommandAdder(add, dsubs)
    import importlib

    for mod in PLUGINS:
        importlib.import_module(mod).register(adder)
    return parser


MAX_MESSAGE_CHARS = 2000
"""An error message longer than this (one embedding a huge value) is cut, with its length."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input or a bad environment, not a bug in decoct.

    They become one ``decoct CMD: error: ...`` line and exit 2; anything else keeps its traceback
    (a bug report). OSError covers unwritable or full disks, directories where files are expected
    and unreadable images; the format errors cover corrupt archives, YAML and safetensors files.
    """
    import pickle
    import tarfile
    import zipfile
    import zlib

    import yaml

    types: list[type[BaseException]] = [ConfigError, ValueError, KeyError, RuntimeError, OSError,
                                         EOFError, yaml.YAMLError, zipfile.BadZipFile, tarfile.TarError,
                                         zlib.error, pickle.UnpicklingError]
    try:
        from safetensors import SafetensorError

        types.append(SafetensorError)
    except ImportError:  # pragma: no cover - older safetensors
        pass
    return tuple(types)


def _message(e: BaseException) -> str:
    """The one line printed for a user error: OS errors name their path(s), format errors their kind."""
    if isinstance(e, OSError) and e.strerror:
        paths = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
        hint = ""
        if isinstance(e, PermissionError) or e.errno == errno.EROFS:
            hint = " (check the permissions, or choose another output directory)"
        elif e.errno in (errno.ENOSPC, errno.EDQUOT):
            hint = " (free some space, or choose another output directory)"
        msg = f"{paths}: {e.strerror}{hint}" if e.filename is not None else f"{e.strerror}{hint}"
    elif isinstance(e, KeyError) and e.args:
        msg = str(e.args[0])
    else:
        msg = str(e)
        if not isinstance(e, (ValueError, KeyError, RuntimeError, OSError)):
            msg = f"{type(e).__name__}: {msg}"  # a corrupt archive/YAML/safetensors file says so
    return clip(msg or type(e).__name__, MAX_MESSAGE_CHARS)


def main(argv: list[str] | None = None) -> int:
    """The ``decoct`` entry point: user errors are one line and exit 2, Ctrl-C exits 130."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    t0 = time.perf_counter()
    try:
        args = _resolve(parser, argv)
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not as "Exception ignored" at exit
        return code
    except BrokenPipeError:
        # the reader of stdout went away (decoct info RUN | head -1): nothing left to report to
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141
    except _user_errors() as e:
        cmd = " ".join(argv[:2] if argv[:1] == ["distill"] and len(argv) > 1 else argv[:1])
        print(f"decoct {cmd}: error: {_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted after {time.perf_counter() - t0:.0f}s; rerun with --resume to continue",
              file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
