"""Expert sets: the on-disk format of expert trajectories for trajectory matching (load and verify).

An *expert* is a network trained on the full real training set (:func:`decoct.matching.experts.train_experts`);
its *trajectory* is its flattened parameter vector (:class:`~decoct.models.flat_params.FlatParams`) before
training and after every epoch.

On disk (a directory, reusable across distillation runs)::

    manifest.json                 settings, parameter layout, one entry per finished expert
                                  (file, seed, sha256, test accuracy per epoch, train loss),
                                  zca_sha256 (when zca is on)
    zca.safetensors               the ZCA state (only when zca is on)
    expert_0000.safetensors       {"trajectory": float32 (epochs + 1, num_params)}
    ...

Everything is written atomically and loaded with safetensors only (no pickle); every load verifies
the directory (:meth:`ExpertSet.verify`: paths confined, no links, headers, SHA-256).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from decoct.augment import ZCA
from decoct.data import DatasetInfo
from decoct.models import model_for
from decoct.models.flat_params import FlatParams
from decoct.runtime.filecheck import (
    FileCheckError,
    confined_path,
    is_int,
    is_sha256,
    read_json_object,
    regular_file_size,
    safetensors_header,
)
from decoct.runtime.io import load_tensors, sha256_file

FORMAT = "decoct-experts"
FORMAT_VERSION = 1
ZCA_DATASETS = ("cifar10", "cifar100")
"""Datasets on which the trajectory-matching papers whiten with ZCA (the default of ``zca=None``)."""
PRELOAD_BYTES = 1 << 30
"""Expert sets up to this size are held in memory by :func:`load_experts`; larger ones are read
two epochs at a time from the memory-mapped files."""


class ExpertMismatchError(ValueError):
    """Experts were trained for another dataset / model / ZCA setting than the one asked for."""


class ExpertFileError(ValueError):
    """An expert directory's files are missing, changed, linked, outside it, or not safetensors."""


