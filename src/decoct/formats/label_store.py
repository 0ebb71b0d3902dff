"""The FKD label store: recorded views + teacher logits, kept inside a distilled-set artifact.

Files (``label_files`` of :class:`~decoct.formats.artifact.DistilledSet`, so ``labels/<name>.safetensors``
and counted by :meth:`DistilledSet.storage` as label bytes)::

    labels/fkd.safetensors           header: one uint8 tensor holding the store's JSON header
    labels/fkd-e00000.safetensors    stored epoch 0
    labels/fkd-e00001.safetensors    ...

One file per stored epoch (the unit of resume and of sharding), with its stored batches
("units") laid out flat so a short last batch needs no padding::

    units   int32 (U,)     batch number inside the epoch (0, 1, ...; pruned epochs hold a prefix)
    sizes   int32 (U,)     images in each batch
    index   int32 (n,)     image indices, batch after batch (the batch composition)
    crop    int16 (n, 4)   top, left, height, width in pixels (see decoct.augment.recorded_views)
    flip    bool  (n,)
    logits  float16 (n, C) the teacher's logits of exactly that view (after the mix)
    perm    int16 (n,)     mix partner inside the batch (stores with a mix only)
    lam     float32 (U,)   mix lambda per batch (stores with a mix only)
    box     int16 (U, 4)   CutMix box a1, b1, a2, b2 per batch (CutMix stores only)

Instead of ``logits``, a store may keep its labels in another *encoding* (top-k classes, per-row
quantised codes; :mod:`decoct.formats.label_codec`, docs/label-store.md, Label encodings): the header then
has version 2 and an ``encoding`` entry, the epoch files the encoding's tensors, and every read decodes
them back to (n, C) teacher logits, so replay is unchanged.

This is the SRe2L/LPLD per-batch format (docs/label-store.md, Where decoct departs from the
reference format) with three changes: integer pixel boxes instead of fractions (exact replay),
int32/int16 indices instead of int64 (smaller), and batches addressed by (epoch, batch number)
rather than by their first image index (the LPLD lookup collision of the reference cannot happen).
Logits are all C classes in fp16, no top-k, as LPLD (unless an encoding says otherwise).

The header records the format version, the pruning factor, the relabel settings and the
*fingerprint* of the artifact's pixels and labels: a store used with any other set is refused
(:meth:`LabelStore.check_for`).

Reading is per epoch, never whole (docs/label-store.md, Reading a store): a store opened from a
loaded artifact's label files (:class:`~decoct.formats.tensor_files.TensorFiles`) checks the header,
the file set and every epoch's small tensors (``epoch``, ``units``, ``sizes``, ``index``; the others
by dtype and shape from the file header) up front, then reads an epoch's tensors on first use and
keeps only the ``keep`` most recently used epochs (an LRU; :meth:`LabelStore.held_epochs`).
:meth:`LabelStore.read_batch` reads a single stored batch's rows (what a pruned store's random
replay needs). A store built in memory (relabel, a plain ``label_files`` dict) holds its epochs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from decoct.augment.recorded_views import ViewRecipe, ViewRecord
from decoct.formats.label_codec import PLAIN, LabelEncoding
from decoct.formats.tensor_files import (
    Deferred,
    Spec,
    TensorFile,
    TensorFiles,
    file_entry,
    file_payload_bytes,
)
from decoct.runtime.filecheck import is_int

__all__ = [
    "ENCODED_VERSION",
    "FORMAT",
    "VERSION",
    "VERSIONS",
    "HEADER_FILE",
    "DEFAULT_KEEP",
    "EpochLabels",
    "LabelStore",
    "LazyEpochs",
    "LabelStoreError",
    "attach_store",
    "check_manifest_entry",
    "dataset_fingerprint",
    "encode_store",
    "encoded_header",
    "epoch_file",
    "manifest_entry",
    "set_fingerprint",
    "stream_fingerprint",
    "strip_store",
]

FORMAT = "decoct-fkd-labels"
VERSION = 1
"""Header version of a plain store (all C logits in fp16); its files are unchanged since version 1."""
ENCODED_VERSION = 2
"""Header version of a store with an ``encoding`` (top-k, quantised): a decoct older than encodings refuses it
by its version instead of failing on a missing ``logits`` tensor."""
VERSIONS = (VERSION, ENCODED_VERSION)
HEADER_FILE = "fkd"
_EPOCH_RE = re.compile(r"^fkd-e(\d{5,})$")


class LabelStoreError(ValueError):
    """A label store is missing, malformed, or does not belong to the set it is used with."""


def epoch_file(epoch: int) -> str:
    """``label_files`` name of one stored epoch."""
    return f"fkd-e{epoch:05d}"


def set_fingerprint(images: Tensor, labels: Tensor, num_classes: int) -> str:
    """SHA-256 of a set's pixels (uint8, in order), hard labels and class count.

    A label store indexes images by position, so it is valid only for exactly these pixels in
    exactly this order; this hash is what ties a store to its artifact.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    return stream_fingerprint(tuple(images.shape), num_classes, [images], labels)


