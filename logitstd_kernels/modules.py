"""``LogitStdKDLoss``, ``DistillationLoss`` and ``FusedLinearDistillationLoss``: the losses as ``nn.Module``.

Each module checks its keywords once, in its constructor, into a :class:`~logitstd_kernels.config.DistillConfig`
(``module.config``; every setting also reads as an attribute, ``module.temperature``), and its forward
checks only the tensors.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from . import config as cfg
from ._checks import check_inputs
from .functional import fused_loss
from .fused_linear import fused_linear_distillation_loss
from .reference import DistillationParts


class _ConfiguredLoss(nn.Module):
    """A loss module holding a checked ``config``; its settings read as attributes."""

    config: cfg.DistillConfig

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            config = self.__dict__.get("config")
            if config is not None and name in cfg.DistillConfig.__dataclass_fields__:
                return getattr(config, name)
            raise

    def extra_repr(self) -> str:
        settings = ", ".join(f"{name}={getattr(self.config, name)!r}" for name in self._shown)
        return f"{settings}, backend={self.backend!r}"


class LogitStdKDLoss(_ConfiguredLoss):
    """Logit-standardized KD loss module; ``forward(student, teacher, mask=None)``.

    Equivalent eager code: ``reference.logitstd_kd_loss(student, teacher, **keywords, mask=mask)``.
    The keywords are those of :func:`logitstd_kernels.logitstd_kd_loss`.
    """

    _shown = cfg.KD_SETTINGS

    @cfg.settings_keywords(cfg.KD_SETTINGS[1:])
    def __init__(self, temperature: float = 2.0, *, reduction: str = "batchmean", backend: str = "auto",
                 **settings) -> None:
        super().__init__()
        self.config = cfg.config_from(dict(settings, temperature=temperature), cfg.KD_SETTINGS, "LogitStdKDLoss",
                                      ce_weight=0.0, kd_weight=1.0, reduction=cfg.kd_reduction(reduction))
        self.reduction = reduction
        self.backend = cfg.check_backend(backend)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        student, teacher, _, mask = check_inputs(student_logits, teacher_logits, None, mask, self.config)
        return fused_loss(student, teacher, None, mask, self.config, self.backend)


class DistillationLoss(_ConfiguredLoss):
    """The distillation objective as a module; ``forward(student, teacher, labels=None, mask=None)``.

    Equivalent eager code: ``reference.distillation_loss(student, teacher, labels, **keywords, mask=mask)``.
    The keywords are those of :func:`logitstd_kernels.distillation_loss` (defaults: the official
    code's ``ce_weight=0.1, kd_weight=9``, base temperature 2).
    """

    _shown = cfg.OBJECTIVE_SETTINGS

    @cfg.settings_keywords(cfg.OBJECTIVE_SETTINGS[2:])
    def __init__(self, ce_weight: float = 0.1, kd_weight: float = 9.0, *, reduction: str = "mean",
                 return_components: bool = False, backend: str = "auto", **settings) -> None:
        super().__init__()
        self.config = cfg.config_from(dict(settings, ce_weight=ce_weight, kd_weight=kd_weight), cfg.OBJECTIVE_SETTINGS,
                                      type(self).__name__, reduction=cfg.objective_reduction(reduction))
        self.return_components = bool(return_components)
        self.backend = cfg.check_backend(backend)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> Union[torch.Tensor, DistillationParts]:
        student, teacher, labels, mask = check_inputs(student_logits, teacher_logits, labels, mask, self.config)
        return fused_loss(student, teacher, labels, mask, self.config, self.backend, self.return_components)


class FusedLinearDistillationLoss(DistillationLoss):
    """The distillation objective of two lm_heads without their logits (chunked), as a module.

    ``forward(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None, *,
    teacher_logits=None, student_bias=None, teacher_bias=None, mask=None)``. Equivalent eager code::

        DistillationLoss(**keywords)(F.linear(student_hidden, student_weight, student_bias),
                                     F.linear(teacher_hidden, teacher_weight, teacher_bias), labels, mask)

    The keywords are those of :class:`DistillationLoss` plus ``chunk_size``, ``accum_dtype`` and the
    logit transforms (``student_logit_scale``, ``teacher_logit_scale``, ``student_final_logit_softcapping``,
    ``teacher_final_logit_softcapping``) of :func:`logitstd_kernels.fused_linear_distillation_loss`;
    ``reduction`` is ``"mean"`` or ``"sum"``.
    Like Liger-Kernel's ``LigerFusedLinearJSDLoss``, it holds no parameters: pass ``lm_head.weight``.
    """

    def __init__(self, ce_weight: float = 0.1, kd_weight: float = 9.0, *, chunk_size: Optional[int] = None,
                 accum_dtype: Optional[torch.dtype] = None, **keywords) -> None:
        reduction = cfg.objective_reduction(keywords.pop("reduction", "mean"), cfg.FUSED_LINEAR_REDUCTIONS)
        transforms = {name: keywords.pop(name) for name in cfg.LOGIT_TRANSFORMS if name in keywords}
        super().__init__(ce_weight, kd_weight, reduction=reduction, **keywords)
        self.chunk_size = cfg.check_chunk_size(chunk_size)
        self.accum_dtype = cfg.check_accum_dtype(accum_dtype)
        self.transforms = cfg.check_logit_transforms(**transforms)

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor,
                teacher_hidden: Optional[torch.Tensor] = None, teacher_weight: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, *, teacher_logits: Optional[torch.Tensor] = None,
                student_bias: Optional[torch.Tensor] = None, teacher_bias: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> Union[torch.Tensor, DistillationParts]:
        settings = {name: getattr(self.config, name) for name in cfg.OBJECTIVE_SETTINGS}
        return fused_linear_distillation_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels, teacher_logits=teacher_logits,
            student_bias=student_bias, teacher_bias=teacher_bias, chunk_size=self.chunk_size,
            accum_dtype=self.accum_dtype, mask=mask, reduction=self.config.reduction,
            return_components=self.return_components, backend=self.backend, **settings, **self.transforms._asdict())

    def extra_repr(self) -> str:
        transforms = "".join(f", {name}={value}" for name, value in self.transforms._asdict().items()
                             if value != cfg.LogitTransforms._field_defaults[name])
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}, accum_dtype={self.accum_dtype}{transforms}"
