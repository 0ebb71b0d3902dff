"""Recorded augmentation for FKD-style label stores: draw the parameters, store them, replay them.

A *view* of a batch is fully described by a small :class:`ViewRecord`: per image a crop box
(top, left, height, width in source pixels) and a horizontal-flip flag, and per batch an optional
mix (CutMix or Mixup: a permutation of the batch, lambda and, for CutMix, one box). Relabel draws a
record, applies it, runs the teacher and stores record + logits; the student later applies the very
same record (:func:`apply_views`), so it sees bit-identical inputs to the ones the teacher saw.

Order of operations follows SRe2L / LPLD relabel (docs/label-store.md, What a view is): crop ->
resize back to the full resolution (bilinear) -> horizontal flip -> normalise -> mix on the
normalised batch. We normalise *first*: bilinear interpolation has weights that sum to one and
normalisation is a per-channel affine map, so the two commute (up to float rounding), and the
padding fill of a padded crop is the normalised black pixel, exactly what torchvision's zero padding
gives.

Crop kinds (:class:`ViewRecipe`):

* ``rrc`` -- RandomResizedCrop with torchvision's sampling rule (10 tries of area ~ U(scale) and
  log-aspect ~ U(log ratio), then the central fallback), drawn per image (LPLD/SRe2L relabel:
  scale (0.08, 1) for ImageNet and Tiny-ImageNet).
* ``pad`` -- RandomCrop(H, padding=p) with zero (black) padding (SRe2L/DWA CIFAR recipe, p=4 at
  32x32): a full-size box whose top/left lie in [-p, p].
* ``none`` -- the whole image.

``shuffle`` = f > 1 (RDED's ImageNet student, factor 2; live teacher only) first cuts each source
image into f column strips and f row strips (the last one takes the remainder) and puts them in a
random order per image (RDED ``ShufflePatches``: f!^2 layouts), then crops. It is a re-indexing
of source rows and columns, composed into the crop's gathers, so it costs nothing.

Boxes are stored as integer pixels (not the fractions of the reference format), so replay never
suffers the off-by-one-pixel round trip of float boxes that docs/label-store.md, Where decoct
departs from the reference format, notes. The resize is implemented with two gathers (rows, then
columns), vectorised over the batch and deterministic on CPU and CUDA; it matches
``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` of each crop to float
rounding. Crops are never larger than the output, so anti-aliasing never applies.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CROPS",
    "MIXES",
    "PARTNERS",
    "ViewRecipe",
    "ViewRecord",
    "apply_views",
    "cutmix_box",
    "draw_views",
    "seeded_generator",
    "cell_spans",
    "strip_map",
]

CROPS = ("rrc", "pad", "none")
MIXES = ("none", "cutmix", "mixup")
PARTNERS = ("perm", "roll")
_MAX_SIDE = 32767  # boxes are stored as int16


@dataclass(frozen=True)
class ViewRecipe:
    """How views are drawn: crop kind and range, flip probability, batch-level mix.

    ``partner`` is the image each one is mixed with: ``perm``, a random permutation of the batch
    (SRe2L/LPLD relabel, SRe2L's and DWA's ImageNet ``train_KD``, DWA's CIFAR mixup; an image can
    be its own partner), or ``roll``, the previous image of the batch (``batch.roll(1, 0)``:
    torchvision's reference ``RandomCutmix``/``RandomMixup``, which DWA's Tiny-ImageNet validation uses).
    """

    crop: str = "rrc"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    padding: int = 4
    flip: float = 0.5
    mix: str = "none"
    mix_alpha: float = 1.0
    partner: str = "perm"
    shuffle: int = 1

    def __post_init__(self) -> None:
        if int(self.shuffle) != self.shuffle or not 1 <= self.shuffle <= 8:
            raise ValueError(f"shuffle (patch-strip factor) must be an integer in 1..8, got {self.shuffle}")
        if self.crop not in CROPS:
            raise ValueError(f"unknown crop {self.crop!r}; known: {', '.join(CROPS)}")
        if self.mix not in MIXES:
            raise ValueError(f"unknown mix {self.mix!r}; known: {', '.join(MIXES)}")
        lo, hi = (float(v) for v in self.scale)
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        rlo, rhi = (float(v) for v in self.ratio)
        if not 0.0 < rlo <= rhi:
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        if self.padding < 0:
            raise ValueError(f"padding must be >= 0, got {self.padding}")
        if not 0.0 <= self.flip <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {self.flip}")
        if self.mix != "none" and self.mix_alpha <= 0:
            raise ValueError(f"mix_alpha must be > 0, got {self.mix_alpha}")
        if self.partner not in PARTNERS:
            raise ValueError(f"unknown mix partner {self.partner!r}; known: {', '.join(PARTNERS)}")
        object.__setattr__(self, "scale", (lo, hi))
        object.__setattr__(self, "ratio", (rlo, rhi))

    def to_dict(self) -> dict:
        """The recipe as JSON-able values; ``partner`` only when it is not the default ``perm``, so
        label-store headers written before the field existed (and their bytes) are unchanged."""
        d = asdict(self)
        d["scale"], d["ratio"] = list(self.scale), list(self.ratio)
        if self.partner == "perm":
            del d["partner"]
        if self.shuffle == 1:
            del d["shuffle"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ViewRecipe:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown view recipe field(s) {sorted(unknown)}")
        d = dict(d)
        for k in ("scale", "ratio"):
            if k in d:
                d[k] = tuple(float(v) for v in d[k])
        return cls(**d)


@dataclass
class ViewRecord:
    """The parameters of one batch's views (all on the CPU unless moved).

    ``crop`` int16 (B, 4): top, left, height, width in source pixels (top/left may be negative for
    padded crops); ``flip`` bool (B,); ``perm`` int16 (B,) the partner of each image inside the
    batch (None without mix); ``lam`` float32 scalar; ``box`` int16 (4,) CutMix rows a1:a2,
    columns b1:b2 (None unless CutMix); ``strips`` int8 (B, 2, f) the order of the column strips
    (``[:, 0]``) and row strips (``[:, 1]``) of each source image (None unless ``shuffle`` > 1).
    """

    crop: Tensor
    flip: Tensor
    perm: Tensor | None = None
    lam: Tensor | None = None
    box: Tensor | None = None
    strips: Tensor | None = None

    def __len__(self) -> int:
        return int(self.crop.shape[0])


def seeded_generator(*key: int | str) -> torch.Generator:
    """A CPU generator seeded from a tuple (e.g. (seed, epoch, batch)).

    Seeding every batch from its own key makes a draw independent of which other batches were
    drawn before it: a pruned store is then exactly a prefix of the full one, a resumed relabel
    reproduces the interrupted one, and ranks of a sharded relabel need no shared RNG state.
    """
    h = hashlib.sha256(repr(tuple(key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") >> 1)


def _beta(alpha: float, generator: torch.Generator) -> float:
    """lambda ~ Beta(alpha, alpha) from a torch generator (Beta(1,1) is exactly U(0,1))."""
    if alpha == 1.0:
        return float(torch.rand((), generator=generator))
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _draw_rrc(n: int, h: int, w: int, recipe: ViewRecipe, g: torch.Generator) -> Tensor:
    """torchvision RandomResizedCrop.get_params for n images at once -> (n, 4) top, left, h, w."""
    tries = 10
    area = h * w
    target = area * (recipe.scale[0] + (recipe.scale[1] - recipe.scale[0]) * torch.rand(n, tries, generator=g,
                                                                                        dtype=torch.float64))
    lr = (math.log(recipe.ratio[0]), math.log(recipe.ratio[1]))
    aspect = torch.exp(lr[0] + (lr[1] - lr[0]) * torch.rand(n, tries, generator=g, dtype=torch.float64))
    cw = torch.round(torch.sqrt(target * aspect)).long()
    ch = torch.round(torch.sqrt(target / aspect)).long()
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = ok.long().argmax(dim=1)
    found = ok.any(dim=1)
    rows = torch.arange(n)
    ch, cw = ch[rows, first], cw[rows, first]
    # central fallback (torchvision): clamp the aspect ratio into range, crop the centre
    in_ratio = w / h
    if in_ratio < recipe.ratio[0]:
        fw, fh = w, int(round(w / recipe.ratio[0]))
    elif in_ratio > recipe.ratio[1]:
        fh, fw = h, int(round(h * recipe.ratio[1]))
    else:
        fw, fh = w, h
    ch = torch.where(found, ch, torch.full_like(ch, fh))
    cw = torch.where(found, cw, torch.full_like(cw, fw))
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    top = torch.floor(u[:, 0] * (h - ch + 1)).long()
    left = torch.floor(u[:, 1] * (w - cw + 1)).long()
    top = torch.where(found, top, (h - ch) // 2)
    left = torch.where(found, left, (w - cw) // 2)
    return torch.stack([top, left, ch, cw], dim=1)


def draw_views(n: int, height: int, width: int, recipe: ViewRecipe, generator: torch.Generator) -> ViewRecord:
    """Draw the views of one batch of ``n`` images of size ``height`` x ``width``.

    Draw order (crop, flip, mix, then the strip orders when ``shuffle`` > 1) is fixed, so the same
    generator state gives the same record, and records without shuffle are those drawn before it existed.
    """
    if n < 1:
        raise ValueError(f"a batch needs at least one image, got {n}")
    if max(height, width) > _MAX_SIDE or n > _MAX_SIDE:
        raise ValueError(f"images and batches are limited to {_MAX_SIDE} pixels / images")
    g = generator
    if recipe.crop == "rrc":
        crop = _draw_rrc(n, height, width, recipe, g)
    elif recipe.crop == "pad":
        p = recipe.padding
        off = torch.randint(-p, p + 1, (n, 2), generator=g)
        crop = torch.cat([off, torch.tensor([[height, width]]).expand(n, 2)], dim=1)
    else:
        crop = torch.tensor([[0, 0, height, width]]).expand(n, 4)
    flip = torch.rand(n, generator=g) < recipe.flip
    rec = ViewRecord(crop=crop.to(torch.int16).contiguous(), flip=flip)
    if recipe.mix != "none":
        if recipe.partner == "roll":  # out[i] mixes with x[i - 1], as batch.roll(1, 0)
            rec.perm = torch.arange(-1, n - 1).remainder(n).to(torch.int16)
        else:
            rec.perm = torch.randperm(n, generator=g).to(torch.int16)
        lam = _beta(recipe.mix_alpha, g)
        rec.lam = torch.tensor(lam, dtype=torch.float32)
        if recipe.mix == "cutmix":
            cy = int(torch.randint(0, height, (), generator=g))
            cx = int(torch.randint(0, width, (), generator=g))
            rec.box = torch.tensor(cutmix_box(height, width, float(rec.lam), cy, cx), dtype=torch.int16)
    f = recipe.shuffle
    if f > 1:
        if min(height, width) < f:
            raise ValueError(f"shuffle {f} needs images of at least {f} pixels a side, got {height}x{width}")
        rec.strips = torch.argsort(torch.rand(n, 2, f, generator=g), dim=2).to(torch.int8)
    return rec


def cell_spans(size: int, f: int) -> list[int]:
    """Lengths of the ``f`` cells an axis of ``size`` pixels is cut into: ``size // f`` each, the
    first ``size % f`` one pixel longer. One rule for RDED's stitched cells
    (:func:`decoct.decoupled.rded.stitch`) and ShufflePatches' strips (:func:`strip_map`), so that
    shuffling a stitched image moves whole patches. RDED's own ShufflePatches drops the last
    ``size % f`` pixels instead, a bug its reference notes flag."""
    if not 1 <= f <= size:
        raise ValueError(f"cannot cut {size} pixels into {f} cells")
    t, rem = divmod(size, f)
    return [t + 1 if k < rem else t for k in range(f)]


def strip_map(order: Tensor, size: int) -> Tensor:
    """Source index of every position along an axis of ``size`` pixels after its ``f`` strips
    (:func:`cell_spans`) are put in ``order`` (B, f). Returns (B, size) int64."""
    b, f = order.shape
    spans = cell_spans(size, f)
    starts = [sum(spans[:k]) for k in range(f)]
    cache: dict[tuple[int, ...], Tensor] = {}
    rows = []
    for o in order.tolist():
        key = tuple(o)
        if key not in cache:
            cache[key] = torch.cat([torch.arange(starts[k], starts[k] + spans[k]) for k in key])
        rows.append(cache[key])
    return torch.stack(rows) if rows else torch.zeros(0, size, dtype=torch.long)


def cutmix_box(height: int, width: int, lam: float, cy: int, cx: int) -> tuple[int, int, int, int]:
    """CutMix's pasted box ``(a1, b1, a2, b2)``: rows ``a1:a2``, columns ``b1:b2`` of a ``height`` x
    ``width`` image, centred at pixel (``cy``, ``cx``), for mixing weight ``lam`` in [0, 1].

    SRe2L/LPLD ``rand_bbox``: half-sides ``floor(S sqrt(1 - lam)) // 2``, clipped to the image.
    torchvision's reference ``RandomCutmix`` (DWA's Tiny-ImageNet validation) takes
    ``int(0.5 sqrt(1 - lam) S)``, which is the same integer (floor(floor(2y) / 2) = floor(y)),
    so one rule serves both. The box may be empty or smaller than ``(1 - lam)`` of the image
    when clipped; like the references, the soft-label loss does not use ``lam``.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    cut = math.sqrt(1.0 - lam)
    half_h, half_w = int(height * cut) // 2, int(width * cut) // 2
    a1, a2 = min(max(cy - half_h, 0), height), min(max(cy + half_h, 0), height)
    b1, b2 = min(max(cx - half_w, 0), width), min(max(cx + half_w, 0), width)
    return a1, b1, a2, b2


