"""The student objectives of ``distill --method``: the paper's logit-based methods, plain or standardized.

Each method comes with the settings of the official code (mdistiller's defaults for the plain
method; the paper's ``--logit-stand --base-temp 2 --kd-weight 9`` for the standardized one):

============  =========================================  ===========================================
method        plain                                      with logit standardization
============  =========================================  ===========================================
``kd``        0.1 CE + 0.9 KD, T = 4                     0.1 CE + 9 KD, T = 2
``dkd``       1 CE + w (1 TCKD + 8 NCKD), T = 4          1 CE + w (9 TCKD + 72 NCKD), T = 2
============  =========================================  ===========================================

``w = min(epoch / warmup, 1)`` is DKD's warm-up (20 of mdistiller's 240 epochs: the same fraction of
the run here, at least one epoch). Every KD term is one call of the package's fused
``distillation_loss`` (CE and the KD term in one pass).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..objective import distillation_loss

__all__ = ["METHOD_NAMES", "MethodSettings", "method_settings", "StudentBatch", "Objective", "build_objective",
           "warmup_epochs"]

METHOD_NAMES = ("kd", "dkd")

# The official runs' length in epochs and DKD's warm-up within it (mdistiller, CIFAR-100).
OFFICIAL_EPOCHS = 240
DKD_WARMUP = 20


@dataclass(frozen=True)
class MethodSettings:
    """One method's weights and temperature (``alpha``/``beta``: DKD's TCKD and NCKD weights)."""

    method: str
    standardize: bool
    ce_weight: float
    kd_weight: float
    temperature: float
    alpha: float = 0.0
    beta: float = 0.0


def method_settings(method: str, standardize: bool) -> MethodSettings:
    """The official code's settings of ``method``, plain or with logit standardization (table above)."""
    if method == "kd":
        return MethodSettings("kd", standardize, 0.1, 9.0 if standardize else 0.9, 2.0 if standardize else 4.0)
    if method == "dkd":
        scale = 9.0 if standardize else 1.0  # the paper multiplies DKD's alpha and beta by its KD weight 9
        return MethodSettings("dkd", standardize, 1.0, 1.0, 2.0 if standardize else 4.0, 1.0 * scale, 8.0 * scale)
    raise ValueError(f"method must be one of {METHOD_NAMES}, got {method!r}")


@dataclass(frozen=True)
class StudentBatch:
    """A minibatch: inputs, labels, the teacher's logits of the inputs and the 1-based epoch."""

    x: torch.Tensor
    y: torch.Tensor
    teacher_logits: torch.Tensor
    epoch: int


Objective = Callable[[nn.Module, StudentBatch], torch.Tensor]


def warmup_epochs(epochs: int, official: int = DKD_WARMUP) -> int:
    """``official`` epochs of the official 240, scaled to a run of ``epochs`` (at least 1)."""
    return max(1, math.ceil(epochs * official / OFFICIAL_EPOCHS))


def _kd(settings: MethodSettings) -> Objective:
    def loss(student: nn.Module, batch: StudentBatch) -> torch.Tensor:
        return distillation_loss(student(batch.x), batch.teacher_logits, batch.y, ce_weight=settings.ce_weight,
                                 kd_weight=settings.kd_weight, temperature=settings.temperature,
                                 standardize=settings.standardize)
    return loss


def _dkd(settings: MethodSettings, epochs: int) -> Objective:
    warmup = warmup_epochs(epochs)

    def loss(student: nn.Module, batch: StudentBatch) -> torch.Tensor:
        return distillation_loss(student(batch.x), batch.teacher_logits, batch.y, ce_weight=settings.ce_weight,
                                 kd_weight=min(batch.epoch / warmup, 1.0), temperature=settings.temperature,
                                 standardize=settings.standardize, divergence="dkd", dkd_alpha=settings.alpha,
                                 dkd_beta=settings.beta)
    return loss


def build_objective(settings: MethodSettings, *, teacher: nn.Module, epochs: int,
                    generator: torch.Generator) -> tuple[Objective, list[nn.Module]]:
    """The loss of one method and the modules it trains besides the student (CTKD's temperature).

    ``teacher`` is the trained teacher (MLKD runs it on augmented views), ``epochs`` the run's length
    (DKD's warm-up and CTKD's schedule scale with it), ``generator`` the source of every random
    augmentation, so that a seed fixes the run.
    """
    del teacher, generator  # used by the methods that augment
    if settings.method == "kd":
        return _kd(settings), []
    if settings.method == "dkd":
        return _dkd(settings, epochs), []
    raise ValueError(f"method must be one of {METHOD_NAMES}, got {settings.method!r}")
