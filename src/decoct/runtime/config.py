"""YAML presets + ``--set key=value`` overrides on top of a command's defaults.

Precedence (lowest to highest): the command's defaults, ``--config FILE`` (YAML mapping),
flags typed on the command line, ``--set key=value``. Every key is checked against the
command's known keys, so a typo fails loudly with suggestions instead of being ignored.

Every key has a type, taken from its argparse flag (:func:`key_specs`): ``type=int/float``,
``choices``, switches (booleans) and ``nargs`` (lists). YAML and ``--set`` values are converted
to that type and checked against the choices and against :data:`RANGES` (the one table of
numeric limits: counts are >= 1, seeds >= 0, learning rates > 0 ...), exactly as a typed flag is;
floats must be finite. Scientific notation (``1e-3``, ``5E-1``) is a float in YAML and ``--set``
(plain YAML 1.1 reads it as a string). Config files are plain mappings: duplicate keys, anchors
and aliases (``&a``/``*a``, which let a few hundred bytes expand to gigabytes) are refused.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override is malformed, names an unknown key, or holds a bad value."""


MAX_CONFIG_BYTES = 1 << 20
"""Config files are hand-written presets (a few KB); anything larger is refused unread."""


def clip(text: str, limit: int = 60) -> str:
    """``text`` cut to ``limit`` characters plus its total length (values quoted in messages)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text):,} characters)"


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` clipped (:func:`clip`): a message never carries a whole huge value."""
    return clip(repr(value), limit)


# ---------------------------------------------------------------------------------------- YAML
class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads ``1e-3`` as a float and refuses aliases and duplicate keys."""

    max_depth = 32

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None, None, "anchors and aliases (&name, *name) are not allowed in a config; write each "
                "value out", event.start_mark)
        depth = getattr(self, "_depth", 0)
        if depth >= self.max_depth:
            raise yaml.composer.ComposerError(
                None, None, f"values nest more than {self.max_depth} levels deep", event.start_mark)
        self._depth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:
                    continue  # unhashable: the base class reports it
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {short(key)} appears twice (lines {first} and "
                        f"{key_node.start_mark.line + 1}); keep one", None)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


# YAML 1.1 floats need a dot and a signed exponent (1.0e+3); also accept 1e-3, 5E-1, 1.5e3, -2e+3
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line: the parser's problem and where (PyYAML's own text spans several lines)."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{clip(problem, 200)}{where}"


def yaml_scalar(text: str) -> Any:
    """Parse one ``--set`` value as YAML (``1e-3`` is a float); text that is not YAML stays text."""
    if text == "":
        return ""
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: an int of > 4300 digits
        return text


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing, oversized, malformed or non-mapping file is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist" if not p.exists() else f"config file {p} is not a file")
    size = p.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {p} is {size:,} bytes; a config is a short YAML mapping "
                          f"(at most {MAX_CONFIG_BYTES:,} bytes)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.start})") from None
    try:
        data = yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.constructor.ConstructorError as e:
        raise ConfigError(f"config file {p}: {_yaml_problem(e)}") from None
    except yaml.composer.ComposerError as e:
        raise ConfigError(f"config file {p}: {_yaml_problem(e)}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {_yaml_problem(e)}") from None
    except ValueError as e:  # e.g. an integer literal of more than 4300 digits
        raise ConfigError(f"config file {p} holds a value Python cannot read: {clip(str(e), 200)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of key: value, got {type(data).__name__}")
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for k, v in data.items():
        key = str(k).replace("-", "_")
        if key in out:
            raise ConfigError(f"config file {p} sets {short(key)} twice (as {short(spelled[key])} and "
                              f"{short(str(k))}); keep one")
        out[key], spelled[key] = v, str(k)
    return out


def split_overrides(items: Iterable[str]) -> dict[str, str]:
    """``["ipc=10", "lr=1e-3"]`` -> ``{"ipc": "10", "lr": "1e-3"}``: the raw text of each value."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {short(item)}")
        out[key] = value
    return out


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["ipc=10", "lr=0.5"]`` -> ``{"ipc": 10, "lr": 0.5}`` (values parsed as YAML scalars)."""
    return {k: yaml_scalar(v) for k, v in split_overrides(items).items()}


# --------------------------------------------------------------------------------- key types
@dataclass(frozen=True)
class Range:
    """Allowed numbers: ``lo``..``hi`` (open ends when ``lo_open``/``hi_open``), plus ``extra``."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    extra: tuple[float, ...] = ()
    note: str = ""

    def ok(self, v: float) -> bool:
        if v in self.extra:
            return True
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return not (self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)))

    def text(self, integer: bool) -> str:
        """``an integer >= 1``, ``a number in (0, 1]`` ..."""
        what = "an integer" if integer else "a finite number"
        lo, hi = self.lo, self.hi
        if integer and lo is not None and self.lo_open:
            lo = math.floor(lo) + 1
        fmt = (lambda x: str(int(x))) if integer else (lambda x: f"{x:g}")
        if lo is not None and hi is not None:
            if integer:
                body = f"{what} in {fmt(lo)}..{fmt(hi)}"
            else:
                body = f"{what} in {'(' if self.lo_open else '['}{fmt(lo)}, {fmt(hi)}{')' if self.hi_open else ']'}"
        elif lo is not None:
            body = f"{what} {'>' if self.lo_open and not integer else '>='} {fmt(lo)}"
        elif hi is not None:
            body = f"{what} {'<' if self.hi_open else '<='} {fmt(hi)}"
        else:
            body = what
        if self.extra:
            body = f"{' or '.join(fmt(x) for x in self.extra)} or {body}"
        return f"{body} ({self.note})" if self.note else body


