"""decoct: dataset distillation with exact storage accounting.

The Python API mirrors the CLI: ``load_dataset``, ``select``, ``evaluate``, ``DistilledSet``.
Names are imported lazily so ``import decoct`` (and the CLI's start-up) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "evaluate_run": "api", "info": "api", "quickstart": "api", "select": "api",
    "DistilledSet": "artifact",
    "Dataset": "data", "DatasetInfo": "data", "ImageSplit": "data", "list_datasets": "data", "load_dataset": "data",
    "EvalResult": "evaluation", "evaluate": "evaluation",
    "create_model": "models", "model_for": "models",
    "distill_dm": "methods.dm", "distill_tm": "methods.tm", "train_experts": "methods.experts",
    "load_experts": "methods.experts", "recover": "methods.recover", "squeeze": "squeeze",
    "load_teacher": "squeeze", "relabel": "labels.relabel", "quantize": "palette.quantize",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'decoct' has no attribute {name!r}")
