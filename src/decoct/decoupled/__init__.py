"""The decoupled family (SRe2L, DWA, LPLD), one pipeline, one module per stage:

1. :mod:`~decoct.decoupled.squeeze` -- train (or wrap) a BatchNorm teacher and record its BN-input
   statistics, global and class-wise (the files: :mod:`decoct.formats.teacher`)
2. :mod:`~decoct.decoupled.recover` -- synthesise images from the teacher (SRe2L / DWA / LPLD),
   sharded across torchrun ranks when launched so
3. :mod:`~decoct.decoupled.relabel` -- replay recorded views through the teacher and write the FKD
   label store into the artifact (:mod:`decoct.formats.label_store`), optionally pruned (LPLD)

:mod:`~decoct.decoupled.rded` (RDED) replaces stage 2 by selection: the teacher's most confident
random crops of real images, stitched; no optimisation, no BN statistics needed.

Students then train on the store, or on a live teacher, in the ``soft`` protocol
(:mod:`decoct.evaluation.protocols`, :mod:`decoct.train.soft_students`).
"""
