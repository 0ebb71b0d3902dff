"""Relabel: build an FKD label store for a distilled set with a teacher (SRe2L/LPLD relabel).

For every stored epoch the set is shuffled, cut into batches of ``batch_size`` images, and for each
batch a view record is drawn (crop, flip, mix; see :mod:`decoct.augment.recorded_views`), applied,
and the teacher's logits of exactly that view are stored in fp16 next to the record and the batch
composition (docs/label-store.md, What a view is). With ``prune`` only the first
``floor((1-r) E B)`` full batches are generated (docs/label-store.md, LPLD label pruning). With an
``encoding`` the fp16 logits are kept as top-k classes and/or per-row quantised codes instead
(:mod:`decoct.formats.label_codec`; :func:`encode_labels` does the same to an existing store).

Determinism: epoch e's order comes from a generator keyed (seed, "order", e) and batch (e, b)'s
views from one keyed (seed, "view", e, b). Hence a pruned store equals the prefix of the full one
(:func:`decoct.formats.label_pruning.prune_store`), an interrupted relabel resumes epoch by epoch with the
same result, and ranks under ``torchrun`` split epochs between them without sharing RNG state.

torchrun: ``torchrun --nproc_per_node N decoct relabel ...`` makes rank r generate the stored
epochs r, r+N, ... into the shared work directory; after a barrier rank 0 assembles the store
and writes the artifact, which is bit-identical to a 1-process relabel on the same device type.

Batches: ``batch = min(batch_size, N)``; a short last batch is kept in full stores (LPLD keeps it
too, but never draws it from a pruned pool), except a 1-image tail, which is dropped because a
batch-norm student cannot train on it. Pruned stores hold full batches only (LPLD drop-last).
The teacher runs in eval mode, one forward per stored batch (so replay reproduces the logits bit
for bit on the same device), bf16 autocast and channels_last on CUDA only.

Memory: the set's uint8 pixels are normalised per batch on the device (no float32 copy of the set),
a set above :func:`~decoct.formats.image_bank.max_set_bytes` is read per batch from its PNG files
(:class:`~decoct.formats.image_bank.ImageBank`), and :func:`relabel` keeps every finished epoch in its
work-directory file, which saving copies: a relabel holds about one epoch of logits, whatever the
number of epochs (docs/label-store.md, Reading a store).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from decoct.augment.recorded_views import ViewRecipe, apply_views, draw_views, seeded_generator
from decoct.formats.artifact import DistilledSet
from decoct.formats.errors import ArtifactError
from decoct.formats.image_bank import ImageBank, max_set_bytes, pixel_bytes
from decoct.formats.label_codec import PLAIN, LabelEncoding
from decoct.formats.label_pruning import _prune_header, kept_units, pool_total, prune_ratio
from decoct.formats.label_store import (
    FORMAT,
    HEADER_FILE,
    VERSION,
    EpochLabels,
    LabelStore,
    LabelStoreError,
    _encode_header,
    attach_store,
    dataset_fingerprint,
    encode_store,
    encoded_header,
    epoch_file,
    strip_store,
)
from decoct.formats.tensor_files import TensorFile, TensorFiles, file_entry
from decoct.runtime.distributed import join_torchrun
from decoct.runtime.io import atomic_save_tensors, atomic_write_json

__all__ = ["RelabelPlan", "check_teacher_output", "encode_labels", "label_encoding", "open_set", "prune_labels", "relabel",
           "relabel_set", "replay_logits", "resolve_teacher", "teacher_fingerprint"]


# ---------------------------------------------------------------------- distributed helpers
def _dist() -> tuple[int, int]:
    """(rank, world size) of the joined process group, (0, 1) outside torchrun."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


# ---------------------------------------------------------------------- teacher
def teacher_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a teacher's state dict (names, dtypes, shapes and values)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def resolve_teacher(teacher: nn.Module | str | Path, info: Any, device: torch.device) -> tuple[nn.Module, dict]:
    """(teacher in eval mode on ``device``, description) from a module or a teacher directory.

    A directory must hold a teacher of this dataset (same classes and image shape); a module
    must output one logit per class. Both are checked before any work starts.
    """
    desc: dict[str, Any]
    if isinstance(teacher, (str, Path)):
        from decoct.formats.teacher import check_teacher_dataset, load_teacher

        model, t_info, meta = load_teacher(teacher, device)
        check_teacher_dataset(t_info, info, teacher)
        desc = {"path": str(teacher), "model": meta.get("model"), "dataset": t_info.name}
    elif isinstance(teacher, nn.Module):
        model = teacher.to(device)
        desc = {"model": type(teacher).__name__}
    else:
        raise TypeError(f"teacher must be an nn.Module or a teacher directory, got {type(teacher).__name__}")
    model.eval()
    desc["fingerprint"] = teacher_fingerprint(model)
    return model, desc


