"""decoct: dataset distillation with exact storage accounting.

The Python API mirrors the CLI: ``load_dataset``, ``select``, ``evaluate``, ``DistilledSet``.
Names are imported lazily so ``import decoct`` (and the CLI's start-up) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "evaluate_run": "decoct.api", "info": "decoct.api", "quickstart": "decoct.api", "select": "decoct.api",
    "DistilledSet": "decoct.formats.artifact",
    "Dataset": "decoct.data", "DatasetInfo": "decoct.data", "ImageSplit": "decoct.data", "list_datasets": "decoct.data", "load_dataset": "decoct.data",
    "EvalResult": "decoct.evaluation.protocols", "evaluate": "decoct.evaluation.protocols",
    "create_model": "decoct.models", "model_for": "decoct.models",
    "distill_dm": "decoct.matching.dm", "distill_tm": "decoct.matching.tm", "train_experts": "decoct.matching.experts",
    "load_experts": "decoct.formats.expert_set", "recover": "decoct.decoupled.recover", "squeeze": "decoct.decoupled.squeeze",
    "load_teacher": "decoct.formats.teacher", "relabel": "decoct.decoupled.relabel", "quantize": "decoct.matching.palette.quantize",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'decoct' has no attribute {name!r}")
