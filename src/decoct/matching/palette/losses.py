"""AutoPalette's auxiliary losses on the palette network's soft assignments ``m`` (B, K, H, W).

All are minimised; docs/methods/autopalette.md (What it does; Where decoct departs from the paper or
the released code) fixes the forms:

* :func:`max_color_loss` ``L_m`` (paper Eq. 6): ``-mean_{b,k} max_ij m_k(ij)``: every colour
  should win at least one pixel (no dead palette entries).
* :func:`balance_loss` ``L_b``: the *code's* form, ``-mean_b H(q_b)`` with ``q_b = mean_ij m(ij)``
  the colour-usage histogram and ``H`` the natural-log entropy (the paper's Eq. 7 adds a spatial
  softmax that the released code does not have). Pixels spread evenly over the buckets.
* :func:`alignment_loss` ``L_a`` (paper Eq. 12 in the code's form): on a random 30 % of each image's
  pixels, the column-L2-normalised Gram matrices ``A = F^T F`` of ``m`` and ``A' = F'^T F'`` of the
  one-hot target buckets (median cut of the same image), loss ``mean_b ||A - A'||_F^2 / n``. It
  only compares which pixels share a bucket, so it is blind to the order of the colour indices.
* :func:`confidence_loss`: mean per-pixel entropy of ``m`` (code only, not in the paper; weight 0 by
  default as in the authors' own commands).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LOG_EPS = 1e-16
"""Added inside the logarithms, as the code does, so ``0 log 0`` evaluates to 0."""


def _check_m(m: Tensor) -> None:
    if m.dim() != 4:
        raise ValueError(f"m must be (B, K, H, W) soft assignments, got shape {tuple(m.shape)}")


def max_color_loss(m: Tensor) -> Tensor:
    """``L_m = -mean over images and colours of the largest probability over pixels``."""
    _check_m(m)
    return -m.amax(dim=(2, 3)).mean()


def balance_loss(m: Tensor) -> Tensor:
    """``L_b = mean_b sum_k q_k log(q_k + 1e-16)`` (= minus the entropy of the usage histogram)."""
    _check_m(m)
    q = m.mean(dim=(2, 3))
    return (q * torch.log(q + LOG_EPS)).sum(dim=1).mean()


def confidence_loss(m: Tensor) -> Tensor:
    """Mean per-pixel entropy ``-sum_k m_k log(m_k + 1e-16)``: pushes assignments to one-hot."""
    _check_m(m)
    return -(m * torch.log(m + LOG_EPS)).sum(dim=1).mean()


def sample_pixels(batch: int, pixels: int, ratio: float, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> Tensor:
    """``floor(ratio * pixels)`` distinct flat pixel positions per image, (B, n) long.

    A fresh draw per image, as the code does; drawn on ``generator``'s device (the CPU when
    None, so a CPU generator can drive CUDA runs too) and moved to ``device``.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"sample ratio must be in (0, 1], got {ratio}")
    n = int(math.floor(pixels * ratio))
    if n < 1:
        raise ValueError(f"sample ratio {ratio} keeps no pixel of {pixels}")
    gdev = generator.device if generator is not None else torch.device("cpu")
    keys = torch.rand(batch, pixels, generator=generator, device=gdev)
    return keys.argsort(dim=1)[:, :n].to(device)


def alignment_loss(m: Tensor, target: Tensor, sample_ratio: float = 0.3,
                   generator: torch.Generator | None = None, sample: Tensor | None = None) -> Tensor:
    """``L_a``: pairwise bucket-sharing structure of ``m`` against a reference quantiser's.

    ``target``: the reference buckets, either indices (B, H, W) (any integer dtype, values < K)
    or one-hot / soft maps (B, K', H, W). ``sample`` (B, n) fixes the pixel positions (tests);
    otherwise :func:`sample_pixels` draws ``floor(sample_ratio * H * W)`` per image.
    """
    _check_m(m)
    b, k, h, w = m.shape
    if target.dim() == 3:
        if target.shape != (b, h, w):
            raise ValueError(f"target indices must be ({b}, {h}, {w}), got {tuple(target.shape)}")
        tgt = F.one_hot(target.long(), k).permute(0, 3, 1, 2).to(m.dtype)
    elif target.dim() == 4 and target.shape[0] == b and target.shape[2:] == (h, w):
        tgt = target.to(m.dtype)
    else:
        raise ValueError(f"target must be (B, H, W) indices or (B, K, H, W) maps, got {tuple(target.shape)}")
    if sample is None:
        sample = sample_pixels(b, h * w, sample_ratio, generator, m.device)
    if sample.dim() != 2 or sample.shape[0] != b:
        raise ValueError(f"sample must be (B, n) pixel positions, got {tuple(sample.shape)}")
    n = sample.shape[1]
    f = m.flatten(2).gather(2, sample.unsqueeze(1).expand(b, k, n))
    ft = tgt.flatten(2).gather(2, sample.unsqueeze(1).expand(b, tgt.shape[1], n))
    a = F.normalize(f.transpose(1, 2) @ f, p=2, dim=1)
    at = F.normalize(ft.transpose(1, 2) @ ft, p=2, dim=1)
    return ((a - at) ** 2).sum(dim=(1, 2)).div(n).mean()


__all__ = ["LOG_EPS", "alignment_loss", "balance_loss", "confidence_loss", "max_color_loss", "sample_pixels"]
