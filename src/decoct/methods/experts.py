"""Expert trajectories for trajectory matching (MTT, Cazenavette et al. 2022): train, store, load.

An *expert* is a network trained on the full real training set; its *trajectory* is its flattened
parameter vector before training and after every epoch. Trajectory matching (``decoct.methods.tm``)
starts a student at epoch ``t`` of a random expert and asks the synthetic set to move it, in a few
steps, to where the expert was at epoch ``t + M``.

Recipe (MTT ``buffer.py``; ``reference/anchors.md`` §1.4): the protocol ConvNet for the image size
(depth from the size, width 128, instance norm), plain SGD with lr 0.01 (the *teacher lr*),
momentum 0, weight decay 0, batch 256, no lr decay, DSA augmentation on every minibatch
(``color_crop_cutout_flip_scale_rotate``, one family per call, per-sample draws), 50 epochs, 100
experts; ZCA whitening where the papers use it (CIFAR-10/100). Two deliberate differences, both
recorded in the manifest:

* ZCA is fitted on mean/std-normalised images (this project's convention, the same transform the
  evaluation applies from the artifact's attachment), whereas MTT fits kornia's ZCA on [0, 1]
  images. Either way the expert, the distillation and the evaluation share one transform.
* MTT's ``buffer.py`` draws its randomness from the wall clock; here expert ``k`` is seeded with
  ``seed + k`` (initialisation, minibatch order, augmentation), so experts are reproducible.

On disk (a directory, reusable across distillation runs)::

    manifest.json                 settings, parameter layout, one entry per finished expert
                                  (file, seed, sha256, test accuracy per epoch, train loss),
                                  zca_sha256 (when zca is on)
    zca.safetensors               the ZCA state (only when zca is on)
    expert_0000.safetensors       {"trajectory": float32 (epochs + 1, num_params)}
    ...

Everything is written atomically and loaded with safetensors only (no pickle); every load verifies
the directory (:meth:`ExpertSet.verify`: paths confined, no links, headers, SHA-256). An interrupted
``train_experts`` keeps the finished experts: calling it again with the same settings trains the
missing ones (a half-trained expert restarts from its seed), and a larger ``num_experts`` extends
the set. Different settings in an existing directory are refused unless ``force``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from decoct.augment import DSA, ZCA
from decoct.augment.dsa import DEFAULT_STRATEGY, parse_strategy
from decoct.data import Dataset, DatasetInfo, load_dataset, normalize
from decoct.models import model_for
from decoct.runtime.filecheck import (
    FileCheckError,
    confined_path,
    is_sha256,
    read_json_object,
    regular_file_size,
    safetensors_header,
)
from decoct.runtime.health import DivergedError, rerun_hint
from decoct.runtime.io import atomic_save_tensors, atomic_write_json, load_tensors, sha256_file
from decoct.train import evaluate_accuracy, seeded_model
from decoct.train.trainer import make_generators, minibatches

FORMAT = "decoct-experts"
FORMAT_VERSION = 1
ZCA_DATASETS = ("cifar10", "cifar100")
"""Datasets on which the trajectory-matching papers whiten with ZCA (the default of ``zca=None``)."""
DEFAULT_MODEL_KWARGS: dict[str, Any] = {"width": 128, "norm": "instance"}
PRELOAD_BYTES = 1 << 30
"""Expert sets up to this size are held in memory by :func:`load_experts`; larger ones are read
two epochs at a time from the memory-mapped files."""

# Settings that must agree for an existing expert directory to be reused or extended.
_SETTING_KEYS = ("dataset", "image_shape", "num_classes", "model", "model_kwargs", "zca", "epochs", "lr",
                 "momentum", "weight_decay", "batch_size", "augment", "seed")


class ExpertMismatchError(ValueError):
    """Experts were trained for another dataset / model / ZCA setting than the one asked for."""


class ExpertFileError(ValueError):
    """An expert directory's files are missing, changed, linked, outside it, or not safetensors."""