def check_teacher_output(model: nn.Module, x: Tensor, num_classes: int) -> None:
    """One forward on two images: the teacher must give one logit per class (before real work)."""
    with torch.no_grad():
        out = model(x[:2])
    if out.dim() != 2 or out.shape[1] != num_classes:
        raise LabelStoreError(
            f"the teacher outputs {tuple(out.shape[1:])} per image; this set has {num_classes} classes")


# ---------------------------------------------------------------------- plan
class RelabelPlan:
    """Batch geometry of a store: which (epoch, batch) units exist and their sizes."""

    def __init__(self, num_images: int, epochs: int, batch_size: int, prune: int | None) -> None:
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {batch_size}")
        if num_images < 2:
            raise ValueError(f"relabel needs at least 2 images, the set has {num_images}")
        n = num_images
        self.num_images, self.epochs, self.batch_size = n, epochs, batch_size
        self.batch = min(batch_size, n)
        self.full = n // self.batch
        tail = n - self.full * self.batch
        self.tail = tail if tail > 1 else 0
        self.units_per_epoch = self.full + (1 if self.tail else 0)
        self.prune = None if prune in (None, 1) else int(prune)
        if prune is not None:
            prune_ratio(int(prune))  # unknown factors fail here
        self.kept = kept_units(pool_total(epochs, self.full), self.prune) if self.prune else None

    def units(self) -> dict[int, list[int]]:
        """Stored epoch -> batch numbers to generate."""
        if self.prune is None:
            return {e: list(range(self.units_per_epoch)) for e in range(self.epochs)}
        out: dict[int, list[int]] = {}
        for g in range(int(self.kept)):
            out.setdefault(g // self.full, []).append(g % self.full)
        return out

    def size(self, unit: int) -> int:
        return self.batch if unit < self.full else self.tail


def _header(plan: RelabelPlan, fingerprint: str, num_classes: int, image_shape: tuple, view: ViewRecipe,
            seed: int, teacher: dict, encoding: LabelEncoding = PLAIN) -> dict[str, Any]:
    h: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "fingerprint": fingerprint, "num_images": plan.num_images,
        "num_classes": num_classes, "image_shape": list(image_shape), "epochs": plan.epochs,
        "batch_size": plan.batch_size, "batch": plan.batch, "units_per_epoch": plan.units_per_epoch,
        "full_units_per_epoch": plan.full, "tail": plan.tail, "view": view.to_dict(), "seed": int(seed),
        "teacher": teacher, "logits": "float16", "prune": None,
    }
    if plan.prune:
        h["prune"] = _prune_header(plan.prune, int(plan.kept), pool_total(plan.epochs, plan.full))
    return encoded_header(h, encoding)


def _epoch_order(seed: int, epoch: int, n: int) -> Tensor:
    return torch.randperm(n, generator=seeded_generator(seed, "order", epoch))


def _generate_epoch(teacher: nn.Module, pixels: Callable[[Tensor], Tensor], shape: tuple[int, ...],
                    plan: RelabelPlan, epoch: int, units: list[int], view: ViewRecipe, seed: int, fill: Tensor,
                    amp: bool, channels_last: bool, on_batch: Callable[[int], None] | None = None,
                    encoding: LabelEncoding = PLAIN) -> EpochLabels:
    """One stored epoch; ``pixels(idx)`` gives the normalised float32 images ``idx`` on the device
    (normalising is per element, so a batch normalised alone equals the same rows of the whole set)."""
    from decoct.train.soft_students import teacher_logits

    order = _epoch_order(seed, epoch, plan.num_images)
    h, w = int(shape[-2]), int(shape[-1])
    idxs, recs, logits = [], [], []
    for u in units:
        idx = order[u * plan.batch: u * plan.batch + plan.size(u)]
        rec = draw_views(len(idx), h, w, view, seeded_generator(seed, "view", epoch, u))
        out = teacher_logits(teacher, apply_views(pixels(idx), rec, fill), amp=amp, channels_last=channels_last)
        if not torch.isfinite(out).all() or out.abs().max() > 65504:
            raise LabelStoreError(f"teacher logits of epoch {epoch} batch {u} are not finite or exceed the "
                                  "float16 range; check the teacher")
        idxs.append(idx)
        recs.append(rec)
        logits.append(out.half().cpu())
        if on_batch is not None:
            on_batch(len(idx))
    return EpochLabels.build(epoch, units, idxs, recs, logits, encoding)


