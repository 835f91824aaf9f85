"""The C++ CPU backend of the sparse-teacher loss: the contract of ``_ops/sparse_op.py`` on
``torch.ops.logitstd.sparse_kd_forward`` / ``sparse_kd_regrad_`` (``csrc/cpu/sparse_cpu.cpp``), with
their fake implementations. There is no CUDA kernel of these ops (``_backends.sparse_backend_module``).

Equivalent eager code of ``sparse_forward`` (per included row ``r``; excluded rows give 0)::

    rows[r] = reference.distillation_loss(student[r:r+1], SparseTeacher(teacher[r:r+1]), labels[r:r+1],
                                          reduction="sum", **settings of config)
    grad_student[r] = grad_scale * torch.autograd.grad(rows[r], student[r])
"""

from __future__ import annotations

from typing import Optional

import torch

from ._cpp import scale_rows_
from .config import SUPPORTS, DistillConfig
from .reference import accumulation_dtype
from .sparse import SparseRows

__all__ = ["sparse_forward", "sparse_regrad_", "scale_rows_", "sparse_args"]


def sparse_args(teacher: SparseRows, config: DistillConfig) -> tuple:
    """``value_scale`` and ``support`` of the kernels: T_gen for stored log-probabilities (else 1), the
    support's code (``config.SUPPORTS`` order)."""
    scale = config.generation_temperature if teacher.kind == "logprobs" else 1.0
    return scale, SUPPORTS.index(config.support)


def _settings(config: DistillConfig) -> tuple:
    return config.temperature, config.teacher_temperature, config.standardize, config.correction, config.eps


def _objective(labels: Optional[torch.Tensor], teacher: SparseRows, config: DistillConfig) -> tuple:
    return (labels, config.ignore_index, config.label_smoothing, config.ce_weight, config.kd_weight,
            *sparse_args(teacher, config))


def sparse_forward(student: torch.Tensor, teacher: SparseRows, labels: Optional[torch.Tensor],
                   mask: Optional[torch.Tensor], grad_scale: torch.Tensor, config: DistillConfig,
                   grad_student: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, grad_student, ce_rows, kd_rows)``: the objective of every row and the student's gradient
    times ``grad_scale`` (an empty (0,) tensor when not requested)."""
    return torch.ops.logitstd.sparse_kd_forward(student, *teacher.tensors(), mask, grad_scale, *_settings(config),
                                                bool(grad_student), *_objective(labels, teacher, config))


def sparse_regrad_(student: torch.Tensor, teacher: SparseRows, labels: Optional[torch.Tensor], active: torch.Tensor,
                   grad_scale: torch.Tensor, config: DistillConfig, grad_x: torch.Tensor) -> None:
    """In place: the gradient rows where ``active`` is true recomputed with their factor ``grad_scale``."""
    torch.ops.logitstd.sparse_kd_regrad_(student, *teacher.tensors(), active, grad_scale, *_settings(config), grad_x,
                                         *_objective(labels, teacher, config))


@torch.library.register_fake("logitstd::sparse_kd_forward")
def _sparse_kd_forward_fake(student, ids, values, entry_mask, row_mean, row_std, log_normalizer, mask, grad_scale,
                            tau_s, tau_t, standardize, correction, eps, grad_student, *rest):
    rows = student.new_empty((student.shape[0],), dtype=accumulation_dtype(student, values))
    grad = student.new_empty(student.shape) if grad_student else student.new_empty((0,))
    return rows, grad, torch.empty_like(rows), torch.empty_like(rows)


@torch.library.register_fake("logitstd::sparse_kd_regrad_")
def _sparse_kd_regrad_fake(*args):
    return None
