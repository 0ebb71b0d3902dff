"""A small MLP, for unit tests and the 8x8 digits default."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MLP(nn.Module):
    def __init__(self, num_classes: int, channels: int = 3, image_size: int = 32, width: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(channels * image_size * image_size, width),
            nn.ReLU(inplace=True),
            nn.Linear(width, width),
            nn.ReLU(inplace=True),
        )
        self.feature_dim = width
        self.classifier = nn.Linear(width, num_classes)
        self.config = dict(width=width)

    def embed(self, x: Tensor) -> Tensor:
        return self.body(torch.flatten(x, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))
