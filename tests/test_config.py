import argparse
import math
import time

import pytest

from decoct.runtime.config import (
    RANGES,
    ConfigError,
    check_value,
    clip,
    key_specs,
    load_yaml,
    merge,
    parse_overrides,
    short,
    split_overrides,
    yaml_scalar,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--ipc", type=int, default=None)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--lr-img", type=float, default=None)
    p.add_argument("--momentum", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--palette", type=int, default=0)
    p.add_argument("--colors", type=int, nargs="+", default=None)
    p.add_argument("--method", nargs="+", default=["mediancut"], choices=["mediancut", "octree"])
    p.add_argument("--embed", default="random", choices=["random", "trained"])
    p.add_argument("--amp", action="store_true")
    p.add_argument("--zca", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--grad", default="exact", choices=["exact", "unrolled"])
    p.add_argument("--unrolled", dest="grad", action="store_const", const="unrolled", default="exact")
    p.add_argument("--model", default=None)
    p.add_argument("--model-kwargs", default=None)
    p.add_argument("--prune", type=int, default=None, choices=[10, 20])
    return p


SPECS = key_specs(_parser()._actions)
DEFAULTS = {k: _parser().get_default(k) for k in SPECS}


def _merge(overrides, raw=False):
    return merge(DEFAULTS, overrides, "x", SPECS, raw=raw)


def test_parse_overrides_types():
    assert parse_overrides(["ipc=10", "lr=0.5", "name=abc", "flag=true", "embed-epochs=3"]) == {
        "ipc": 10, "lr": 0.5, "name": "abc", "flag": True, "embed_epochs": 3}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["ipc"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["=3"])
    assert split_overrides(["lr=1e-3", "a=b=c"]) == {"lr": "1e-3", "a": "b=c"}


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("5E-1", 0.5), ("-2e+3", -2000.0), ("1.5e3", 1500.0),
                                         ("1.0e-5", 1e-5), (".5e2", 50.0), ("+3e0", 3.0), ("1_0e1", 100.0)])
def test_scientific_notation_is_a_float(tmp_path, text, value):
    """PyYAML 1.1 reads 1e-3 (no dot, or an unsigned exponent) as a string; decoct reads a float."""
    assert yaml_scalar(text) == value and isinstance(yaml_scalar(text), float)
    assert parse_overrides([f"lr={text}"]) == {"lr": value}
    p = tmp_path / "c.yaml"
    p.write_text(f"lr: {text}\nq: '{text}'\n")
    assert load_yaml(p) == {"lr": value, "q": text}  # quoted stays text
    for not_float in ("e5", "1e", "1.2.3", "1e-3x", "dsa_1e3"):
        assert isinstance(yaml_scalar(not_float), str)


def test_merge_unknown_key_suggests():
    with pytest.raises(ConfigError, match="unknown config key 'ipcc'.*ipc"):
        _merge({"ipcc": 3})
    with pytest.raises(ConfigError) as e:
        _merge({"x" * 10_000: 1})
    assert len(str(e.value)) < 600 and "10,002 characters" in str(e.value)


def test_every_key_is_typed_even_with_a_none_default():
    """Types come from the flag, not from the default's type (None defaults used to skip conversion)."""
    out = _merge({"lr_img": "1e-3", "ipc": "5", "iterations": 1e4, "momentum": 0, "zca": False,
                  "model": "convnet", "prune": 20, "colors": 4, "method": "octree"})
    assert out["lr_img"] == 1e-3 and isinstance(out["lr_img"], float)
    assert out["ipc"] == 5 and out["iterations"] == 10_000 and isinstance(out["iterations"], int)
    assert out["momentum"] == 0.0 and isinstance(out["momentum"], float)
    assert out["colors"] == [4] and out["method"] == ["octree"] and out["zca"] is False
    raw = _merge({"lr_img": "1e-3", "ipc": "7", "model": "1e3", "model_kwargs": "width=64", "zca": "null",
                  "colors": "[2, 16]", "amp": "true"}, raw=True)
    assert raw["lr_img"] == 1e-3 and raw["ipc"] == 7 and raw["model"] == "1e3"  # text keys keep the text
    assert raw["model_kwargs"] == "width=64" and raw["zca"] is None and raw["colors"] == [2, 16]
    assert raw["amp"] is True
    assert _merge({"model_kwargs": {"width": 64}})["model_kwargs"] == {"width": 64}


@pytest.mark.parametrize("key, value, words", [
    ("ipc", 0, "'ipc' in x must be an integer >= 1, got 0"),
    ("ipc", -3, "integer >= 1"),
    ("ipc", "ten", "integer >= 1, got 'ten'"),
    ("iterations", 2.7, "'iterations' in x must be an integer >= 1, got 2.7"),
    ("iterations", True, "got True"),
    ("iterations", None, "needs a value"),
    ("iterations", [1, 2], "got [1, 2]"),
    ("lr_img", math.inf, "'lr_img' in x must be a finite number > 0, got inf"),
    ("lr_img", -math.inf, "finite number > 0"),
    ("lr_img", math.nan, "got nan"),
    ("lr_img", "inf", "finite number > 0"),
    ("lr_img", 0, "finite number > 0, got 0"),
    ("lr_img", 10**400, "finite number > 0"),
    ("lr_img", False, "finite number > 0, got False"),
    ("momentum", 1.0, "in [0, 1)"),
    ("seed", -1, "in 0..4294967295"),
    ("palette", 1, "0 or an integer in 2..256"),
    ("colors", [2, 300], "each an integer in 2..256"),
    ("colors", [], "at least one"),
    ("method", ["kmeans"], "one of mediancut, octree, got 'kmeans'"),
    ("embed", "train", "one of random, trained, got 'train'"),
    ("grad", "tesla", "one of exact, unrolled"),
    ("prune", 15, "one of 10, 20, got 15"),
    ("amp", "yes please", "true or false"),
    ("amp", 1, "true or false"),
    ("model", [1], "must be text"),
    ("model", True, "must be text"),
])
def test_bad_values_are_refused_naming_the_key(key, value, words):
    with pytest.raises(ConfigError, match=None) as e:
        _merge({key: value})
    assert words in str(e.value) and f"'{key}'" in str(e.value)