_POSITIVE = Range(0, lo_open=True)  # counts: >= 1; rates: > 0
_NONNEG = Range(0)  # 0 means off / automatic
_FRACTION = Range(0, 1, lo_open=True)  # (0, 1]
_MOMENTUM = Range(0, 1, hi_open=True)  # [0, 1)

RANGES: dict[str, Range] = {
    # counts: at least one
    "ipc": _POSITIVE, "runs": _POSITIVE, "epochs": _POSITIVE, "iterations": _POSITIVE,
    "checkpoint_every": _POSITIVE, "num_experts": _POSITIVE, "batch_size": _POSITIVE,
    "batch_real": _POSITIVE, "stats_batch_size": _POSITIVE, "embed_epochs": _POSITIVE, "width": _POSITIVE,
    "syn_steps": _POSITIVE, "expert_epochs": _POSITIVE, "max_start_epoch": _POSITIVE,
    "max_iterations": _POSITIVE, "max_epochs": _POSITIVE, "palette_aux_images": _POSITIVE,
    "palette_warmup_batch": _POSITIVE, "candidates": _POSITIVE, "crops": _POSITIVE, "factor": _POSITIVE,
    "label_epochs": _POSITIVE, "label_topk": _POSITIVE, "eval_runs": _POSITIVE, "eval_epochs": _POSITIVE,
    # counts of at least two: images sampled per class to estimate PNG sizes (a variance), a relabel batch
    "sample": Range(2), "label_batch": Range(2),
    # counts where 0 means off / all / automatic
    "seed": Range(0, 2**32 - 1), "real_chunk": _NONNEG, "batch_syn": _NONNEG, "snapshot_every": _NONNEG,
    "min_start_epoch": _NONNEG, "current_max_start_epoch": _NONNEG, "expansion_end_epoch": _NONNEG,
    "dwa_steps": _NONNEG, "jitter": _NONNEG, "workers": _NONNEG, "palette_warmup": _NONNEG, "palette_init_epochs": _NONNEG,
    # bits per stored label value (decoct relabel --label-bits; 8 or 4, checked by the label codec)
    "label_bits": Range(4, 8, note="8 or 4"),
    # colours per image
    "colors": Range(2, 256), "palette": Range(2, 256, extra=(0,), note="0 = full colour"),
    # learning rates: > 0
    "lr": _POSITIVE, "lr_img": _POSITIVE, "lr_lr": _POSITIVE, "lr_teacher": _POSITIVE,
    "lr_labels": _POSITIVE, "lr_palette": _POSITIVE, "palette_init_lr": _POSITIVE,
    # distillation temperature: > 0
    "temperature": _POSITIVE,
    # loss weights, decay, thresholds, radii: >= 0
    "weight_decay": _NONNEG, "threshold": _NONNEG, "r_bn": _NONNEG, "r_var": _NONNEG,
    "first_bn_multiplier": _NONNEG, "dwa_rho": _NONNEG, "palette_alpha": _NONNEG, "palette_beta": _NONNEG,
    "palette_gamma": _NONNEG, "palette_conf": _NONNEG,
    # fractions
    "momentum": _MOMENTUM, "label_smoothing": _MOMENTUM, "stats_momentum": _FRACTION,
    "crop_scale_min": _FRACTION, "palette_sample_ratio": _FRACTION,
}
"""The numeric limits of every config key of every command, by key name (one table for all)."""

