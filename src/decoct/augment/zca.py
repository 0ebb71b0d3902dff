"""ZCA whitening, as MTT/TM apply to CIFAR before distillation.

Matches the kornia ``ZCAWhitening(eps=0.1, compute_inv=True)`` recipe the trajectory-matching
papers use: fit on *normalised* training images, unbiased covariance, regularised inverse
square root. The fit accumulates the covariance in float64 chunks so that CIFAR-size data
(N=50000, D=3072) needs only a few GB. What is stored is the eigendecomposition (float32
eigenvectors and eigenvalues, 37.8 MB for CIFAR) rather than both D x D matrices W and W_inv
(75.5 MB); both are rebuilt from it, by the same code at fit and at load, so a loaded
transform is bit-identical to the fitted one. Files holding W / W_inv (decoct <= 0.1 runs)
still load.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ZCA"]

_KEYS = ("mean", "evecs", "evals", "shape")
_LEGACY_KEYS = ("mean", "W", "W_inv", "shape")


class ZCA:
    """Whitening transform ``y = (x - mean) @ W`` with inverse ``x = y @ W_inv + mean``."""

    def __init__(self) -> None:
        self.mean: Tensor | None = None  # (D,) float32
        self.W: Tensor | None = None  # (D, D) float32, symmetric
        self.W_inv: Tensor | None = None  # (D, D) float32, symmetric; built lazily
        self.shape: tuple[int, ...] | None = None  # per-sample shape, e.g. (C, H, W)
        self.evecs: Tensor | None = None  # (D, D) float32, columns are eigenvectors
        self.evals: Tensor | None = None  # (D,) float32, regularised eigenvalues (+ eps)

    # ------------------------------------------------------------------ fitting

    @torch.no_grad()
    def fit(self, x: Tensor, eps: float = 0.1, chunk_size: int = 2048) -> ZCA:
        """Fit on float images ``x`` (N, C, H, W); ``eps`` regularises tiny eigenvalues.

        Two passes over ``x`` in chunks of ``chunk_size`` rows (mean, then the centred
        ``X^T X``), both in float64 on ``x``'s device, so memory is O(D^2 + chunk * D).
        """
        if not x.is_floating_point():
            raise ValueError(f"ZCA.fit expects float (normalised) images, got {x.dtype}")
        if x.dim() < 2 or x.shape[0] < 2:
            raise ValueError(f"ZCA.fit needs (N, ...) with N >= 2, got shape {tuple(x.shape)}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0 (pixel covariances are near-singular), got {eps}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        n = x.shape[0]
        flat = x.reshape(n, -1)
        d = flat.shape[1]

        total = torch.zeros(d, dtype=torch.float64, device=x.device)
        for start in range(0, n, chunk_size):
            total += flat[start : start + chunk_size].double().sum(dim=0)
        mean = total / n

        cov = torch.zeros(d, d, dtype=torch.float64, device=x.device)
        for start in range(0, n, chunk_size):
            xc = flat[start : start + chunk_size].double() - mean
            cov.addmm_(xc.T, xc)
        cov /= n - 1

        evals, evecs = torch.linalg.eigh(cov)
        evals = evals.clamp_min(0.0) + eps  # eigh may return tiny negatives

        self.mean = mean.float()
        self.evecs = evecs.float()
        self.evals = evals.float()
        self.shape = tuple(int(s) for s in x.shape[1:])
        self._build()
        return self

    def _build(self) -> None:
        """W = V diag(l^-1/2) V^T from the stored eigenpairs; W_inv is built on first use."""
        v, lam = self.evecs, self.evals
        self.W = (v * lam.rsqrt()) @ v.T
        self.W_inv = None

    def _inverse_matrix(self) -> Tensor:
        """W_inv = V diag(l^1/2) V^T (a D^3 product, so only when :meth:`inverse` is used)."""
        if self.W_inv is None:
            v, lam = self.evecs, self.evals
            self.W_inv = (v * lam.sqrt()) @ v.T
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
        if self.evecs is not None:
            self.evecs = self.evecs.to(device)
            self.evals = self.evals.to(device)
        return self

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only (safetensors / ``weights_only`` friendly); ``shape`` as int64."""
        if self.W is None or self.shape is None:
            raise RuntimeError("ZCA is not fitted; nothing to save")
        if self.evecs is None:  # loaded from a legacy W / W_inv file: keep that form
            return {"mean": self.mean.detach().cpu(), "W": self.W.detach().cpu(),
                    "W_inv": self.W_inv.detach().cpu(), "shape": torch.tensor(self.shape, dtype=torch.int64)}
        return {
            "mean": self.mean.detach().cpu(),
            "evecs": self.evecs.detach().cpu().contiguous(),
            "evals": self.evals.detach().cpu(),
            "shape": torch.tensor(self.shape, dtype=torch.int64),
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, Tensor]) -> ZCA:
        """Rebuild a fitted ZCA from :meth:`state_dict` output."""
        legacy = all(k in d for k in _LEGACY_KEYS) and "evecs" not in d
        missing = [k for k in _KEYS if k not in d]
        if missing and not legacy:
            raise KeyError(f"ZCA state_dict is missing {missing}; expected keys {list(_KEYS)}")
        z = cls()
        z.shape = tuple(int(s) for s in d["shape"].tolist())
        z.mean = d["mean"].float().reshape(-1)
        if legacy:
            z.W = d["W"].float()
            z.W_inv = d["W_inv"].float()
        else:
            z.evecs = d["evecs"].float()
            z.evals = d["evals"].float().reshape(-1)
            if z.evecs.dim() != 2 or z.evecs.shape[0] != z.evecs.shape[1] or z.evals.numel() != z.evecs.shape[0]:
                raise ValueError(f"inconsistent ZCA state: evecs {tuple(z.evecs.shape)}, evals {tuple(z.evals.shape)}")
            if bool((z.evals <= 0).any()):
                raise ValueError("inconsistent ZCA state: eigenvalues must be > 0 (they include eps)")
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
