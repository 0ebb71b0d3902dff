"""Evaluation: train students on a distilled set and report accuracy next to its bytes.

:mod:`~decoct.evaluation.protocols` holds the ``classic``, ``fast`` and ``soft`` protocols (the soft
one consuming a set's label store or a live teacher) and the random-real baseline at equal storage.
"""
