"""Training of teachers and evaluation students: one trainer, R students at once, and students
from soft labels (:mod:`~decoct.train.soft_students`)."""

from decoct.train.multi import ENGINES, GroupedConvNet, fit_students, resolve_engine, train_students
from decoct.train.trainer import (
    OPTIMIZERS,
    SCHEDULES,
    Augment,
    TrainConfig,
    evaluate_accuracy,
    lr_at,
    seeded_model,
    train_model,
)

__all__ = [
    "ENGINES",
    "OPTIMIZERS",
    "SCHEDULES",
    "Augment",
    "GroupedConvNet",
    "TrainConfig",
    "evaluate_accuracy",
    "fit_students",
    "lr_at",
    "resolve_engine",
    "seeded_model",
    "train_model",
    "train_students",
]
