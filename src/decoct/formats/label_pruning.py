"""LPLD label pruning: keep a label pool, draw each training epoch's batches from it.

docs/label-store.md, LPLD label pruning: a store of E epochs x B batches ("units", global id g =
epoch*B + batch) is pruned at ratio r by keeping the *prefix* of ``floor((1-r) * E * B)`` units
(every epoch is an independent random draw of views, so a prefix is a random subset). The student
still trains all E epochs; with the improved label pool (``batch_to_epoch``, what every LPLD script
uses) each epoch is B unit ids drawn uniformly *with replacement* from the pool. ``epoch``
granularity replays one whole stored epoch drawn uniformly from the pool's complete epochs;
``order`` replays stored epoch e at training epoch e (the unpruned 1x protocol).

Factor <-> ratio mapping, exactly as the LPLD scripts (docs/label-store.md, LPLD label pruning): 10x
r=0.9, 20x r=0.95, "30x" r=0.97 (really 33.3x), 40x r=0.975, and the paper's 50x r=0.98, 100x
r=0.99. Computed with fractions, so the kept count never suffers float rounding
(``int(100 * (1 - 0.9))`` is 9, not 10).

B counts only *full* batches (LPLD relabels pruned stores with drop-last), so the pool never holds
a short tail batch; the reference instead draws over all ids and replaces a drawn last-of-epoch id
by its predecessor, which also never uses a tail but double-weights the second-to-last batch.
The reference's draws come from the unseeded global RNG; ours from a seeded generator.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction

import torch

from decoct.augment.recorded_views import MIXES, ViewRecipe
from decoct.formats.label_codec import LabelEncoding
from decoct.formats.label_store import FORMAT, VERSION, LabelStore, LabelStoreError, encoded_header
from decoct.formats.tensor_files import safetensors_size

__all__ = [
    "GRANULARITIES",
    "PRUNE_FACTORS",
    "epoch_plan",
    "kept_units",
    "label_store_bytes",
    "payload_model",
    "prune_ratio",
    "prune_store",
]

PRUNE_FACTORS: dict[int, Fraction] = {
    1: Fraction(0),
    10: Fraction(9, 10),
    20: Fraction(19, 20),
    30: Fraction(97, 100),
    40: Fraction(39, 40),
    50: Fraction(49, 50),
    100: Fraction(99, 100),
}
"""Pruning factor (as the papers name it) -> pruning ratio r (fraction of stored batches dropped)."""

GRANULARITIES = ("auto", "order", "batch_to_epoch", "epoch")


def prune_ratio(factor: int) -> Fraction:
    """The ratio r of a pruning factor; unknown factors raise naming the known ones."""
    if factor not in PRUNE_FACTORS:
        raise ValueError(f"unknown pruning factor {factor!r}; known: {', '.join(map(str, PRUNE_FACTORS))}")
    return PRUNE_FACTORS[factor]


def kept_units(total: int, factor: int) -> int:
    """``floor((1 - r) * total)`` units kept; raises when that leaves no batch at all."""
    r = prune_ratio(factor)
    kept = int((1 - r) * total)
    if kept < 1:
        raise LabelStoreError(
            f"pruning {factor}x (r={float(r):g}) keeps floor({total} x {1 - r}) = 0 of {total} stored batches; "
            f"relabel more epochs (the pool needs at least {math.ceil(1 / (1 - r))} full batches) or prune less")
    return kept


def pool_total(epochs: int, full_per_epoch: int) -> int:
    """Units the pruning ratio applies to: E epochs x B full batches."""
    return epochs * full_per_epoch


def prune_store(store: LabelStore, factor: int) -> LabelStore:
    """The pruned store: the prefix of ``floor((1-r) E B)`` full stored batches of an unpruned store.

    Bit-identical to relabelling with ``prune=factor`` directly (each batch's draws depend only on
    (seed, epoch, batch)), so one full relabel serves every pruning factor.
    """
    if store.prune_factor != 1:
        raise LabelStoreError(f"the store is already pruned {store.prune_factor}x; prune the unpruned store")
    h = store.header
    full_per_epoch = int(h["full_units_per_epoch"])
    if sorted(store.complete_epochs()) != list(range(int(h["epochs"]))):
        raise LabelStoreError("pruning needs a complete unpruned store (every epoch and batch)")
    keep = kept_units(pool_total(int(h["epochs"]), full_per_epoch), factor)
    if factor == 1:
        return store
    positions: dict[int, list[int]] = {}
    left = keep
    for e in store.epochs:  # batch sizes come from the store's layout: no epoch is read here
        if left <= 0:
            break
        positions[e] = [p for p, s in enumerate(store.epoch_sizes(e)) if s == store.batch][:left]
        left -= len(positions[e])
    header = dict(h, prune=_prune_header(factor, keep, pool_total(int(h["epochs"]), full_per_epoch)))
    return store.select(positions, header)  # a store read per epoch stays one (each epoch cut when used)


def _prune_header(factor: int, kept: int, total: int) -> dict:
    r = prune_ratio(factor)
    return {"factor": factor, "ratio": f"{r.numerator}/{r.denominator}", "kept_units": kept,
            "total_units": total}


def epoch_plan(store: LabelStore, epochs: int, granularity: str = "auto",
               generator: torch.Generator | None = None) -> list[list[tuple[int, int]]]:
    """For each training epoch, the stored batches (epoch, position) to replay, in order.

    ``auto``: ``order`` for an unpruned store, ``batch_to_epoch`` (the improved label pool) for a
    pruned one.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; known: {', '.join(GRANULARITIES)}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if granularity == "auto":
        granularity = "order" if store.prune_factor == 1 else "batch_to_epoch"
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    if granularity == "order":
        have = store.complete_epochs()
        if have[:epochs] != list(range(epochs)):
            ready = next((i for i, e in enumerate(have) if e != i), len(have))  # epochs 0..ready-1 complete
            fewer = f"train at most {ready} epochs (decoct evaluate --epochs {ready}), " if ready else ""
            raise LabelStoreError(
                f"order replay of {epochs} epochs needs stored epochs 0..{epochs - 1} complete; the store "
                f"has {len(have)} complete epoch(s){' (it is pruned)' if store.prune_factor > 1 else ''}. "
                f"Fix: {fewer}store {epochs} epochs (decoct relabel RUN --teacher DIR --epochs {epochs} --force), "
                "or, in Python, replay stored batches at random with granularity='batch_to_epoch'")
        return [[(e, p) for p in range(store.epoch_len(e))] for e in range(epochs)]
    if granularity == "epoch":
        pool_epochs = store.complete_epochs()
        if not pool_epochs:
            raise LabelStoreError("epoch granularity needs at least one complete stored epoch")
        picks = torch.randint(len(pool_epochs), (epochs,), generator=g).tolist()
        return [[(pool_epochs[i], p) for p in range(store.epoch_len(pool_epochs[i]))] for i in picks]
    pool = store.units(full_only=True)
    if not pool:
        raise LabelStoreError("the label pool holds no full batch")
    per_epoch = int(store.header["full_units_per_epoch"])
    draws = torch.randint(len(pool), (epochs, per_epoch), generator=g).tolist()
    return [[pool[i] for i in row] for row in draws]


