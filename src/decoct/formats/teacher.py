"""Teacher files: the teacher directory and its BN-statistics file (load, save, verify only).

A teacher directory, written by :func:`decoct.decoupled.squeeze.squeeze` and read by :func:`load_teacher`::

    model.safetensors     the model's state dict (parameters and BN running buffers)
    bn_stats.safetensors  per BN layer ``<name>.<stat>`` (``mean``, ``var``, ``class_mean``,
                          ``class_var``, ``class_mean_exact``, ``class_var_exact``, ``class_count``),
                          float32; what they measure is in :mod:`decoct.decoupled.squeeze`
    teacher.json          format/version, model name + kwargs, dataset info, train config,
                          test accuracy, BN layer list, sha256 of both safetensors files

Only safetensors files are read (no pickle). Every load checks teacher.json (format, version,
model, both files' sha256), then the files' headers against the model teacher.json names, before
any tensor is read; then the streamed hashes. Training a teacher and computing its statistics
are not here: they live with the decoupled family (:mod:`decoct.decoupled.squeeze`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from decoct.data import DatasetInfo
from decoct.models import MODELS, model_for
from decoct.runtime.filecheck import (
    FileCheckError,
    is_int,
    is_sha256,
    read_json_object,
    regular_file_size,
    safetensors_header,
)
from decoct.runtime.io import atomic_save_tensors, load_tensors, sha256_file

__all__ = [
    "BN_STATS_FORMAT",
    "TEACHER_FORMAT",
    "TEACHER_VERSION",
    "BNStats",
    "Teacher",
    "TeacherError",
    "bn_layers",
    "check_teacher_dataset",
    "load_bn_stats",
    "load_teacher",
    "load_teacher_full",
    "read_teacher_meta",
    "save_bn_stats",
]

TEACHER_FORMAT = "decoct-teacher"
TEACHER_VERSION = 1
BN_STATS_FORMAT = "decoct-bn-stats"
_STAT_KEYS = ("mean", "var", "class_mean", "class_var", "class_mean_exact", "class_var_exact", "class_count")


class TeacherError(ValueError):
    """A teacher directory is missing, corrupted, or does not fit the dataset/model asked for."""


def bn_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """(name, module) of every BatchNorm layer in module (registration) order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@dataclass
class BNStats:
    """BN-input statistics of a teacher: ``layers`` in module order, ``stats[name][key]`` tensors."""

    layers: list[str]
    stats: dict[str, dict[str, Tensor]]
    num_classes: int
    momentum: float = 0.1

    def to_tensors(self) -> dict[str, Tensor]:
        return {f"{n}.{k}": v.float() if v.is_floating_point() else v
                for n in self.layers for k, v in self.stats[n].items()}

    def channels(self, name: str) -> int:
        return int(self.stats[name]["mean"].numel())

    def check_model(self, model: nn.Module, what: str = "BN statistics") -> None:
        """Raise :class:`TeacherError` unless ``model``'s BN layers are exactly these (names, channels)."""
        layers = bn_layers(model)
        names = [n for n, _ in layers]
        if names != self.layers:
            missing = [n for n in self.layers if n not in names][:5]
            extra = [n for n in names if n not in self.layers][:5]
            raise TeacherError(
                f"{what} do not belong to this architecture: the model has {len(names)} BN layers, "
                f"the statistics {len(self.layers)} (layers only in the statistics: {missing}; only in "
                f"the model: {extra}); were they computed for another model?")
        for n, m in layers:
            c = m.num_features
            st = self.stats[n]
            want = {"mean": (c,), "var": (c,), "class_mean": (self.num_classes, c),
                    "class_var": (self.num_classes, c), "class_count": (self.num_classes,)}
            for k, shape in want.items():
                if k in st and tuple(st[k].shape) != shape:
                    raise TeacherError(f"{what}: layer {n!r} {k} has shape {tuple(st[k].shape)}, the model "
                                       f"needs {shape}; were they computed for another model or dataset?")


def save_bn_stats(path: str | Path, stats: BNStats, model_name: str) -> None:
    meta = {"format": BN_STATS_FORMAT, "version": str(TEACHER_VERSION), "model": model_name,
            "num_classes": str(stats.num_classes), "momentum": repr(stats.momentum),
            "layers": json.dumps(stats.layers)}
    atomic_save_tensors(path, stats.to_tensors(), metadata=meta)


