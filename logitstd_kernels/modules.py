"""``LogitStdKDLoss``, ``DistillationLoss`` and ``FusedLinearDistillationLoss``: the losses as ``nn.Module``."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ._checks import (OBJECTIVE_REDUCTIONS, check_backend, check_label_smoothing, check_reduction,
                      check_temperature, check_weight)
from .functional import logitstd_kd_loss
from .fused_linear import fused_linear_distillation_loss
from .objective import DistillationParts, distillation_loss


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


class _ObjectiveKeywords(nn.Module):
    """The keywords of :func:`logitstd_kernels.distillation_loss`, checked once, for the loss modules."""

    def __init__(
        self,
        ce_weight: float = 0.1,
        kd_weight: float = 9.0,
        *,
        temperature: float = 2.0,
        teacher_temperature: Optional[float] = None,
        standardize: bool = True,
        correction: int = 1,
        eps: float = 1e-7,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        return_components: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.ce_weight = check_weight("ce_weight", ce_weight)
        self.kd_weight = check_weight("kd_weight", kd_weight)
        self.temperature = check_temperature("temperature", temperature)
        self.teacher_temperature = (
            None if teacher_temperature is None else check_temperature("teacher_temperature", teacher_temperature)
        )
        self.standardize = bool(standardize)
        self.correction = correction
        self.eps = eps
        self.ignore_index = ignore_index
        self.label_smoothing = check_label_smoothing(label_smoothing)
        if reduction not in OBJECTIVE_REDUCTIONS:
            raise ValueError(f"reduction must be one of {OBJECTIVE_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.return_components = bool(return_components)
        self.backend = check_backend(backend)

    def extra_repr(self) -> str:
        return (f"ce_weight={self.ce_weight}, kd_weight={self.kd_weight}, temperature={self.temperature}, "
                f"teacher_temperature={self.teacher_temperature}, standardize={self.standardize}, "
                f"correction={self.correction}, eps={self.eps}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, reduction={self.reduction!r}, backend={self.backend!r}")


class DistillationLoss(_ObjectiveKeywords):
    """The distillation objective as a module; ``forward(student, teacher, labels=None, mask=None)``.

    Equivalent eager code: ``reference.distillation_loss(student, teacher, labels, **keywords, mask=mask)``.
    The keywords are those of :func:`logitstd_kernels.distillation_loss` (defaults: the official
    code's ``ce_weight=0.1, kd_weight=9``, base temperature 2) and are checked here, once.
    """

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> Union[torch.Tensor, DistillationParts]:
        return distillation_loss(
            student_logits, teacher_logits, labels, ce_weight=self.ce_weight, kd_weight=self.kd_weight,
            temperature=self.temperature, teacher_temperature=self.teacher_temperature,
            standardize=self.standardize, correction=self.correction, eps=self.eps,
            ignore_index=self.ignore_index, label_smoothing=self.label_smoothing, mask=mask,
            reduction=self.reduction, return_components=self.return_components, backend=self.backend,
        )


class FusedLinearDistillationLoss(_ObjectiveKeywords):
    """The distillation objective of two lm_heads without their logits (chunked), as a module.

    ``forward(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None, *,
    teacher_logits=None, student_bias=None, teacher_bias=None, mask=None)``. Equivalent eager code::

        DistillationLoss(**keywords)(F.linear(student_hidden, student_weight, student_bias),
                                     F.linear(teacher_hidden, teacher_weight, teacher_bias), labels, mask)

    The keywords are those of :class:`DistillationLoss` plus ``chunk_size`` and ``accum_dtype`` of
    :func:`logitstd_kernels.fused_linear_distillation_loss`; ``reduction`` is ``"mean"`` or ``"sum"``.
    Like Liger-Kernel's ``LigerFusedLinearJSDLoss``, it holds no parameters: pass ``lm_head.weight``.
    """

    def __init__(self, ce_weight: float = 0.1, kd_weight: float = 9.0, *, chunk_size: Optional[int] = None,
                 accum_dtype: Optional[torch.dtype] = None, **keywords) -> None:
        if keywords.get("reduction", "mean") not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum' for the fused linear loss, got "
                             f"{keywords['reduction']!r}")
        super().__init__(ce_weight, kd_weight, **keywords)
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.accum_dtype = accum_dtype

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor,
                teacher_hidden: Optional[torch.Tensor] = None, teacher_weight: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, *, teacher_logits: Optional[torch.Tensor] = None,
                student_bias: Optional[torch.Tensor] = None, teacher_bias: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> Union[torch.Tensor, DistillationParts]:
        return fused_linear_distillation_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels, teacher_logits=teacher_logits,
            student_bias=student_bias, teacher_bias=teacher_bias, chunk_size=self.chunk_size,
            accum_dtype=self.accum_dtype, ce_weight=self.ce_weight, kd_weight=self.kd_weight,
            temperature=self.temperature, teacher_temperature=self.teacher_temperature,
            standardize=self.standardize, correction=self.correction, eps=self.eps,
            ignore_index=self.ignore_index, label_smoothing=self.label_smoothing, mask=mask,
            reduction=self.reduction, return_components=self.return_components, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}, accum_dtype={self.accum_dtype}"
