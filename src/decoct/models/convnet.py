"""The ConvNet of DC/DSA/DM/MTT: [conv3x3 -> norm -> ReLU -> avgpool2] x depth -> linear.

Instance norm is implemented as ``GroupNorm(width, width)`` (one group per channel, affine),
exactly as the matching-family papers do, so it works with any batch size and under vmap.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

NORMS = ("instance", "batch", "none")
POOLS = ("avg", "max", "none")


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; known: {', '.join(NORMS)}")


class ConvNet(nn.Module):
    """ConvNet-D{depth}, width ``width`` (128 in the papers), for square images."""

    def __init__(
        self,
        num_classes: int,
        channels: int = 3,
        image_size: int = 32,
        depth: int = 3,
        width: int = 128,
        norm: str = "instance",
        pooling: str = "avg",
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if pooling not in POOLS:
            raise ValueError(f"unknown pooling {pooling!r}; known: {', '.join(POOLS)}")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; known: {', '.join(NORMS)}")
        layers: list[nn.Module] = []
        size = image_size
        in_ch = channels
        for _ in range(depth):
            layers += [nn.Conv2d(in_ch, width, 3, padding=1), make_norm(norm, width), nn.ReLU(inplace=True)]
            if pooling == "avg":
                layers.append(nn.AvgPool2d(2, 2))
            elif pooling == "max":
                layers.append(nn.MaxPool2d(2, 2))
            if pooling != "none":
                size //= 2
            in_ch = width
        if size < 1:
            raise ValueError(f"image_size {image_size} too small for depth {depth}")
        self.features = nn.Sequential(*layers)
        self.feature_dim = width * size * size
        self.classifier = nn.Linear(self.feature_dim, num_classes)
        self.config = dict(depth=depth, width=width, norm=norm, pooling=pooling)

    def embed(self, x: Tensor) -> Tensor:
        """Penultimate features (what DM matches and coresets select in)."""
        return torch.flatten(self.features(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))


def depth_for_size(image_size: int) -> int:
    """The papers' depth rule: D3 for 32x32, D4 for 64x64, D5 for 128x128 (D2 below 32)."""
    if image_size <= 16:
        return 2
    if image_size <= 32:
        return 3
    if image_size <= 64:
        return 4
    return 5
