"""Augmentations used by distillation and evaluation: DSA and ZCA whitening."""

from decoct.augment.dsa import DSA, DSAParams, dsa
from decoct.augment.zca import ZCA

__all__ = ["DSA", "DSAParams", "dsa", "ZCA"]