MAPPING_KEYS = frozenset({"model_kwargs"})
"""Text keys that a YAML preset may also give as a mapping (``model_kwargs: {width: 64}``)."""


@dataclass(frozen=True)
class KeySpec:
    """The type of one config key, as its argparse flag defines it."""

    key: str
    kind: type  # int, float, bool or str
    label: str  # how a typed value is named in messages: the flag (--runs) or the positional's name
    optional: bool = False  # None is a value (the flag's default is None)
    many: bool = False  # nargs '+' / '*': a list
    choices: tuple[Any, ...] | None = None
    convert: Any = None  # a custom argparse type callable (applied to text)

    @property
    def range(self) -> Range | None:
        return RANGES.get(self.key) if self.kind in (int, float) else None

    def describe(self) -> str:
        """What a valid value is, in words."""
        if self.choices is not None:
            body = f"one of {', '.join(map(str, self.choices))}"
        elif self.kind is bool:
            body = "true or false"
        elif self.kind in (int, float):
            rng = self.range
            body = rng.text(self.kind is int) if rng is not None else (
                "an integer" if self.kind is int else "a finite number")
        else:
            body = "text"
        if self.many:
            body = f"a list, each {body}"
        return body


def key_specs(actions: Iterable[argparse.Action], skip: Iterable[str] = ()) -> dict[str, KeySpec]:
    """The :class:`KeySpec` of each dest of ``actions`` (a parser's ``_actions``), minus ``skip``."""
    skip = set(skip) | {"help"}
    by_dest: dict[str, list[argparse.Action]] = {}
    for a in actions:
        if a.dest not in skip and a.dest is not argparse.SUPPRESS:
            by_dest.setdefault(a.dest, []).append(a)
    specs: dict[str, KeySpec] = {}
    for dest, acts in by_dest.items():
        # --unrolled (store_const into --grad's dest) defers to the store action beside it
        main = next((a for a in acts if type(a) is argparse._StoreAction), acts[0])
        label = main.option_strings[-1] if main.option_strings else dest
        for a in acts:
            if a.option_strings and a.option_strings[-1].startswith("--") and not label.startswith("--"):
                label = a.option_strings[-1]
        optional = main.default is None and not main.required
        many = main.nargs in ("+", "*") or (isinstance(main.nargs, int) and main.nargs > 1)
        choices = tuple(main.choices) if main.choices is not None else None
        if isinstance(main, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                             argparse.BooleanOptionalAction)):
            kind, convert = bool, None
        elif isinstance(main, argparse._StoreConstAction):
            kind, convert = type(main.const) if main.const is not None else str, None
        elif main.type in (int, float, str, None):
            kind, convert = main.type or str, None
        else:
            kind, convert = str, main.type
        if isinstance(main, argparse.BooleanOptionalAction):
            label = main.option_strings[0]
        specs[dest] = KeySpec(dest, kind, label, optional, many, choices, convert)
    return specs


def _bad(label: str, spec: KeySpec, value: Any) -> ConfigError:
    return ConfigError(f"{label} must be {spec.describe()}, got {short(value)}")


