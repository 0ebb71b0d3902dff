"""Evaluation protocols and multi-run evaluation of a distilled set.

Protocols (docs/protocols.md):

* ``classic`` — the matching family's recipe with hard labels: ConvNet (depth from the image
  size: D3 for 32x32, D4 for 64x64, D5 for 128x128; D2 for 8x8 digits), width 128, instance
  norm, SGD momentum 0.9, lr 0.01, weight decay 5e-4, 1000 epochs with lr x0.1 at half,
  batch 256, DSA augmentation; ZCA when the artifact carries one. Final-epoch accuracy.
* ``fast`` — the same recipe with 300 epochs, for CPU smoke runs; always labelled as such and
  never to be compared with paper numbers.
* ``soft`` — the decoupled family's recipe (:mod:`decoct.train.soft_students`): a ResNet-18 student
  distilled with KL at the reference temperature from the artifact's FKD label store (replaying its
  stored views), or from an online teacher (``online_teacher=``; unlimited labels, reported as
  protocol ``soft-online``). Optimiser, schedule, epochs, batch and views per dataset from
  docs/protocols.md, soft; epochs default to the store's. Label bytes are part of ``bytes_on_disk``
  (with an online teacher a store the set carries is unused and not counted). A fast variant is
  ``epochs=`` fewer. ``recipe='dwa'`` (online only) trains with DWA's own student recipes, as its
  paper evaluates (:func:`decoct.train.soft_students.soft_recipe_for`).

The set evaluated is always what was saved (uint8 or palette pixels decoded from the PNGs),
never float tensors from memory. ``baseline='random'`` evaluates, under the same protocol and
seeds, a random real subset of equal storage: as many real full-colour images per class as
fit in the set's raw information size (images + palettes + labels), at least one per class.
``baseline='mediancut'`` (classic/fast; sets distilled with a palette, e.g. AutoPalette) evaluates
the strongest simple baseline at equal bytes (issue 13): random real images, as many per class as
the set has, quantised by median cut to the set's K colours, hard labels (the x4 images at K = 64
that the paper's budget rule allows, at the same raw bytes as a K-colour set of that count).

AutoPalette-DM sets record their recipe (``meta.autopalette_dm``, :data:`decoct.matching.dm.PALETTE_RECIPES`);
evaluation trains on what the artifact stores (the K-colour images for ``paper``; the un-quantised
images and the expert's soft labels for ``authors-code``), checks that the two agree, and records the
recipe in the result's ``extra``.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from decoct.augment import DSA, ZCA
from decoct.coreset.select import random_baseline_indices
from decoct.data import Dataset, is_streamed, normalize
from decoct.data.provenance import SOURCE_KEY, check_same_data, legacy_source, load_for, read_source
from decoct.formats.artifact import DistilledSet
from decoct.formats.tensor_files import payload_bytes
from decoct.models import model_for
from decoct.runtime.distributed import join_torchrun, resolve_device
from decoct.train import TrainConfig, resolve_engine, train_students

PROTOCOLS: dict[str, dict[str, Any]] = {
    "classic": dict(epochs=1000, lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=256, schedule="step",
                    augment="dsa", model="convnet", model_kwargs=dict(width=128, norm="instance")),
    "fast": dict(epochs=300, lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=256, schedule="step",
                 augment="dsa", model="convnet", model_kwargs=dict(width=128, norm="instance")),
    # None = from the dataset's reference recipe (decoct.train.soft_students.soft_recipe_for) or the label store
    "soft": dict(epochs=None, lr=None, momentum=None, weight_decay=None, batch_size=None, schedule=None,
                 optimizer=None, warmup_epochs=None, temperature=None, t2=None, no_decay_1d=None,
                 granularity="auto", model="resnet18", model_kwargs={}, recipe="auto"),
}


@dataclass
class EvalResult:
    """Accuracy over several students plus the storage they were trained from."""

    protocol: str
    model: str
    accuracies: list[float]
    bytes_on_disk: int
    raw_bytes: int
    seconds: float
    num_images: int
    engine: str
    epochs: int
    baseline: EvalResult | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return sum(self.accuracies) / len(self.accuracies)

    @property
    def std(self) -> float:
        n = len(self.accuracies)
        if n < 2:
            return 0.0
        m = self.mean
        return math.sqrt(sum((a - m) ** 2 for a in self.accuracies) / (n - 1))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = self.mean, self.std
        d["baseline"] = self.baseline.to_dict() if self.baseline else None
        return d

    def summary(self, label: str = "set") -> str:
        return (f"{label:<12} {100 * self.mean:6.2f} ± {100 * self.std:5.2f} %  "
                f"({len(self.accuracies)} run{'s' if len(self.accuracies) != 1 else ''}, {self.protocol}, "
                f"{self.model})  "
                f"{self.num_images} images, {self.bytes_on_disk:,} B on disk, {self.raw_bytes:,} B raw")


_CONVNETS = ("convnet", "convnetd3", "convnetd4", "convnetd5")
BASELINES = ("random", "mediancut")
"""``evaluate(baseline=...)``: random real at equal raw bytes; random real median-cut to the set's K colours
with the set's image count (palette sets)."""


