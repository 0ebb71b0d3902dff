"""The bottom layer: what every stage uses and no stage defines (it knows no method).

* :mod:`~decoct.runtime.distributed` -- device resolution, torchrun rank/world size/barrier, shard ranges
* :mod:`~decoct.runtime.io` -- atomic writes, safe loads (tensors, JSON), interrupted-replacement repair
* :mod:`~decoct.runtime.filecheck` -- checks of files read back, before their contents size anything
* :mod:`~decoct.runtime.config` -- typed, range-checked command keys from YAML and ``--set``
* :mod:`~decoct.runtime.registry` -- name -> factory tables (datasets, models, methods)
* :mod:`~decoct.runtime.runs` and :mod:`~decoct.runtime.runlock` -- run directories: config,
  checkpoints, resume, JSON-lines log, the run's lock
* :mod:`~decoct.runtime.progress` -- progress bars and plain progress lines
* :mod:`~decoct.runtime.health` -- NaN/inf and range checks that stop a diverged run
"""