def _axis_table(start: Tensor, length: Tensor, out: int, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Bilinear source taps along one axis, as ``interpolate(align_corners=False)`` computes them.

    Returns (i0, i1, w0, w1, valid): absolute source indices (B, out) clamped into the image,
    their weights (B, out), and (2, B, out) whether each tap lies inside the image (padded crops
    read the fill value outside it).
    """
    dst = torch.arange(out, device=start.device, dtype=torch.float32)
    scale = length.to(torch.float32).unsqueeze(1) / out
    src = ((dst + 0.5) * scale - 0.5).clamp_min(0.0)
    i0 = src.floor().long()
    i0 = torch.minimum(i0, length.unsqueeze(1) - 1)
    step = (i0 < length.unsqueeze(1) - 1).long()
    lam1 = src - i0.to(src.dtype)
    a0 = start.unsqueeze(1) + i0
    a1 = a0 + step
    valid = torch.stack([(a0 >= 0) & (a0 < size), (a1 >= 0) & (a1 < size)])
    return a0.clamp(0, size - 1), a1.clamp(0, size - 1), 1.0 - lam1, lam1, valid


def apply_views(x: Tensor, record: ViewRecord, fill: Tensor | None = None) -> Tensor:
    """Apply a record to normalised images ``x`` (B, C, H, W): crop+resize, flip, then mix.

    ``fill`` (C,) is the value outside the image for padded crops (pass the normalised black
    pixel; zeros by default). Pure tensor ops, no randomness: the same inputs give the same
    output bit for bit on a given device.
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be float (B, C, H, W), got {x.dtype} {tuple(x.shape)}")
    b, c, h, w = x.shape
    if len(record) != b:
        raise ValueError(f"record describes {len(record)} images, the batch has {b}")
    dev = x.device
    t0, l0, h0, w0 = record.crop.long().unbind(1)  # checked where the record lives (CPU: no sync)
    if (h0 < 1).any() or (w0 < 1).any() or (h0 > h).any() or (w0 > w).any():
        raise ValueError("record holds a crop box larger than the image or empty")
    outside = bool(((t0 < 0) | (l0 < 0) | (t0 + h0 > h) | (l0 + w0 > w)).any())
    crop = record.crop.to(dev).long()
    top, left, ch, cw = crop.unbind(1)
    fill_v = torch.zeros(c, device=dev, dtype=x.dtype) if fill is None else fill.to(dev, x.dtype).view(c)
    fill_v = fill_v.view(1, c, 1, 1)

    r0, r1, rw0, rw1, rvalid = _axis_table(top, ch, h, h)
    q0, q1, qw0, qw1, qvalid = _axis_table(left, cw, w, w)
    if record.strips is not None:  # ShufflePatches: read each tap from where its strip came from
        order = record.strips.long()
        if order.shape[:2] != (b, 2):
            raise ValueError(f"record strips have shape {tuple(order.shape)}, need ({b}, 2, f)")
        cmap, rmap = strip_map(order[:, 0], w).to(dev), strip_map(order[:, 1], h).to(dev)
        r0, r1 = rmap.gather(1, r0), rmap.gather(1, r1)
        q0, q1 = cmap.gather(1, q0), cmap.gather(1, q1)
    flip = record.flip.to(dev).view(b, 1)
    if flip.any():
        q0, q1 = torch.where(flip, q0.flip(1), q0), torch.where(flip, q1.flip(1), q1)
        qw0, qw1 = torch.where(flip, qw0.flip(1), qw0), torch.where(flip, qw1.flip(1), qw1)
        qvalid = torch.where(flip.unsqueeze(0), qvalid.flip(2), qvalid)

    def take(src: Tensor, dim: int, idx: Tensor, valid: Tensor) -> Tensor:
        shape = [b, 1, 1, 1]
        shape[dim] = idx.shape[1]
        full = list(src.shape)
        full[dim] = idx.shape[1]
        out = torch.gather(src, dim, idx.view(shape).expand(full))
        return torch.where(valid.view(shape), out, fill_v) if outside else out

    rows = (take(x, 2, r0, rvalid[0]) * rw0.view(b, 1, h, 1).to(x.dtype)
            + take(x, 2, r1, rvalid[1]) * rw1.view(b, 1, h, 1).to(x.dtype))
    out = (take(rows, 3, q0, qvalid[0]) * qw0.view(b, 1, 1, w).to(x.dtype)
           + take(rows, 3, q1, qvalid[1]) * qw1.view(b, 1, 1, w).to(x.dtype))

    if record.perm is not None:
        perm = record.perm.to(dev).long()
        if record.box is not None:
            a1, b1, a2, b2 = (int(v) for v in record.box)
            out = out.clone()
            out[:, :, a1:a2, b1:b2] = out[perm][:, :, a1:a2, b1:b2]
        else:
            if record.lam is None:
                raise ValueError("a mixup record needs lam")
            lam = float(record.lam)
            out = lam * out + (1.0 - lam) * out[perm]
    return out
