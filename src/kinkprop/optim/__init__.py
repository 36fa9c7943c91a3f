"""Optimizers and learning-rate schedules, updating parameters in place."""

from .optimizers import SGD, Adam, AdamW, Optimizer
from .schedules import CosineAnnealingLR, StepLR

OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "StepLR", "CosineAnnealingLR", "OPTIMIZERS"]
