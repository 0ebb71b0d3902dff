"""ZCA whitening, as MTT/TM apply to CIFAR before distillation.

Matches the kornia ``ZCAWhitening(eps=0.1, compute_inv=True)`` recipe the trajectory-matching
papers use: fit on *normalised* training images, unbiased covariance, regularised inverse
square root. The fit accumulates the covariance in float64 chunks so that CIFAR-size data
(N=50000, D=3072) needs only a few GB; the stored matrices are float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ZCA"]

_KEYS = ("mean", "W", "W_inv", "shape")


class ZCA:
    """Whitening transform ``y = (x - mean) @ W`` with inverse ``x = y @ W_inv + mean``."""

    def __init__(self) -> None:
        self.mean: Tensor | None = None  # (D,) float32
        self.W: Tensor | None = None  # (D, D) float32, symmetric
        self.W_inv: Tensor | None = None  # (D, D) float32, symmetric
        self.shape: tuple[int, ...] | None = None  # per-sample shape, e.g. (C, H, W)

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
        w = (evecs * evals.rsqrt()) @ evecs.T
        w_inv = (evecs * evals.sqrt()) @ evecs.T

        self.mean = mean.float()
        self.W = w.float()
        self.W_inv = w_inv.float()
        self.shape = tuple(int(s) for s in x.shape[1:])
        return self

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
        w_inv = self.W_inv.to(device=x.device, dtype=x.dtype)
        return (x.reshape(x.shape[0], -1) @ w_inv + mean).reshape(x.shape)

    __call__ = transform

    def to(self, device: torch.device | str) -> ZCA:
        """Move the stored matrices to ``device`` once, instead of on every call."""
        if self.W is not None:
            self.mean = self.mean.to(device)
            self.W = self.W.to(device)
            self.W_inv = self.W_inv.to(device)
        return self

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only (safetensors / ``weights_only`` friendly); ``shape`` as int64."""
        if self.W is None or self.shape is None:
            raise RuntimeError("ZCA is not fitted; nothing to save")
        return {
            "mean": self.mean.detach().cpu(),
            "W": self.W.detach().cpu(),
            "W_inv": self.W_inv.detach().cpu(),
            "shape": torch.tensor(self.shape, dtype=torch.int64),
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, Tensor]) -> ZCA:
        """Rebuild a fitted ZCA from :meth:`state_dict` output."""
        missing = [k for k in _KEYS if k not in d]
        if missing:
            raise KeyError(f"ZCA state_dict is missing {missing}; expected keys {list(_KEYS)}")
        z = cls()
        z.shape = tuple(int(s) for s in d["shape"].tolist())
        z.mean = d["mean"].float().reshape(-1)
        z.W = d["W"].float()
        z.W_inv = d["W_inv"].float()
        dim = z.mean.numel()
        expected = 1
        for s in z.shape:
            expected *= s
        if dim != expected or z.W.shape != (dim, dim) or z.W_inv.shape != (dim, dim):
            raise ValueError(
                f"inconsistent ZCA state: shape {z.shape}, mean {tuple(z.mean.shape)}, "
                f"W {tuple(z.W.shape)}, W_inv {tuple(z.W_inv.shape)}"
            )
        return z
