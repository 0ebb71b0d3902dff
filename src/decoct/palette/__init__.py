"""AutoPalette (palette network, losses, colour-guided init) and classic quantisers.

Shared entry points used by DM and TM (owned by the AutoPalette work; DM/TM only call these):

* ``add_palette_args(parser)``: the ``--palette K`` family of flags on ``distill dm|tm``.
* ``effective_ipc(ipc, palette)``: the paper's storage-budget rule (images per class that fit).
* ``make_param(init, labels, zca, palette, **options) -> ImageParam``: pixels when
  ``palette == 0``, the AutoPalette parameterisation otherwise.
"""

from __future__ import annotations

import argparse
from typing import Any

from torch import Tensor

from ..augment import ZCA
from ..methods.param import ImageParam, PixelParam


def add_palette_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("AutoPalette")
    g.add_argument("--palette", type=int, default=0,
                   help="K colours per synthetic image (AutoPalette); 0 = full-colour pixels")


def effective_ipc(ipc: int, palette: int) -> int:
    if palette == 0:
        return ipc
    raise NotImplementedError("--palette is not implemented yet")


def make_param(init: Tensor, labels: Tensor, zca: ZCA | None = None, palette: int = 0,
               **options: Any) -> ImageParam:
    if palette == 0:
        return PixelParam(init, labels, zca)
    raise NotImplementedError("--palette is not implemented yet")


def init_indices(dataset: Any, ipc: int, palette: int = 0, method: str = "real", seed: int = 0,
                 device: Any = "cpu") -> Tensor:
    """Training-set indices of the real images that initialise ``ipc`` synthetic images per class.

    ``real``: uniformly random per class (seeded). ``graphcut`` (AutoPalette's colour-guided
    init) arrives with the palette work.
    """
    import torch

    if method != "real":
        raise NotImplementedError(f"init {method!r} is not implemented yet")
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in range(dataset.info.num_classes):
        idx = dataset.train.class_indices(c)
        if ipc > len(idx):
            raise ValueError(f"--ipc {ipc} asks for more images than class {c} has ({len(idx)})")
        out.append(idx[torch.randperm(len(idx), generator=g)[:ipc]])
    return torch.cat(out)
