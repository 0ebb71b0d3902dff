"""Commands of stored soft labels: ``relabel`` (FKD label store, LPLD pruning)."""

from __future__ import annotations

from typing import Any


def register(cli: Any) -> None:
    """Add this family's commands to the ``decoct`` parser (see :class:`decoct.cli.CommandAdder`)."""
