"""``LogitStdKDLoss``: the loss as an ``nn.Module`` for training loops."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._checks import check_backend, check_reduction, check_temperature
from .functional import logitstd_kd_loss


class LogitStdKDLoss(nn.Module):
    """Logit-standardized KD loss module; ``forward(student, teacher, mask=None)``.

    Equivalent eager code: ``reference.logitstd_kd_loss(student, teacher, **keywords, mask=mask)``.
    The keywords are those of :func:`logitstd_kernels.logitstd_kd_loss` and are checked here, once.
    """

    def __init__(
        self,
        temperature: float = 2.0,
        *,
        teacher_temperature: Optional[float] = None,
        standardize: bool = True,
        correction: int = 1,
        eps: float = 1e-7,
        reduction: str = "batchmean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.temperature = check_temperature("temperature", temperature)
        self.teacher_temperature = (
            None if teacher_temperature is None else check_temperature("teacher_temperature", teacher_temperature)
        )
        self.standardize = bool(standardize)
        self.correction = correction
        self.eps = eps
        self.reduction = check_reduction(reduction)
        self.backend = check_backend(backend)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return logitstd_kd_loss(
            student_logits, teacher_logits, temperature=self.temperature,
            teacher_temperature=self.teacher_temperature, standardize=self.standardize,
            correction=self.correction, eps=self.eps, reduction=self.reduction, mask=mask, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, teacher_temperature={self.teacher_temperature}, "
                f"standardize={self.standardize}, correction={self.correction}, eps={self.eps}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")
