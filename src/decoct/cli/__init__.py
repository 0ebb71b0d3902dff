"""``decoct`` command line: a thin layer over the Python API, one module per family.

:mod:`~decoct.cli.sets` (quickstart, select, evaluate, info, export, report),
:mod:`~decoct.cli.matching` (distill dm/tm, experts, quantize), :mod:`~decoct.cli.decoupled`
(squeeze, distill sre2l/dwa/lpld), :mod:`~decoct.cli.labels` (relabel), :mod:`~decoct.cli.plan`
(plan); what they share is
:mod:`~decoct.cli.common`. This module builds the parser and runs a command (:func:`main`, the
``decoct`` entry point; ``python -m decoct.cli`` is the same). Every command takes ``--config FILE.yaml`` and ``--set key=value`` (see :mod:`decoct.runtime.config`);
the resolved config is saved in the run directory.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from collections.abc import Callable

from decoct.cli import sets
from decoct.cli.common import (
    CommandAdder,
    _common,
    _HelpFormatter,
    _resolve,
    config_may_supply_required,
)
from decoct.runtime.config import ConfigError, clip

# ----------------------------------------------------------------------------------------------
PLUGINS = ("decoct.cli.matching", "decoct.cli.decoupled", "decoct.cli.labels", "decoct.cli.plan")
"""Modules that add commands: each defines ``register(cli: CommandAdder) -> None``."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="decoct", description="Dataset distillation with exact storage accounting.",
        formatter_class=_HelpFormatter)
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str, run: bool = True):
        p = subs.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)
        p.set_defaults(func=func, _sub=p)
        _common(p, run=run)
        return p

    sets.register(CommandAdder(add, None))  # quickstart, select, evaluate, info, export, report

    distill = subs.add_parser("distill", help="Distil a dataset with an iterative method (see decoct distill -h).",
                              description="Distil a dataset into a few synthetic images per class.")
    dsubs = distill.add_subparsers(dest="method", required=True, metavar="METHOD")
    adder = CommandAdder(add, dsubs)
    import importlib

    for mod in PLUGINS:
        importlib.import_module(mod).register(adder)
    config_may_supply_required(parser)
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

