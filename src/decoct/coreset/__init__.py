"""The coreset family: real images chosen per class (random, herding, k-center, graph-cut).

:mod:`~decoct.coreset.select` holds the rules and :func:`~decoct.coreset.select.select_coreset`;
:func:`decoct.api.select` saves a selection as a run. Below the other families: AutoPalette's
colour-guided initialisation uses graph-cut.
"""
