"""Curriculum temperature KD (CTKD, Li et al., AAAI 2023): a learnable temperature trained adversarially.

The temperature module's parameters receive the *reversed* gradient of the distillation loss (they
maximize it while the student minimizes it), with a reversal strength ``lambda`` that rises over the
first epochs (easy to hard). The temperature it returns is a tensor that the fused losses take as
``temperature=`` (0-dim for the global variant, one per row for the per-instance one); the fused CPU
kernel returns ``d loss / d temperature`` from the sums its gradient pass already has.

Usage (the official weights under logit standardization)::

    ctkd = lsk.CTKDTemperature(decay_epochs=10)            # its parameters go into the optimizer
    ctkd.set_epoch(epoch)
    tau = ctkd(student_logits, teacher_logits)             # tau in (t_start, t_end)
    loss = lsk.distillation_loss(student_logits, teacher_logits, labels, temperature=tau,
                                 ce_weight=0.1, kd_weight=9.0)   # 0.1 CE + 9 tau^2 KL

Equivalent eager code: the same with ``backend="torch"`` (the reference's autograd).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import nn

from .config import check_weight

__all__ = ["GradientReversal", "gradient_reversal", "CTKDTemperature", "cosine_lambda"]


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; backward ``-lambda * grad`` (Ganin & Lempitsky's gradient reversal layer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lambda_: float) -> torch.Tensor:
        ctx.lambda_ = lambda_
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * (-ctx.lambda_), None


def _check_real(name: str, value: object) -> float:
    """A finite real number (``TypeError`` for another type, ``ValueError`` for NaN or an infinity)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def gradient_reversal(x: torch.Tensor, lambda_: float = 1.0) -> torch.Tensor:
    """``x`` in the forward; its gradient times ``-lambda_`` in the backward (``lambda_ >= 0`` reverses
    with strength ``lambda_``; 0 stops the gradient). Equivalent eager code::

        x.detach() * (1 + lambda_) - x * lambda_      # value x, gradient -lambda_ * grad
    """
    return _ReverseGradient.apply(x, _check_real("lambda_", lambda_))