def stream_fingerprint(shape: tuple[int, ...], num_classes: int, chunks: Iterable[Tensor], labels: Tensor) -> str:
    """:func:`set_fingerprint` of a set given as consecutive uint8 chunks of its images (in order), so
    a set too large to hold (:class:`~decoct.formats.image_bank.ImageBank`) is hashed without holding it."""
    h = hashlib.sha256()
    h.update(json.dumps({"shape": [int(s) for s in shape], "classes": int(num_classes)}).encode())
    seen = 0
    for chunk in chunks:
        if chunk.dtype != torch.uint8:
            raise ValueError(f"images must be uint8, got {chunk.dtype}")
        h.update(np.ascontiguousarray(chunk.cpu().numpy()).tobytes())
        seen += int(chunk.shape[0])
    if seen != int(shape[0]):
        raise ValueError(f"the chunks hold {seen} images, the shape says {shape[0]}")
    h.update(labels.cpu().numpy().astype("<i8").tobytes())
    return h.hexdigest()


def dataset_fingerprint(dset: Any) -> str:
    """:func:`set_fingerprint` of a :class:`~decoct.formats.artifact.DistilledSet` (or of an
    :class:`~decoct.formats.image_bank.ImageBank`, streamed)."""
    streamed = getattr(dset, "fingerprint", None)
    if callable(streamed):
        return streamed()
    return set_fingerprint(dset.images, dset.labels, dset.info.num_classes)