def palette_colors(dset: DistilledSet) -> int | None:
    """K of a set distilled or quantised with a palette: ``meta.palette.colors`` (AutoPalette, also when the
    authors-code recipe stores un-quantised images), else the stored palettes' size; None for other sets."""
    pal = dset.meta.get("palette")
    k = pal.get("colors") if isinstance(pal, dict) else None
    if isinstance(k, int) and not isinstance(k, bool) and 2 <= k <= 256:
        return k
    return int(dset.palettes.shape[1]) if dset.palettes is not None else None


def mediancut_baseline(dset: DistilledSet, dataset: Dataset, seed: int) -> DistilledSet:
    """Random real images, as many per class as ``dset`` has, median-cut to ``dset``'s K colours (hard labels).

    The equal-bytes baseline of a palette set (issue 13, point 4): AutoPalette's x2^(8 - ceil(log2 K))
    images per class are what the paper's budget buys; the same count of real images quantised by the
    paper's own reference quantiser (PIL median cut, as its L_a target) costs the same index and
    palette bits, so the difference is what the palette network and the distillation add. The real
    images are :func:`decoct.coreset.select.random_baseline_indices` with ``seed`` (as ``random``).
    Raises ValueError for a set without a palette or with unequal class counts.
    """
    from decoct.matching.palette.quantize import quantize_set

    k = palette_colors(dset)
    if k is None:
        raise ValueError("--baseline mediancut is the equal-bytes baseline of a palette set (--palette K, "
                         "decoct quantize); this set has no palette: use --baseline random")
    counts = [c for c in dset.ipc if c > 0]
    if len(set(counts)) != 1 or len(counts) != dset.info.num_classes:
        raise ValueError(f"--baseline mediancut needs the same number of images in every class, the set has "
                         f"{dset.ipc}; use --baseline random")
    ipc = counts[0]
    idx = random_baseline_indices(dataset, ipc, seed)
    real = DistilledSet(info=dataset.info, images=real_pixels(dataset, idx), labels=dataset.train.labels[idx],
                        method="random", config={"ipc": ipc, "seed": seed},
                        meta=dict(ipc=ipc, seed=seed, source_indices=idx.tolist()))
    return quantize_set(real, k, "mediancut", seed=seed)