# ---------------------------------------------------------------------- API
class _Job:
    """Everything a relabel needs, validated before any teacher forward of the real work."""

    def __init__(self, dset: DistilledSet | ImageBank, teacher: nn.Module | str | Path, epochs: int,
                 batch_size: int | None, seed: int, device: str | torch.device, prune: int | None,
                 view: ViewRecipe | None, amp: bool | None, channels_last: bool | None,
                 encoding: LabelEncoding | None = None) -> None:
        from decoct.train.soft_students import _replay_images, fill_value, soft_recipe_for

        if isinstance(dset, DistilledSet) and not dset.is_canonical:  # a bank is read in storage order
            raise ValueError("relabel needs a set in canonical (class-sorted) order; use set.canonical()")
        dev = join_torchrun(device)
        recipe = soft_recipe_for(dset.info)
        self.view = view or recipe.view
        if self.view.shuffle != 1:
            raise ValueError(f"view shuffle={self.view.shuffle} (RDED's ShufflePatches) is for live-teacher students; "
                             "a label store does not record strip orders")
        self.plan = RelabelPlan(len(dset), int(epochs), int(batch_size or recipe.batch_size), prune)
        self.encoding = encoding or PLAIN
        self.encoding.check_classes(dset.info.num_classes)  # before the teacher is loaded
        self.model, tdesc = resolve_teacher(teacher, dset.info, dev)
        cuda = dev.type == "cuda"
        self.amp = cuda if amp is None else bool(amp)
        self.channels_last = cuda if channels_last is None else bool(channels_last)
        if self.amp and not cuda:
            raise ValueError(f"amp (bf16 autocast) is supported on CUDA only, got device {dev}")
        # uint8 pixels (on the device) or a bank's files, normalised per batch: never a float32 copy of the set
        self.shape, self.pixels = _replay_images(dset.images if isinstance(dset, DistilledSet) else dset,
                                                 dset.info, dev)
        check_teacher_output(self.model, self.pixels(torch.arange(2)), dset.info.num_classes)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.seed = int(seed)
        self.header = _header(self.plan, dataset_fingerprint(dset), dset.info.num_classes, dset.info.image_shape,
                              self.view, self.seed, tdesc, self.encoding)
        self.header["precision"] = "bf16-autocast" if self.amp else "float32"
        self.fill = fill_value(dset.info, dev)
        self.units = self.plan.units()
        self.header["stored_epochs"] = {str(e): len(self.units[e]) for e in sorted(self.units)}

    def run(self, work: Path | None, progress: bool, hold: bool = False) -> LabelStore:
        """Generate this rank's epochs (reusing finished ones in ``work``) and return the whole store.

        Without ``work`` the epochs are held in memory. With ``work`` each finished epoch stays in its
        file there, checked and read on use, so a store of any size costs about one epoch of memory
        while it is made and saved (its files are copied); ``hold`` reads them all into memory at the end
        (:func:`relabel_set`, whose store must outlive the work directory's files).
        """
        from decoct.runtime.runs import progress as bar_of

        rank, world = _dist()
        if world > 1 and work is None:
            raise ValueError("a sharded (torchrun) relabel needs a work_dir shared by all ranks")
        key = hashlib.sha256(json.dumps(self.header, sort_keys=True).encode()).hexdigest()
        if work is not None and rank == 0:
            job = work / "job.json"
            if job.exists() and json.loads(job.read_text()).get("key") != key:
                shutil.rmtree(work)  # a previous relabel with other settings: its epochs do not apply
            work.mkdir(parents=True, exist_ok=True)
            atomic_write_json(job, {"key": key, "header": self.header})
        _barrier()
        mine = [e for i, e in enumerate(sorted(self.units)) if i % world == rank]
        held: dict[int, EpochLabels] = {}
        files: dict[int, TensorFile] = {}
        # one bar over every image view of every epoch (progress inside an epoch of a large set)
        views = sum(self.plan.size(u) for e in mine for u in self.units[e])
        bar = bar_of(total=views, desc="relabel", enabled=progress and rank == 0, unit="img",
                     span=f"{len(mine)} epochs")
        for e in mine:
            bar.set_postfix(epoch=f"{e + 1}/{self.plan.epochs}", refresh=False)
            path = work / f"e{e:05d}.safetensors" if work is not None else None
            if path is not None and path.exists():
                done = self._file(path, e)
                if done is not None:
                    files[e] = done
                    bar.update(sum(self.plan.size(u) for u in self.units[e]))
                    continue
            ep = _generate_epoch(self.model, self.pixels, self.shape, self.plan, e, self.units[e], self.view,
                                 self.seed, self.fill, self.amp, self.channels_last, on_batch=bar.update,
                                 encoding=self.encoding)
            if path is None:
                held[e] = ep
                continue
            atomic_save_tensors(path, ep.tensors())
            del ep  # from now on the epoch is its file
            done = self._file(path, e)
            if done is None:
                raise LabelStoreError(f"epoch {e} written to {path} cannot be read back; check the disk")
            files[e] = done
        bar.close()
        _barrier()
        for e in self.units:
            if e not in files and e not in held:  # another rank's epochs: checked, left on disk
                assert work is not None
                done = self._file(work / f"e{e:05d}.safetensors", e)
                if done is None:
                    raise LabelStoreError(f"epoch {e} of the sharded relabel is missing or damaged in {work}")
                files[e] = done
        if work is None:
            return LabelStore(dict(self.header), held)
        entries: dict[str, Any] = {HEADER_FILE: {"header": _encode_header(self.header)}}
        entries.update({epoch_file(e): files[e] for e in sorted(files)})
        store = LabelStore.from_label_files(TensorFiles(entries))
        assert store is not None
        if hold:
            store = LabelStore(store.header, {e: store.epochs[e] for e in store.epochs})
        _barrier()  # every rank has checked the shared epochs before rank 0 may remove them
        return store

    def _file(self, path: Path, epoch: int) -> TensorFile | None:
        """The work file of ``epoch``, checked as a loaded store checks an epoch file (header; dtypes
        and shapes of every tensor; batch sizes, numbers and image indices) without reading its
        logits; None when it is damaged or from other settings (then it is made again)."""
        name = epoch_file(epoch)
        try:
            tf = TensorFile.open(path, f"{path.parent.name}/{path.name}", path.stat().st_size, None)
            tensors = tf.meta()
            tensors.update(tf.read({k: None for k in ("epoch", "units", "sizes", "index") if k in tf.specs}))
            ep = EpochLabels.from_tensors(tensors, name, self.encoding, int(self.header["num_classes"]))
            ep.validate(self.header, name)
        except (LabelStoreError, ArtifactError, OSError, ValueError):
            return None  # a damaged leftover: regenerate it
        return tf if ep.epoch == epoch and ep.units.tolist() == self.units[epoch] else None