@dataclass
class EpochLabels:
    """The stored batches of one epoch (see the module docstring for the fields).

    The labels are ``logits`` (fp16 (n, C)) in a plain store; in an encoded one ``logits`` is None and
    ``coded`` holds the ``encoding``'s tensors (all row-aligned: one row per stored view), which
    :meth:`batch` decodes (``num_classes`` C is what top-k decodes to).
    """

    epoch: int
    units: Tensor
    sizes: Tensor
    index: Tensor
    crop: Tensor
    flip: Tensor
    logits: Tensor | None
    perm: Tensor | None = None
    lam: Tensor | None = None
    box: Tensor | None = None
    coded: dict[str, Tensor] | None = None
    encoding: LabelEncoding = PLAIN
    num_classes: int | None = None

    def __post_init__(self) -> None:
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.sizes.long().cumsum(0)])

    def __len__(self) -> int:
        return int(self.units.shape[0])

    def label_tensors(self) -> dict[str, Tensor]:
        """The stored label tensors: ``{"logits": ...}`` or the encoding's (rows = stored views)."""
        if self.encoding.plain:
            return {"logits": self.logits} if self.logits is not None else {}
        return dict(self.coded or {})

    def _classes(self) -> int:
        if self.num_classes is not None:
            return int(self.num_classes)
        if self.logits is not None:
            return int(self.logits.shape[1])
        raise ValueError("an encoded epoch needs num_classes to decode its labels")

    def batch(self, pos: int) -> tuple[Tensor, ViewRecord, Tensor]:
        """(image indices int64, view record, teacher logits) of the ``pos``-th stored batch: the stored
        fp16 logits, or an encoded store's labels decoded (float32, :meth:`LabelEncoding.decode`)."""
        s, e = int(self.offsets[pos]), int(self.offsets[pos + 1])
        rec = ViewRecord(crop=self.crop[s:e], flip=self.flip[s:e])
        if self.perm is not None:
            rec.perm = self.perm[s:e]
            rec.lam = self.lam[pos] if self.lam is not None else None
            rec.box = self.box[pos] if self.box is not None else None
        if self.encoding.plain:
            assert self.logits is not None
            return self.index[s:e].long(), rec, self.logits[s:e]
        rows = {k: v[s:e] for k, v in self.label_tensors().items()}
        return self.index[s:e].long(), rec, _decoded(self.encoding, rows, self._classes())

    def tensors(self) -> dict[str, Tensor]:
        out = {"epoch": torch.tensor([self.epoch], dtype=torch.int32)}
        for f in ("units", "sizes", "index", "crop", "flip", "logits", "perm", "lam", "box"):
            t = getattr(self, f)
            if t is not None:
                out[f] = t.contiguous()
        if not self.encoding.plain:
            out.update({k: v.contiguous() for k, v in self.label_tensors().items()})
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor], name: str, encoding: LabelEncoding = PLAIN,
                     num_classes: int | None = None) -> EpochLabels:
        labels = tuple(encoding.specs(0, num_classes or 2)) if not encoding.plain else ("logits",)
        need = ("epoch", "units", "sizes", "index", "crop", "flip") + labels
        missing = [k for k in need if k not in t]
        if missing:
            raise LabelStoreError(f"labels/{name}.safetensors: missing tensor(s) {missing}"
                                  + ("" if encoding.plain else f" of a {encoding.name} store"))
        extra = set(t) - set(need) - {"perm", "lam", "box"}
        if extra:
            raise LabelStoreError(f"labels/{name}.safetensors: unexpected tensor(s) {sorted(extra)}")
        if t["epoch"].shape != (1,) or t["epoch"].dtype != torch.int32:
            raise LabelStoreError(f"labels/{name}.safetensors: epoch must be int32 (1,)")
        return cls(epoch=int(t["epoch"][0]), units=t["units"], sizes=t["sizes"], index=t["index"],
                   crop=t["crop"], flip=t["flip"], logits=t["logits"] if encoding.plain else None,
                   perm=t.get("perm"), lam=t.get("lam"), box=t.get("box"),
                   coded=None if encoding.plain else {k: t[k] for k in labels}, encoding=encoding,
                   num_classes=num_classes)

    @classmethod
    def build(cls, epoch: int, units: list[int], indices: list[Tensor], records: list[ViewRecord],
              logits: list[Tensor], encoding: LabelEncoding = PLAIN) -> EpochLabels:
        """Assemble an epoch from per-batch pieces (as relabel produces them), its logits kept as fp16 or
        encoded by ``encoding`` (from their fp16 values)."""
        mixed = bool(records) and records[0].perm is not None
        cut = bool(records) and records[0].box is not None
        half = torch.cat(logits).to(torch.float16)
        return cls(
            epoch=epoch,
            units=torch.tensor(units, dtype=torch.int32),
            sizes=torch.tensor([len(i) for i in indices], dtype=torch.int32),
            index=torch.cat(indices).to(torch.int32),
            crop=torch.cat([r.crop for r in records]).to(torch.int16),
            flip=torch.cat([r.flip for r in records]).bool(),
            logits=half if encoding.plain else None,
            perm=torch.cat([r.perm for r in records]).to(torch.int16) if mixed else None,
            lam=torch.stack([r.lam for r in records]).float() if mixed else None,
            box=torch.stack([r.box for r in records]).to(torch.int16) if cut else None,
            coded=None if encoding.plain else encoding.encode(half), encoding=encoding,
            num_classes=int(half.shape[1]),
        )

    def encoded(self, encoding: LabelEncoding) -> EpochLabels:
        """This plain epoch with its fp16 logits encoded by ``encoding`` (every other tensor shared)."""
        if not self.encoding.plain or self.logits is None:
            raise LabelStoreError(f"epoch {self.epoch} is already encoded as {self.encoding.name}; encode the fp16 store")
        if encoding.plain:
            return self
        return dataclasses.replace(self, logits=None, coded=encoding.encode(self.logits), encoding=encoding,
                                   num_classes=int(self.logits.shape[1]))

    def select(self, positions: list[int]) -> EpochLabels:
        """A copy holding only the stored batches at ``positions`` (in that order)."""
        idx = torch.cat([torch.arange(int(self.offsets[p]), int(self.offsets[p + 1])) for p in positions])
        pos = torch.tensor(positions, dtype=torch.long)
        return EpochLabels(
            epoch=self.epoch, units=self.units[pos], sizes=self.sizes[pos], index=self.index[idx],
            crop=self.crop[idx], flip=self.flip[idx], logits=None if self.logits is None else self.logits[idx],
            perm=None if self.perm is None else self.perm[idx],
            lam=None if self.lam is None else self.lam[pos],
            box=None if self.box is None else self.box[pos],
            coded=None if self.coded is None else {k: v[idx] for k, v in self.coded.items()},
            encoding=self.encoding, num_classes=self.num_classes,
        )

    def validate(self, header: dict[str, Any], name: str) -> None:
        """Shapes, dtypes and ranges against the header; raises :class:`LabelStoreError`."""
        where = f"labels/{name}.safetensors"
        n_img, c = header["num_images"], header["num_classes"]
        u = len(self)
        n = int(self.sizes.long().sum()) if u else 0
        checks = [
            (self.units.dtype == torch.int32 and self.units.shape == (u,), "units must be int32 (U,)"),
            (self.sizes.dtype == torch.int32 and self.sizes.shape == (u,), "sizes must be int32 (U,)"),
            (self.index.dtype == torch.int32 and self.index.shape == (n,), "index must be int32 (sum of sizes,)"),
            (self.crop.dtype == torch.int16 and self.crop.shape == (n, 4), "crop must be int16 (n, 4)"),
            (self.flip.dtype == torch.bool and self.flip.shape == (n,), "flip must be bool (n,)"),
        ]
        if self.encoding.plain:
            checks.append((self.logits is not None and self.logits.dtype == torch.float16
                           and self.logits.shape == (n, c), f"logits must be float16 (n, {c})"))
        else:
            have = self.label_tensors()
            for k, (dtype, shape) in self.encoding.specs(n, c).items():
                t = have.get(k)
                checks.append((t is not None and t.dtype == dtype and tuple(t.shape) == shape,
                               f"{k} of a {self.encoding.name} store must be {str(dtype).replace('torch.', '')} "
                               f"{tuple(s if i else 'n' for i, s in enumerate(shape))}"))
        mixed = header["view"]["mix"] != "none"
        cutmix = header["view"]["mix"] == "cutmix"
        checks += [
            ((self.perm is not None) == mixed, "perm must be present exactly when the store mixes"),
            ((self.lam is not None) == mixed, "lam must be present exactly when the store mixes"),
            ((self.box is not None) == cutmix, "box must be present exactly for CutMix"),
        ]
        if mixed and self.perm is not None and self.lam is not None:
            checks.append((self.perm.shape == (n,) and self.lam.shape == (u,), "perm (n,) / lam (U,) shapes"))
        if cutmix and self.box is not None:
            checks.append((self.box.shape == (u, 4), "box must be (U, 4)"))
        for ok, msg in checks:
            if not ok:
                raise LabelStoreError(f"{where}: {msg}")
        if u and (int(self.sizes.min()) < 1 or int(self.sizes.max()) > header["batch"]):
            raise LabelStoreError(f"{where}: batch sizes outside [1, {header['batch']}]")
        if n and (int(self.index.min()) < 0 or int(self.index.max()) >= n_img):
            raise LabelStoreError(f"{where}: image index outside [0, {n_img}) — store from another set?")
        if u and (int(self.units.min()) < 0 or int(self.units.max()) >= header["units_per_epoch"]):
            raise LabelStoreError(f"{where}: batch number outside [0, {header['units_per_epoch']})")