def recipe_of(dset: DistilledSet) -> dict[str, Any] | None:
    """The AutoPalette-DM recipe the set records (``meta.autopalette_dm``), checked against what it stores:
    ``paper`` sets hold K-colour palette images and hard labels, ``authors-code`` sets un-quantised
    images and soft labels. None for other sets; ValueError when the record and the files disagree."""
    rec = dset.meta.get("autopalette_dm")
    if rec is None:
        return None
    recipe = rec.get("recipe") if isinstance(rec, dict) else None
    if recipe in ("paper", "authors-code") and isinstance(dset.meta.get("quantizer"), dict):
        return dict(rec, requantized=f"{dset.meta['quantizer'].get('method')}{dset.meta['quantizer'].get('colors')} "
                                     "(decoct quantize after distillation)")
    if recipe == "paper":
        ok = dset.is_palette and dset.soft_labels is None
    elif recipe == "authors-code":
        ok = not dset.is_palette and dset.soft_labels is not None
    else:
        raise ValueError(f"meta.autopalette_dm.recipe {recipe!r} is not a known AutoPalette-DM recipe "
                         "(paper, authors-code)")
    if not ok:
        raise ValueError(f"the set records the AutoPalette-DM recipe {recipe!r} but stores "
                         f"{'palette' if dset.is_palette else 'full-colour'} images with "
                         f"{'soft' if dset.soft_labels is not None else 'hard'} labels; re-run the distillation")
    return dict(rec)


def hard_protocol_storage(dset: DistilledSet, path: Path, storage: dict[str, Any]) -> tuple[int, int]:
    """(bytes on disk, raw bytes) a hard/soft-label protocol trains from: an FKD label store in
    ``labels/`` other than ``soft.safetensors`` is not used by ``classic``/``fast``, so not counted."""
    import json as _json

    files = _json.loads((path / "manifest.json").read_text()).get("files", {})
    store_bytes = sum(int(e["bytes"]) for rel, e in files.items()
                      if rel.startswith("labels/") and rel != "labels/soft.safetensors")
    store_bits = payload_bytes(dset.label_files) * 8  # from the files' headers: no label file is read
    raw = storage["raw_bytes"]
    raw_total = math.ceil((raw["images"] + raw["palettes"]) + max(0, raw["labels"] - store_bits / 8))
    return storage["bytes_on_disk"]["total"] - store_bytes, raw_total


def student_precision(amp: bool, device: torch.device | str) -> tuple[bool, bool]:
    """(bf16 autocast, channels_last) of the students on ``device``: the one place the protocols decide.

    The references train their students in float32, so every protocol does unless ``amp`` (``decoct
    evaluate --amp``) opts into bf16 autocast, which is CUDA only (on CPUs without native bf16 it is
    about 20x slower): asking for it elsewhere is an error, not a silent fallback. channels_last is on
    for CUDA (a memory layout; the arithmetic stays float32 without ``amp``).
    """
    dev = torch.device(device)
    if amp and dev.type != "cuda":
        raise ValueError(f"--amp (bf16 autocast of the students) is supported on CUDA only, got device {dev}; "
                         "drop --amp: the protocols train in float32 by default")
    return bool(amp), dev.type == "cuda"


def protocol_config(protocol: str, **overrides: Any) -> dict[str, Any]:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    cfg = dict(PROTOCOLS[protocol])
    for k, v in overrides.items():
        if v is None:
            continue
        if k == "recipe" and protocol != "soft" and v != "auto":
            raise ValueError(f"--recipe chooses the soft protocol's student recipe; it does not apply to {protocol!r}")
        if k == "recipe" and protocol != "soft":
            continue
        if k not in cfg:
            raise ValueError(f"protocol option {k!r} does not exist; known: {', '.join(cfg)}")
        cfg[k] = v
    return cfg


def dataset_for_set(dset: Any, path: Path, dataset: Dataset | str | None, *, data_root: str | None = None,
                    download: bool = False, data_options: dict[str, Any] | None = None) -> Dataset:
    """The dataset a set's students train and test on: ``dataset`` when a loaded :class:`Dataset` is
    passed (checked to have the set's classes and image shape), else the data the set records in its
    manifest (or ``dataset``, a name, in its place), loaded with ``data_options``. Raises ValueError
    when the passed dataset does not match the set."""
    if isinstance(dataset, Dataset):
        check_same_data(dset.info, dataset.info, f"the set {path}", "the dataset passed")
        return dataset
    recorded = read_source(dset.meta.get(SOURCE_KEY), f"{path}/manifest.json meta") or legacy_source(dset.config)
    return load_for(dset.info, recorded, dataset=dataset, data_root=data_root, download=download,
                    what=f"the set {path}", options=data_options)


