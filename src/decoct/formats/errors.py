"""The error every check of a distilled-set artifact raises (its files, PNGs and manifest)."""

from __future__ import annotations

__all__ = ["ArtifactError"]


class ArtifactError(ValueError):
    """An artifact on disk is missing, corrupted, or not a decoct distilled set."""