def _decoded(encoding: LabelEncoding, rows: dict[str, Tensor], num_classes: int) -> Tensor:
    """An encoded batch's teacher logits; a bad class id is a :class:`LabelStoreError`."""
    try:
        return encoding.decode(rows, num_classes)
    except ValueError as e:
        raise LabelStoreError(f"{encoding.name} label store: {e}") from e


DEFAULT_KEEP = 2
"""Stored epochs a store read from files keeps in memory (the epoch in use and the one before)."""

_SMALL = ("epoch", "units", "sizes", "index")  # read up front to check every epoch; a few bytes per view


class LazyEpochs(Mapping[int, EpochLabels]):
    """Stored epochs by number, each made by its loader on first use; only the ``keep`` most recently
    used are held (an LRU), so iterating a store of any size holds at most ``keep`` epochs."""

    def __init__(self, loaders: Mapping[int, Callable[[], EpochLabels]], keep: int = DEFAULT_KEEP) -> None:
        if not is_int(keep, 1):
            raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
        self._loaders = dict(sorted(loaders.items()))
        self._held: OrderedDict[int, EpochLabels] = OrderedDict()
        self.keep = keep

    def __getitem__(self, epoch: int) -> EpochLabels:
        if epoch in self._held:
            self._held.move_to_end(epoch)
            return self._held[epoch]
        ep = self._loaders[epoch]()
        self._held[epoch] = ep
        while len(self._held) > self.keep:
            self._held.popitem(last=False)
        return ep

    def __contains__(self, epoch: object) -> bool:
        return epoch in self._loaders

    def __iter__(self) -> Iterator[int]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)

    def held(self) -> list[int]:
        """Epochs held in memory now, least recently used first."""
        return list(self._held)


