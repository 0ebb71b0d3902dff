"""Differentiable Siamese Augmentation (DSA, Zhao & Bilen 2021).

Distillation methods (DC/DSA, DM, MTT/TM) match statistics of real and synthetic batches
under augmentation; for the comparison to be meaningful both batches must see *the same*
transformation, and gradients must reach the synthetic pixels through it. Here:

* every transform is a batched tensor op (no per-sample Python loop), differentiable with
  respect to the pixel values and device agnostic;
* ``seed=int`` draws from a private CPU :class:`torch.Generator` and shares ONE draw across
  the whole batch, so two batches of different sizes augmented with the same seed receive
  an identical transform (the "siamese" property), without touching the global RNG;
* ``seed=None`` draws per-sample parameters, as used when training evaluation students.

Scale and rotate resample bilinearly through ``affine_grid``/``grid_sample``. DSA's own code
(VICO-UoE/DatasetCondensation ``utils.py``, used by DC/DSA/DM) calls both with the default
``align_corners=False`` (-1 and 1 are the outer edges of the border pixels, pixel ``i`` sits at
``(2i + 1) / W - 1``); MTT's copy of the same functions, which DATM and AutoPalette inherit, passes
``align_corners=True`` (-1 and 1 are the centres of the border pixels). In pixel units both
scale about the image centre identically; rotation couples the axes by ``W / H`` (False) or
``(W - 1) / (H - 1)`` (True), so on square images the two agree to float rounding and on non-square
ones they differ. :class:`DSAParams` defaults to DSA's ``False``; the trajectory-matching code paths
(experts, TM) use :data:`MTT_PARAMS` (``True``) as their references do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DSA", "DSAParams", "dsa", "FAMILIES", "DEFAULT_STRATEGY", "MTT_PARAMS", "parse_strategy"]

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
MODES = ("S", "M")


@dataclass(frozen=True)
class DSAParams:
    """Augmentation strengths; defaults follow the DSA paper's released settings."""

    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0  # degrees
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    align_corners: bool = False  # scale/rotate resampling: DSA's code False, MTT/DATM/AutoPalette's True

    def __post_init__(self) -> None:
        if not 0.0 <= self.prob_flip <= 1.0:
            raise ValueError(f"prob_flip must be in [0, 1], got {self.prob_flip}")
        if self.ratio_scale <= 0:
            raise ValueError(f"ratio_scale must be > 0, got {self.ratio_scale}")
        if not 0.0 <= self.ratio_crop_pad <= 1.0:
            raise ValueError(f"ratio_crop_pad must be in [0, 1], got {self.ratio_crop_pad}")
        if not 0.0 <= self.ratio_cutout <= 1.0:
            raise ValueError(f"ratio_cutout must be in [0, 1], got {self.ratio_cutout}")


MTT_PARAMS = DSAParams(align_corners=True)
"""DSA as MTT's ``utils.py`` implements it (and DATM and AutoPalette, which copy it): the same
strengths, scale and rotate resampled with ``align_corners=True``. Experts and TM use it."""


# --------------------------------------------------------------------------------------
# Random parameter source
# --------------------------------------------------------------------------------------


class _Sampler:
    """Draws augmentation parameters for a batch of ``n`` samples.

    With ``shared=True`` one value is drawn and expanded over the batch, so the number of
    values consumed from the generator does not depend on ``n`` (needed for the siamese
    property across batches of different sizes).
    """

    def __init__(
        self, n: int, device: torch.device, shared: bool, generator: torch.Generator | None
    ) -> None:
        self.n = n
        self.device = device
        self.shared = shared
        self.generator = generator

    def _draw_device(self) -> torch.device:
        return self.generator.device if self.generator is not None else self.device

    def rand(self) -> Tensor:
        """Uniform [0, 1) float32 of shape (n,) on the target device."""
        m = 1 if self.shared else self.n
        t = torch.rand(m, generator=self.generator, device=self._draw_device())
        return t.to(self.device).expand(self.n)

    def randint(self, low: int, high: int) -> Tensor:
        """Integers in [low, high) of shape (n,) on the target device."""
        m = 1 if self.shared else self.n
        t = torch.randint(low, high, (m,), generator=self.generator, device=self._draw_device())
        return t.to(self.device).expand(self.n)

    def choice(self, k: int) -> int:
        """One index in [0, k) for the whole call (family choice in mode 'S')."""
        # Without an explicit generator use the CPU global RNG: avoids a device sync.
        device = self.generator.device if self.generator is not None else torch.device("cpu")
        return int(torch.randint(0, k, (1,), generator=self.generator, device=device).item())


# --------------------------------------------------------------------------------------
# Deterministic transforms (explicit per-sample parameters, all shape (N,))
# --------------------------------------------------------------------------------------


def _col(v: Tensor, x: Tensor) -> Tensor:
    """(N,) parameters -> (N, 1, 1, 1) in x's dtype, for broadcasting over images."""
    return v.to(dtype=x.dtype).view(-1, 1, 1, 1)


