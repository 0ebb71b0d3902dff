"""Augmentations used by distillation and evaluation: DSA, ZCA whitening, and the recorded views
of FKD label stores (:mod:`~decoct.augment.recorded_views`)."""

from decoct.augment.dsa import DSA, DSAParams, dsa
from decoct.augment.zca import ZCA

__all__ = ["DSA", "DSAParams", "dsa", "ZCA"]
