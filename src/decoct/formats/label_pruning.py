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

import math
from fractions import Fraction

import torch

from decoct.formats.label_store import LabelStore, LabelStoreError

__all__ = [
    "GRANULARITIES",
    "PRUNE_FACTORS",
    "epoch_plan",
    "kept_units",
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
                  prune: int | None = None) -> dict[str, int]:
    """Bytes of a store's tensors, computed without building it (e.g. for paper-scale settings).

    Per image and stored epoch ``2C`` (fp16 logits) + 8 (box) + 1 (flip) + 4 (index) + 2 (mix
    partner, with a mix); per batch 8 (size, batch number) + 4 (lambda, with a mix) + 8 (CutMix
    box); per epoch file 4 (epoch id). The JSON header and the safetensors file headers (about 0.5
    KB per file) come on top. Batches as relabel makes them (see :mod:`decoct.decoupled.relabel`).
    Compare LPLD's ``2C + 25`` per image and epoch plus ~3 KB per batch file (docs/label-store.md,
    Size of a store).
    """
    b = min(batch_size, num_images)
    full = num_images // b
    tail = num_images - full * b
    tail = tail if tail > 1 else 0
    per_image = 2 * num_classes + 8 + 1 + 4 + (2 if mix != "none" else 0)
    per_batch = 8 + (4 if mix != "none" else 0) + (8 if mix == "cutmix" else 0)
    if prune in (None, 1):
        batches, images, files = epochs * (full + (1 if tail else 0)), epochs * (full * b + tail), epochs
    else:
        batches = kept_units(epochs * full, int(prune))
        images, files = batches * b, -(-batches // full)
    return {"batches": batches, "image_views": images, "files": files,
            "bytes": images * per_image + batches * per_batch + files * 4}
