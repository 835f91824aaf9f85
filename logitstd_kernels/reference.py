"""The eager PyTorch implementation of the public contract: ground truth for tests and benchmarks.

Written for clarity, not speed. It is the one reference implementation in the project; tests and
benchmarks import it from here. With ``correction=1, eps=1e-7, reduction="batchmean"`` it is the
paper's official code (and torchdistill's ``LogitStdKDLoss``)::

    z = (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-7) / tau
    loss = F.kl_div(F.log_softmax(z_s, -1), F.softmax(z_t, -1), reduction="batchmean") * tau**2

and with ``correction=0, eps=0`` it is the paper's Algorithm 1. The math is in docs/design.md section 1.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from ._checks import check_kd_args, check_logits, check_objective_args, check_std_args, check_temperature

__all__ = ["zscore", "logitstd_kd_loss", "kd_loss", "distillation_loss", "DistillationParts", "accumulation_dtype"]


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32: the dtype of the loss and of the math."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def zscore(logits: torch.Tensor, temperature: float = 1.0, *, correction: int = 1, eps: float = 1e-7) -> torch.Tensor:
    """Weighted Z-score of the last dimension (the paper's Algorithm 1).

    Equivalent eager code::

        (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True, correction=correction) + eps) / temperature

    The result has the input's dtype; the statistics are computed in float32 (float64 for float64).
    """
    check_logits("logits", logits)
    tau = check_temperature("temperature", temperature)
    check_std_args(logits.shape[-1], correction, eps, name="logits")
    x = logits.to(accumulation_dtype(logits))
    mean = x.mean(dim=-1, keepdim=True)
    std = x.std(dim=-1, keepdim=True, correction=correction)
    return ((x - mean) / (std + eps) / tau).to(logits.dtype)


def _row_kl(student: torch.Tensor, teacher: torch.Tensor, tau_s: float, tau_t: float,
            standardize: bool, correction: int, eps: float) -> torch.Tensor:
    """``tau_s**2 * KL(softmax(b) || softmax(a))`` for each row, in the accumulation dtype."""
    acc = accumulation_dtype(student, teacher)
    if student.shape[0] == 0:  # no rows: nothing to standardize (torch.std would warn); still in the graph
        return (student.to(acc).sum(-1) + teacher.to(acc).sum(-1)) * 0
    x = student.to(acc)
    y = teacher.to(acc)
    if standardize:
        a = (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True, correction=correction) + eps) / tau_s
        b = (y - y.mean(-1, keepdim=True)) / (y.std(-1, keepdim=True, correction=correction) + eps) / tau_t
    else:
        a = x / tau_s
        b = y / tau_t
    log_q = F.log_softmax(a, dim=-1)
    p = F.softmax(b, dim=-1)
    return F.kl_div(log_q, p, reduction="none").sum(-1) * (tau_s * tau_s)


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
) -> torch.Tensor:
    """Logit-standardized KD loss ``tau_s**2 * KL(softmax(Z(y)/tau_t) || softmax(Z(x)/tau_s))``.

    The last dimension holds the classes; every leading index is a row. Rows where ``mask`` is
    False contribute 0 loss and 0 gradient and are not counted by ``"batchmean"``/``"mean"``.
    The loss is float32 (float64 when an input is float64); gradients come back in each input's dtype.
    """
    student, teacher, mask, tau_s, tau_t = check_kd_args(
        student_logits, teacher_logits, temperature=temperature, teacher_temperature=teacher_temperature,
        standardize=standardize, correction=correction, eps=eps, reduction=reduction, mask=mask,
    )
    num_classes = student.shape[-1]
    lead = student.shape[:-1]
    x = student.reshape(-1, num_classes)
    y = teacher.reshape(-1, num_classes)
    if mask is None:
        rows = _row_kl(x, y, tau_s, tau_t, standardize, correction, eps)
        count = x.shape[0]
    else:
        # Index the included rows out so that excluded rows (even NaN ones) get an exact 0 gradient.
        keep = mask.reshape(-1)
        rows = torch.zeros(x.shape[0], dtype=accumulation_dtype(x, y), device=x.device)
        rows = rows.index_put((keep,), _row_kl(x[keep], y[keep], tau_s, tau_t, standardize, correction, eps))
        count = int(keep.sum())
    if reduction == "none":
        return rows.reshape(lead)
    total = rows.sum()
    if reduction == "sum":
        return total
    count = max(count, 1)
    if reduction == "batchmean":
        return total / count
    return total / (count * num_classes)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    reduction: str = "batchmean",
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Vanilla (Hinton) KD: ``T**2 * KL(softmax(y/T) || softmax(x/T))``, i.e. no standardization."""
    return logitstd_kd_loss(student_logits, teacher_logits, temperature=temperature,
                            standardize=False, reduction=reduction, mask=mask)


