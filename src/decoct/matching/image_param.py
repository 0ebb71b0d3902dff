"""Parameterisations of synthetic images: what DM and TM optimise.

docs/methods/autopalette.md, What it does: AutoPalette is a parameterisation, not a method. DM and
TM only talk to an :class:`ImageParam`; plain pixels (:class:`PixelParam`) and palette images
(``decoct.matching.palette.PaletteParam``) implement the same interface, so ``--palette K`` on
either method is one switch.

The interface::

    param.labels                       (N,) long, class of every synthetic image (class-grouped order)
    param.num_images                   N
    param(idx=None) -> Tensor          training-time images (N|len(idx), C, H, W) in the *training
                                       space* (normalised, ZCA-whitened when param.zca is set);
                                       differentiable w.r.t. every parameter
    param.optimizers(...) -> dict      name -> torch optimiser (e.g. {"images": ..., "palette": ...})
    param.aux_loss(generator) -> (Tensor | None, dict)
                                       extra terms after the task loss (AutoPalette's L_m, L_b, L_a);
                                       None for plain pixels
    param.to_set(info, **kw) -> DistilledSet
                                       the set exactly as it will be stored (uint8 / palette PNGs)
    param.state_dict() / load_state_dict()    (nn.Module's)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from decoct.augment import ZCA
from decoct.data import DatasetInfo
from decoct.formats.artifact import DistilledSet


class ImageParam(nn.Module):
    """Base class: holds labels and the optional ZCA; subclasses define ``forward``."""

    def __init__(self, labels: Tensor, zca: ZCA | None = None) -> None:
        super().__init__()
        self.register_buffer("labels", labels.long().clone())
        self.zca = zca

    @property
    def num_images(self) -> int:
        return int(self.labels.shape[0])

    def class_index(self, c: int) -> Tensor:
        """Indices of class ``c``'s synthetic images."""
        return (self.labels == c).nonzero().flatten()

    def aux_loss(self, generator: torch.Generator | None = None) -> tuple[Tensor | None, dict[str, float]]:
        return None, {}

    def to_set(self, info: DatasetInfo, **kwargs: Any) -> DistilledSet:  # pragma: no cover - abstract
        raise NotImplementedError


class PixelParam(ImageParam):
    """Free float pixels in the training space (the classic DC/DM/MTT parameterisation)."""

    def __init__(self, init: Tensor, labels: Tensor, zca: ZCA | None = None) -> None:
        super().__init__(labels, zca)
        if init.dim() != 4 or init.shape[0] != labels.shape[0]:
            raise ValueError(f"init must be (N, C, H, W) with N = len(labels), got {tuple(init.shape)}")
        self.images = nn.Parameter(init.detach().float().clone())

    def forward(self, idx: Tensor | None = None) -> Tensor:
        return self.images if idx is None else self.images[idx]

    def optimizers(self, lr_img: float, momentum: float = 0.5, **_: Any) -> dict[str, torch.optim.Optimizer]:
        return {"images": torch.optim.SGD([self.images], lr=lr_img, momentum=momentum)}

    def pixel_space(self) -> Tensor:
        """Normalised-space images (ZCA undone), detached, on the CPU."""
        x = self.images.detach()
        if self.zca is not None:
            x = self.zca.inverse(x)
        return x.cpu()

    def to_set(self, info: DatasetInfo, **kwargs: Any) -> DistilledSet:
        """8-bit PNGs of the (de-whitened) pixels; the ZCA travels as an attachment."""
        attachments = dict(kwargs.pop("attachments", {}))
        if self.zca is not None:
            attachments["zca"] = self.zca.state_dict()
        return DistilledSet.from_float(info, self.pixel_space(), self.labels.cpu(), attachments=attachments,
                                       **kwargs)


def pixel_range(info: DatasetInfo, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Per-channel (lo, hi) of normalised pixels that map to [0, 1] (for clamping)."""
    zero = torch.zeros(1, info.channels, 1, 1)
    one = torch.ones(1, info.channels, 1, 1)
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    lo, hi = (zero - mean) / std, (one - mean) / std
    return lo.to(device), hi.to(device)


__all__ = ["ImageParam", "PixelParam", "pixel_range"]
