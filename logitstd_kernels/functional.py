"""The public functions: ``logitstd_kd_loss``, ``kd_loss`` and ``zscore``.

They validate their arguments (raising before any kernel runs), pick a backend and call the fused
op ``torch.ops.logitstd.kd_loss``; ``backend="torch"`` runs the eager reference instead.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import ops  # noqa: F401  (registers torch.ops.logitstd.kd_loss)
from . import reference
from ._backends import resolve_backend_name
from ._checks import check_backend, check_kd_args

__all__ = ["logitstd_kd_loss", "kd_loss", "zscore"]


def _as_rows(logits: torch.Tensor) -> torch.Tensor:
    """(N, V) view of the logits with unit stride along V (copies only if the last dim is strided)."""
    rows = logits.reshape(-1, logits.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def logitstd_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 2.0,
    teacher_temperature: Optional[float] = None,
    standardize: bool = True,
    correction: int = 1,
    eps: float = 1e-7,
    reduction: str = "batchmean",
    mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Logit-standardized KD loss, fused: ``tau_s**2 * KL(softmax(Z(y)/tau_t) || softmax(Z(x)/tau_s))``.

    Equivalent eager code (the official implementation, ``correction=1, eps=1e-7``)::

        zs = (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + eps) / temperature
        zt = (y - y.mean(-1, keepdim=True)) / (y.std(-1, keepdim=True) + eps) / teacher_temperature
        F.kl_div(F.log_softmax(zs, -1), F.softmax(zt, -1), reduction="batchmean") * temperature**2

    Args:
        student_logits, teacher_logits: same shape ``(..., V)``; the last dim holds the classes.
        temperature: the student's (base) temperature ``tau_s``; the loss is scaled by ``tau_s**2``.
        teacher_temperature: the teacher's temperature ``tau_t`` (default: ``temperature``).
        standardize: z-score each row first (False gives vanilla Hinton KD).
        correction: 1 divides the variance by V-1 (``torch.std``, official code), 0 by V (Algorithm 1).
        eps: added to the standard deviation (official code 1e-7; Algorithm 1: 0).
        reduction: ``"none"`` (per row), ``"sum"``, ``"batchmean"`` (sum / included rows) or
            ``"mean"`` (sum / (included rows * V)).
        mask: optional bool tensor of the leading shape; False rows give 0 loss and 0 gradient.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"torch"`` (the eager reference).

    Returns:
        float32 loss (float64 for float64 inputs); gradients flow to both inputs when they require grad.
    """
    student, teacher, mask, tau_s, tau_t = check_kd_args(
        student_logits, teacher_logits, temperature=temperature, teacher_temperature=teacher_temperature,
        standardize=standardize, correction=correction, eps=eps, reduction=reduction, mask=mask,
    )
    name = resolve_backend_name(check_backend(backend), student.device.type)
    if name == "torch":
        return reference.logitstd_kd_loss(
            student, teacher, temperature=tau_s, teacher_temperature=tau_t, standardize=standardize,
            correction=correction, eps=eps, reduction=reduction, mask=mask,
        )
    grad_enabled = torch.is_grad_enabled()
    loss, _, _ = torch.ops.logitstd.kd_loss(
        _as_rows(student), _as_rows(teacher), None if mask is None else mask.reshape(-1).contiguous(),
        tau_s, tau_t, bool(standardize), int(correction), float(eps), reduction,
        grad_enabled and student.requires_grad, grad_enabled and teacher.requires_grad, name,
    )
    return loss.reshape(student.shape[:-1]) if reduction == "none" else loss


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    reduction: str = "batchmean",
    mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
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