class DistillationParts(NamedTuple):
    """``distillation_loss(..., return_components=True)``: the loss and its two (detached) parts,
    reduced like the loss: ``ce`` the cross-entropy, ``kd`` the ``tau_s**2 * KL`` term (unweighted),
    so that ``loss = ce_weight * ce + kd_weight * kd``."""

    loss: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    ce_weight: float = 0.1,
    kd_weight: float = 9.0,
    temperature: float = 2.0,
    teacher_temperature: Optional[float] = None,
    standardize: bool = True,
    correction: int = 1,
    eps: float = 1e-7,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    mask: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    return_components: bool = False,
) -> Union[torch.Tensor, DistillationParts]:
    """The distillation objective (the paper's Algorithm 2 with token labels)::

        included = mask & (labels != ignore_index)            # rows of the objective
        ce = F.cross_entropy(x[included], labels[included], label_smoothing=label_smoothing, reduction="none")
        kd = tau_s**2 * KL(softmax(Z(y)/tau_t) || softmax(Z(x)/tau_s))[included]
        loss = (ce_weight * ce + kd_weight * kd).sum() / max(included.sum(), 1)     # reduction="mean"

    Without labels the CE term is absent (pure KD: ``kd_weight * kd``). ``reduction``: ``"mean"``
    (over the included rows: token-level averaging, ``batchmean`` for classification), ``"sum"``, or
    ``"none"`` (per row; excluded rows 0). All rows excluded: loss 0, gradients 0.
    """
    (student, teacher, labels, mask, tau_s, tau_t, ce_weight, kd_weight, label_smoothing) = check_objective_args(
        student_logits, teacher_logits, labels, ce_weight=ce_weight, kd_weight=kd_weight, temperature=temperature,
        teacher_temperature=teacher_temperature, standardize=standardize, correction=correction, eps=eps,
        ignore_index=ignore_index, label_smoothing=label_smoothing, mask=mask, reduction=reduction,
    )
    num_classes = student.shape[-1]
    lead = student.shape[:-1]
    x = student.reshape(-1, num_classes)
    y = teacher.reshape(-1, num_classes)
    acc = accumulation_dtype(x, y)
    keep = torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if mask is None else mask.reshape(-1)
    if labels is not None:
        keep = keep & (labels.reshape(-1) != ignore_index)
    # Index the included rows out so that excluded rows (even NaN ones) get an exact 0 gradient.
    kd = torch.zeros(x.shape[0], dtype=acc, device=x.device).index_put(
        (keep,), _row_kl(x[keep], y[keep], tau_s, tau_t, standardize, correction, eps))
    ce = torch.zeros_like(kd)
    if labels is not None:
        ce = ce.index_put((keep,), F.cross_entropy(x[keep].to(acc), labels.reshape(-1)[keep].long(),
                                                   reduction="none", label_smoothing=label_smoothing))
        rows = ce_weight * ce + kd_weight * kd
    else:
        rows = kd_weight * kd

    def reduce(values: torch.Tensor) -> torch.Tensor:
        if reduction == "none":
            return values.reshape(lead)
        total = values.sum()
        return total if reduction == "sum" else total / max(int(keep.sum()), 1)

    loss = reduce(rows)
    if not return_components:
        return loss
    return DistillationParts(loss, reduce(ce).detach(), reduce(kd).detach())