class LabelStore:
    """A label store: the header plus its stored epochs, held in memory or read per epoch.

    ``epochs`` maps stored epoch -> :class:`EpochLabels`: a dict (everything in memory, as relabel
    builds a store) or a :class:`LazyEpochs` (read on use; then ``layout`` gives each epoch's
    ``(units, sizes)`` up front and ``sources`` the file each epoch came from, copied as is when the
    store is written again). Everything but the batches themselves (plans, counts, sizes) comes from
    the layout, so it never loads an epoch.
    """

    def __init__(self, header: dict[str, Any], epochs: Mapping[int, EpochLabels], *,
                 layout: Mapping[int, tuple[Tensor, Tensor]] | None = None,
                 sources: Mapping[int, TensorFile] | None = None) -> None:
        if isinstance(epochs, LazyEpochs):
            if layout is None or sorted(layout) != list(epochs):
                raise ValueError("a store of lazily read epochs needs the (units, sizes) layout of every epoch")
            self.epochs: Mapping[int, EpochLabels] = epochs
            self._layout = {e: layout[e] for e in epochs}
        else:
            self.epochs = dict(sorted(epochs.items()))
            self._layout = {e: (ep.units, ep.sizes) for e, ep in self.epochs.items()}
        self._sources = dict(sources or {})
        self.header = dict(header, stored_epochs={str(e): len(u) for e, (u, _) in self._layout.items()})

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_label_files(cls, files: Mapping[str, dict[str, Tensor]], keep: int = DEFAULT_KEEP
                         ) -> LabelStore | None:
        """The store held in a set's ``label_files`` (None when it has none).

        Checked here, before anything trains: the header, that its ``stored_epochs`` name exactly
        the epoch files present, and each epoch's tensors (dtypes, shapes, batch sizes, image
        indices, batch numbers; :meth:`EpochLabels.validate`). From a plain dict the epochs are
        kept (they are in memory already); from :class:`~decoct.formats.tensor_files.TensorFiles`
        only their small tensors are read now, the rest when an epoch is used (checked again
        then), at most ``keep`` epochs held at a time.
        """
        if HEADER_FILE not in files:
            stray = [k for k in files if _EPOCH_RE.match(k)]
            if stray:
                raise LabelStoreError(f"label files {stray[:3]} have no header labels/{HEADER_FILE}.safetensors")
            return None
        header = _decode_header(files[HEADER_FILE])
        listed = {int(e) for e in header["stored_epochs"]}
        present = {int(m.group(1)) for k in files if (m := _EPOCH_RE.match(k))}
        if listed != present:
            raise LabelStoreError(
                f"label store header lists epochs {sorted(listed)[:8]}..., files hold {sorted(present)[:8]}...")
        lazy = isinstance(files, TensorFiles) and any(
            not isinstance(files.entry(epoch_file(e)), dict) for e in listed)
        epochs: dict[int, EpochLabels] = {}
        layout: dict[int, tuple[Tensor, Tensor]] = {}
        for e in sorted(listed):
            name = epoch_file(e)
            ep = _checked_epoch(_small_tensors(files, name) if lazy else files[name], header, e, name)
            if lazy:
                layout[e] = (ep.units.clone(), ep.sizes.clone())
            else:
                epochs[e] = ep
        if not lazy:
            return cls(header, epochs)
        assert isinstance(files, TensorFiles)
        loaders = {e: _file_loader(files, header, e, layout[e]) for e in layout}
        sources = {e: s for e in layout if isinstance(s := files.entry(epoch_file(e)), TensorFile)}
        return cls(header, LazyEpochs(loaders, keep), layout=layout, sources=sources)

    @classmethod
    def from_set(cls, dset: Any) -> LabelStore:
        """The store of a :class:`~decoct.formats.artifact.DistilledSet`, checked to belong to it."""
        store = cls.from_label_files(dset.label_files)
        if store is None:
            raise LabelStoreError(
                "this distilled set has no FKD label store (labels/fkd.safetensors); create one with "
                "`decoct relabel RUN --teacher DIR --epochs E`, or evaluate with an online teacher: "
                "`decoct evaluate RUN --protocol soft --teacher DIR`")
        store.check_for(dset)
        return store

    def check_for(self, dset: Any) -> None:
        """Refuse a store made for another set (different pixels, order, labels or classes)."""
        h = self.header
        fp = dataset_fingerprint(dset)
        if fp != h["fingerprint"]:
            raise LabelStoreError(
                f"label store does not belong to this distilled set: it was made for a set with "
                f"fingerprint {h['fingerprint'][:12]}… ({h['num_images']} images), this set's is "
                f"{fp[:12]}… ({len(dset)} images). Relabel this set instead of copying labels.")

    # ------------------------------------------------------------------ writing
    def label_files(self) -> Mapping[str, dict[str, Tensor]]:
        """``DistilledSet.label_files`` entries of this store.

        A dict of tensors for a store held in memory; for one read per epoch a
        :class:`~decoct.formats.tensor_files.TensorFiles` whose epochs are the files they were read
        from (copied byte for byte when saved) or computed one at a time when saved (a pruned store).
        """
        head = {"header": _encode_header(self.header)}
        if not isinstance(self.epochs, LazyEpochs):
            files = {HEADER_FILE: head}
            for e, ep in self.epochs.items():
                files[epoch_file(e)] = ep.tensors()
            return files
        entries: dict[str, Any] = {HEADER_FILE: head}
        for e in self._layout:
            src = self._sources.get(e)
            entries[epoch_file(e)] = src if src is not None else Deferred(_tensors_of(self.epochs, e),
                                                                         self._epoch_specs(e))
        return TensorFiles(entries)

    def select(self, positions: Mapping[int, list[int]], header: dict[str, Any]) -> LabelStore:
        """A store under ``header`` holding, of each epoch in ``positions``, the stored batches at those
        positions (in that order): how a pruned store is cut from a full one. A store read per epoch
        gives one read per epoch too (each epoch selected when it is used)."""
        if not isinstance(self.epochs, LazyEpochs):
            return LabelStore(header, {e: self.epochs[e].select(list(p)) for e, p in positions.items()})
        layout, loaders, sources = {}, {}, {}
        for e, p in positions.items():
            units, sizes = self._layout[e]
            pos = torch.tensor(list(p), dtype=torch.long)
            layout[e] = (units[pos], sizes[pos])
            loaders[e] = _selected(self.epochs, e, list(p))
            if list(p) == list(range(len(units))) and e in self._sources:
                sources[e] = self._sources[e]  # the whole epoch: its file is copied as it is
        return LabelStore(header, LazyEpochs(loaders, self.epochs.keep), layout=layout, sources=sources)

    # ------------------------------------------------------------------ views
    @property
    def view(self) -> ViewRecipe:
        v = ViewRecipe.from_dict(self.header["view"])
        if v.shuffle != 1:  # the records hold no strip orders: a replay could not match what the teacher saw
            raise LabelStoreError(f"the label store's view has shuffle={v.shuffle}, which stores cannot replay")
        return v

    @property
    def batch(self) -> int:
        """Images per full stored batch (the student's batch size)."""
        return int(self.header["batch"])

    @property
    def prune_factor(self) -> int:
        p = self.header.get("prune")
        return int(p["factor"]) if p else 1

    @property
    def num_units(self) -> int:
        return sum(len(u) for u, _ in self._layout.values())

    def epoch_len(self, epoch: int) -> int:
        """Stored batches of ``epoch`` (no epoch is read)."""
        return len(self._layout[epoch][0])

    def epoch_sizes(self, epoch: int) -> list[int]:
        """Images in each stored batch of ``epoch`` (no epoch is read)."""
        return self._layout[epoch][1].tolist()

    def held_epochs(self) -> list[int]:
        """Epochs whose tensors this store holds in memory now (all of them for a store built in memory)."""
        return self.epochs.held() if isinstance(self.epochs, LazyEpochs) else list(self.epochs)

    def units(self, full_only: bool = False) -> list[tuple[int, int]]:
        """(epoch, position) of every stored batch in global order; ``full_only`` skips short ones."""
        out = []
        for e, (_, sizes) in self._layout.items():
            s = sizes.tolist()
            out += [(e, p) for p in range(len(s)) if not full_only or s[p] == self.batch]
        return out

    def complete_epochs(self) -> list[int]:
        """Stored epochs holding every batch of the epoch (every full batch, for a pruned store)."""
        h = self.header
        pruned = self.prune_factor > 1
        out = []
        for e, (units, sizes) in self._layout.items():
            full = int((sizes == self.batch).sum())
            if full == int(h["full_units_per_epoch"]) and (pruned or len(units) == int(h["units_per_epoch"])):
                out.append(e)
        return out

    def batch_at(self, epoch: int, pos: int) -> tuple[Tensor, ViewRecord, Tensor]:
        """(image indices, view record, fp16 logits) of a stored batch, from its epoch (read whole and
        kept, for a store read per epoch): the access for replaying epochs in order."""
        return self.epochs[epoch].batch(pos)

    def read_batch(self, epoch: int, pos: int) -> tuple[Tensor, ViewRecord, Tensor]:
        """As :meth:`batch_at`, but reads only this batch's rows when its epoch is not held: the access
        for batches drawn at random from a pool (a pruned store), which would otherwise read a whole
        epoch per batch. Equal to :meth:`batch_at` bit for bit."""
        src = self._sources.get(epoch)
        if src is None or not isinstance(self.epochs, LazyEpochs) or epoch in self.epochs.held():
            return self.batch_at(epoch, pos)
        sizes = self._layout[epoch][1]
        if not 0 <= pos < len(sizes):
            raise IndexError(f"stored epoch {epoch} has {len(sizes)} batches, asked for position {pos}")
        s = int(sizes[:pos].long().sum())
        e = s + int(sizes[pos])
        mix = self.header["view"]["mix"]
        rows: dict[str, tuple[int, int] | None] = {"index": (s, e), "crop": (s, e), "flip": (s, e)}
        enc = self.encoding
        labels = list(self._label_specs(0))
        rows.update({k: (s, e) for k in labels})  # every label tensor holds one row per stored view
        if mix != "none":
            rows.update(perm=(s, e), lam=(pos, pos + 1))
        if mix == "cutmix":
            rows["box"] = (pos, pos + 1)
        t = src.read(rows)
        idx = t["index"]
        n_img = int(self.header["num_images"])
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= n_img):
            raise LabelStoreError(f"{src.rel}: image index outside [0, {n_img}) — changed after it was checked?")
        rec = ViewRecord(crop=t["crop"], flip=t["flip"])
        if mix != "none":
            rec.perm, rec.lam = t["perm"], t["lam"][0]
            rec.box = t["box"][0] if mix == "cutmix" else None
        if enc.plain:
            return idx.long(), rec, t["logits"]
        return idx.long(), rec, _decoded(enc, {k: t[k] for k in labels}, int(self.header["num_classes"]))

    def payload_bytes(self) -> int:
        """Bytes of the stored tensors (what the store costs before file headers); reads no epoch."""
        files = self.label_files()
        return sum(file_payload_bytes(files, name) for name in files)

    def summary(self) -> dict[str, Any]:
        h = self.header
        return dict(epochs=h["epochs"], batch=h["batch"], stored_batches=self.num_units,
                    prune_factor=self.prune_factor, view=h["view"], seed=h["seed"],
                    label_format=self.encoding.name, payload_bytes=self.payload_bytes())

    @property
    def encoding(self) -> LabelEncoding:
        """How the labels are stored (:class:`~decoct.formats.label_codec.LabelEncoding`): plain fp16 when the
        header names no encoding."""
        enc = self.__dict__.get("_encoding")
        if enc is None:
            enc = self.__dict__["_encoding"] = _encoding_of(self.header)
        return enc

    def _label_specs(self, rows: int) -> dict[str, Spec]:
        return self.encoding.specs(rows, int(self.header["num_classes"]))

    def _epoch_specs(self, epoch: int) -> dict[str, Spec]:
        """(dtype, shape) of each tensor of a stored epoch's file, from the layout (as validated)."""
        units, sizes = self._layout[epoch]
        n, u, c = int(sizes.long().sum()), len(units), int(self.header["num_classes"])
        specs: dict[str, Spec] = {
            "epoch": (torch.int32, (1,)), "units": (torch.int32, (u,)), "sizes": (torch.int32, (u,)),
            "index": (torch.int32, (n,)), "crop": (torch.int16, (n, 4)), "flip": (torch.bool, (n,))}
        specs.update(self.encoding.specs(n, c))
        mix = self.header["view"]["mix"]
        if mix != "none":
            specs.update(perm=(torch.int16, (n,)), lam=(torch.float32, (u,)))
        if mix == "cutmix":
            specs["box"] = (torch.int16, (u, 4))
        return specs


