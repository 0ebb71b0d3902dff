"""ZCA whitening, as MTT, DATM and AutoPalette apply to CIFAR before distillation.

The references fit kornia's ``ZCAWhitening(eps=0.1, compute_inv=True)`` on the training images
**in [0, 1]** (``ToTensor`` only, no mean/std normalisation when ZCA is on): unbiased covariance,
regularised inverse square root ``W = V diag((l + eps)^-1/2) V^T``. The scale matters: eps is an
absolute floor on the eigenvalues, so on mean/std-normalised images (about 16x the variance) it
regularises far less and whitens several times more directions (CIFAR-10, std about 0.2: 25x the
variance).

decoct's pipeline hands every transform mean/std-normalised images. :meth:`ZCA.fit` therefore takes
the normalisation those inputs carry (``input_mean``, ``input_std``, per channel), maps them back to
[0, 1] pixels, fits there exactly as the references do, and folds the normalisation into the
transform: ``transform(normalise(p))`` equals kornia's ``zca(p)`` for [0, 1] pixels ``p``, and
``inverse`` returns normalised images again. ``tests/test_zca_recipe.py`` pins this to kornia on real
CIFAR-10 images.

The fit accumulates the covariance in float64 chunks, so CIFAR-size data (N=50000, D=3072) needs only
a few GB. What is stored is the eigendecomposition (float32 eigenvectors and eigenvalues, 37.8 MB for
CIFAR) rather than both D x D matrices W and W_inv (75.5 MB); both are rebuilt from it, by the same
code at fit and at load, so a loaded transform is bit-identical to the fitted one.

Stored forms (all load; each holds the transform itself, so a set is always evaluated with exactly
the transform it was distilled with):

* ``pixel_mean, evecs, evals, shape, input_mean, input_std``: fitted on [0, 1] pixels (this version).
  The mean is named ``pixel_mean`` so that an older decoct refuses the file (missing ``mean``) instead
  of applying it without the normalisation.
* ``mean, evecs, evals, shape``: fitted on the inputs as given. Files written before this version are
  of this form and were fitted on normalised images (eps regularising about 25x less than the
  references' on CIFAR); they keep working as they were made.
* ``mean, W, W_inv, shape``: decoct <= 0.1 files, also fitted on normalised images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["ZCA"]

_KEYS = ("mean", "evecs", "evals", "shape")
_PIXEL_KEYS = ("pixel_mean", "evecs", "evals", "shape", "input_mean", "input_std")
_LEGACY_KEYS = ("mean", "W", "W_inv", "shape")


class ZCA:
    """Whitening transform ``y = (x - mean) @ W`` with inverse ``x = y @ W_inv + mean``.

    ``mean``, ``W`` and ``W_inv`` act on the inputs as decoct passes them (normalised images); when the
    fit was on [0, 1] pixels they include the normalisation (``W = diag(std) W_pixels``), so applying
    the transform costs the same as before and exported ``mean``/``W`` apply to normalised images.
    """

    def __init__(self) -> None:
        self.mean: Tensor | None = None  # (D,) float32, in input units
        self.W: Tensor | None = None  # (D, D) float32; symmetric unless input_std is set
        self.W_inv: Tensor | None = None  # (D, D) float32; built lazily
        self.shape: tuple[int, ...] | None = None  # per-sample shape, e.g. (C, H, W)
        self.evecs: Tensor | None = None  # (D, D) float32, columns are eigenvectors (fit scale)
        self.evals: Tensor | None = None  # (D,) float32, regularised eigenvalues (+ eps), fit scale
        self.pixel_mean: Tensor | None = None  # (D,) float32, mean in the fit scale ([0, 1] pixels)
        self.input_mean: Tensor | None = None  # (C,) float32: inputs are (pixels - input_mean) / input_std
        self.input_std: Tensor | None = None  # (C,) float32; None: fitted on the inputs as given

    # ------------------------------------------------------------------ fitting

    @torch.no_grad()
    def fit(self, x: Tensor, eps: float = 0.1, chunk_size: int = 2048, *,
            input_mean: Sequence[float] | Tensor | None = None,
            input_std: Sequence[float] | Tensor | None = None) -> ZCA:
        """Fit on float images ``x`` (N, C, H, W); ``eps`` regularises small eigenvalues.

        The references' recipe is a fit on [0, 1] pixels. Pass the per-channel normalisation that
        ``x`` carries (``x = (pixels - input_mean) / input_std``, decoct's :func:`~decoct.data.normalize`)
        and the fit is made on ``pixels`` while :meth:`transform` still takes normalised images.
        Without them the fit is on ``x`` as given. Two passes over ``x`` in chunks of ``chunk_size``
        rows (mean, then the centred ``X^T X``), both in float64 on ``x``'s device, so memory is
        O(D^2 + chunk * D).
        """
        if not x.is_floating_point():
            raise ValueError(f"ZCA.fit expects float images, got {x.dtype}")
        if x.dim() < 2 or x.shape[0] < 2:
            raise ValueError(f"ZCA.fit needs (N, ...) with N >= 2, got shape {tuple(x.shape)}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0 (pixel covariances are near-singular), got {eps}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        shape = tuple(int(s) for s in x.shape[1:])
        in_mean, in_std = _check_norm(input_mean, input_std, shape)
        n = x.shape[0]
        flat = x.reshape(n, -1)
        d = flat.shape[1]
        scale = offset = None
        if in_std is not None:
            scale = _per_feature(in_std, shape).to(x.device, torch.float64)
            offset = _per_feature(in_mean, shape).to(x.device, torch.float64)

        def rows(start: int) -> Tensor:
            r = flat[start : start + chunk_size].double()
            return r if scale is None else r * scale + offset  # back to [0, 1] pixels

        total = torch.zeros(d, dtype=torch.float64, device=x.device)
        for start in range(0, n, chunk_size):
            total += rows(start).sum(dim=0)
        mean = total / n

        cov = torch.zeros(d, d, dtype=torch.float64, device=x.device)
        for start in range(0, n, chunk_size):
            xc = rows(start) - mean
            cov.addmm_(xc.T, xc)
        cov /= n - 1

        evals, evecs = torch.linalg.eigh(cov)
        evals = evals.clamp_min(0.0) + eps  # eigh may return tiny negatives

        self.pixel_mean = mean.float()
        self.evecs = evecs.float()
        self.evals = evals.float()
        self.input_mean, self.input_std = in_mean, in_std
        self.shape = shape
        self._build()
        return self

    @property
    def fitted_on(self) -> str:
        """``"pixels"`` (the references' [0, 1] scale) or ``"inputs"`` (the values given to fit)."""
        return "pixels" if self.input_std is not None else "inputs"

    def _build(self) -> None:
        """W = S V diag(l^-1/2) V^T and mean = (pixel_mean - m) / s from the stored eigenpairs, where
        S = diag(s) is the input normalisation (identity when fitted on the inputs); W_inv is lazy."""
        v, lam = self.evecs, self.evals
        w = (v * lam.rsqrt()) @ v.T
        if self.input_std is None:
            self.mean, self.W = self.pixel_mean, w
        else:
            s = _per_feature(self.input_std, self.shape).to(w.device)
            m = _per_feature(self.input_mean, self.shape).to(w.device)
            self.mean = (self.pixel_mean - m) / s
            self.W = s[:, None] * w
        self.W_inv = None

    def _inverse_matrix(self) -> Tensor:
        """W_inv = V diag(l^1/2) V^T S^-1 (a D^3 product, so only when :meth:`inverse` is used)."""
        if self.W_inv is None:
            v, lam = self.evecs, self.evals
            w_inv = (v * lam.sqrt()) @ v.T
            if self.input_std is not None:
                w_inv = w_inv / _per_feature(self.input_std, self.shape).to(w_inv.device)[None, :]
            self.W_inv = w_inv
        return self.W_inv

    # ------------------------------------------------------------------ applying

    def _check(self, x: Tensor) -> None:
        if self.W is None or self.shape is None:
            raise RuntimeError("ZCA is not fitted; call fit() or from_state_dict() first")
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(
                f"ZCA was fitted on images of shape {self.shape}, got {tuple(x.shape[1:])}"
            )

    def transform(self, x: Tensor) -> Tensor:
        """Whiten ``x`` (N, *shape); differentiable, computed in x's dtype on x's device."""
        self._check(x)
        mean = self.mean.to(device=x.device, dtype=x.dtype)
        w = self.W.to(device=x.device, dtype=x.dtype)
        return ((x.reshape(x.shape[0], -1) - mean) @ w).reshape(x.shape)

    def inverse(self, x: Tensor) -> Tensor:
        """Undo :meth:`transform` (e.g. to view or store ZCA-space synthetic images)."""
        self._check(x)
        mean = self.mean.to(device=x.device, dtype=x.dtype)
        w_inv = self._inverse_matrix().to(device=x.device, dtype=x.dtype)
        return (x.reshape(x.shape[0], -1) @ w_inv + mean).reshape(x.shape)

    __call__ = transform

    def to(self, device: torch.device | str) -> ZCA:
        """Move the stored matrices to ``device`` once, instead of on every call."""
        if self.W is not None:
            self.mean = self.mean.to(device)
            self.W = self.W.to(device)
            self.W_inv = None if self.W_inv is None else self.W_inv.to(device)
        for name in ("evecs", "evals", "pixel_mean", "input_mean", "input_std"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        return self

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only (safetensors / ``weights_only`` friendly); ``shape`` as int64.

        Fitted on pixels: ``pixel_mean, evecs, evals, shape, input_mean, input_std``; fitted on
        the inputs as given: ``mean, evecs, evals, shape``; loaded from a legacy file: its form.
        """
        if self.W is None or self.shape is None:
            raise RuntimeError("ZCA is not fitted; nothing to save")
        shape = torch.tensor(self.shape, dtype=torch.int64)
        if self.evecs is None:  # loaded from a legacy W / W_inv file: keep that form
            return {"mean": self.mean.detach().cpu(), "W": self.W.detach().cpu(),
                    "W_inv": self.W_inv.detach().cpu(), "shape": shape}
        out = {"evecs": self.evecs.detach().cpu().contiguous(), "evals": self.evals.detach().cpu(), "shape": shape}
        if self.input_std is None:
            return {"mean": self.pixel_mean.detach().cpu(), **out}
        return {"pixel_mean": self.pixel_mean.detach().cpu(), **out,
                "input_mean": self.input_mean.detach().cpu(), "input_std": self.input_std.detach().cpu()}

    @classmethod
    def from_state_dict(cls, d: dict[str, Tensor]) -> ZCA:
        """Rebuild a fitted ZCA from :meth:`state_dict` output (any of the three stored forms)."""
        pixels = "pixel_mean" in d
        legacy = not pixels and all(k in d for k in _LEGACY_KEYS) and "evecs" not in d
        want = _PIXEL_KEYS if pixels else _KEYS
        missing = [k for k in want if k not in d]
        if missing and not legacy:
            raise KeyError(f"ZCA state_dict is missing {missing}; expected keys {list(want)}")
        z = cls()
        z.shape = tuple(int(s) for s in d["shape"].tolist())
        if legacy:
            z.mean = d["mean"].float().reshape(-1)
            z.W = d["W"].float()
            z.W_inv = d["W_inv"].float()
        else:
            z.pixel_mean = d["pixel_mean" if pixels else "mean"].float().reshape(-1)
            if pixels:
                z.input_mean, z.input_std = _check_norm(d["input_mean"], d["input_std"], z.shape)
            z.evecs = d["evecs"].float()
            z.evals = d["evals"].float().reshape(-1)
            if z.evecs.dim() != 2 or z.evecs.shape[0] != z.evecs.shape[1] or z.evals.numel() != z.evecs.shape[0]:
                raise ValueError(f"inconsistent ZCA state: evecs {tuple(z.evecs.shape)}, evals {tuple(z.evals.shape)}")
            if bool((z.evals <= 0).any()):
                raise ValueError("inconsistent ZCA state: eigenvalues must be > 0 (they include eps)")
            if z.pixel_mean.numel() != z.evals.numel():
                raise ValueError(f"inconsistent ZCA state: mean {tuple(z.pixel_mean.shape)}, "
                                 f"evecs {tuple(z.evecs.shape)}")
            z._build()
        dim = z.mean.numel()
        expected = 1
        for s in z.shape:
            expected *= s
        w_inv_shape = z.W_inv.shape if z.W_inv is not None else (dim, dim)
        if dim != expected or z.W.shape != (dim, dim) or w_inv_shape != (dim, dim):
            raise ValueError(
                f"inconsistent ZCA state: shape {z.shape}, mean {tuple(z.mean.shape)}, "
                f"W {tuple(z.W.shape)}, W_inv {tuple(w_inv_shape)}"
            )
        return z


def _check_norm(mean: Sequence[float] | Tensor | None, std: Sequence[float] | Tensor | None,
                shape: tuple[int, ...]) -> tuple[Tensor | None, Tensor | None]:
    """Per-channel input normalisation as two float32 (C,) tensors, or (None, None) for none."""
    if mean is None and std is None:
        return None, None
    if mean is None or std is None:
        raise ValueError("ZCA input normalisation needs both input_mean and input_std (or neither)")
    m = torch.as_tensor(mean, dtype=torch.float32).detach().cpu().reshape(-1)
    s = torch.as_tensor(std, dtype=torch.float32).detach().cpu().reshape(-1)
    channels = shape[0] if shape else 0
    if len(shape) < 2 or m.numel() != channels or s.numel() != channels:
        raise ValueError(f"ZCA input normalisation is per channel: images {shape} need {channels} means and "
                         f"stds, got {m.numel()} and {s.numel()}")
    if not bool(torch.isfinite(m).all()) or not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
        raise ValueError(f"ZCA input_std must be finite and > 0 and input_mean finite, got {m.tolist()}, "
                         f"{s.tolist()}")
    return m, s


def _per_feature(v: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A per-channel (C,) vector expanded to the flattened (C*H*W,) feature order."""
    spatial = 1
    for k in shape[1:]:
        spatial *= k
    return v.float().repeat_interleave(spatial)