def train_and_test(images: torch.Tensor, labels: torch.Tensor, dataset: Dataset, zca: ZCA | None,
                   cfg: dict[str, Any], runs: int, seed: int, device: torch.device, engine: str,
                   progress: bool, done: list[float] | None = None, chunk: int | None = None,
                   on_progress: Callable[[list[float]], None] | None = None,
                   amp: bool = False) -> tuple[list[float], str]:
    """Train hard-label (classic/fast) students with seeds ``seed .. seed+runs-1`` on ``images``
    (N, C, H, W) uint8 and ``labels`` (N,) class indices or (N, C) soft targets, and test each on
    ``dataset``'s test split (ZCA-whitened with ``zca`` when given); ``chunk`` students at a time,
    skipping the ``done`` ones (their accuracies are kept), calling ``on_progress`` after each chunk.
    The protocol's engine for its own sets and for the baselines and scores that must train the same way.

    Returns the accuracies and the engine that trained them (``auto`` resolved, as recorded)."""
    info = dataset.info
    x = normalize(images, info, device)
    xt = normalize(dataset.test.images, info, device)
    if zca is not None:
        x, xt = zca.transform(x), zca.transform(xt)
    # the protocol's width/norm describe its ConvNet; other students keep their own defaults
    model_kwargs = dict(cfg["model_kwargs"]) if cfg["model"] in _CONVNETS else {}

    def factory() -> torch.nn.Module:
        return model_for(cfg["model"], info, **model_kwargs)

    amp, channels_last = student_precision(amp, device)
    tcfg = TrainConfig(epochs=cfg["epochs"], lr=cfg["lr"], momentum=cfg["momentum"],
                       weight_decay=cfg["weight_decay"], batch_size=cfg["batch_size"], schedule=cfg["schedule"],
                       amp=amp, channels_last=channels_last)
    with torch.random.fork_rng(devices=[]):  # a probe student, off the seeded streams
        engine = resolve_engine(engine, factory(), device)
    augment = None
    if cfg["augment"] == "dsa":
        dsa = DSA()
        augment = lambda xb, gen: dsa(xb, generator=gen)  # noqa: E731
    elif cfg["augment"] != "none":
        raise ValueError(f"unknown augment {cfg['augment']!r}; known: dsa, none")
    accs = list(done or [])
    chunk = max(1, chunk or runs)
    y, yt = labels.to(device), dataset.test.labels.to(device)
    while len(accs) < runs:
        seeds = [seed + r for r in range(len(accs), min(runs, len(accs) + chunk))]
        accs += [float(a) for a in train_students(factory, x, y, xt, yt, tcfg, seeds=seeds, augment=augment,
                                                  engine=engine, device=device, progress=progress)]
        if on_progress is not None:
            on_progress(accs)
    return accs, engine


def real_pixels(dataset: Dataset, idx: torch.Tensor) -> torch.Tensor:
    """Training images ``idx`` as uint8 (n, C, H, W): indexed in memory, or decoded from a streamed
    split through its validation view (Resize + CenterCrop: a real image as a set would store it)."""
    if is_streamed(dataset):
        return dataset.train.load(idx, view="val")
    return dataset.train.images[idx]


