"""The Triton backend of the sparse-teacher loss: the contract of ``_ops/sparse_op.py``
(``sparse_forward``, ``sparse_regrad_``, ``scale_rows_``) on ``sparse_kernel.sparse_kd_kernel``.

Equivalent eager code of ``sparse_forward`` (per included row ``r``; excluded rows give 0)::

    rows[r] = reference.distillation_loss(student[r:r+1], SparseTeacher(teacher[r:r+1]), labels[r:r+1],
                                          reduction="sum", **settings of config)
    grad_student[r] = grad_scale[r] * torch.autograd.grad(rows[r], student[r])

No host synchronization: the masks and the gradient's factors are read by the kernel.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton

from ..config import SUPPORTS, DistillConfig
from ..sparse import SparseRows
from .config import SPARSE_BLOCK, SPARSE_TAIL_COMPARES, SPARSE_WARPS
from .launch import device_guard, scale_rows_
from .sparse_kernel import sparse_kd_kernel

__all__ = ["sparse_forward", "sparse_regrad_", "scale_rows_"]


def _launch(student: torch.Tensor, teacher: SparseRows, labels: Optional[torch.Tensor], keep: Optional[torch.Tensor],
            grad_scale: torch.Tensor, outputs: tuple, grad: Optional[torch.Tensor], config: DistillConfig,
            zero_excluded: bool) -> None:
    """One launch over every row; ``outputs``: the (N,) rows, ce and kd buffers."""
    if student.dim() != 2 or (student.shape[1] > 1 and student.stride(1) != 1):
        raise ValueError(f"student must be a 2-d tensor with unit stride along the classes, got strides "
                         f"{student.stride()}")
    num_rows, num_classes = student.shape
    k = teacher.ids.shape[1]
    acc64 = torch.float64 in (student.dtype, teacher.values.dtype)
    factors = grad_scale.reshape(-1)
    rows = outputs[0]
    mask = None if teacher.mask is None else teacher.mask.contiguous().view(torch.uint8)
    value_scale = config.generation_temperature if teacher.kind == "logprobs" else 1.0
    round_bf16 = student.device.type == "cpu" and grad is not None and grad.dtype == torch.bfloat16
    block, kblock = min(triton.next_power_of_2(num_classes), SPARSE_BLOCK), triton.next_power_of_2(k)
    with device_guard(student):
        sparse_kd_kernel[(num_rows,)](
            student, student.stride(0), teacher.ids, teacher.values.contiguous(), rows if mask is None else mask,
            *(rows if t is None else t for t in (teacher.row_mean, teacher.row_std, teacher.log_normalizer)),
            rows if keep is None else keep, factors, factors.stride(0) if factors.numel() > 1 else 0, *outputs,
            rows if grad is None else grad, rows if labels is None else labels, num_classes, k, config.ignore_index,
            config.temperature, config.teacher_temperature, config.eps, config.correction, config.label_smoothing,
            config.ce_weight, config.kd_weight, value_scale,
            BLOCK=block, KBLOCK=kblock, TAIL_BLOCK=max(16, min(block, SPARSE_TAIL_COMPARES // kblock)),
            STANDARDIZE=config.standardize, SUPPORT=SUPPORTS.index(config.support), HAS_MASK=keep is not None,
            HAS_LABELS=labels is not None, HAS_EMASK=mask is not None, HAS_STATS=teacher.row_std is not None,
            HAS_LN=teacher.log_normalizer is not None, GRAD=grad is not None, ZERO_EXCLUDED=zero_excluded,
            ROUND_BF16=round_bf16, ACC64=acc64, num_warps=SPARSE_WARPS,
        )


def _keep(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if mask is None else mask.contiguous().view(torch.uint8)


def sparse_forward(student: torch.Tensor, teacher: SparseRows, labels: Optional[torch.Tensor],
                   mask: Optional[torch.Tensor], grad_scale: torch.Tensor, config: DistillConfig,
                   grad_student: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, grad_student, ce_rows, kd_rows)``: the objective of every row and the student's gradient
    times ``grad_scale`` (an empty (0,) tensor when not requested)."""
    acc = torch.float64 if torch.float64 in (student.dtype, teacher.values.dtype) else torch.float32
    outputs = tuple(torch.empty(student.shape[0], dtype=acc, device=student.device) for _ in range(3))
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device) if grad_student else None
    if student.shape[0] > 0:
        _launch(student, teacher, labels, _keep(mask), grad_scale, outputs, grad, config, True)
    return outputs[0], grad if grad is not None else student.new_empty((0,)), outputs[1], outputs[2]


def sparse_regrad_(student: torch.Tensor, teacher: SparseRows, labels: Optional[torch.Tensor], active: torch.Tensor,
                   grad_scale: torch.Tensor, config: DistillConfig, grad_x: torch.Tensor) -> None:
    """In place: the gradient rows where ``active`` is true recomputed with their factor ``grad_scale``."""
    if student.shape[0] == 0:
        return
    acc = torch.float64 if torch.float64 in (student.dtype, teacher.values.dtype) else torch.float32
    scratch = torch.empty(student.shape[0], dtype=acc, device=student.device)
    _launch(student, teacher, labels, _keep(active), grad_scale, (scratch, scratch, scratch), grad_x, config, False)
