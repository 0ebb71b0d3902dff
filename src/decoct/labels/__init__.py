"""Stored soft labels: the FKD label store, relabel with a teacher, LPLD label pruning."""

from decoct.formats.label_pruning import (
    GRANULARITIES,
    PRUNE_FACTORS,
    epoch_plan,
    kept_units,
    payload_model,
    prune_ratio,
    prune_store,
)
from decoct.formats.label_store import (
    FORMAT,
    VERSION,
    EpochLabels,
    LabelStore,
    LabelStoreError,
    attach_store,
    dataset_fingerprint,
    set_fingerprint,
    strip_store,
)
from decoct.labels.relabel import prune_labels, relabel, relabel_set, replay_logits, resolve_teacher

__all__ = [
    "FORMAT",
    "GRANULARITIES",
    "PRUNE_FACTORS",
    "VERSION",
    "EpochLabels",
    "LabelStore",
    "LabelStoreError",
    "attach_store",
    "dataset_fingerprint",
    "epoch_plan",
    "kept_units",
    "payload_model",
    "prune_ratio",
    "prune_labels",
    "prune_store",
    "relabel",
    "relabel_set",
    "replay_logits",
    "resolve_teacher",
    "set_fingerprint",
    "strip_store",
]