@dataclass
class ExpertSet:
    """A directory of expert trajectories (see :func:`load_experts`)."""

    path: Path
    manifest: dict[str, Any]
    zca: ZCA | None
    _cache: dict[int, Tensor]

    # --- description ------------------------------------------------------------------------
    @property
    def experts(self) -> list[dict[str, Any]]:
        return self.manifest["experts"]

    def __len__(self) -> int:
        return len(self.experts)

    @property
    def epochs(self) -> int:
        return int(self.manifest["settings"]["epochs"])

    @property
    def num_params(self) -> int:
        return int(self.manifest["num_params"])

    @property
    def model_name(self) -> str:
        return str(self.manifest["settings"]["model"])

    @property
    def model_kwargs(self) -> dict[str, Any]:
        return dict(self.manifest["settings"]["model_kwargs"])

    @property
    def info(self) -> DatasetInfo:
        return DatasetInfo.from_dict(self.manifest["dataset"])

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.manifest["settings"])

    def build_model(self) -> nn.Module:
        """A fresh module of the experts' architecture whose layout matches the stored vectors.

        The layout is compared on a shape-only (``meta``) model first, so options read from the
        manifest cannot allocate a huge model before they are checked against the stored vectors.
        """
        try:
            with torch.device("meta"):
                layout = FlatParams(model_for(self.model_name, self.info, **self.model_kwargs)).layout()
        except (TypeError, ValueError, KeyError) as e:
            raise ExpertMismatchError(f"{self.path}/manifest.json: model {self.model_name!r} with options "
                                      f"{self.model_kwargs} cannot be built here: {e}") from e
        if layout != self.manifest["param_layout"]:
            raise ExpertMismatchError(
                f"the model {self.model_name}({self.model_kwargs}) built here has a different parameter "
                f"layout than the experts in {self.path} (was the model code changed?)")
        return model_for(self.model_name, self.info, **self.model_kwargs)

    def final_accuracy(self) -> float:
        """Mean final-epoch test accuracy of the experts (a sanity number for logs)."""
        accs = [e["test_accuracy"][-1] for e in self.experts]
        return sum(accs) / max(1, len(accs))

    # --- validation -------------------------------------------------------------------------
    def check(self, info: DatasetInfo | None = None, *, model: str | None = None,
              model_kwargs: dict[str, Any] | None = None, zca: bool | None = None,
              min_epochs: int | None = None) -> None:
        """Raise :class:`ExpertMismatchError` naming every difference from what a run needs."""
        s = self.manifest["settings"]
        problems: list[str] = []
        if info is not None:
            from decoct.data import DATASETS

            d = self.manifest.get("dataset", {})
            # an image-folder tree's name is its folder's, not an identity: a copy elsewhere (same
            # classes and normalisation) is the same data; a registered name is an identity
            copy = (s["dataset"] not in DATASETS and info.name not in DATASETS
                    and list(info.classes) == list(d.get("classes", [])) and list(info.mean) == list(d.get("mean", []))
                    and list(info.std) == list(d.get("std", [])))
            if info.name != s["dataset"] and not copy:
                problems.append(f"dataset: experts {s['dataset']!r}, run {info.name!r}")
            if list(info.image_shape) != list(s["image_shape"]) or info.num_classes != s["num_classes"]:
                problems.append(f"data shape: experts {tuple(s['image_shape'])} x {s['num_classes']} classes, "
                                f"run {info.image_shape} x {info.num_classes} classes")
            if info.name == s["dataset"] and (list(info.mean) != list(self.manifest["dataset"]["mean"])
                                              or list(info.std) != list(self.manifest["dataset"]["std"])):
                problems.append("normalisation constants (mean/std) differ from the experts' dataset")
        if model is not None and model.lower() != s["model"]:
            problems.append(f"model: experts {s['model']!r}, run {model!r}")
        if model_kwargs is not None and dict(model_kwargs) != dict(s["model_kwargs"]):
            problems.append(f"model options: experts {s['model_kwargs']}, run {dict(model_kwargs)}")
        if zca is not None and bool(zca) != bool(s["zca"]):
            problems.append(f"ZCA: experts were trained {'with' if s['zca'] else 'without'} ZCA, the run asks "
                            f"{'for' if zca else 'for no'} ZCA")
        if min_epochs is not None and self.epochs < min_epochs:
            problems.append(f"epochs: the run needs trajectories of at least {min_epochs} epochs "
                            f"(max_start_epoch - 1 + expert_epochs), the experts have {self.epochs}")
        if len(self) == 0:
            problems.append("the directory holds no finished expert")
        if problems:
            name = info.name if info is not None else s["dataset"]
            hint = experts_command(name, epochs=max(self.epochs, min_epochs or 0),
                                   zca=s["zca"] if zca is None else zca)
            raise ExpertMismatchError(f"experts in {self.path} do not fit this run:\n  - " + "\n  - ".join(problems)
                                      + f"\nTrain matching ones with: {hint}")

    # --- reading ----------------------------------------------------------------------------
    def _file(self, k: int) -> Path:
        return self.path / self.experts[k]["file"]

    def trajectory(self, k: int) -> Tensor:
        """Expert ``k``'s whole trajectory, float32 (epochs + 1, num_params), on the CPU."""
        if k in self._cache:
            return self._cache[k]
        return load_tensors(self._file(k))["trajectory"]

    def params(self, k: int, epochs: Sequence[int]) -> Tensor:
        """Rows ``epochs`` of expert ``k``'s trajectory, (len(epochs), num_params), reading only them."""
        if not 0 <= k < len(self):
            raise IndexError(f"expert {k} out of range (0..{len(self) - 1})")
        for e in epochs:
            if not 0 <= e <= self.epochs:
                raise IndexError(f"epoch {e} out of range (0..{self.epochs})")
        if k in self._cache:
            return self._cache[k][list(epochs)]
        with safe_open(os.fspath(self._file(k)), framework="pt", device="cpu") as f:
            sl = f.get_slice("trajectory")
            return torch.stack([sl[e:e + 1][0] for e in epochs])

    def preload(self) -> None:
        """Hold every trajectory in memory (fast sampling; only for sets that fit)."""
        for k in range(len(self)):
            if k not in self._cache:
                self._cache[k] = load_tensors(self._file(k))["trajectory"]

    def verify(self) -> list[str]:
        """Every expert file checked against the manifest; returns the problems found.

        Per file: its path stays inside the directory (no ``..``, no absolute path, no symbolic
        link), it is a safetensors file whose header holds ``trajectory`` float32
        (epochs + 1, num_params) (checked before anything is read), and its SHA-256 (streamed)
        is the manifest's. :func:`load_experts` runs this on every load.
        """
        problems = []
        shape = (self.epochs + 1, self.num_params)
        where = f"{self.path}/manifest.json"
        for e in self.experts:
            try:
                p = confined_path(self.path, e["file"], where)
                regular_file_size(p)
                t = safetensors_header(p).get("trajectory")
                if t is None or t["dtype"] != "F32" or t["shape"] != shape:
                    got = "no 'trajectory' tensor" if t is None else f"trajectory {t['dtype']} {t['shape']}"
                    problems.append(f"{p}: holds {got}; the manifest needs trajectory F32 {shape}")
                elif sha256_file(p) != e["sha256"]:
                    problems.append(f"{p} does not match its sha256 in the manifest (changed or corrupted "
                                    "after training)")
            except FileNotFoundError:
                problems.append(f"{self.path / e['file']} is missing")
            except FileCheckError as err:
                problems.append(str(err))
        return problems