@pytest.mark.parametrize("key, text", [("ipc", "0"), ("iterations", "2.7"), ("iterations", "true"),
                                       ("lr_img", ".inf"), ("lr_img", "nan"), ("lr_img", "-1e-3"),
                                       ("embed", "foo"), ("amp", "maybe"), ("seed", "-1")])
def test_bad_set_text_is_refused_and_quoted_as_typed(key, text):
    with pytest.raises(ConfigError) as e:
        _merge({key: text}, raw=True)
    assert f"'{key}'" in str(e.value) and f"got '{text}'" in str(e.value)


def test_accepted_edges():
    assert _merge({"palette": 0, "seed": 0, "momentum": 0})["palette"] == 0
    assert _merge({"palette": 2})["palette"] == 2 and _merge({"palette": 256})["palette"] == 256
    assert _merge({"lr_img": 1e-12})["lr_img"] == 1e-12
    assert _merge({"ipc": None})["ipc"] is None  # None default: None allowed


def test_typed_flag_label():
    """A value typed on the command line is named by its flag."""
    with pytest.raises(ConfigError, match=r"^--ipc must be an integer >= 1, got 0$"):
        check_value(SPECS["ipc"], 0)
    assert SPECS["zca"].label == "--zca" and SPECS["grad"].label == "--grad"
    assert SPECS["grad"].choices == ("exact", "unrolled")


def test_short_clips_values():
    assert short("abc") == "'abc'"
    s = short("y" * 10**6)
    assert len(s) < 100 and s.endswith("(1,000,002 characters)")
    assert clip("z" * 61, 60) == "z" * 60 + "... (61 characters)"


def test_load_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("ipc: 10\nembed-epochs: 2\n")
    assert load_yaml(p) == {"ipc": 10, "embed_epochs": 2}
    p.write_text("")
    assert load_yaml(p) == {}
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is not a file"):
        load_yaml(tmp_path)
    p.write_text("ipc: [1\n")
    with pytest.raises(ConfigError, match=r"c.yaml is not valid YAML: .*\(line 2, column 1\)$") as e:
        load_yaml(p)
    assert "\n" not in str(e.value)
    p.write_bytes(b"ipc: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_yaml(p)
    p.write_text("a: " + "[" * 100 + "]" * 100 + "\n")
    with pytest.raises(ConfigError, match=r"c.yaml: values nest more than 32 levels deep \(line 1, column 35\)"):
        load_yaml(p)
    p.write_text("ipc: " + "1" * 6000 + "\n")
    with pytest.raises(ConfigError, match="c.yaml"):
        load_yaml(p)
    p.write_text("# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match="at most 1,048,576 bytes"):
        load_yaml(p)


@pytest.mark.parametrize("text, words", [
    ("ipc: 1\nseed: 2\nipc: 3\n", "key 'ipc' appears twice (lines 1 and 3)"),
    ("ipc: 1\nnested: {a: 1, a: 2}\n", "key 'a' appears twice"),
    ("embed-epochs: 2\nembed_epochs: 3\n", "sets 'embed_epochs' twice (as 'embed-epochs' and 'embed_epochs')"),
])
def test_duplicate_yaml_keys_are_an_error(tmp_path, text, words):
    p = tmp_path / "dup.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_yaml(p)
    assert words in str(e.value) and str(p) in str(e.value)


def _alias_bomb(levels: int = 9) -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    prev = "a"
    for name in "bcdefghijklmnop"[:levels - 1]:
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
        prev = name
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_refused_fast_with_a_short_message(tmp_path):
    """Billion laughs: ~340 bytes that plain yaml.safe_load expands to 9^9 strings (GBs, minutes)."""
    p = tmp_path / "bomb.yaml"
    p.write_text(_alias_bomb())
    assert p.stat().st_size < 400
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        load_yaml(p)
    assert time.perf_counter() - t0 < 1.0
    msg = str(e.value)
    assert len(msg) < 300 and "aliases" in msg and str(p) in msg
    # a --set value cannot smuggle one in either: it stays text
    assert yaml_scalar("&a [*a]") == "&a [*a]"


def test_harmless_anchor_is_refused_too(tmp_path):
    p = tmp_path / "a.yaml"
    p.write_text("lr: &x 0.1\nlr_img: *x\n")
    with pytest.raises(ConfigError, match=r"anchors and aliases .* \(line 1"):
        load_yaml(p)


def test_ranges_table_entries_are_sane():
    for key, rng in RANGES.items():
        assert key == key.lower().replace("-", "_")
        assert rng.lo is not None or rng.hi is not None
