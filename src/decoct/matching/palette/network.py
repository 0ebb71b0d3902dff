"""AutoPalette's palette network and the soft / hard palette quantisation it drives.

The network (ColorCNN-style, docs/methods/autopalette.md, What it does) is a per-pixel MLP: a 1x1
conv ``C -> 256`` with bias, ReLU, a 1x1 conv ``256 -> K`` without bias, softmax over the K colours.
It only decides *which bucket* each pixel goes to; the palette itself is never a parameter, it is
the mean of each image's own pixels in that bucket (same page):

* soft (training): ``P_k = sum_ij m_k(ij) x(ij) / (sum_ij m_k(ij) + 1e-8)``, image
  ``b(ij) = sum_k m_k(ij) P_k``. A relaxation, not straight-through: gradients reach the
  network through ``m`` and the pixels through ``m`` and ``P``.
* hard (storage / evaluation): ``h(ij) = argmax_k m_k(ij)``, ``P_k`` = mean of the pixels with
  ``h = k`` (0 for an empty bucket), image ``b(ij) = P_{h(ij)}``: at most K colours.

The assignment ``m`` is computed from one tensor (what the network sees: the training-space
image, ZCA-whitened when ZCA is on) and the palette from another (``pixels``), which lets the
ZCA case keep the K-colour property in pixel space (see :mod:`decoct.matching.palette.palette_param`).

The two 1x1 convs are held as ``nn.Conv2d`` (so the state dict reads like ColorCNN's) but run as
matrix products on channels-last pixels, which is the same arithmetic and faster on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-8
"""The guard of the palette's denominator (the code's value); an empty bucket gives colour 0."""


class PaletteNet(nn.Module):
    """Per-pixel colour-bucket classifier: ``(B, C, H, W) -> m (B, K, H, W)``, softmax over K."""

    def __init__(self, channels: int = 3, colors: int = 64, hidden: int = 256, soften: float = 1.0) -> None:
        super().__init__()
        if channels < 1 or hidden < 1:
            raise ValueError(f"channels and hidden must be >= 1, got {channels}, {hidden}")
        if not 2 <= colors <= 256:
            raise ValueError(f"colors (K) must be in 2..256, got {colors}")
        if soften <= 0:
            raise ValueError(f"soften must be > 0, got {soften}")
        self.channels, self.colors, self.soften = channels, colors, float(soften)
        self.conv1 = nn.Conv2d(channels, hidden, 1)
        self.conv2 = nn.Conv2d(hidden, colors, 1, bias=False)

    def logits(self, x: Tensor) -> Tensor:
        """Per-pixel scores, channels-last: (B, H, W, K)."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"expected (B, {self.channels}, H, W) images, got {tuple(x.shape)}")
        h = x.permute(0, 2, 3, 1)
        h = F.relu(F.linear(h, self.conv1.weight.flatten(1), self.conv1.bias))
        return F.linear(h, self.conv2.weight.flatten(1))

    def probs(self, x: Tensor) -> Tensor:
        """Soft assignments ``m`` (B, K, H, W); each pixel's K values sum to 1."""
        return torch.softmax(self.soften * self.logits(x), dim=-1).permute(0, 3, 1, 2)

    def forward(self, x: Tensor, pixels: Tensor | None = None, hard: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Quantise ``pixels`` (default ``x``) with the buckets predicted from ``x``.

        Returns ``(image (B, C, H, W), m (B, K, H, W), palette (B, K, C))``; in hard mode the
        image is ``palette[argmax m]`` and the palette the plain bucket means.
        """
        m = self.probs(x)
        src = x if pixels is None else pixels
        if hard:
            img, _, pal = hard_quantize(src, m)
            return img, m, pal
        img, pal = soft_quantize(src, m)
        return img, m, pal


def _check(pixels: Tensor, m: Tensor) -> None:
    if pixels.dim() != 4 or m.dim() != 4 or pixels.shape[0] != m.shape[0] or pixels.shape[2:] != m.shape[2:]:
        raise ValueError(f"pixels (B, C, H, W) and m (B, K, H, W) must agree, got {tuple(pixels.shape)} "
                         f"and {tuple(m.shape)}")


def bucket_means(pixels: Tensor, weights: Tensor) -> Tensor:
    """``P_k = sum_ij w_k(ij) x(ij) / (sum_ij w_k(ij) + 1e-8)`` as (B, K, C)."""
    _check(pixels, weights)
    num = torch.einsum("bkhw,bchw->bkc", weights, pixels)
    return num / (weights.sum(dim=(2, 3)).unsqueeze(-1) + EPS)


def soft_quantize(pixels: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """Training-time palette image: ``(sum_k m_k P_k (B, C, H, W), soft palette (B, K, C))``."""
    pal = bucket_means(pixels, m)
    return torch.einsum("bkhw,bkc->bchw", m, pal), pal


def hard_quantize(pixels: Tensor, m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Storage-time palette image: ``(image, indices (B, H, W) long, palette (B, K, C))``.

    ``indices = argmax_k m`` (first maximum on ties, torch's rule); the palette is the mean of
    the pixels of each bucket, so the image has at most K distinct colours.
    """
    _check(pixels, m)
    idx = m.argmax(dim=1)
    onehot = F.one_hot(idx, m.shape[1]).permute(0, 3, 1, 2).to(pixels.dtype)
    pal = bucket_means(pixels, onehot)
    return gather_palette(idx, pal), idx, pal


def gather_palette(indices: Tensor, palette: Tensor) -> Tensor:
    """``palette (B, K, C)`` looked up at ``indices (B, H, W)`` -> image (B, C, H, W)."""
    b = torch.arange(indices.shape[0], device=indices.device).view(-1, 1, 1)
    return palette[b, indices.long()].permute(0, 3, 1, 2)


__all__ = ["EPS", "PaletteNet", "bucket_means", "gather_palette", "hard_quantize", "soft_quantize"]