def payload_model(num_images: int, num_classes: int, epochs: int, batch_size: int, mix: str = "none",
                  prune: int | None = None, *, topk: int | None = None, bits: int = 16) -> dict[str, int]:
    """Bytes of a store's tensors, computed without building it (e.g. for paper-scale settings).

    Per image and stored epoch the label row (``2C`` for fp16 logits; with ``topk``/``bits`` the
    encoding's :meth:`~decoct.formats.label_codec.LabelEncoding.row_bytes`: ``C + 4`` 8-bit, ``ceil(C/2) + 4``
    4-bit, ``4k`` top-k fp16, ``3k + 4`` top-k 8-bit, ``2k + ceil(k/2) + 4`` top-k 4-bit) + 8 (box) + 1 (flip)
    + 4 (index) + 2 (mix partner, with a mix); per batch 8 (size, batch number) + 4 (lambda, with a mix) +
    8 (CutMix box); per epoch file 4 (epoch id). The JSON header and the safetensors file headers (about
    0.5 KB per file) come on top (:func:`label_store_bytes` adds them). Batches as relabel makes them (see
    :mod:`decoct.decoupled.relabel`). Compare LPLD's ``2C + 25`` per image and epoch plus ~3 KB per batch
    file (docs/label-store.md, Size of a store).
    """
    enc = _encoding(num_classes, topk, bits)
    b = min(batch_size, num_images)
    full = num_images // b
    tail = num_images - full * b
    tail = tail if tail > 1 else 0
    per_image = enc.row_bytes(num_classes) + 8 + 1 + 4 + (2 if mix != "none" else 0)
    per_batch = 8 + (4 if mix != "none" else 0) + (8 if mix == "cutmix" else 0)
    if prune in (None, 1):
        batches, images, files = epochs * (full + (1 if tail else 0)), epochs * (full * b + tail), epochs
    else:
        batches = kept_units(epochs * full, int(prune))
        images, files = batches * b, -(-batches // full)
    return {"batches": batches, "image_views": images, "files": files,
            "bytes": images * per_image + batches * per_batch + files * 4}


def _encoding(num_classes: int, topk: int | None, bits: int) -> LabelEncoding:
    """The encoding of a (topk, bits) setting for sizes (the fill does not change a byte)."""
    enc = LabelEncoding(topk=topk, bits=bits)
    enc.check_classes(num_classes)
    return enc


HEADER_TEACHER_PATH = 32
"""Characters of the teacher path :func:`label_store_bytes` assumes in the store's JSON header (each
character more or less is one byte of ``on_disk``)."""


def label_store_bytes(num_images: int, num_classes: int, epochs: int, batch_size: int, *,
                      prune: int | None = None, topk: int | None = None, bits: int = 16, mix: str = "none",
                      image_shape: tuple[int, int, int] = (3, 32, 32), view: ViewRecipe | None = None
                      ) -> dict[str, int]:
    """Bytes of the label store ``decoct relabel`` would write, computed without a teacher or a set.

    For N = ``num_images`` images of C = ``num_classes`` classes, ``epochs`` stored epochs of batches of
    ``batch_size`` (the store uses ``min(batch_size, N)``; the dataset's soft recipe gives the default, and
    its view's ``mix``), LPLD ``prune`` factor (None or 1: unpruned), ``topk`` kept classes (None: all C)
    and ``bits`` (16 = fp16 values, 8 or 4 = per-row codes). Returns:

    - ``batches``, ``image_views`` (stored rows), ``files`` (epoch files);
    - ``label_values``: bytes of the label tensors alone (rows x the encoding's bytes per row);
    - ``payload``: bytes of every stored tensor, :func:`payload_model` (``LabelStore.payload_bytes()`` minus
      the JSON header tensor);
    - ``epoch_files``: the exact size of the epoch files; ``header_file``: the estimated size of
      ``labels/fkd.safetensors``;
    - ``on_disk`` = ``epoch_files + header_file``: what the artifact counts as label bytes
      (``storage()["bytes_on_disk"]["labels"]``), every epoch file sized exactly
      (:func:`~decoct.formats.tensor_files.safetensors_size`) and the header file exact but for the
      teacher's description, assumed a :data:`HEADER_TEACHER_PATH`-character path, ``resnet18`` and
      ``cifar10`` (a few bytes each way), and the spread fill's longer names. ``image_shape`` and ``view`` (default:
      ``ViewRecipe(mix=mix)``; pass the recipe's) only size that header.

    Raises ValueError for a bad combination (``topk >= C``, ``bits`` not in {16, 8, 4}, an unknown prune
    factor, a pruning that keeps no batch).
    """
    if mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r}; known: {', '.join(MIXES)}")
    if view is not None and view.mix != mix:
        raise ValueError(f"view mixes {view.mix!r}, mix says {mix!r}")
    for name, v, lo in (("num_images", num_images, 2), ("num_classes", num_classes, 1), ("epochs", epochs, 1),
                        ("batch_size", batch_size, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    enc = _encoding(num_classes, topk, bits)
    model = payload_model(num_images, num_classes, epochs, batch_size, mix, prune, topk=topk, bits=bits)
    b = min(batch_size, num_images)
    full = num_images // b
    tail = num_images - full * b
    tail = tail if tail > 1 else 0
    pruned = prune not in (None, 1)
    if not pruned:
        layout = {(full + (1 if tail else 0), full * b + tail): epochs}
        stored = {str(e): full + (1 if tail else 0) for e in range(epochs)}
    else:
        kept = model["batches"]
        layout = {(full, full * b): kept // full}
        if kept % full:
            layout[(kept % full, (kept % full) * b)] = 1
        stored = {str(e): full for e in range(kept // full)}
        if kept % full:
            stored[str(kept // full)] = kept % full

    def epoch_specs(u: int, n: int) -> dict:
        specs = {"epoch": (torch.int32, (1,)), "units": (torch.int32, (u,)), "sizes": (torch.int32, (u,)),
                 "index": (torch.int32, (n,)), "crop": (torch.int16, (n, 4)), "flip": (torch.bool, (n,))}
        specs.update(enc.specs(n, num_classes))
        if mix != "none":
            specs.update(perm=(torch.int16, (n,)), lam=(torch.float32, (u,)))
        if mix == "cutmix":
            specs["box"] = (torch.int16, (u, 4))
        return specs

    files = sum(count * safetensors_size(epoch_specs(u, n)) for (u, n), count in layout.items() if count)
    header = {
        "format": FORMAT, "version": VERSION, "fingerprint": "0" * 64, "num_images": num_images,
        "num_classes": num_classes, "image_shape": list(image_shape), "epochs": epochs, "batch_size": batch_size,
        "batch": b, "units_per_epoch": full + (1 if tail else 0), "full_units_per_epoch": full, "tail": tail,
        "view": (view or ViewRecipe(mix=mix)).to_dict(), "seed": 0,
        "teacher": {"path": "t" * HEADER_TEACHER_PATH, "model": "resnet18", "dataset": "cifar10",
                    "fingerprint": "0" * 64},
        "logits": "float16", "prune": None, "precision": "float32", "stored_epochs": stored}
    if pruned:
        header["prune"] = _prune_header(int(prune), model["batches"], pool_total(epochs, full))
    header = encoded_header(header, enc)
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    head = safetensors_size({"header": (torch.uint8, (len(text),))})
    rows = model["image_views"]
    return {"batches": model["batches"], "image_views": rows, "files": model["files"],
            "label_values": rows * enc.row_bytes(num_classes), "payload": model["bytes"],
            "epoch_files": files, "header_file": head, "on_disk": files + head}
