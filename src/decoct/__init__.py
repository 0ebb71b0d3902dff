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
    "EvalResult": "decoct.evaluation", "evaluate": "decoct.evaluation",
    "create_model": "decoct.models", "model_for": "decoct.models",
    "distill_dm": "decoct.methods.dm", "distill_tm": "decoct.methods.tm", "train_experts": "decoct.methods.experts",
    "load_experts": "decoct.formats.expert_set", "recover": "decoct.methods.recover", "squeeze": "decoct.squeeze",
    "load_teacher": "decoct.formats.teacher", "relabel": "decoct.labels.relabel", "quantize": "decoct.palette.quantize",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'decoct' has no attribute {name!r}")
