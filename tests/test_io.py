"""decoct.runtime.io: atomic writes leave no debris, loads never unpickle arbitrary objects."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from decoct.runtime import io as dio


class _NotAllowed:
    """A custom class: pickling it into a checkpoint must not be loadable."""

    def __init__(self) -> None:
        self.x = 1


def test_atomic_write_json_format_and_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.json"
    dio.atomic_write_json(target, {"b": 1, "a": [1, 2]})
    text = target.read_text()
    assert text.endswith("}\n")
    assert text.index('"b"') < text.index('"a"')  # insertion order, not sorted
    assert '\n  "b": 1' in text  # indent 2
    assert json.loads(text) == {"b": 1, "a": [1, 2]}
    dio.atomic_write_json(target, {"c": 3})  # replace an existing file
    assert json.loads(target.read_text()) == {"c": 3}
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_atomic_write_json_rejects_nan_and_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    dio.atomic_write_json(target, {"ok": 1})
    with pytest.raises(ValueError):
        dio.atomic_write_json(target, {"bad": float("nan")})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "data.bin"
    dio.atomic_write_bytes(target, b"old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(dio.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        dio.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]


def test_atomic_write_text_and_permissions(tmp_path: Path) -> None:
    target = tmp_path / "t.txt"
    dio.atomic_write_text(target, "héllo")
    assert target.read_text(encoding="utf-8") == "héllo"
    if os.name == "posix":
        umask = os.umask(0)
        os.umask(umask)
        assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_tensors_roundtrip_with_metadata(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).view(3, 4)
    tensors = {"a": base.t(), "b": base[0], "c": torch.tensor([1, 2], dtype=torch.int64)}
    path = tmp_path / "t.safetensors"
    dio.atomic_save_tensors(path, tensors, metadata={"kind": "test"})
    loaded = dio.load_tensors(path)
    assert set(loaded) == {"a", "b", "c"}
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v)
    assert dio.load_tensors_metadata(path) == {"kind": "test"}
    dio.atomic_save_tensors(path, {"x": torch.zeros(1)})
    assert dio.load_tensors_metadata(path) == {}


def test_save_tensors_rejects_non_string_metadata(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="metadata"):
        dio.atomic_save_tensors(tmp_path / "t.safetensors", {"x": torch.zeros(1)}, {"n": 1})  # type: ignore[dict-item]


def test_torch_save_load_plain_containers(tmp_path: Path) -> None:
    obj = {"step": 3, "lr": 0.1, "name": "dm", "state": {"w": torch.ones(2, 2)}, "hist": [1.0, 2.0]}
    path = tmp_path / "ckpt.pt"
    dio.atomic_torch_save(path, obj)
    back = dio.safe_torch_load(path)
    assert back["step"] == 3 and back["name"] == "dm" and back["hist"] == [1.0, 2.0]
    assert torch.equal(back["state"]["w"], torch.ones(2, 2))


def test_safe_torch_load_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"obj": _NotAllowed()}, path)
    with pytest.raises(ValueError, match="evil.pt"):
        dio.safe_torch_load(path)


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    data = os.urandom(3 << 20)  # larger than one read chunk
    path.write_bytes(data)
    assert dio.sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert dio.sha256_bytes(data) == hashlib.sha256(data).hexdigest()


def _make_dir(path: Path, content: str) -> Path:
    path.mkdir()
    (path / "f.txt").write_text(content)
    return path


def test_replace_dir_new_and_existing(tmp_path: Path) -> None:
    final = tmp_path / "final"
    dio.replace_dir(_make_dir(tmp_path / "tmp1", "one"), final)
    assert (final / "f.txt").read_text() == "one"
    dio.replace_dir(_make_dir(tmp_path / "tmp2", "two"), final)
    assert (final / "f.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no backup left


def test_replace_dir_restores_backup_on_failure(tmp_path: Path, monkeypatch) -> None:
    final = _make_dir(tmp_path / "final", "old")
    tmp = _make_dir(tmp_path / "tmp", "new")
    real_rename = os.rename

    def rename(src, dst):
        if Path(src) == tmp:
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(dio.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        dio.replace_dir(tmp, final)
    assert (final / "f.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "tmp"]


def test_replace_dir_refuses_file_target(tmp_path: Path) -> None:
    (tmp_path / "final").write_text("not a dir")
    with pytest.raises(ValueError, match="not a directory"):
        dio.replace_dir(_make_dir(tmp_path / "tmp", "x"), tmp_path / "final")


def test_fsync_paths_files_and_dirs(tmp_path: Path) -> None:
    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.bin"
        p.write_bytes(bytes([i]))
        paths.append(p)
    dio.fsync_paths(paths + [tmp_path])
    dio.fsync_paths([])
    with pytest.raises(FileNotFoundError):
        dio.fsync_paths([tmp_path / "missing", tmp_path / "0.bin"])