class GradientReversal(nn.Module):
    """Module form of :func:`gradient_reversal`; ``lambda_`` is an attribute the caller may change."""

    def __init__(self, lambda_: float = 1.0) -> None:
        super().__init__()
        self.lambda_ = _check_real("lambda_", lambda_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gradient_reversal(x, self.lambda_)

    def extra_repr(self) -> str:
        return f"lambda_={self.lambda_}"


def cosine_lambda(epoch: float, decay_epochs: int, lambda_max: float = 1.0) -> float:
    """The reversal strength of epoch ``epoch``: a half cosine from 0 up to ``lambda_max`` over the
    first ``decay_epochs`` epochs, constant after::

        lambda(e) = lambda_max * (1 - cos(pi * min(max(e, 0), E) / E)) / 2,   E = decay_epochs

    The official code's ``CosineDecay(max_value=0, min_value=-lambda_max, num_loops=E)`` gives
    ``-lambda(e)`` (0 down to -1) and multiplies the gradient by it directly: the same reversal.
    """
    epoch = _check_real("epoch", epoch)
    if isinstance(decay_epochs, bool) or not isinstance(decay_epochs, numbers.Integral) or decay_epochs < 1:
        raise ValueError(f"decay_epochs must be a positive int, got {decay_epochs!r}")
    progress = min(max(epoch, 0.0), float(decay_epochs)) / decay_epochs
    return check_weight("lambda_max", lambda_max) * (1.0 - math.cos(math.pi * progress)) / 2.0


class CTKDTemperature(nn.Module):
    """CTKD's learnable temperature ``tau = t_start + (t_end - t_start) * sigmoid(theta)``, with
    ``theta`` behind a gradient reversal of strength :meth:`lambda_at` (the current epoch's).

    ``num_classes=None``: global, one parameter ``theta`` (initialized to 0), ``forward`` returns a
    0-dim tensor. ``num_classes=C``: per instance, ``theta`` of each row from a small MLP
    ``Linear(2C, hidden) -> ReLU -> Linear(hidden, 1)`` of the detached ``cat(teacher, student)``
    logits; ``forward`` returns one temperature per row (the logits' leading shape).

    The official code writes ``t_start + t_end * sigmoid(theta)`` with ``t_start=1, t_end=20``: the
    range (1, 21), these defaults.

    Args:
        num_classes: None (global) or the class count (per instance).
        t_start, t_end: the temperature's range, ``0 < t_start < t_end`` (finite).
        decay_epochs: the epochs over which the reversal strength rises to ``lambda_max``.
        lambda_max: the final reversal strength (official 1; finite, >= 0).
        hidden: the per-instance MLP's width.
    """

    def __init__(self, num_classes: Optional[int] = None, *, t_start: float = 1.0, t_end: float = 21.0,
                 decay_epochs: int = 10, lambda_max: float = 1.0, hidden: int = 256) -> None:
        super().__init__()
        self.t_start, self.t_end = _check_real("t_start", t_start), _check_real("t_end", t_end)
        if not 0.0 < self.t_start < self.t_end:
            raise ValueError(f"t_start and t_end must satisfy 0 < t_start < t_end, got {t_start}, {t_end}")
        cosine_lambda(0, decay_epochs, lambda_max)  # checks decay_epochs and lambda_max
        self.decay_epochs, self.lambda_max = int(decay_epochs), float(lambda_max)
        for name, value in (("num_classes", num_classes), ("hidden", hidden)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
                raise ValueError(f"{name} must be a positive int{' or None' if name == 'num_classes' else ''}, "
                                 f"got {value!r}")
        self.num_classes = num_classes
        self.reversal = GradientReversal(0.0)
        if num_classes is None:
            self.theta = nn.Parameter(torch.zeros(()))
        else:
            self.mlp = nn.Sequential(nn.Linear(2 * num_classes, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def lambda_at(self, epoch: float) -> float:
        """The reversal strength at ``epoch`` (:func:`cosine_lambda`)."""
        return cosine_lambda(epoch, self.decay_epochs, self.lambda_max)

    def set_epoch(self, epoch: float) -> None:
        """Use the reversal strength of ``epoch`` from now on."""
        self.reversal.lambda_ = self.lambda_at(epoch)

    def forward(self, student_logits: Optional[torch.Tensor] = None,
                teacher_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The temperature: 0-dim (global; the logits are not needed) or of the logits' leading shape."""
        if self.num_classes is None:
            theta = self.theta
        else:
            theta = self._instance_theta(student_logits, teacher_logits)
        return self.t_start + (self.t_end - self.t_start) * torch.sigmoid(self.reversal(theta))

    def _instance_theta(self, student: Optional[torch.Tensor], teacher: Optional[torch.Tensor]) -> torch.Tensor:
        for name, logits in (("student_logits", student), ("teacher_logits", teacher)):
            if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or logits.shape[-1] != self.num_classes:
                got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise ValueError(f"{name} must be a (..., {self.num_classes}) tensor for a per-instance "
                                 f"temperature, got {got}")
        if student.shape != teacher.shape:
            raise ValueError(f"student_logits {tuple(student.shape)} and teacher_logits {tuple(teacher.shape)} "
                             "differ in shape")
        features = torch.cat((teacher.detach(), student.detach()), -1).to(self.mlp[0].weight.dtype)
        return self.mlp(features)[..., 0]

    def extra_repr(self) -> str:
        kind = "global" if self.num_classes is None else f"num_classes={self.num_classes}"
        return (f"{kind}, t_start={self.t_start}, t_end={self.t_end}, decay_epochs={self.decay_epochs}, "
                f"lambda_max={self.lambda_max}")