def _keep_format(out: Tensor, like: Tensor) -> Tensor:
    """Return ``out`` in ``like``'s memory format (channels_last in -> channels_last out)."""
    if like.is_contiguous():
        return out.contiguous()
    if like.is_contiguous(memory_format=torch.channels_last):
        return out.contiguous(memory_format=torch.channels_last)
    return out


def _brightness(x: Tensor, delta: Tensor) -> Tensor:
    """Add a per-sample offset ``delta`` to every pixel."""
    return x + _col(delta, x)


def _saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Scale each pixel's deviation from its channel mean by ``factor``."""
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * _col(factor, x) + mean


def _contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Scale each image's deviation from its global (C, H, W) mean by ``factor``."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * _col(factor, x) + mean


def _translate(x: Tensor, dx: Tensor, dy: Tensor) -> Tensor:
    """Shift images by integer pixels with zero fill: ``out[..., i, j] = x[..., i-dy, j-dx]``.

    Positive ``dx`` moves content right, positive ``dy`` moves it down. A gather, so the
    result is differentiable with respect to the pixel values.
    """
    n, _, h, w = x.shape
    dev = x.device
    rows = torch.arange(h, device=dev).view(1, h) - dy.to(dev, torch.long).view(n, 1)
    cols = torch.arange(w, device=dev).view(1, w) - dx.to(dev, torch.long).view(n, 1)
    row_ok = (rows >= 0) & (rows < h)
    col_ok = (cols >= 0) & (cols < w)
    batch = torch.arange(n, device=dev).view(n, 1, 1)
    # Advanced indices separated by a slice: result is (N, H, W, C).
    out = x[batch, :, rows.clamp(0, h - 1).view(n, h, 1), cols.clamp(0, w - 1).view(n, 1, w)]
    mask = (row_ok.view(n, h, 1, 1) & col_ok.view(n, 1, w, 1)).to(x.dtype)
    return _keep_format((out * mask).permute(0, 3, 1, 2), x)


def _cutout(x: Tensor, cy: Tensor, cx: Tensor, size_h: int, size_w: int) -> Tensor:
    """Zero a ``size_h x size_w`` rectangle whose centre is (cy, cx), clipped at the border.

    Rows ``[cy - size_h // 2, cy - size_h // 2 + size_h)`` (same for columns) are zeroed.
    """
    n, _, h, w = x.shape
    dev = x.device
    top = cy.to(dev, torch.long).view(n, 1) - size_h // 2
    left = cx.to(dev, torch.long).view(n, 1) - size_w // 2
    r = torch.arange(h, device=dev).view(1, h)
    c = torch.arange(w, device=dev).view(1, w)
    in_rows = (r >= top) & (r < top + size_h)
    in_cols = (c >= left) & (c < left + size_w)
    hole = in_rows.view(n, 1, h, 1) & in_cols.view(n, 1, 1, w)
    return x * (~hole).to(x.dtype)


def _flip(x: Tensor, do_flip: Tensor) -> Tensor:
    """Horizontally flip the samples where ``do_flip`` (bool, (N,)) is true."""
    return torch.where(do_flip.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)


def _affine(x: Tensor, theta: Tensor, align_corners: bool = False) -> Tensor:
    """Resample ``x`` through the (N, 2, 3) affine ``theta`` (bilinear, zero padding)."""
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=align_corners)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners)


def _scale(x: Tensor, sx: Tensor, sy: Tensor, align_corners: bool = False) -> Tensor:
    """Scale the sampling grid independently along x (width) and y (height)."""
    zero = torch.zeros_like(sx)
    theta = torch.stack(
        [torch.stack([sx, zero, zero], dim=1), torch.stack([zero, sy, zero], dim=1)], dim=1
    )
    return _affine(x, theta, align_corners)


def _rotate(x: Tensor, angle: Tensor, align_corners: bool = False) -> Tensor:
    """Rotate by ``angle`` radians (per sample) about the image centre."""
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    theta = torch.stack(
        [torch.stack([cos, sin, zero], dim=1), torch.stack([-sin, cos, zero], dim=1)], dim=1
    )
    return _affine(x, theta, align_corners)


# --------------------------------------------------------------------------------------
# Random families: draw parameters, then apply the deterministic transform
# --------------------------------------------------------------------------------------


def _aug_color(x: Tensor, p: DSAParams, s: _Sampler) -> Tensor:
    x = _brightness(x, (s.rand() - 0.5) * p.brightness)
    x = _saturation(x, s.rand() * p.saturation)
    return _contrast(x, s.rand() + p.contrast)


