import pytest

from decoct.config import ConfigError, load_yaml, merge, parse_overrides


def test_parse_overrides_types():
    assert parse_overrides(["ipc=10", "lr=0.5", "name=abc", "flag=true", "embed-epochs=3"]) == {
        "ipc": 10, "lr": 0.5, "name": "abc", "flag": True, "embed_epochs": 3}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["ipc"])


def test_merge_unknown_key_suggests():
    with pytest.raises(ConfigError, match="unknown config key 'ipcc'.*ipc"):
        merge({"ipc": 1, "seed": 0}, {"ipcc": 3}, "--set")


def test_merge_coerces_to_default_type():
    out = merge({"lr": 0.1, "ipc": 1, "amp": False, "name": None}, {"lr": 1, "ipc": "5", "name": 3}, "x")
    assert out == {"lr": 1.0, "ipc": 5, "amp": False, "name": 3}
    with pytest.raises(ConfigError, match="expects int"):
        merge({"ipc": 1}, {"ipc": "ten"}, "x")
    with pytest.raises(ConfigError, match="true/false"):
        merge({"amp": False}, {"amp": "yes please"}, "x")


def test_load_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("ipc: 10\nembed-epochs: 2\n")
    assert load_yaml(p) == {"ipc": 10, "embed_epochs": 2}
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
