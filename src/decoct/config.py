"""YAML presets + ``--set key=value`` overrides on top of a command's defaults.

Precedence (lowest to highest): the command's defaults, ``--config FILE`` (YAML mapping),
flags typed on the command line, ``--set key=value``. Every key is checked against the
command's known keys, so a typo fails loudly with suggestions instead of being ignored.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override is malformed or names an unknown key."""


def _unknown(key: str, known: Iterable[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(sorted(known))}"
    return ConfigError(f"unknown config key {key!r} in {where}{hint}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or non-mapping content is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of key: value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["ipc=10", "lr=0.1"]`` -> ``{"ipc": 10, "lr": 0.1}`` (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            out[key] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            out[key] = value
    return out


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Bring a YAML/--set value to the type of the key's default (int -> float is fine)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} expects true/false, got {value!r}")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (int, float, str)) and not isinstance(value, type(default)):
        try:
            return type(default)(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"config key {key!r} expects {type(default).__name__}, got {value!r}"
            ) from None
    return value


def merge(defaults: Mapping[str, Any], overrides: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Overlay ``overrides`` on ``defaults``; unknown keys raise :class:`ConfigError`."""
    out = dict(defaults)
    for key, value in overrides.items():
        if key not in defaults:
            raise _unknown(key, defaults.keys(), where)
        out[key] = _coerce(key, value, defaults[key])
    return out
