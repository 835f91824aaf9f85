"""The KD functions: ``logitstd_kd_loss``, ``kd_loss`` and ``zscore``.

Each checks its arguments once (raising before any kernel runs), picks a backend and runs the
fused op ``torch.ops.logitstd.distillation_loss`` without labels (KD is the objective without its
CE term); ``backend="torch"`` runs the eager reference instead.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from . import config as cfg
from . import reference
from ._backends import resolve_backend_name, resolve_sparse_backend_name
from ._checks import check_inputs
from ._ops.loss_op import call_loss_op
from ._ops.sparse_op import call_sparse_op
from .config import DistillConfig
from .reference import DistillationParts
from .sparse import SparseTeacher

__all__ = ["logitstd_kd_loss", "kd_loss", "zscore", "as_rows", "fused_loss"]


def as_rows(logits: torch.Tensor) -> torch.Tensor:
    """(N, V) view of the logits with unit stride along V (copies only if the last dim is strided)."""
    rows = logits.reshape(-1, logits.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def fused_loss(student: torch.Tensor, teacher: Union[torch.Tensor, SparseTeacher], labels: Optional[torch.Tensor],
               mask: Optional[torch.Tensor], config: DistillConfig, backend: str,
               return_components: bool = False,
               temperature: Optional[torch.Tensor] = None) -> Union[torch.Tensor, DistillationParts]:
    """The objective of checked (..., V) logits and a dense or sparse teacher on ``backend`` (the op, or
    the reference for "torch"); ``temperature``: a learnable temperature tensor
    (``config.split_temperature``; dense teachers only) or None."""
    sparse = isinstance(teacher, SparseTeacher)
    if sparse and temperature is not None:
        raise ValueError("temperature: a learnable (tensor) temperature needs a dense teacher, got a SparseTeacher")
    resolve = resolve_sparse_backend_name if sparse else resolve_backend_name
    name = resolve(cfg.check_backend(backend), student.device.type)
    tau = None if sparse else reference.temperature_per_row(temperature, student, teacher)
    if name == "torch":
        return reference.loss_of_config(student, teacher, labels, mask, config, return_components, tau)
    flat_labels = None if labels is None else labels.reshape(-1).long().contiguous()
    flat_mask = None if mask is None else mask.reshape(-1).contiguous()
    if sparse:
        loss, ce, kd = call_sparse_op(as_rows(student), teacher.rows(), flat_labels, flat_mask, config, name)
    else:
        loss, ce, kd = call_loss_op(as_rows(student), as_rows(teacher), flat_labels, flat_mask, config, name, tau)
    if config.reduction == "none":
        lead = student.shape[:-1]
        loss, ce, kd = loss.reshape(lead), ce.reshape(lead), kd.reshape(lead)
    return DistillationParts(loss, ce, kd) if return_components else loss


@cfg.settings_keywords(cfg.KD_SETTINGS, docs=("mask", "backend"))
def logitstd_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, reduction: str = "batchmean",
                     mask: Optional[torch.Tensor] = None, backend: str = "auto", **settings) -> torch.Tensor:
    """Logit-standardized KD loss, fused: ``tau_s**2 * KL(softmax(Z(y)/tau_t) || softmax(Z(x)/tau_s))``.

    Equivalent eager code (the official implementation, ``correction=1, eps=1e-7``)::

        zs = (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + eps) / temperature
        zt = (y - y.mean(-1, keepdim=True)) / (y.std(-1, keepdim=True) + eps) / teacher_temperature
        F.kl_div(F.log_softmax(zs, -1), F.softmax(zt, -1), reduction="batchmean") * temperature**2

    Args:
        student_logits, teacher_logits: same shape ``(..., V)``; the last dim holds the classes.
        reduction: ``"none"`` (per row), ``"sum"``, ``"batchmean"`` (sum / included rows) or
            ``"mean"`` (sum / (included rows * V)), as in ``F.kl_div``.
        {keywords}

    Returns:
        float32 loss (float64 for float64 inputs); gradients flow to both inputs when they require grad.
    """
    settings, tau = cfg.split_temperature(settings, "logitstd_kd_loss")
    config = cfg.config_from(settings, cfg.KD_SETTINGS, "logitstd_kd_loss", ce_weight=0.0, kd_weight=1.0,
                             reduction=cfg.kd_reduction(reduction))
    student, teacher, _, mask = check_inputs(student_logits, teacher_logits, None, mask, config)
    return fused_loss(student, teacher, None, mask, config, backend, temperature=tau)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0, *,
            reduction: str = "batchmean", mask: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Vanilla (Hinton) KD, fused: ``logitstd_kd_loss(..., standardize=False)``.

    Equivalent eager code::

        F.kl_div(F.log_softmax(x / T, -1), F.softmax(y / T, -1), reduction="batchmean") * T**2
    """
    return logitstd_kd_loss(student_logits, teacher_logits, temperature=temperature, standardize=False,
                            reduction=reduction, mask=mask, backend=backend)


def zscore(logits: torch.Tensor, temperature: float = 1.0, *, correction: int = 1, eps: float = 1e-7) -> torch.Tensor:
    """Weighted Z-score of the last dimension (Algorithm 1), in eager PyTorch.

    Equivalent eager code::

        (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True, correction=correction) + eps) / temperature

    This is a single elementwise pass that eager PyTorch and ``torch.compile`` already handle well;
    the fused kernels exist for the loss, where the standardized logits are never materialized.
    """
    return reference.zscore(logits, temperature, correction=correction, eps=eps)