def _tensors_of(epochs: Mapping[int, EpochLabels], e: int) -> Callable[[], dict[str, Tensor]]:
    return lambda: epochs[e].tensors()


def _selected(epochs: Mapping[int, EpochLabels], e: int, positions: list[int]) -> Callable[[], EpochLabels]:
    return lambda: epochs[e].select(positions)


def _small_tensors(files: TensorFiles, name: str) -> dict[str, Tensor]:
    """An epoch file's small tensors read, the others as ``meta`` tensors (dtype and shape only)."""
    entry = file_entry(files, name)
    if not isinstance(entry, TensorFile):
        return files[name]
    out = entry.meta()
    out.update(entry.read({k: None for k in _SMALL if k in entry.specs}))
    return out


def _checked_epoch(tensors: dict[str, Tensor], header: dict[str, Any], epoch: int, name: str) -> EpochLabels:
    ep = EpochLabels.from_tensors(tensors, name, _encoding_of(header), int(header["num_classes"]))
    if ep.epoch != epoch:
        raise LabelStoreError(f"labels/{name}.safetensors: holds epoch {ep.epoch}")
    ep.validate(header, name)
    if len(ep) != int(header["stored_epochs"][str(epoch)]):
        raise LabelStoreError(f"labels/{name}.safetensors: {len(ep)} batches, header says "
                              f"{header['stored_epochs'][str(epoch)]}")
    return ep


