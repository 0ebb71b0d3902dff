"""Commands of the matching family: ``distill dm|tm``, ``experts``, ``quantize``."""

from __future__ import annotations

from typing import Any


def register(cli: Any) -> None:
    """Add this family's commands to the ``decoct`` parser (see :class:`decoct.cli.CommandAdder`)."""