def _one(spec: KeySpec, value: Any, label: str, raw: bool, shown: Any = None) -> Any:
    """Convert one (list item) value to the key's kind and check its choices and range."""
    kind, shown = spec.kind, value if shown is None else shown  # shown: the value as the user wrote it
    if kind is str:
        if raw:
            out: Any = value
        elif isinstance(value, str):
            out = value
        elif isinstance(value, dict) and spec.key in MAPPING_KEYS:
            return dict(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out = str(value)
        else:
            raise _bad(label, spec, shown)
        if spec.convert is not None:
            try:
                out = spec.convert(out)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
                raise ConfigError(f"{label}: {short(str(e), 200)}") from None
    else:
        if raw:
            value = yaml_scalar(value)
        if kind is bool:
            if not isinstance(value, bool):
                raise _bad(label, spec, shown)
            out = value
        elif isinstance(value, bool):
            raise _bad(label, spec, shown)
        elif kind is int:
            if isinstance(value, str):
                parsed = yaml_scalar(value.strip())
                value = parsed if isinstance(parsed, (int, float)) and not isinstance(parsed, bool) else value
            if isinstance(value, float) and math.isfinite(value) and value == int(value):
                value = int(value)  # 1e4 -> 10000; 2.7 is refused, never truncated
            if not isinstance(value, int):
                raise _bad(label, spec, shown)
            out = value
        elif kind is float:
            if isinstance(value, str):
                try:
                    value = float(value.strip())
                except ValueError:
                    raise _bad(label, spec, shown) from None
            if not isinstance(value, (int, float)):
                raise _bad(label, spec, shown)
            try:
                out = float(value)
            except OverflowError:
                raise _bad(label, spec, shown) from None
            if not math.isfinite(out):
                raise _bad(label, spec, shown)
        else:  # a store_const of another kind
            out = value
        rng = spec.range
        if rng is not None and not rng.ok(out):
            raise _bad(label, spec, shown)
    if spec.choices is not None and out not in spec.choices:
        raise ConfigError(f"{label} must be one of {', '.join(map(str, spec.choices))}, got {short(out)}")
    return out


def check_value(spec: KeySpec, value: Any, label: str | None = None, *, raw: bool = False) -> Any:
    """``value`` converted to ``spec``'s type and checked (choices, :data:`RANGES`, finite floats).

    ``raw``: ``value`` is the text of a ``--set`` (text keys keep it verbatim; ``null`` or ``~`` is
    None where None is allowed). ``label`` names the value in the error (default: the flag).
    """
    label = label or spec.label
    if raw and value in ("null", "~", "Null", "NULL"):
        value = None
    if value is None:
        if spec.optional:
            return None
        raise ConfigError(f"{label} needs a value: {spec.describe()}")
    if spec.many:
        text = value if raw else None
        if raw:
            value = yaml_scalar(value)
        items = value if isinstance(value, (list, tuple)) else [value]
        if not items:
            raise ConfigError(f"{label} must be {spec.describe()} with at least one item, got {short(text or [])}")
        return [_one(spec, v, label, raw=False, shown=text) for v in items]
    if isinstance(value, (list, tuple, dict)) and not (isinstance(value, dict) and spec.key in MAPPING_KEYS):
        raise _bad(label, spec, value)
    return _one(spec, value, label, raw)


def _unknown(key: str, known: Iterable[str], where: str) -> ConfigError:
    known = list(known)
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(sorted(known))}"
    return ConfigError(f"unknown config key {short(key)} in {where}{hint}")


def merge(defaults: Mapping[str, Any], overrides: Mapping[str, Any], where: str,
          specs: Mapping[str, KeySpec], *, raw: bool = False) -> dict[str, Any]:
    """Overlay ``overrides`` on ``defaults``, each value typed and checked by its key's spec.

    Unknown keys and bad values raise :class:`ConfigError` naming the key and ``where`` (e.g.
    ``--set`` or ``--config FILE``). ``raw``: the values are ``--set`` text (see :func:`check_value`).
    """
    out = dict(defaults)
    for key, value in overrides.items():
        if key not in defaults:
            raise _unknown(key, defaults.keys(), where)
        out[key] = check_value(specs[key], value, f"config key {key!r} in {where}", raw=raw)
    return out


def env_bytes(name: str, default: int) -> int:
    """A byte count from the environment variable ``name`` (``4e9`` or ``4000000000``), ``default``
    when unset. Raises ValueError naming the variable for a non-number or a negative value."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(float(raw))
    except (ValueError, OverflowError):
        raise ValueError(f"${name} must be a number of bytes, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"${name} must be >= 0, got {raw!r}")
    return value
