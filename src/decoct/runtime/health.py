"""Checks that a training loop's loss and learned quantities are still valid, and the error it raises.

Why: an optimiser with too large a step does not fail, it drifts. DM with an extreme ``--lr-img``
logged ``"loss": NaN`` and then wrote a finished, all-black set; TM's learned step size went
negative (or grew 200x) and the run reported success. Every method therefore checks, each
iteration, its loss and metrics (finite), its learned tensors (finite) and method-specific bounds
(TM's step size > 0 and not absurdly large; synthetic pixels not mostly blown out), and stops at
once with a :class:`DivergedError` naming the method, the iteration, the quantity, its value and
what to change. The run is then left unfinished (no artifact, no ``DONE``), its last good
checkpoint kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

SATURATION_MARGIN = 1.0
"""A pixel counts as blown out when it lies more than this (a whole [0, 1] range) outside [0, 1]."""
SATURATION_LIMIT = 0.5
"""A synthetic set with more than this fraction of blown-out pixels has diverged (storing it clips them
all: an all-black or all-white set). Merely clipped pixels are no sign: the healthy digits DM quickstart
set (93 % accuracy) has 67 % of its pixels outside [0, 1], but none by more than 0.6, and after 1000
iterations 74 %, none by more than 0.8 (measured, see :func:`saturation`); DM at ``--lr-img 1e12`` has
100 % of them blown out after 10 iterations."""


class DivergedError(RuntimeError):
    """A loop produced a non-finite or out-of-range quantity; the run stopped without writing a result.

    A ``RuntimeError``, so the CLI prints its one-line message and exits with status 2.
    """

    def __init__(self, what: str, where: str, quantity: str, value: Any, hint: str) -> None:
        self.what, self.where, self.quantity, self.value, self.hint = what, where, quantity, value, hint
        super().__init__(f"{what} diverged at {where}: {quantity} is {_show(value)}; {hint}")

    def event(self) -> dict[str, Any]:
        """The ``log.jsonl`` record of the failure."""
        return dict(event="diverged", method=self.what, at=self.where, quantity=self.quantity,
                    value=_show(self.value), message=str(self))


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def rerun_hint(*flags: tuple[str, Any], extra: str = "") -> str:
    """``lower --lr-img (now 1000) and start over with --force``: changed settings cannot ``--resume``."""
    named = " or ".join(f"{flag} (now {_show(v)})" for flag, v in flags)
    text = f"lower {named} and start over with --force (a run with changed settings cannot --resume)"
    return f"{text}{extra}"


def check_metrics(metrics: Mapping[str, float], what: str, where: str, hint: str) -> None:
    """Raise :class:`DivergedError` for the first non-finite value among ``metrics`` (loss first)."""
    for key in sorted(metrics, key=lambda k: k != "loss"):
        v = float(metrics[key])
        if not math.isfinite(v):
            raise DivergedError(what, where, key, v, hint)


def first_nonfinite(tensors: Iterable[tuple[str, Tensor]]) -> str | None:
    """Name of the first tensor holding a NaN or inf (None when all are finite)."""
    for name, t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def check_tensors(tensors: Iterable[tuple[str, Tensor]], what: str, where: str, hint: str) -> None:
    """Raise :class:`DivergedError` when any named tensor holds a NaN or inf."""
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise DivergedError(what, where, bad, "not finite (NaN or inf)", hint)


def saturation(pixels: Tensor, mean: Iterable[float], std: Iterable[float], margin: float = SATURATION_MARGIN
               ) -> float:
    """Fraction of normalised ``pixels`` (N, C, H, W) lying more than ``margin`` outside [0, 1] in pixel units.

    Measured on digits: real images 0.0; the DM quickstart set (IPC 2, 200 iterations, lr 1) spans
    [-0.35, 1.59]: 0.67 with margin 1/255, 0.088 with 0.25, 0.002 with 0.5, 0.0 with 1.0; after 1000
    iterations [-0.46, 1.80]: 0.74, 0.32, 0.036, 0.0; DM with ``--lr-img 1e12``: 1.0 at iteration 10.
    """
    c = pixels.shape[1]
    m = torch.tensor(list(mean), dtype=torch.float32, device=pixels.device).view(1, c, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32, device=pixels.device).view(1, c, 1, 1)
    p = pixels.detach().float() * s + m
    out = (p < -margin) | (p > 1 + margin)
    return float(out.float().mean()) if out.numel() else 0.0


def check_saturation(param: Any, info: Any, what: str, where: str, hint: str,
                     limit: float = SATURATION_LIMIT) -> float:
    """Raise :class:`DivergedError` when more than ``limit`` of the synthetic pixels are blown out.

    ``param``: an ``ImageParam`` (its ``images`` are in the training space; ZCA is undone first);
    ``info``: the dataset's ``DatasetInfo`` (mean/std). Returns the saturated fraction.
    """
    with torch.no_grad():
        x = param.images.detach()
        if getattr(param, "zca", None) is not None:
            x = param.zca.inverse(x)
        frac = saturation(x, info.mean, info.std)
    if frac > limit:
        lo, hi = -SATURATION_MARGIN, 1 + SATURATION_MARGIN
        raise DivergedError(what, where, f"the share of synthetic pixels far outside [0, 1] (beyond [{lo:g}, {hi:g}])",
                            f"{100 * frac:.1f}%", hint)
    return frac


__all__ = ["SATURATION_LIMIT", "SATURATION_MARGIN", "DivergedError", "check_metrics", "check_saturation",
           "check_tensors", "first_nonfinite", "rerun_hint", "saturation"]
