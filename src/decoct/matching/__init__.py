"""The matching family: synthetic images optimised against real data (hard labels).

* :mod:`~decoct.matching.dm` -- distribution matching (DM)
* :mod:`~decoct.matching.tm` -- trajectory matching (MTT) and :mod:`~decoct.matching.experts`, the
  expert training it needs (the files: :mod:`decoct.formats.expert_set`)
* :mod:`~decoct.matching.image_param` -- what DM and TM optimise: the :class:`ImageParam` interface
  and plain pixels; :mod:`~decoct.matching.palette` -- AutoPalette, the palette parameterisation,
  and the post-hoc quantisers (median cut, octree, k-means)
"""
