"""Plain containers for datasets: whole splits held as uint8 tensors, plus their metadata."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and an artifact need to know about a dataset (no pixels)."""

    name: str
    classes: tuple[str, ...]
    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["classes"] = list(self.classes)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DatasetInfo:
        return cls(
            name=str(d["name"]),
            classes=tuple(d["classes"]),
            channels=int(d["channels"]),
            height=int(d["height"]),
            width=int(d["width"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
        )


@dataclass
class ImageSplit:
    """One split: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,)."""

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dim() != 1 or len(self.labels) != len(self.images):
            raise ValueError(
                f"labels must be (N,) with N={len(self.images)}, got {tuple(self.labels.shape)}"
            )
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def class_indices(self, c: int) -> Tensor:
        """Indices of the images of class ``c`` (in split order)."""
        return torch.nonzero(self.labels == c, as_tuple=False).flatten()

    def class_counts(self, num_classes: int) -> Tensor:
        return torch.bincount(self.labels, minlength=num_classes)

    def subset(self, idx: Tensor) -> ImageSplit:
        return ImageSplit(self.images[idx], self.labels[idx])


@dataclass
class Dataset:
    """A dataset: its metadata and its train and test splits.

    ``source`` is how :func:`decoct.data.load_dataset` found it (``{"registry": name, "root":
    absolute path or None[, "options": {...}]}``); sets and teachers record it so later commands
    find the same data again (:mod:`decoct.data.provenance`). None for a dataset built by hand.
    ``train``/``test`` are :class:`ImageSplit` or, for a streamed dataset, :class:`decoct.data.stream.StreamSplit`.
    """

    info: DatasetInfo
    train: ImageSplit
    test: ImageSplit
    source: dict | None = None
    subset_of: tuple[int, ...] | None = None
    """For a class subset of a larger tree: each class's index among the tree's sorted classes
    (what a 1000-way ImageNet classifier's output rows are indexed by)."""


def normalize(images: Tensor, info: DatasetInfo, device: torch.device | str | None = None) -> Tensor:
    """uint8 (N,C,H,W) -> float32 normalised with the dataset's mean/std, on ``device``."""
    x = images.to(device=device) if device is not None else images
    x = x.float().div_(255.0)
    mean = torch.tensor(info.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def denormalize(x: Tensor, info: DatasetInfo) -> Tensor:
    """Inverse of :func:`normalize`, to float in [0, 1] (not clamped)."""
    mean = torch.tensor(info.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=x.device).view(1, -1, 1, 1)
    return x * std + mean


def to_uint8(x: Tensor, info: DatasetInfo) -> Tensor:
    """Normalised float images -> uint8 (rounded, clamped): what an 8-bit PNG stores."""
    return denormalize(x.detach(), info).clamp(0, 1).mul(255).round().to(torch.uint8)
