"""ResNets: torchvision's ResNet-18/50 with a CIFAR stem or the ImageNet stem, and ResNet-18-AP.

The CIFAR stem (3x3 stride-1 conv, no max-pool) is what SRe2L/DWA/LPLD use for 32x32 and
64x64 data; the ImageNet stem is torchvision's unchanged. ResNet-18-AP (DC's cross-architecture
net) replaces strided convolutions with stride-1 convolutions followed by 2x2 average pooling.
"""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor, nn

from decoct.models.convnet import make_norm

STEMS = ("auto", "cifar", "imagenet")


def _resolve_stem(stem: str, image_size: int) -> str:
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; known: {', '.join(STEMS)}")
    if stem == "auto":
        return "cifar" if image_size <= 64 else "imagenet"
    return stem


class TorchvisionResNet(nn.Module):
    """Wraps a torchvision ResNet, exposing ``embed`` (pooled features) like every decoct model."""

    def __init__(self, arch: str, num_classes: int, channels: int, image_size: int, stem: str) -> None:
        super().__init__()
        factory = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50}[arch]
        net = factory(weights=None, num_classes=num_classes)
        stem = _resolve_stem(stem, image_size)
        if stem == "cifar":
            net.conv1 = nn.Conv2d(channels, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        elif channels != 3:
            net.conv1 = nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
        self.net = net
        self.feature_dim = net.fc.in_features
        self.config = dict(arch=arch, stem=stem)

    def embed(self, x: Tensor) -> Tensor:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        return torch.flatten(n.avgpool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.net.fc(self.embed(x))


class _BlockAP(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False)
        self.bn1 = make_norm(norm, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = make_norm(norm, out_ch)
        self.pool = nn.AvgPool2d(2, 2) if stride != 1 else nn.Identity()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, 1, bias=False),
                nn.AvgPool2d(2, 2) if stride != 1 else nn.Identity(),
                make_norm(norm, out_ch),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.pool(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetAP(nn.Module):
    """ResNet-18-AP (DC's ``ResNet18AP``): average pooling in place of strides."""

    def __init__(self, num_classes: int, channels: int = 3, image_size: int = 32, norm: str = "instance") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 64, 3, 1, 1, bias=False)
        self.bn1 = make_norm(norm, 64)
        blocks: list[nn.Module] = []
        in_ch = 64
        for out_ch, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            blocks += [_BlockAP(in_ch, out_ch, stride, norm), _BlockAP(out_ch, out_ch, 1, norm)]
            in_ch = out_ch
        self.layers = nn.Sequential(*blocks)
        self.feature_dim = 512
        self.classifier = nn.Linear(512, num_classes)
        self.config = dict(norm=norm)

    def embed(self, x: Tensor) -> Tensor:
        x = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))