def experts_command(dataset: str, out: str | None = None, epochs: int = 50, zca: bool | None = None) -> str:
    """The command that trains experts for ``dataset`` (used in error messages)."""
    from decoct.data import DATASETS

    out = out or f"experts/{dataset}"
    flag = "" if zca is None or zca == default_zca(dataset) else (" --zca" if zca else " --no-zca")
    # an image-folder tree's DatasetInfo name is its folder's name, not a registered one
    name = dataset if dataset.lower() in DATASETS and dataset.lower() != "imagefolder" else \
        "imagefolder --data-root DIR"
    return f"decoct experts --dataset {name} --out {out} --num-experts 10 --epochs {epochs}{flag}"


_MAX_EPOCHS = 100_000
_MAX_PARAMS = 1 << 34


def read_manifest(path: Path) -> dict[str, Any]:
    """manifest.json of an expert directory, every field that sizes or locates something checked."""
    m = path / "manifest.json"
    if not m.exists() and not m.is_symlink():
        raise FileNotFoundError(f"{path} holds no expert manifest (manifest.json); make experts with "
                                f"`decoct experts --dataset D --out {path} ...`")
    try:
        manifest = read_json_object(m, str(m))
    except FileCheckError as e:
        raise ExpertFileError(str(e)) from e
    if manifest.get("format") != FORMAT:
        raise ExpertFileError(f"{m} is not a decoct expert manifest (format {str(manifest.get('format'))[:40]!r})")
    version = manifest.get("version", 0)
    if not is_int(version, 0, FORMAT_VERSION):
        raise ExpertFileError(f"{m} has format version {str(version)[:20]}; this decoct reads up to {FORMAT_VERSION}")
    s, d = manifest.get("settings"), manifest.get("dataset")
    bad: str | None = None
    if not isinstance(s, dict) or not isinstance(d, dict):
        bad = "settings and dataset must be objects"
    elif not is_int(s.get("epochs"), 1, _MAX_EPOCHS):
        bad = f"settings.epochs must be an integer in 1..{_MAX_EPOCHS}"
    elif not isinstance(s.get("zca"), bool) or not isinstance(s.get("model"), str):
        bad = "settings.zca must be true/false and settings.model a name"
    elif not isinstance(s.get("model_kwargs"), dict) or not isinstance(s.get("dataset"), str):
        bad = "settings.model_kwargs must be an object and settings.dataset a name"
    elif (not isinstance(s.get("image_shape"), list) or len(s["image_shape"]) != 3
          or not all(is_int(v, 1, 1 << 14) for v in s["image_shape"]) or not is_int(s.get("num_classes"), 1, 1 << 20)):
        bad = "settings.image_shape must be 3 positive integers and settings.num_classes a positive integer"
    elif not is_int(manifest.get("num_params"), 1, _MAX_PARAMS) or not isinstance(manifest.get("param_layout"), list):
        bad = "num_params must be a positive integer and param_layout a list"
    elif s["zca"] and not isinstance(manifest.get("zca_file"), str):
        bad = "zca_file must name the ZCA file of experts trained with ZCA"
    elif manifest.get("zca_sha256") is not None and not is_sha256(manifest["zca_sha256"]):
        bad = "zca_sha256 must be a SHA-256 (64 hex digits)"
    elif not isinstance(manifest.get("experts"), list) or not all(
            isinstance(e, dict) and isinstance(e.get("file"), str) and is_sha256(e.get("sha256"))
            and is_int(e.get("index"), 0, 1 << 31) and isinstance(e.get("test_accuracy"), list)
            for e in manifest["experts"]):
        bad = "experts must list {index, file, sha256, test_accuracy} per expert (a sha256 is required)"
    if bad is None:
        try:
            info = DatasetInfo.from_dict(d)
            if [info.channels, info.height, info.width] != list(s["image_shape"]):
                bad = "dataset and settings.image_shape disagree"
        except (KeyError, TypeError, ValueError) as e:
            bad = f"dataset is malformed ({type(e).__name__}: {e})"
    if bad is not None:
        raise ExpertFileError(f"{m}: {bad}")
    return manifest