def _same_settings(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two headers describe the same store (the teacher compared by its weights, not its path)."""
    def key(h: dict[str, Any]) -> dict[str, Any]:
        teacher = {k: v for k, v in (h.get("teacher") or {}).items() if k != "path"}
        return {k: v for k, v in h.items() if k != "stored_epochs"} | {"teacher": teacher}
    return key(a) == key(b)


def relabel_set(dset: DistilledSet, teacher: nn.Module | str | Path, epochs: int, batch_size: int | None = None,
                seed: int = 0, device: str | torch.device = "auto", prune: int | None = None, *,
                view: ViewRecipe | None = None, amp: bool | None = None, channels_last: bool | None = None,
                work_dir: str | Path | None = None, progress: bool = False,
                encoding: LabelEncoding | None = None) -> LabelStore:
    """Build the label store of an in-memory set (canonical order); see :func:`relabel`.

    With ``work_dir`` every finished epoch is written there and reused on the next call with the
    same settings (resume); under torchrun the ranks split the epochs and must share ``work_dir``.
    """
    job = _Job(dset, teacher, epochs, batch_size, seed, device, prune, view, amp, channels_last, encoding)
    return job.run(Path(work_dir) if work_dir is not None else None, progress, hold=True)


def open_set(path: str | Path) -> DistilledSet | ImageBank:
    """The artifact at ``path`` as relabel and the soft protocol read it: loaded (:meth:`DistilledSet.load`),
    or, when its uint8 pixels exceed :func:`~decoct.formats.image_bank.max_set_bytes`, an
    :class:`~decoct.formats.image_bank.ImageBank` that decodes them per batch (checked the same way)."""
    limit = max_set_bytes()  # a bad $DECOCT_MAX_SET_BYTES fails here, naming the variable
    try:
        big = pixel_bytes(path) > limit
    except ArtifactError:
        big = False  # a damaged manifest: DistilledSet.load reports it (and repairs nothing silently)
    return ImageBank.open(path) if big else DistilledSet.load(path)


def _save_with_store(dset: DistilledSet | ImageBank, store: LabelStore, dst: Path) -> None:
    """Write ``dset`` to ``dst`` with ``store`` as its label store (replacing any previous one); a
    bank's image files are copied, not decoded."""
    if isinstance(dset, DistilledSet):
        attach_store(dset, store).save(dst, overwrite=True)
        return
    store.check_for(dset)
    kept, new = strip_store(dset.label_files), store.label_files()
    dset.save_with_label_files(dst, TensorFiles({k: file_entry(m, k) for m in (kept, new) for k in m}),
                               overwrite=True)


def relabel(artifact_dir: str | Path, teacher: nn.Module | str | Path, epochs: int, batch_size: int | None = None,
            seed: int = 0, device: str | torch.device = "auto", prune: int | None = None, *,
            out: str | Path | None = None, view: ViewRecipe | None = None, amp: bool | None = None,
            channels_last: bool | None = None, force: bool = False, progress: bool = False,
            encoding: LabelEncoding | None = None) -> Path:
    """Relabel the artifact at ``artifact_dir`` and write it back (or to ``out``) with its label store.

    ``batch_size`` defaults to the dataset's soft recipe (it is also the student's batch size);
    ``prune`` is an LPLD factor (10, 20, 30, 40, 50, 100) and generates only the kept batches;
    ``encoding`` keeps the labels as top-k classes and/or per-row quantised codes instead of all C fp16
    logits (:func:`label_encoding`, :mod:`decoct.formats.label_codec`).
    Resumable per epoch (finished epochs wait in ``.<artifact>.relabel/`` next to the artifact).
    An artifact already holding a store made with the same settings is left as is; one made with
    other settings is replaced only with ``force``. Returns the artifact directory written.
    """
    from decoct.runtime.runs import resolve_artifact

    src = resolve_artifact(artifact_dir)
    dst = Path(out) if out is not None else src
    dset = open_set(src)
    if out is not None and dst.exists() and any(dst.iterdir()) and not force:
        raise ValueError(f"{dst} exists; pass force=True to replace it")
    job = _Job(dset, teacher, epochs, batch_size, seed, device, prune, view, amp, channels_last, encoding)
    existing = LabelStore.from_label_files(dset.label_files) if out is None else None
    work = dst.parent / f".{dst.name}.relabel"
    if existing is not None and not force:
        if _same_settings(existing.header, job.header):
            if _dist()[0] == 0:
                shutil.rmtree(work, ignore_errors=True)  # left by a relabel killed after its store was saved
            return dst
        raise LabelStoreError(
            f"{src} already holds a label store made with other settings (epochs {existing.header['epochs']}, "
            f"batch {existing.header['batch']}, prune {existing.prune_factor}x, labels {existing.encoding.name}, "
            f"seed {existing.header['seed']}); "
            "pass --force (force=True) to replace it, or write the relabelled set elsewhere with --out DIR "
            "(out=DIR)")
    store = job.run(work, progress)
    rank, _ = _dist()
    if rank == 0:
        _save_with_store(dset, store, dst)  # the work files are copied into the artifact
        shutil.rmtree(work, ignore_errors=True)
    _barrier()
    return dst


def replay_logits(teacher: nn.Module, images: Tensor, store: LabelStore, epoch: int, pos: int,
                  fill: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(recomputed fp16 logits, stored fp16 logits) of one stored batch: a replay check."""
    from decoct.train.soft_students import teacher_logits

    idx, rec, stored = store.batch_at(epoch, pos)
    x = apply_views(images[idx.to(images.device)], rec, fill)
    return teacher_logits(teacher.eval(), x).half().cpu(), stored


def prune_labels(artifact_dir: str | Path, factor: int, *, out: str | Path | None = None,
                 force: bool = False) -> Path:
    """Prune the artifact's unpruned label store ``factor``x (LPLD), in place or into ``out``.

    The result is identical to relabelling with ``prune=factor`` (see
    :func:`decoct.formats.label_pruning.prune_store`), without running the teacher again. In place, the
    full store is replaced, so that needs ``force``.
    """
    from decoct.formats.label_pruning import prune_store
    from decoct.runtime.runs import resolve_artifact

    src = resolve_artifact(artifact_dir)
    dset = open_set(src)
    store = LabelStore.from_set(dset)
    pruned = prune_store(store, int(factor))
    dst = _destination(src, out, force, "pruning in place replaces the full label store", "pruned")
    _save_with_store(dset, pruned, dst)
    return dst


def _destination(src: Path, out: str | Path | None, force: bool, in_place: str, what: str) -> Path:
    """Where a store rewrite goes: ``out``, or ``src`` itself only with ``force``; an existing non-empty
    ``out`` needs ``force`` too. Raises ValueError saying which flag to pass."""
    dst = Path(out) if out is not None else src
    if out is None and not force:
        raise ValueError(f"{in_place} of {src}; pass --force (force=True) to replace it, or write the {what} "
                         "set elsewhere with --out DIR (out=DIR)")
    if out is not None and dst.exists() and any(dst.iterdir()) and not force:
        raise ValueError(f"{dst} exists; pass force=True to replace it")
    return dst


def label_encoding(info: Any, topk: int | None = None, fill: str | None = None, bits: int | None = None
                   ) -> LabelEncoding:
    """The label encoding ``decoct relabel --label-topk K --label-fill F --label-bits B`` asks for, for a
    dataset ``info``, checked against its classes (plain fp16 when nothing is asked).

    A ``spread`` fill takes its probabilities at the dataset's soft-protocol temperature
    (``soft_recipe_for(info).temperature``: 30 CIFAR-size, 20 Tiny and ImageNet-size), as FKD takes them
    at its student's temperature (docs/label-store.md, Label encodings). ``fill`` defaults to ``zero``
    with ``topk``. Raises ValueError naming the option: ``bits`` not 8 or 4, ``topk`` not below
    the number of classes, a ``fill`` without ``topk``.
    """
    from decoct.train.soft_students import soft_recipe_for

    if bits is not None and (isinstance(bits, bool) or bits not in (8, 4)):
        raise ValueError(f"--label-bits must be 8 or 4 (leave it out for fp16 values), got {bits!r}")
    temperature = soft_recipe_for(info).temperature if fill == "spread" and topk is not None else None
    enc = LabelEncoding(topk=topk, fill=fill, bits=16 if bits is None else bits, temperature=temperature)
    enc.check_classes(int(info.num_classes))
    return enc


def encode_labels(artifact_dir: str | Path, encoding: LabelEncoding, *, prune: int | None = None,
                  out: str | Path | None = None, force: bool = False) -> Path:
    """Keep the artifact's fp16 label store in ``encoding`` (top-k, quantised), pruned ``prune``x first when
    asked, in place (``force``) or into ``out``, without running the teacher again.

    The result equals relabelling with ``encoding=`` and ``prune=`` file for file: every encoding rule is
    per stored view and starts from the same fp16 logits, and pruning keeps whole stored batches. The
    store must be the plain fp16 one (unpruned, for ``prune``).
    """
    from decoct.formats.label_pruning import prune_store
    from decoct.runtime.runs import resolve_artifact

    src = resolve_artifact(artifact_dir)
    dst = _destination(src, out, force, "encoding the labels in place replaces the fp16 label store", "encoded")
    dset = open_set(src)
    encoding.check_classes(int(dset.info.num_classes))
    if LabelStore.from_label_files(dset.label_files) is None:
        raise LabelStoreError(f"{src} has hard labels only (no label store to encode): make one with the teacher, "
                              f"`decoct relabel RUN --teacher DIR --epochs E --label-topk K` (or --label-bits B)")
    store = LabelStore.from_set(dset)
    if prune not in (None, 1):
        store = prune_store(store, int(prune))
    _save_with_store(dset, encode_store(store, encoding), dst)
    return dst
