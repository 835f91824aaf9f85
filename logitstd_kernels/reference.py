"""The eager PyTorch implementation of the public contract: ground truth for tests and benchmarks.

Written for clarity, not speed. It is the one reference implementation in the project; tests and
benchmarks import it from here. With ``correction=1, eps=1e-7, reduction="batchmean"`` it is the
paper's official code (and torchdistill's ``LogitStdKDLoss``)::

    z = (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-7) / tau
    loss = F.kl_div(F.log_softmax(z_s, -1), F.softmax(z_t, -1), reduction="batchmean") * tau**2

and with ``correction=0, eps=0`` it is the paper's Algorithm 1. The math is in DESIGN.md section 1.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import check_kd_args, check_logits, check_std_args, check_temperature

__all__ = ["zscore", "logitstd_kd_loss", "kd_loss", "accumulation_dtype"]


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