def load_zca(p: Path, manifest: dict[str, Any]) -> ZCA:
    """The experts' ZCA, its path confined, header checked against the image size, hash checked
    (expert sets written before the hash was recorded have only the header and shape checks)."""
    where = f"{p}/manifest.json"
    try:
        zf = confined_path(p, manifest["zca_file"], where)
        regular_file_size(zf)
        header = safetensors_header(zf)
    except FileNotFoundError as e:
        raise ExpertFileError(f"{p / manifest['zca_file']} is missing: the experts in {p} were trained "
                              "with ZCA") from e
    except FileCheckError as e:
        raise ExpertFileError(str(e)) from e
    dim = math.prod(manifest["settings"]["image_shape"])
    channels = int(manifest["settings"]["image_shape"][0])
    want: dict[str, tuple[int, ...]] = {"shape": (3,)}
    if "pixel_mean" in header:  # fitted on [0, 1] pixels (the references' recipe)
        want.update(pixel_mean=(dim,), input_mean=(channels,), input_std=(channels,))
    else:  # fitted on the normalised images (expert sets written before the pixel fit)
        want.update(mean=(dim,))
    want.update({"evecs": (dim, dim), "evals": (dim,)} if "evecs" in header else {"W": (dim, dim), "W_inv": (dim, dim)})
    wrong = [k for k, shape in want.items() if k not in header or header[k]["shape"] != shape]
    if wrong:
        raise ExpertFileError(f"{zf}: tensors {wrong} are missing or not shaped for {dim}-pixel images "
                              "(a ZCA of another dataset?)")
    want_sha = manifest.get("zca_sha256")
    if want_sha is not None and sha256_file(zf) != want_sha:
        raise ExpertFileError(f"{zf} does not match its sha256 in the manifest (changed or corrupted)")
    try:
        return ZCA.from_state_dict(load_tensors(zf))
    except (KeyError, ValueError) as e:
        raise ExpertFileError(f"{zf}: not a valid ZCA state ({e})") from e


def load_experts(path: str | Path, *, preload: bool | None = None) -> ExpertSet:
    """Open an expert directory written by :func:`train_experts` (safetensors only, no pickle).

    Every load verifies the directory first (:meth:`ExpertSet.verify`: paths confined, no links,
    headers shaped as the manifest says, SHA-256 of every file) and raises
    :class:`ExpertFileError` listing what is wrong. ``preload=None`` keeps the trajectories in
    memory when they total at most ``PRELOAD_BYTES``; otherwise each distillation iteration reads
    just the two epochs it needs.
    """
    p = Path(path)
    manifest = read_manifest(p)
    zca = load_zca(p, manifest) if manifest["settings"]["zca"] else None
    es = ExpertSet(p, manifest, zca, {})
    problems = es.verify()
    if problems:
        raise ExpertFileError(f"expert set {p} failed verification ({len(problems)} problem"
                              f"{'s' if len(problems) > 1 else ''}): " + "; ".join(problems[:5])
                              + ("; ..." if len(problems) > 5 else ""))
    total = len(es) * (es.epochs + 1) * es.num_params * 4
    if preload or (preload is None and total <= PRELOAD_BYTES):
        es.preload()
    return es


def default_zca(dataset: str) -> bool:
    """ZCA where the trajectory-matching papers use it (CIFAR-10/100)."""
    return dataset.lower() in ZCA_DATASETS


def expert_size_bytes(num_params: int, epochs: int, num_experts: int) -> int:
    """Disk size of an expert set (float32 trajectories), for planning."""
    return int(num_params) * (int(epochs) + 1) * int(num_experts) * 4


def describe(es: ExpertSet) -> str:
    """One line: what the directory holds."""
    s = es.settings
    size = expert_size_bytes(es.num_params, es.epochs, len(es))
    return (f"{len(es)} experts x {s['epochs']} epochs of {s['model']}{s['model_kwargs']} on {s['dataset']} "
            f"(zca={'on' if s['zca'] else 'off'}, lr {s['lr']}), {es.num_params:,} params each, "
            f"{size / 2**20:.1f} MiB, mean final test accuracy {100 * es.final_accuracy():.2f}%")


__all__ = ["FORMAT", "FORMAT_VERSION", "PRELOAD_BYTES", "ZCA_DATASETS", "ExpertFileError", "ExpertMismatchError",
           "ExpertSet", "default_zca", "describe", "expert_size_bytes", "experts_command", "load_experts",
           "load_zca", "read_manifest"]
