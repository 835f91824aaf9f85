"""The student objectives of ``distill --method``: the paper's logit-based methods, plain or standardized.

Each method comes with the settings of the official code (mdistiller's defaults for the plain
method; the paper's ``--logit-stand --base-temp 2 --kd-weight 9`` for the standardized one):

============  =========================================  ===========================================
method        plain                                      with logit standardization
============  =========================================  ===========================================
``kd``        0.1 CE + 0.9 KD, T = 4                     0.1 CE + 9 KD, T = 2
``dkd``       1 CE + w (1 TCKD + 8 NCKD), T = 4          1 CE + w (9 TCKD + 72 NCKD), T = 2
``mlkd``      0.1 CE x 2 views + 0.9 MLKD, T = 4, 3, 5,   0.1 CE x 2 views + 9 MLKD, T = 2, 3, 5,
              2, 6                                       2, 6 (the instance terms standardized)
``ctkd``      0.1 CE + 0.9 KD, learned T in (1, 21)       0.1 CE + 9 KD, learned T in (1, 21)
============  =========================================  ===========================================

``w = min(epoch / warmup, 1)`` is DKD's warm-up (20 of mdistiller's 240 epochs: the same fraction of
the run here, at least one epoch). MLKD (:func:`mlkd_objective`) sees a weak and a strong view of
each batch (:func:`.digits.weak_view`: pixel noise of std 0.1; :func:`.digits.strong_view`: noise of
std 0.3 and 10% of the pixels blanked) and runs the teacher on both. CTKD's temperature
(``lsk.CTKDTemperature``, global, started at the official ``theta = 1``, i.e. T = 15.6) maximizes the
KD term through a gradient reversal whose strength rises over the first 10 of 240 epochs (scaled
likewise). Every KD term is the package's fused loss (CE and the KD term in one pass where both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..ctkd import CTKDTemperature
from ..mlkd import MLKD_TEMPERATURES, mlkd_loss
from ..objective import distillation_loss
from .digits import strong_view, weak_view

__all__ = ["METHOD_NAMES", "MethodSettings", "method_settings", "StudentBatch", "Objective", "build_objective",
           "mlkd_objective", "warmup_epochs"]

METHOD_NAMES = ("kd", "dkd", "mlkd", "ctkd")

# The official runs' length in epochs and DKD's warm-up within it (mdistiller, CIFAR-100).
OFFICIAL_EPOCHS = 240
DKD_WARMUP = 20
CTKD_DECAY = 10  # CTKD's reversal strength rises over its first 10 epochs
CTKD_THETA = 1.0  # CTKD's initial temperature parameter: T = 1 + 20 sigmoid(1)


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
    if method in ("mlkd", "ctkd"):  # CTKD's temperature is learned; this is its initial value
        temperature = 1.0 + 20.0 / (1.0 + math.exp(-CTKD_THETA)) if method == "ctkd" else (2.0 if standardize else 4.0)
        return MethodSettings(method, standardize, 0.1, 9.0 if standardize else 0.9, temperature)
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


def mlkd_objective(settings: MethodSettings, teacher: nn.Module, generator: torch.Generator) -> Objective:
    """MLKD on a weak and a strong view of the batch (the official ``forward_train``)::

        ce = ce_weight * (CE(s_weak, y) + CE(s_strong, y))
        weak = kd_weight * mlkd_loss(s_weak, t_weak, temperatures, confidence="fraction")    # all 3 levels
        strong = kd_weight * mlkd_loss(s_strong, t_strong, temperatures, confidence="none",
                                       class_weight=0, batch_weight=0)                     # instance only

    ``temperatures = (T, 3, 5, 2, 6)``. The official strong term takes its temperatures 2 and 6 on the
    weak view; here all five use the strong view.
    """
    taus = (settings.temperature, *MLKD_TEMPERATURES[1:])  # the method's own, then the official 3, 5, 2, 6

    def loss(student: nn.Module, batch: StudentBatch) -> torch.Tensor:
        x_weak, x_strong = weak_view(batch.x, generator), strong_view(batch.x, generator)
        with torch.no_grad():
            t_weak, t_strong = teacher(x_weak), teacher(x_strong)
        s_weak, s_strong = student(x_weak), student(x_strong)
        ce = settings.ce_weight * (F.cross_entropy(s_weak, batch.y) + F.cross_entropy(s_strong, batch.y))
        weak = mlkd_loss(s_weak, t_weak, temperatures=taus, confidence="fraction", standardize=settings.standardize)
        strong = mlkd_loss(s_strong, t_strong, temperatures=taus, confidence="none", class_weight=0.0,
                           batch_weight=0.0, standardize=settings.standardize)
        return ce + settings.kd_weight * (weak + strong)
    return loss


def _ctkd(settings: MethodSettings, epochs: int) -> tuple[Objective, nn.Module]:
    temperature = CTKDTemperature(decay_epochs=warmup_epochs(epochs, CTKD_DECAY))
    with torch.no_grad():
        temperature.theta.fill_(CTKD_THETA)

    def loss(student: nn.Module, batch: StudentBatch) -> torch.Tensor:
        temperature.set_epoch(batch.epoch)
        return distillation_loss(student(batch.x), batch.teacher_logits, batch.y, ce_weight=settings.ce_weight,
                                 kd_weight=settings.kd_weight, temperature=temperature(),
                                 standardize=settings.standardize)
    return loss, temperature


def build_objective(settings: MethodSettings, *, teacher: nn.Module, epochs: int,
                    generator: torch.Generator) -> tuple[Objective, list[nn.Module]]:
    """The loss of one method and the modules it trains besides the student (CTKD's temperature).

    ``teacher`` is the trained teacher (MLKD runs it on augmented views), ``epochs`` the run's length
    (DKD's warm-up and CTKD's schedule scale with it), ``generator`` the source of every random
    augmentation, so that a seed fixes the run.
    """
    if settings.method == "kd":
        return _kd(settings), []
    if settings.method == "dkd":
        return _dkd(settings, epochs), []
    if settings.method == "mlkd":
        return mlkd_objective(settings, teacher, generator), []
    if settings.method == "ctkd":
        objective, temperature = _ctkd(settings, epochs)
        return objective, [temperature]
    raise ValueError(f"method must be one of {METHOD_NAMES}, got {settings.method!r}")
