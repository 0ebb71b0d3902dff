"""A module's parameters as one flat vector: what expert trajectories store and TM steps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["FlatParams"]


class FlatParams:
    """Maps a module's parameters to one flat vector and back, for ``functional_call``.

    MTT's ``ReparamModule`` does the same by rewriting the module; here the module is left intact
    and :meth:`forward` calls it functionally with views of the flat vector, so gradients flow to
    the vector (and through it to anything it was computed from).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.num_params = sum(self.numels)

    def layout(self) -> list[list[Any]]:
        """``[[name, shape], ...]`` (JSON-friendly; stored in the expert manifest)."""
        return [[n, list(s)] for n, s in zip(self.names, self.shapes, strict=True)]

    def flatten(self, module: nn.Module | None = None) -> Tensor:
        """The parameters of ``module`` (default: the wrapped one), detached, as one vector."""
        m = module if module is not None else self.model
        return torch.cat([p.detach().reshape(-1) for p in m.parameters()])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        if flat.dim() != 1 or flat.numel() != self.num_params:
            raise ValueError(f"flat parameters must be a vector of {self.num_params}, got {tuple(flat.shape)}")
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.numels), self.shapes, strict=True)}

    def forward(self, flat: Tensor, x: Tensor) -> Tensor:
        """``model(x)`` with the parameters taken from ``flat`` (differentiable in both)."""
        return torch.func.functional_call(self.model, self.unflatten(flat), (x,))

    __call__ = forward