def equal_storage_ipc(dset: DistilledSet, raw_total: int) -> int:
    """Full-colour real images per class that fit in the set's raw storage (at least 1)."""
    c, h, w = dset.info.image_shape
    return max(1, raw_total // (dset.info.num_classes * c * h * w))


def evaluate(artifact: str | Path | DistilledSet, protocol: str = "classic", *, runs: int = 5, seed: int = 0,
             dataset: Dataset | str | None = None, data_root: str | None = None, download: bool = False,
             device: str = "auto", engine: str = "auto", baseline: str | None = None, progress: bool = True,
             chunk: int | None = None, state: dict[str, list[float]] | None = None,
             on_progress: Callable[[dict[str, list[float]]], None] | None = None,
             online_teacher: Any = None, data_options: dict[str, Any] | None = None, amp: bool = False,
             **overrides: Any) -> EvalResult:
    """Train ``runs`` students on a saved distilled set and report final-epoch test accuracy.

    ``overrides`` may set any protocol field (epochs, lr, model, ...). ``state`` holds the
    accuracies of students already trained (``{"set": [...], "baseline": [...]}``, as passed to
    ``on_progress`` after every ``chunk`` students), so an interrupted evaluation resumes. With an in-memory
    ``DistilledSet`` the set is saved to a temporary directory and reloaded first, so the
    pixels evaluated are exactly what a user would load. ``online_teacher`` (a module or a teacher
    directory) is for the ``soft`` protocol only: the teacher labels fresh views at every step.
    Students train in float32, as the references do; ``amp=True`` opts into bf16 autocast (CUDA
    only). The result records which (``extra["amp"]``) and the engine that ran (never ``auto``).

    The test data is ``dataset`` (a loaded :class:`Dataset`), or is loaded from the source the set
    recorded (``meta.data_source``: registry name and root), which ``dataset`` (a registry name) and
    ``data_root`` override, and ``data_options`` (``data_mode``, ``classes``, ``workers``) the
    recorded loader options; either way it must have the set's classes and image shape. A streamed
    dataset (ImageNet) is validated per batch, sharded under torchrun; it supports the ``soft``
    protocol only (the classic ones keep the test split in memory).
    """
    import tempfile

    dev = resolve_device(device)
    amp = student_precision(amp, dev)[0]  # --amp off CUDA fails here, before anything loads
    cfg = protocol_config(protocol, **overrides)
    if baseline is not None and baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; known: {', '.join(BASELINES)}")
    if baseline == "mediancut" and protocol == "soft":
        raise ValueError("--baseline mediancut trains the quantised real images with hard labels (classic/fast "
                         "protocols); with --protocol soft use --baseline random")
    if online_teacher is not None and protocol != "soft":
        raise ValueError(f"an online teacher applies to the soft protocol only, not {protocol!r}")
    if isinstance(artifact, DistilledSet):
        with tempfile.TemporaryDirectory() as tmp:
            artifact.save(Path(tmp) / "set")
            return evaluate(Path(tmp) / "set", protocol, runs=runs, seed=seed, dataset=dataset,
                            data_root=data_root, download=download, device=device, engine=engine, baseline=baseline,
                            progress=progress, chunk=chunk, state=state, on_progress=on_progress,
                            online_teacher=online_teacher, data_options=data_options, amp=amp, **overrides)
    path = Path(artifact)
    if protocol == "soft":  # a set above $DECOCT_MAX_SET_BYTES is trained from its files, decoded per batch
        from decoct.decoupled.relabel import open_set

        dset = open_set(path)
    else:
        dset = DistilledSet.load(path)
    storage = dset.storage(path) if isinstance(dset, DistilledSet) else dset.storage()
    dataset = dataset_for_set(dset, path, dataset, data_root=data_root, download=download, data_options=data_options)
    zca_named = "zca" in (dset.attachments if isinstance(dset, DistilledSet) else dset.attachment_names)
    zca = ZCA.from_state_dict(dset.attachments["zca"]) if zca_named and isinstance(dset, DistilledSet) else None
    state = {k: list(v) for k, v in (state or {}).items()}
    if protocol == "soft":
        if zca_named:
            raise ValueError("the soft protocol does not support ZCA-whitened sets")
        return _evaluate_soft(dset, storage, dataset, cfg, runs=runs, seed=seed, device=dev, baseline=baseline,
                              progress=progress, chunk=chunk, state=state, on_progress=on_progress,
                              online_teacher=online_teacher, amp=amp, path=path)
    if is_streamed(dataset):
        raise ValueError(f"the {protocol!r} protocol trains and tests in memory; this dataset is streamed from disk: "
                         "use --protocol soft (the ImageNet protocol), or --data-mode memory if it fits")

    def report(key: str) -> Callable[[list[float]], None]:
        def cb(accs: list[float]) -> None:
            state[key] = list(accs)
            if on_progress is not None:
                on_progress(state)
        return cb

    # What the set itself says it should be trained with: TM/DATM sets carry learned soft labels
    # (logits) and MTT's learned student step size (meta.syn_lr); the papers evaluate with both.
    base_cfg = dict(cfg)  # the random-real baseline trains with the protocol's own recipe
    targets = dset.soft_labels if dset.soft_labels is not None else dset.labels
    extra: dict[str, Any] = {"labels": "soft" if dset.soft_labels is not None else "hard", "amp": bool(amp)}
    recipe = recipe_of(dset)
    if recipe is not None:  # trained on what it stores: the K-colour images, or the un-quantised ones
        extra["autopalette_dm"] = recipe["recipe"]
        extra["images"] = "palette (quantised)" if dset.is_palette else "un-quantised full colour"
    if baseline == "mediancut":
        base_set = mediancut_baseline(dset, dataset, seed)  # refuses a set without a palette, before training
    if "syn_lr" in dset.meta and overrides.get("lr") is None:
        cfg["lr"] = float(dset.meta["syn_lr"])
        extra["lr"] = f"learned syn_lr {cfg['lr']:.4g}"
    disk_bytes, raw_bytes = hard_protocol_storage(dset, path, storage)
    t0 = time.perf_counter()
    accs, used = train_and_test(dset.images, targets, dataset, zca, cfg, runs, seed, dev, engine, progress,
                             state.get("set"), chunk, report("set"), amp=amp)
    result = EvalResult(protocol, cfg["model"], accs, disk_bytes, raw_bytes, time.perf_counter() - t0, len(dset),
                        used, cfg["epochs"], extra=extra)
    if baseline == "random":
        ipc = equal_storage_ipc(dset, result.raw_bytes)
        idx = random_baseline_indices(dataset, ipc, seed)
        base = DistilledSet(info=dataset.info, images=dataset.train.images[idx], labels=dataset.train.labels[idx],
                            method="random", config={"ipc": ipc, "seed": seed})
        with tempfile.TemporaryDirectory() as tmp:
            base.save(Path(tmp) / "random")
            base_storage = base.storage(Path(tmp) / "random")
        t1 = time.perf_counter()
        baccs, bused = train_and_test(base.images, base.labels, dataset, zca, base_cfg, runs, seed, dev, engine, progress,
                                   state.get("baseline"), chunk, report("baseline"), amp=amp)
        result.baseline = EvalResult(protocol, cfg["model"], baccs, base_storage["bytes_on_disk"]["total"],
                                     base_storage["raw_bytes"]["total"], time.perf_counter() - t1, len(base),
                                     bused, cfg["epochs"], extra={"ipc": ipc, "kind": "random", "amp": bool(amp)})
    elif baseline == "mediancut":
        with tempfile.TemporaryDirectory() as tmp:
            base_set.save(Path(tmp) / "mediancut")  # bytes of the palette PNGs, as a quantised set stores them
            base_storage = base_set.storage(Path(tmp) / "mediancut")
        k, ipc = int(base_set.palettes.shape[1]), base_set.ipc[0]
        t1 = time.perf_counter()
        baccs, bused = train_and_test(base_set.images, base_set.labels, dataset, zca, base_cfg, runs, seed, dev, engine,
                                   progress, state.get("baseline"), chunk, report("baseline"), amp=amp)
        result.baseline = EvalResult(protocol, cfg["model"], baccs, base_storage["bytes_on_disk"]["total"],
                                     base_storage["raw_bytes"]["total"], time.perf_counter() - t1, len(base_set),
                                     bused, cfg["epochs"],
                                     extra={"ipc": ipc, "kind": "mediancut", "colors": k, "labels": "hard",
                                            "amp": bool(amp),
                                            "what": f"random real x{ipc}/class median-cut to {k} colours"})
    return result


def _evaluate_soft(dset: DistilledSet, storage: dict[str, Any], dataset: Dataset, cfg: dict[str, Any], *, runs: int,
                   seed: int, device: torch.device, baseline: str | None, progress: bool, chunk: int | None,
                   state: dict[str, list[float]], on_progress: Callable[[dict[str, list[float]]], None] | None,
                   online_teacher: Any, amp: bool = False, path: Path) -> EvalResult:
    """The ``soft`` protocol: students trained by KD from the label store or an online teacher.

    The recipe is ``cfg["recipe"]``'s for the image size (:func:`decoct.train.soft_students.soft_recipe_for`):
    ``auto`` with a store or a teacher, a method's own (``dwa``) with a teacher only. With a teacher,
    a label store in ``path`` is ignored and not counted. Everything that can be wrong (no store, a
    store of another set, a batch size the store was not made with, a teacher of other classes, a
    method recipe without a teacher) fails here, before the first student trains.
    """
    from decoct.decoupled.relabel import check_teacher_output, resolve_teacher
    from decoct.formats.label_store import LabelStore
    from decoct.train.soft_students import FKDConfig, fill_value, fit_soft_students, soft_recipe_for

    device = join_torchrun(device)  # under torchrun every student trains with DDP
    info = dataset.info
    # RDED's student shuffles and crops by the factor the set was stitched with (its presets' by size otherwise)
    factor = dset.meta.get("factor") if cfg["recipe"] == "rded" and dset.method == "rded" else None
    recipe = soft_recipe_for(info, cfg["recipe"], factor=int(factor) if factor is not None else None)
    if cfg["recipe"] != "auto" and online_teacher is None:
        raise ValueError(f"the {cfg['recipe']} recipe trains its students against a live teacher, as its paper does "
                         "(no stored labels): pass --teacher DIR; or drop --recipe to replay the set's label store")
    teacher = None
    store = None
    if online_teacher is not None:
        # a label store the set may carry is not used: its bytes are not counted, and the random
        # baseline is sized from the images alone (as for a set never relabelled)
        counted = hard_protocol_storage(dset, path, storage)
        storage = {**storage, "bytes_on_disk": dict(storage["bytes_on_disk"]), "raw_bytes": dict(storage["raw_bytes"])}
        storage["bytes_on_disk"]["labels"] -= storage["bytes_on_disk"]["total"] - counted[0]
        storage["bytes_on_disk"]["total"], storage["raw_bytes"]["total"] = counted
        teacher, tdesc = resolve_teacher(online_teacher, info, device)
        two = dset.images[:2] if isinstance(dset, DistilledSet) else dset.batch([0, 1])  # or an ImageBank
        check_teacher_output(teacher, normalize(two, info, device), info.num_classes)
        batch = cfg["batch_size"] or min(recipe.batch_size, len(dset))
        epochs = cfg["epochs"] or recipe.epochs
        view = recipe.view
    else:
        store = LabelStore.from_set(dset)
        if cfg["batch_size"] is not None and cfg["batch_size"] != store.batch:
            raise ValueError(f"the label store was made with batch {store.batch}; the soft protocol trains with the "
                             f"store's batch size (asked for {cfg['batch_size']}); relabel with that batch size")
        batch = store.batch
        epochs = cfg["epochs"] or int(store.header["epochs"])
        view = store.view
    if baseline == "random" and store is not None:
        raise ValueError("baseline='random' with stored labels would need the baseline relabelled by the same "
                         "teacher: select a random run, relabel it, and evaluate it; or pass an online teacher")
    amp, channels_last = student_precision(amp, device)
    keys = ("optimizer", "lr", "momentum", "weight_decay", "no_decay_1d", "schedule", "warmup_epochs",
            "temperature", "t2", "granularity")
    fcfg = FKDConfig.from_recipe(recipe, epochs=epochs, batch_size=batch, amp=amp, channels_last=channels_last,
                                 **{k: cfg[k] for k in keys})
    fill = fill_value(info, device)
    if is_streamed(dataset):  # ImageNet's val: read per batch, sharded under torchrun
        from decoct.train.trainer import evaluate_split

        xt = yt = None

        def test_accuracy(model: torch.nn.Module) -> float:
            return evaluate_split(model, dataset.test, info, fcfg.eval_batch_size, device, amp=fcfg.amp,
                                  channels_last=fcfg.channels_last, show_progress=progress)
    else:
        xt = normalize(dataset.test.images, info, device)
        yt = dataset.test.labels.to(device)
        test_accuracy = None  # type: ignore[assignment]

    def factory() -> torch.nn.Module:
        return model_for(cfg["model"], info, **cfg["model_kwargs"])

    def run_students(images: torch.Tensor, key: str) -> list[float]:
        # uint8 pixels, normalised per batch on the device (not a float32 copy of the whole set)
        accs = list(state.get(key) or [])
        step = max(1, chunk or runs)
        while len(accs) < runs:
            seeds = [seed + r for r in range(len(accs), min(runs, len(accs) + step))]
            accs += fit_soft_students(factory, images, xt, yt, fcfg, seeds=seeds,
                                      store=store if key == "set" else None, teacher=teacher, view=view, fill=fill,
                                      device=device, progress=progress, info=info, evaluate=test_accuracy)
            state[key] = list(accs)
            if on_progress is not None:
                on_progress(state)
        return accs

    t0 = time.perf_counter()
    # a loaded set's uint8 pixels, or an ImageBank (a set above max_set_bytes(), decoded per batch) as it is
    accs = run_students(dset.images if isinstance(dset, DistilledSet) else dset, "set")
    extra: dict[str, Any] = dict(recipe=recipe.name, recipe_source=recipe.source, temperature=fcfg.temperature,
                                 batch_size=batch, image_bytes=storage["bytes_on_disk"]["images"],
                                 label_bytes=storage["bytes_on_disk"]["labels"], view=view.to_dict(), amp=amp)
    extra["images_source"] = "memory" if isinstance(dset, DistilledSet) else "bank"  # a bank: decoded per batch
    if store is not None:
        extra.update(label_source="store", unlimited_labels=False, prune_factor=store.prune_factor,
                     label_format=store.encoding.name,
                     stored_epochs=int(store.header["epochs"]), stored_batches=store.num_units,
                     label_payload_bytes=store.payload_bytes(),
                     granularity=fcfg.granularity if fcfg.granularity != "auto" else
                     ("order" if store.prune_factor == 1 else "batch_to_epoch"))
        proto = "soft"
    else:
        extra.update(label_source="online_teacher", unlimited_labels=True, teacher=tdesc,
                     note="online teacher: every step labels fresh views; label storage is unlimited and "
                          "not counted in bytes_on_disk")
        proto = "soft-online"
    result = EvalResult(proto, cfg["model"], accs, storage["bytes_on_disk"]["total"], storage["raw_bytes"]["total"],
                        time.perf_counter() - t0, len(dset), "sequential", epochs, extra=extra)
    if baseline == "random":
        ipc = equal_storage_ipc(dset, result.raw_bytes)
        idx = random_baseline_indices(dataset, ipc, seed)
        base = DistilledSet(info=info, images=real_pixels(dataset, idx), labels=dataset.train.labels[idx],
                            method="random", config={"ipc": ipc, "seed": seed})
        with tempfile.TemporaryDirectory() as tmp:
            base.save(Path(tmp) / "random")
            bst = base.storage(Path(tmp) / "random")
        t1 = time.perf_counter()
        baccs = run_students(base.images, "baseline")
        result.baseline = EvalResult(proto, cfg["model"], baccs, bst["bytes_on_disk"]["total"],
                                     bst["raw_bytes"]["total"], time.perf_counter() - t1, len(base), "sequential",
                                     epochs, extra={"ipc": ipc, "label_source": "online_teacher", "amp": amp})
    return result


__all__ = ["BASELINES", "EvalResult", "PROTOCOLS", "dataset_for_set", "evaluate", "mediancut_baseline",
           "palette_colors", "protocol_config", "recipe_of", "student_precision", "train_and_test"]
