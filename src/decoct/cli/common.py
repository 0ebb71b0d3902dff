"""What every command module shares: the common flags, config resolution, and the adder that
lets a family's module register its commands (:class:`CommandAdder`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from decoct.runtime.config import (
    ConfigError,
    check_value,
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


def data_flags(p: argparse.ArgumentParser) -> None:
    """``--data-mode``, ``--classes``, ``--workers``: how a large image tree (``imagenet``) is read."""
    g = p.add_argument_group("large datasets (imagenet)")
    g.add_argument("--data-mode", default=None, choices=("auto", "memory", "stream"),
                   help="stream: decode images per batch from disk; memory: decode the splits once into memory; "
                        "auto (the dataset's default): stream when the decoded splits exceed $DECOCT_MEMORY_LIMIT "
                        "(4 GiB)")
    g.add_argument("--classes", default=None, metavar="A:B|WNID,...",
                   help="work on a class subset of the tree: sorted class indices A..B-1, or folder names")
    g.add_argument("--workers", type=int, default=None,
                   help="DataLoader processes decoding a streamed dataset (default: min(8, CPUs))")


def data_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :func:`data_flags` the user set, as ``load_dataset`` options (unset ones are left out, so a
    dataset without them is not handed options it would refuse)."""
    keys = {"data_mode": "data_mode", "classes": "classes", "workers": "workers"}
    return {k: getattr(args, a) for k, a in keys.items() if getattr(args, a, None) is not None}


def config_may_supply_required(parser: argparse.ArgumentParser) -> None:
    """Let ``--config`` supply required flags (``dataset: cifar10`` in a preset): argparse would
    refuse the command line before the preset is read, so every required flag of every command is
    made optional to argparse and checked by :func:`_resolve` after the preset and ``--set``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                config_may_supply_required(sub)
        elif action.option_strings and action.required:
            action.required = False
            action.config_required = True  # type: ignore[attr-defined]
            action.help = f"{action.help or ''} (required: the flag, or the key in --config/--set)".strip()


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
    missing = [a.option_strings[-1] for a in sub._actions
               if getattr(a, "config_required", False) and typed.get(a.dest) is None]
    if missing:
        raise ConfigError(f"the following arguments are required: {', '.join(missing)} (on the command line, "
                          f"or as keys {', '.join(m.lstrip('-').replace('-', '_') for m in missing)} in --config)")
    return args


def resolved_config(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in META_KEYS and not k.startswith("_")}


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

    data_flags = staticmethod(data_flags)