def load_bn_stats(path: str | Path, sha256: str | None = None) -> BNStats:
    """Read ``bn_stats.safetensors`` (a teacher directory or the file itself).

    The safetensors header (format, layer list, tensor names and shapes) is checked before any
    tensor is read; with ``sha256`` the file's streamed hash must match it.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "bn_stats.safetensors"
    if not p.exists() and not p.is_symlink():
        raise TeacherError(f"{p}: no BN statistics file (run `decoct squeeze` to make one)")
    header = _checked_header(p)
    if sha256 is not None:
        _verify_hash(p, sha256)
    meta = header.get("__metadata__", {})
    if meta.get("format") != BN_STATS_FORMAT:
        raise TeacherError(f"{p}: not a decoct BN-statistics file (format {str(meta.get('format'))[:40]!r})")
    try:
        layers = json.loads(meta["layers"])
        num_classes = int(meta["num_classes"])
        momentum = float(meta.get("momentum", 0.1))
    except (KeyError, TypeError, ValueError) as e:
        raise TeacherError(f"{p}: malformed BN-statistics metadata ({type(e).__name__}: {e})") from e
    if not isinstance(layers, list) or not all(isinstance(n, str) for n in layers) or num_classes < 1:
        raise TeacherError(f"{p}: malformed BN-statistics metadata (layers, num_classes)")
    for key, h in header.items():
        if key == "__metadata__":
            continue
        name, _, stat = key.rpartition(".")
        if name not in layers or stat not in _STAT_KEYS:
            raise TeacherError(f"{p}: unexpected tensor {key!r}")
        per_class = stat.startswith("class_")
        if len(h["shape"]) != (1 if stat in ("mean", "var", "class_count") else 2) or (
                per_class and h["shape"][0] != num_classes):
            raise TeacherError(f"{p}: tensor {key!r} has shape {h['shape']}, not a {num_classes}-class statistic")
    tensors = load_tensors(p)
    stats: dict[str, dict[str, Tensor]] = {n: {} for n in layers}
    for key, t in tensors.items():
        name, _, stat = key.rpartition(".")
        stats[name][stat] = t
    for n in layers:
        miss = [k for k in _STAT_KEYS if k not in stats[n]]
        if miss:
            raise TeacherError(f"{p}: layer {n!r} lacks {miss}")
    return BNStats(layers, stats, num_classes, momentum)


@dataclass
class Teacher:
    """A loaded teacher: model (eval mode), the dataset it was trained for, its metadata and stats."""

    model: nn.Module
    info: DatasetInfo
    meta: dict[str, Any]
    stats: BNStats | None = None
    path: Path | None = None


def _checked_header(path: Path) -> dict[str, Any]:
    """A teacher file's safetensors header: a plain file (no link), really safetensors."""
    try:
        regular_file_size(path)
        return safetensors_header(path)
    except FileCheckError as e:
        raise TeacherError(str(e)) from e


def _verify_hash(path: Path, want: str | None) -> None:
    """The file's streamed SHA-256 must be ``want`` (a teacher.json without it is refused earlier)."""
    if not is_sha256(want):
        raise TeacherError(f"{path}: teacher.json records no sha256 for it; the teacher cannot be verified")
    if sha256_file(path) != want:
        raise TeacherError(f"{path}: sha256 differs from teacher.json (file changed or corrupted)")


_TEACHER_FILES = ("model.safetensors", "bn_stats.safetensors")


def read_teacher_meta(path: str | Path) -> dict[str, Any]:
    """teacher.json of a teacher directory, validated (format, version, model, the files' sha256)."""
    p = Path(path)
    j = p / "teacher.json"
    if not j.exists() and not j.is_symlink():
        hint = " (an unfinished squeeze? rerun it with --resume)" if (p / "checkpoint.pt").exists() else ""
        raise TeacherError(f"{p} is not a teacher directory: no teacher.json{hint}")
    try:
        meta = read_json_object(j, str(j))
    except FileCheckError as e:
        raise TeacherError(str(e)) from e
    if meta.get("format") != TEACHER_FORMAT:
        raise TeacherError(f"{j}: format {str(meta.get('format'))[:40]!r}, expected {TEACHER_FORMAT!r}")
    version = meta.get("version", -1)
    if not is_int(version, hi=TEACHER_VERSION):
        raise TeacherError(f"{j}: format version {str(version)[:20]} is not one this decoct reads "
                           f"(up to {TEACHER_VERSION}); upgrade decoct")
    if meta.get("model") not in MODELS:
        raise TeacherError(f"{j}: unknown model {str(meta.get('model'))[:40]!r}; known: {', '.join(MODELS.names())}")
    files = meta.get("files")
    missing = [f for f in _TEACHER_FILES if not (isinstance(files, dict) and is_sha256(files.get(f)))]
    if missing:
        d = meta.get("dataset")
        name = str(d.get("name"))[:40] if isinstance(d, dict) else "NAME"
        raise TeacherError(f"{j}: no sha256 recorded for {', '.join(missing)} ('files' entry), so the teacher "
                           f"cannot be verified; make it again: decoct squeeze --dataset {name} --model "
                           f"{meta['model']} --out {p} --force")
    if not isinstance(meta.get("dataset"), dict) or not isinstance(meta.get("model_kwargs", {}), dict):
        raise TeacherError(f"{j}: 'dataset' and 'model_kwargs' must be objects")
    return meta


