"""What lands on disk, as pure data: load, save and verify only (no training, no teacher calls).

* :mod:`~decoct.formats.artifact` -- the distilled-set artifact (:class:`DistilledSet`), its PNGs
  (:mod:`~decoct.formats.png`) and its error (:mod:`~decoct.formats.errors`)
* :mod:`~decoct.formats.label_store` -- the FKD label store kept inside an artifact
* :mod:`~decoct.formats.label_pruning` -- LPLD's pruning rule and the replay plan of a store
* :mod:`~decoct.formats.expert_set` -- expert trajectories for trajectory matching
* :mod:`~decoct.formats.teacher` -- a teacher directory and its BN-statistics file
"""