def _aug_crop(x: Tensor, p: DSAParams, s: _Sampler) -> Tensor:
    _, _, h, w = x.shape
    max_dy = int(h * p.ratio_crop_pad + 0.5)
    max_dx = int(w * p.ratio_crop_pad + 0.5)
    dy = s.randint(-max_dy, max_dy + 1)
    dx = s.randint(-max_dx, max_dx + 1)
    return _translate(x, dx, dy)


def _aug_cutout(x: Tensor, p: DSAParams, s: _Sampler) -> Tensor:
    _, _, h, w = x.shape
    size_h = int(h * p.ratio_cutout + 0.5)
    size_w = int(w * p.ratio_cutout + 0.5)
    # Centre range chosen so the hole's position is symmetric for even and odd sizes.
    cy = s.randint(0, h + (1 - size_h % 2))
    cx = s.randint(0, w + (1 - size_w % 2))
    return _cutout(x, cy, cx, size_h, size_w)


def _aug_flip(x: Tensor, p: DSAParams, s: _Sampler) -> Tensor:
    return _flip(x, s.rand() < p.prob_flip)


def _aug_scale(x: Tensor, p: DSAParams, s: _Sampler) -> Tensor:
    lo, hi = 1.0 / p.ratio_scale, p.ratio_scale
    sx = s.rand() * (hi - lo) + lo
    sy = s.rand() * (hi - lo) + lo
    return _scale(x, sx, sy, p.align_corners)


def _aug_rotate(x: Tensor, p: DSAParams, s: _Sampler) -> Tensor:
    angle = (s.rand() - 0.5) * 2.0 * math.radians(p.ratio_rotate)
    return _rotate(x, angle, p.align_corners)


FAMILIES: dict[str, Callable[[Tensor, DSAParams, _Sampler], Tensor]] = {
    "color": _aug_color,
    "crop": _aug_crop,
    "cutout": _aug_cutout,
    "flip": _aug_flip,
    "scale": _aug_scale,
    "rotate": _aug_rotate,
}


def parse_strategy(strategy: str) -> tuple[str, ...]:
    """Split ``'color_crop_...'`` into family names; ``'none'``/``''`` -> no families.

    Raises ``ValueError`` naming an unknown family, so a typo never silently disables one.
    """
    if strategy.strip().lower() in ("", "none"):
        return ()
    names = tuple(part for part in strategy.split("_") if part)
    for name in names:
        if name not in FAMILIES:
            raise ValueError(
                f"unknown DSA family {name!r} in strategy {strategy!r}; "
                f"known families: {', '.join(FAMILIES)}"
            )
    return names


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown DSA mode {mode!r}; expected one of {MODES}")
    return mode


def _apply(
    x: Tensor,
    families: tuple[str, ...],
    params: DSAParams,
    mode: str,
    seed: int | None,
    generator: torch.Generator | None,
) -> Tensor:
    if x.dim() != 4:
        raise ValueError(f"DSA expects images (N, C, H, W), got shape {tuple(x.shape)}")
    if seed is not None and generator is not None:
        raise ValueError("pass either seed (siamese batch mode) or generator, not both")
    if not families or x.shape[0] == 0:
        return x
    if seed is not None:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(seed))
        sampler = _Sampler(x.shape[0], x.device, shared=True, generator=gen)
    else:
        sampler = _Sampler(x.shape[0], x.device, shared=False, generator=generator)
    if mode == "S":
        families = (families[sampler.choice(len(families))],)
    for name in families:
        x = FAMILIES[name](x, params, sampler)
    return x


def dsa(
    x: Tensor,
    strategy: str = DEFAULT_STRATEGY,
    seed: int | None = None,
    params: DSAParams | None = None,
    mode: str = "S",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Augment normalised images ``x`` (N, C, H, W) differentiably.

    ``seed=int``: one parameter draw shared by the whole batch from a private generator
    (same seed -> same transform on real and synthetic batches of any size; the global RNG
    is untouched). ``seed=None``: independent per-sample draws from ``generator`` (or the
    global RNG of ``x``'s device). Mode ``'S'`` applies one family chosen at random per call,
    ``'M'`` applies every family of the strategy in order.
    """
    return _apply(
        x, parse_strategy(strategy), params or DSAParams(), _check_mode(mode), seed, generator
    )


class DSA:
    """Callable DSA augmentation holding strategy, strengths and mode (trainer ``augment_fn``)."""

    def __init__(
        self,
        strategy: str = DEFAULT_STRATEGY,
        params: DSAParams | None = None,
        mode: str = "S",
    ) -> None:
        self.strategy = strategy
        self.families = parse_strategy(strategy)
        self.params = params or DSAParams()
        self.mode = _check_mode(mode)

    def __call__(
        self, x: Tensor, seed: int | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Augment ``x``; see :func:`dsa` for the meaning of ``seed`` and ``generator``."""
        return _apply(x, self.families, self.params, self.mode, seed, generator)

    def __repr__(self) -> str:
        return f"DSA(strategy={self.strategy!r}, mode={self.mode!r}, params={self.params})"