# ------------------------------------------------------------------------------------------
# flat parameter vectors
# ------------------------------------------------------------------------------------------
class FlatParams:
    """Maps a module's parameters to one flat vector and back, for ``functional_call``.

    MTT's ``ReparamModule`` does the same by rewriting the module; here the module is left intact
    and :meth:`forward` calls it functionally with views of the flat vector, so gradients flow to
    the vector (and through it to anything it was computed from).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.num_params = sum(self.numels)

    def layout(self) -> list[list[Any]]:
        """``[[name, shape], ...]`` (JSON-friendly; stored in the expert manifest)."""
        return [[n, list(s)] for n, s in zip(self.names, self.shapes, strict=True)]

    def flatten(self, module: nn.Module | None = None) -> Tensor:
        """The parameters of ``module`` (default: the wrapped one), detached, as one vector."""
        m = module if module is not None else self.model
        return torch.cat([p.detach().reshape(-1) for p in m.parameters()])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        if flat.dim() != 1 or flat.numel() != self.num_params:
            raise ValueError(f"flat parameters must be a vector of {self.num_params}, got {tuple(flat.shape)}")
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.numels), self.shapes, strict=True)}

    def forward(self, flat: Tensor, x: Tensor) -> Tensor:
        """``model(x)`` with the parameters taken from ``flat`` (differentiable in both)."""
        return torch.func.functional_call(self.model, self.unflatten(flat), (x,))

    __call__ = forward


# ------------------------------------------------------------------------------------------
# the expert set on disk
# ------------------------------------------------------------------------------------------
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


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _read_manifest(path: Path) -> dict[str, Any]:
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
    if not _is_int(version, 0, FORMAT_VERSION):
        raise ExpertFileError(f"{m} has format version {str(version)[:20]}; this decoct reads up to {FORMAT_VERSION}")
    s, d = manifest.get("settings"), manifest.get("dataset")
    bad: str | None = None
    if not isinstance(s, dict) or not isinstance(d, dict):
        bad = "settings and dataset must be objects"
    elif not _is_int(s.get("epochs"), 1, _MAX_EPOCHS):
        bad = f"settings.epochs must be an integer in 1..{_MAX_EPOCHS}"
    elif not isinstance(s.get("zca"), bool) or not isinstance(s.get("model"), str):
        bad = "settings.zca must be true/false and settings.model a name"
    elif not isinstance(s.get("model_kwargs"), dict) or not isinstance(s.get("dataset"), str):
        bad = "settings.model_kwargs must be an object and settings.dataset a name"
    elif (not isinstance(s.get("image_shape"), list) or len(s["image_shape"]) != 3
          or not all(_is_int(v, 1, 1 << 14) for v in s["image_shape"]) or not _is_int(s.get("num_classes"), 1, 1 << 20)):
        bad = "settings.image_shape must be 3 positive integers and settings.num_classes a positive integer"
    elif not _is_int(manifest.get("num_params"), 1, _MAX_PARAMS) or not isinstance(manifest.get("param_layout"), list):
        bad = "num_params must be a positive integer and param_layout a list"
    elif s["zca"] and not isinstance(manifest.get("zca_file"), str):
        bad = "zca_file must name the ZCA file of experts trained with ZCA"
    elif manifest.get("zca_sha256") is not None and not is_sha256(manifest["zca_sha256"]):
        bad = "zca_sha256 must be a SHA-256 (64 hex digits)"
    elif not isinstance(manifest.get("experts"), list) or not all(
            isinstance(e, dict) and isinstance(e.get("file"), str) and is_sha256(e.get("sha256"))
            and _is_int(e.get("index"), 0, 1 << 31) and isinstance(e.get("test_accuracy"), list)
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


def _load_zca(p: Path, manifest: dict[str, Any]) -> ZCA:
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
    want = {"mean": (dim,), "shape": (3,)}
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
    manifest = _read_manifest(p)
    zca = _load_zca(p, manifest) if manifest["settings"]["zca"] else None
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


# ------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------
def default_zca(dataset: str) -> bool:
    """ZCA where the trajectory-matching papers use it (CIFAR-10/100)."""
    return dataset.lower() in ZCA_DATASETS


def _train_expert(net: FlatParams, model: nn.Module, x: Tensor, y: Tensor, xt: Tensor, yt: Tensor, *,
                  epochs: int, lr: float, momentum: float, weight_decay: float, batch_size: int,
                  augment: Callable[[Tensor, torch.Generator], Tensor] | None, seed: int, device: torch.device,
                  amp: bool, channels_last: bool, progress: Callable[[int, float], None] | None,
                  on_batch: Callable[[int], None] | None = None, hint: str = "", label: str = "expert"
                  ) -> tuple[Tensor, list[float], list[float]]:
    """Train one expert; return (trajectory (E+1, P), test accuracy per saved point, train loss per epoch).

    ``on_batch(images)`` after every minibatch, ``progress(epoch, loss)`` after every epoch; a
    non-finite loss raises :class:`~decoct.runtime.health.DivergedError` at once (checked every 20 batches and
    at each epoch's end), naming ``label`` and saying what to change (``hint``).
    """
    traj = torch.empty(epochs + 1, net.num_params)
    traj[0] = net.flatten(model).cpu()
    accs = [evaluate_accuracy(model, xt, yt, device=device, amp=amp, channels_last=channels_last)]
    losses: list[float] = []
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    perm_gen, aug_gen = make_generators(seed, device)
    n = len(x)
    model.train()
    for e in range(epochs):
        perm = torch.randperm(n, generator=perm_gen).to(device)
        total = torch.zeros((), device=device)
        steps = 0
        for start, stop in minibatches(n, batch_size):
            idx = perm[start:stop]
            xb = x[idx]
            if augment is not None:
                xb = augment(xb, aug_gen)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = model(xb)
            loss = F.cross_entropy(out.float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
            steps += 1
            if on_batch is not None:
                on_batch(stop - start)
            if steps % 20 == 0 and not bool(torch.isfinite(total)):  # a cheap sync every 20 batches
                raise DivergedError("expert training", f"{label}, epoch {e + 1}, batch {steps}",
                                    "the training loss", float(total), hint)
        traj[e + 1] = net.flatten(model).cpu()
        losses.append(total.item() / max(1, steps))
        if not math.isfinite(losses[-1]):
            raise DivergedError("expert training", f"{label}, epoch {e + 1}", "the training loss", losses[-1], hint)
        accs.append(evaluate_accuracy(model, xt, yt, device=device, amp=amp, channels_last=channels_last))
        if progress is not None:
            progress(e + 1, losses[-1])
    return traj, accs, losses


def train_experts(dataset: str | Dataset, out: str | Path, *, num_experts: int, epochs: int = 50,
                  model: str = "convnet", model_kwargs: dict[str, Any] | None = None, lr: float = 0.01,
                  momentum: float = 0.0, weight_decay: float = 0.0, batch_size: int = 256,
                  zca: bool | None = None, augment: str = DEFAULT_STRATEGY, seed: int = 0,
                  device: str | torch.device = "auto", data_root: str | None = None, download: bool = False,
                  amp: bool = False, channels_last: bool = False, force: bool = False,
                  progress: bool = True, log: Callable[[dict[str, Any]], None] | None = None) -> ExpertSet:
    """Train ``num_experts`` expert trajectories of ``epochs`` epochs into ``out`` (resumable).

    ``dataset``: a registered name or a loaded :class:`~decoct.data.Dataset`. ``zca=None`` means
    "as the papers" (on for CIFAR-10/100). ``augment``: a DSA strategy or ``"none"``.
    Already finished experts with the same settings are kept; ``force`` deletes them first.
    Returns the :class:`ExpertSet` (see :func:`load_experts`).
    """
    from decoct.runtime.distributed import resolve_device
    from decoct.runtime.runs import progress as progress_bar

    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if lr <= 0 or momentum < 0 or weight_decay < 0 or batch_size < 1:
        raise ValueError(f"need lr > 0, momentum >= 0, weight_decay >= 0, batch_size >= 1; got lr={lr}, "
                         f"momentum={momentum}, weight_decay={weight_decay}, batch_size={batch_size}")
    parse_strategy(augment)  # a typo fails here, not after the first expert
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    if amp and dev.type != "cuda":
        raise ValueError(f"amp (bf16 autocast) is supported on CUDA only, got device {dev}")
    data = dataset if isinstance(dataset, Dataset) else load_dataset(dataset, root=data_root, download=download)
    info = data.info
    use_zca = default_zca(info.name) if zca is None else bool(zca)
    kwargs = dict(DEFAULT_MODEL_KWARGS if model_kwargs is None else model_kwargs)
    model_name = model.lower()

    def factory() -> nn.Module:
        return model_for(model_name, info, **kwargs)

    net = FlatParams(factory())
    settings = dict(dataset=info.name, image_shape=list(info.image_shape), num_classes=info.num_classes,
                    model=model_name, model_kwargs=kwargs, zca=use_zca, epochs=int(epochs), lr=float(lr),
                    momentum=float(momentum), weight_decay=float(weight_decay), batch_size=int(batch_size),
                    augment=augment, seed=int(seed))
    root = Path(out)
    manifest: dict[str, Any] | None = None
    if (root / "manifest.json").exists():
        if force:
            _remove_experts(root)
        else:
            manifest = _read_manifest(root)
            old = manifest["settings"]
            changed = [k for k in _SETTING_KEYS if old.get(k) != settings[k]]
            if changed:
                diff = ", ".join(f"{k}: {old.get(k)!r} -> {settings[k]!r}" for k in changed)
                raise ExpertMismatchError(f"{root} holds experts with other settings ({diff}); use another --out, "
                                          "or --force to delete them and start over")
    root.mkdir(parents=True, exist_ok=True)
    if manifest is None:
        manifest = dict(format=FORMAT, version=FORMAT_VERSION, dataset=info.to_dict(), settings=settings,
                        num_params=net.num_params, param_layout=net.layout(),
                        zca_file="zca.safetensors" if use_zca else None,
                        notes=("ZCA (eps 0.1) fitted on mean/std-normalised training images; expert k is seeded "
                               "with seed + k; trajectory row e = parameters after e epochs (row 0 = init)"),
                        experts=[])
    x = normalize(data.train.images, info, dev)
    xt = normalize(data.test.images, info, dev)
    y, yt = data.train.labels.to(dev), data.test.labels.to(dev)
    zca_obj: ZCA | None = None
    if use_zca:
        zpath = root / "zca.safetensors"
        if zpath.exists():
            zca_obj = _load_zca(root, manifest)
        else:
            zca_obj = ZCA().fit(x)
            atomic_save_tensors(zpath, zca_obj.state_dict())
        manifest["zca_sha256"] = sha256_file(zpath)  # load_experts checks it
        zca_obj.to(dev)
        x, xt = zca_obj.transform(x), zca_obj.transform(xt)
    atomic_write_json(root / "manifest.json", manifest)

    dsa = DSA(augment) if parse_strategy(augment) else None
    aug_fn = (lambda xb, gen: dsa(xb, generator=gen)) if dsa is not None else None  # noqa: E731
    done = {int(e["index"]) for e in manifest["experts"]}
    todo = [k for k in range(num_experts) if k not in done]
    # one bar over every image of every epoch of every expert still to train (progress inside an epoch)
    bar = progress_bar(total=len(todo) * epochs * len(x), desc="experts", enabled=progress, unit="img",
                       span=f"{len(todo)} experts x {epochs} epochs",
                       log=(lambda **ev: log(ev)) if log is not None else None)
    hint = rerun_hint(("--lr", lr))
    for k in todo:
        t0 = time.perf_counter()
        s = int(seed) + k
        m = seeded_model(factory, s).to(dev)
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
        bar.set_postfix(expert=k, epoch=f"1/{epochs}", refresh=False)

        def tick(epoch: int, loss: float, k: int = k) -> None:
            bar.set_postfix(expert=k, epoch=f"{min(epoch + 1, epochs)}/{epochs}", loss=f"{loss:.3f}", refresh=False)

        try:
            traj, accs, losses = _train_expert(net, m, x, y, xt, yt, epochs=epochs, lr=lr, momentum=momentum,
                                               weight_decay=weight_decay, batch_size=batch_size, augment=aug_fn,
                                               seed=s, device=dev, amp=amp, channels_last=channels_last,
                                               progress=tick, on_batch=bar.update, hint=hint, label=f"expert {k}")
            if not torch.isfinite(traj).all():
                raise DivergedError("expert training", f"expert {k}", "the trajectory", "not finite (NaN or inf)",
                                    hint)
        except DivergedError as err:
            bar.close()
            if log is not None:
                log(err.event())
            raise
        fname = f"expert_{k:04d}.safetensors"
        atomic_save_tensors(root / fname, {"trajectory": traj},
                            metadata={"format": FORMAT, "index": str(k), "seed": str(s)})
        entry = dict(index=k, file=fname, seed=s, sha256=sha256_file(root / fname),
                     test_accuracy=[round(a, 6) for a in accs], train_loss=[round(v, 6) for v in losses],
                     seconds=round(time.perf_counter() - t0, 3))
        manifest["experts"] = sorted(manifest["experts"] + [entry], key=lambda e: e["index"])
        atomic_write_json(root / "manifest.json", manifest)
        if log is not None:
            log(dict(event="expert", index=k, final_accuracy=accs[-1], seconds=entry["seconds"]))
    bar.close()
    return load_experts(root)


def _remove_experts(root: Path) -> None:
    """Delete what :func:`train_experts` wrote (and nothing else) before a forced restart."""
    for p in root.glob("expert_*.safetensors"):
        p.unlink()
    for name in ("manifest.json", "zca.safetensors"):
        if (root / name).exists():
            (root / name).unlink()


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


__all__ = ["ExpertFileError", "ExpertMismatchError", "ExpertSet", "FlatParams", "ZCA_DATASETS", "default_zca", "describe",
           "experts_command", "load_experts", "train_experts"]
