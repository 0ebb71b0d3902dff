"""The image views a streamed split produces, one image at a time, as the references build them.

=========  ==========================================================================  ============
view       pixels (uint8, C x S x S)                                                     used by
=========  ==========================================================================  ============
``train``  RandomResizedCrop(S, scale 0.08-1, ratio 3/4-4/3) + horizontal flip (p 0.5)  BN statistics
``val``    Resize(shorter side round(S * 256 / 224)) + CenterCrop(S)                    validation
``resize`` Resize to exactly S x S (aspect ratio not kept, no crop)                     DWA real init
=========  ==========================================================================  ============

These are torchvision's ImageNet presets (``references/classification``: RandomResizedCrop + flip
for training, Resize(256) + CenterCrop(224) for evaluation) and DWA's real-image initialisation
(docs/methods/dwa.md, Recover: "resized to a fixed 224 x 224, plain resize"). Resizing is
torchvision's ``transforms.v2.functional`` (bilinear, antialiased, on uint8 tensors).

Random views draw their parameters from a generator seeded by (seed, position in the pass), not
from a process-wide random state: the same image at the same position gets the same crop in any
DataLoader worker and on any torchrun rank, so a sharded pass sees exactly the pixels a
single-process pass sees.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

VIEWS = ("train", "val", "resize")

__all__ = ["VIEWS", "apply_view", "rrc_boxes", "view_generator"]


def rrc_boxes(n: int, h: int, w: int, g: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
              ratio: tuple[float, float] = (3 / 4, 4 / 3), tries: int = 10) -> Tensor:
    """``n`` RandomResizedCrop boxes (top, left, height, width) as torchvision draws them: (n, 4) long.

    Up to ``tries`` candidates per sample (area fraction uniform in ``scale``, log aspect ratio
    uniform in ``ratio``); the first that fits is used, otherwise torchvision's fallback (the
    whole image clipped to the ratio range, centred). Vectorised over samples.
    """
    dev = g.device
    area = h * w
    s = torch.empty(n, tries, device=dev).uniform_(scale[0], scale[1], generator=g) * area
    logr = torch.empty(n, tries, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g)
    r = torch.exp(logr)
    cw = torch.round(torch.sqrt(s * r))
    ch = torch.round(torch.sqrt(s / r))
    ok = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
    u = torch.rand(n, tries, 2, device=dev, generator=g)
    top = torch.floor(u[..., 0] * (h - ch + 1).clamp(min=1))
    left = torch.floor(u[..., 1] * (w - cw + 1).clamp(min=1))
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1, device=dev))
    # fallback: centre crop with the ratio clipped to the allowed range
    in_ratio = w / h
    if in_ratio < ratio[0]:
        fw, fh = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        fh, fw = h, int(round(h * ratio[1]))
    else:
        fw, fh = w, h
    fb = torch.tensor([(h - fh) // 2, (w - fw) // 2, fh, fw], dtype=torch.float32, device=dev)
    idx = first.clamp(min=0)
    ar = torch.arange(n, device=dev)
    box = torch.stack([top[ar, idx], left[ar, idx], ch[ar, idx], cw[ar, idx]], 1)
    return torch.where((first >= 0)[:, None], box, fb[None]).long()


def view_generator(seed: int, position: int) -> torch.Generator:
    """The generator of the random view at ``position`` of a pass seeded ``seed`` (CPU)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + 104_729 * (int(position) + 1)) % (2**63 - 1))


def val_resize(size: int) -> int:
    """The shorter side before the centre crop: 256 for 224, in proportion otherwise."""
    return int(round(size * 256 / 224))


def apply_view(img: Tensor, view: str, size: int, g: torch.Generator | None = None) -> Tensor:
    """One decoded image ``img`` (uint8 C x H x W) -> the ``view`` at ``size`` (uint8 C x S x S).

    ``g`` draws the crop and flip of the ``train`` view (required there, unused otherwise).
    Raises ValueError for an unknown view.
    """
    from torchvision.transforms.v2 import functional as TF  # seconds to import: only when decoding

    h, w = img.shape[-2:]
    if view == "train":
        if g is None:
            raise ValueError("the 'train' view needs a generator (see view_generator)")
        top, left, bh, bw = rrc_boxes(1, h, w, g)[0].tolist()
        out = TF.resized_crop(img, top, left, bh, bw, [size, size], antialias=True)
        if bool(torch.rand((), generator=g) < 0.5):
            out = TF.horizontal_flip(out)
        return out
    if view == "val":
        short = val_resize(size)
        if min(h, w) != short:
            img = TF.resize(img, [short], antialias=True)
        return TF.center_crop(img, [size, size])
    if view == "resize":
        if (h, w) == (size, size):
            return img
        return TF.resize(img, [size, size], antialias=True)
    raise ValueError(f"unknown view {view!r}; known: {', '.join(VIEWS)}")