def _file_loader(files: TensorFiles, header: dict[str, Any], epoch: int, layout: tuple[Tensor, Tensor]
                 ) -> Callable[[], EpochLabels]:
    def load() -> EpochLabels:
        name = epoch_file(epoch)
        ep = _checked_epoch(files[name], header, epoch, name)  # the file is checked again as it is read
        if not (torch.equal(ep.units, layout[0]) and torch.equal(ep.sizes, layout[1])):
            raise LabelStoreError(f"labels/{name}.safetensors: batches differ from when the store was opened; "
                                  "load the set again")
        return ep
    return load


def _encode_header(header: dict[str, Any]) -> Tensor:
    data = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def _decode_header(tensors: dict[str, Tensor]) -> dict[str, Any]:
    t = tensors.get("header")
    if t is None or t.dtype != torch.uint8 or t.dim() != 1:
        raise LabelStoreError(f"labels/{HEADER_FILE}.safetensors: no uint8 'header' tensor")
    try:
        header = json.loads(bytes(t.numpy().tobytes()).decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise LabelStoreError(f"labels/{HEADER_FILE}.safetensors: header is not JSON ({e})") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise LabelStoreError(f"labels/{HEADER_FILE}.safetensors: not a {FORMAT!r} header")
    if header.get("version") not in VERSIONS:
        raise LabelStoreError(f"label store version {header.get('version')!r:.20} is not supported "
                              f"(this decoct reads versions {', '.join(map(str, VERSIONS))})")
    if header["version"] == VERSION and "encoding" in header:
        raise LabelStoreError(f"labels/{HEADER_FILE}.safetensors: a version {VERSION} header names an encoding "
                              f"(encoded stores are version {ENCODED_VERSION})")
    if header["version"] == ENCODED_VERSION:
        enc = _encoding_of(header)
        if enc.plain:
            raise LabelStoreError(f"labels/{HEADER_FILE}.safetensors: a version {ENCODED_VERSION} header names "
                                  f"the plain fp16 format (plain stores are version {VERSION})")
        if is_int(header.get("num_classes"), 1):
            try:
                enc.check_classes(int(header["num_classes"]))
            except ValueError as e:
                raise LabelStoreError(f"labels/{HEADER_FILE}.safetensors: {e}") from e
    need = ("fingerprint", "num_images", "num_classes", "epochs", "batch", "units_per_epoch", "view",
            "seed", "stored_epochs")
    missing = [k for k in need if k not in header]
    if missing:
        raise LabelStoreError(f"labels/{HEADER_FILE}.safetensors: header lacks {missing}")
    # numbers that size a training run or index tensors: integers in range, checked before use
    for key, lo in (("num_images", 1), ("num_classes", 1), ("epochs", 1), ("batch", 1), ("units_per_epoch", 1),
                    ("full_units_per_epoch", 0), ("seed", 0)):
        v = header.get(key, 0 if key == "full_units_per_epoch" else None)
        if not is_int(v, lo, (1 << 31) - 1):
            raise LabelStoreError(f"labels/{HEADER_FILE}.safetensors: header {key} must be an integer in "
                                  f"[{lo}, 2^31), got {str(v)[:20]}")
    stored = header["stored_epochs"]
    if not isinstance(stored, dict) or not all(
            isinstance(k, str) and k.isdigit() and int(k) < header["epochs"]
            and is_int(v, 0, header["units_per_epoch"]) for k, v in stored.items()):
        raise LabelStoreError(f"labels/{HEADER_FILE}.safetensors: header stored_epochs must map epochs below "
                              f"{header['epochs']} to batch counts of at most units_per_epoch")
    ViewRecipe.from_dict(header["view"])
    return header


def _encoding_of(header: dict[str, Any]) -> LabelEncoding:
    """The header's label encoding (plain fp16 without one); an unknown one is a one-line LabelStoreError."""
    if header.get("encoding") is None:
        return PLAIN
    try:
        return LabelEncoding.from_dict(header["encoding"])
    except ValueError as e:
        raise LabelStoreError(str(e)) from e


def encoded_header(header: dict[str, Any], encoding: LabelEncoding) -> dict[str, Any]:
    """``header`` for a store whose labels are kept in ``encoding`` (version 2 with its ``encoding`` entry;
    a plain header, version 1 without one, for the plain fp16 encoding)."""
    out = {k: v for k, v in header.items() if k != "encoding"}
    if encoding.plain:
        out["version"] = VERSION
        return out
    encoding.check_classes(int(header["num_classes"]))
    out.update(version=ENCODED_VERSION, encoding=encoding.to_dict())
    return out


def encode_store(store: LabelStore, encoding: LabelEncoding) -> LabelStore:
    """``store`` with its fp16 logits kept in ``encoding`` (top-k, quantised; see
    :mod:`decoct.formats.label_codec`): the same batches, views and header otherwise. A store read per
    epoch stays one (each epoch encoded when it is used or written). Equal, file for file, to relabelling
    straight into ``encoding``; per row, so it commutes with :func:`~decoct.formats.label_pruning.prune_store`.
    Raises LabelStoreError for a store already encoded (encode the fp16 one) and ValueError for a
    ``topk`` not below the number of classes."""
    if not store.encoding.plain:
        raise LabelStoreError(f"the label store is already encoded as {store.encoding.name}; encode the fp16 store "
                              "(relabel again, or keep an unencoded copy with --out)")
    header = encoded_header(store.header, encoding)
    if encoding.plain:
        return store
    if not isinstance(store.epochs, LazyEpochs):
        return LabelStore(header, {e: ep.encoded(encoding) for e, ep in store.epochs.items()})
    loaders = {e: _encoded(store.epochs, e, encoding) for e in store._layout}
    return LabelStore(header, LazyEpochs(loaders, store.epochs.keep), layout=dict(store._layout), sources={})


def _encoded(epochs: Mapping[int, EpochLabels], e: int, encoding: LabelEncoding) -> Callable[[], EpochLabels]:
    return lambda: epochs[e].encoded(encoding)


def manifest_entry(files: Mapping[str, dict[str, Tensor]]) -> dict[str, Any] | None:
    """What an artifact's manifest records of the label store in ``files`` (``labels.store``): its
    ``format``, ``version`` and label ``encoding`` name (``fp16``, ``q8``, ``top5-zero-q4``, ...). None when
    there is no store or its header cannot be read (label files are opaque to the artifact; the store's
    own checks report a broken header when it is opened)."""
    if HEADER_FILE not in files:
        return None
    try:
        header = _decode_header(files[HEADER_FILE])
        return {"format": FORMAT, "version": header["version"], "encoding": _encoding_of(header).name}
    except (ValueError, KeyError, OSError):
        return None


def check_manifest_entry(entry: Any) -> None:
    """Refuse a manifest's ``labels.store`` record this version cannot read (one line naming the format)."""
    if not isinstance(entry, dict) or entry.get("format") != FORMAT:
        raise LabelStoreError(f"manifest.json: labels.store must record a {FORMAT!r} store, got {str(entry)[:80]}")
    if entry.get("version") not in VERSIONS:
        raise LabelStoreError(f"manifest.json: label store version {entry.get('version')!r:.20} is not supported "
                              f"(this decoct reads versions {', '.join(map(str, VERSIONS))})")
    try:
        LabelEncoding.check_name(entry.get("encoding"))
    except ValueError as e:
        raise LabelStoreError(f"manifest.json: {e}") from e


def strip_store(files: Mapping[str, dict[str, Tensor]]) -> Mapping[str, dict[str, Tensor]]:
    """``label_files`` without any FKD store entries (nothing is read)."""
    keep = [k for k in files if k != HEADER_FILE and not _EPOCH_RE.match(k)]
    if isinstance(files, TensorFiles):
        return TensorFiles({k: files.entry(k) for k in keep})
    return {k: files[k] for k in keep}


def attach_store(dset: Any, store: LabelStore | None) -> Any:
    """A copy of ``dset`` whose label files hold ``store`` (replacing any previous store)."""
    if store is not None:
        store.check_for(dset)
    files = strip_store(dset.label_files)
    if store is not None:
        new = store.label_files()
        if isinstance(files, TensorFiles) or isinstance(new, TensorFiles):
            files = TensorFiles({k: file_entry(m, k) for m in (files, new) for k in m})
        else:
            files = {**files, **new}
    return dataclasses.replace(dset, label_files=files)