def load_teacher(path: str | Path, device: torch.device | str = "cpu", *, with_stats: bool = False,
                 verify: bool = True) -> tuple[nn.Module, DatasetInfo, dict[str, Any]]:
    """Load a teacher directory: ``(model in eval mode on device, DatasetInfo, teacher.json dict)``.

    Only safetensors files are read (no pickle). The files' sha256 are checked against
    teacher.json when ``verify``. With ``with_stats`` the BN statistics are loaded too, checked
    against the model's BN layers, and returned as ``meta["bn_stats"]`` (a :class:`BNStats`).
    """
    t = load_teacher_full(path, device, with_stats=with_stats, verify=verify)
    meta = dict(t.meta)
    if t.stats is not None:
        meta["bn_stats"] = t.stats
    return t.model, t.info, meta


def load_teacher_full(path: str | Path, device: torch.device | str = "cpu", *, with_stats: bool = True,
                      verify: bool = True) -> Teacher:
    """Like :func:`load_teacher` but returns a :class:`Teacher` (stats loaded by default).

    Before any tensor is read: teacher.json must record both files' sha256, the files must be
    plain safetensors files (no links) and their headers must hold exactly the tensor names and
    shapes of the model teacher.json names (compared on a shape-only ``meta`` model, so options
    read from the file cannot allocate a huge model first); then the streamed hash is checked.
    ``verify=False`` skips only the hashing.
    """
    p = Path(path)
    meta = read_teacher_meta(p)
    files = meta["files"]
    try:
        info = DatasetInfo.from_dict(meta["dataset"])
    except (KeyError, TypeError, ValueError) as e:
        raise TeacherError(f"{p / 'teacher.json'}: malformed dataset ({type(e).__name__}: {e})") from e
    model_file = p / "model.safetensors"
    if not model_file.exists() and not model_file.is_symlink():
        raise TeacherError(f"{p}: model.safetensors is missing")
    header = _checked_header(model_file)
    kwargs = meta.get("model_kwargs", {})
    try:
        with torch.device("meta"):
            want = {k: tuple(v.shape) for k, v in model_for(meta["model"], info, **kwargs).state_dict().items()}
    except (TypeError, ValueError, KeyError) as e:
        raise TeacherError(f"{p / 'teacher.json'}: model {meta['model']} {kwargs} cannot be built: {e}") from e
    got = {k: h["shape"] for k, h in header.items() if k != "__metadata__"}
    if got != want:
        diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))[:5]
        raise TeacherError(f"{model_file}: does not fit model {meta['model']} {kwargs} (tensors differing in "
                           f"name or shape: {diff})")
    if verify:
        _verify_hash(model_file, files.get("model.safetensors"))
    model = model_for(meta["model"], info, **kwargs)
    state = load_tensors(model_file)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise TeacherError(f"{model_file}: does not fit model {meta['model']} {kwargs}: {e}") from e
    model.to(torch.device(device)).eval()
    stats = None
    if with_stats:
        sp = p / "bn_stats.safetensors"
        stats = load_bn_stats(sp, files.get("bn_stats.safetensors") if verify else None)
        if stats.num_classes != info.num_classes:
            raise TeacherError(f"{sp}: statistics for {stats.num_classes} classes, the teacher has {info.num_classes}")
        stats.check_model(model, f"BN statistics in {sp}")
    return Teacher(model, info, meta, stats, p)


def check_teacher_dataset(info: DatasetInfo, dataset_info: DatasetInfo, teacher_path: str | Path = "") -> None:
    """Raise :class:`TeacherError` unless the teacher was made for this dataset's classes and images."""
    if tuple(info.classes) != tuple(dataset_info.classes):
        n1, n2 = info.num_classes, dataset_info.num_classes
        diff = next((i for i, (a, b) in enumerate(zip(info.classes, dataset_info.classes, strict=False)) if a != b), min(n1, n2))
        raise TeacherError(
            f"teacher {teacher_path} was trained on {info.name!r} with {n1} classes, the dataset "
            f"{dataset_info.name!r} has {n2}; the class lists differ first at index {diff}")
    if info.image_shape != dataset_info.image_shape:
        raise TeacherError(f"teacher {teacher_path} expects images {info.image_shape}, dataset "
                           f"{dataset_info.name!r} has {dataset_info.image_shape}")
