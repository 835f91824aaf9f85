"""The C++/CUDA backend ("cpu" and "cuda"): the kernel contract of ``_backends`` on ``logitstd_kernels._C``.

Importing this module loads the extension built by ``setup.py``; loading it registers the ops
``torch.ops.logitstd.fused_kd_forward`` and ``torch.ops.logitstd.scale_rows_`` (schemas in
``csrc/logitstd.cpp``) with a CPU kernel and, when the extension was built with CUDA, a CUDA kernel.
This module adds their fake (meta) implementations, so they trace under ``torch.compile`` and pass
``torch.library.opcheck``. It raises ImportError when the extension is not built; the backend
registry reports that as the reason the "cpu"/"cuda" backends are unavailable.

Equivalent eager code of ``fused_forward`` (per included row ``r``; excluded rows give 0)::

    rows[r] = reference.distillation_loss(student[r:r+1], teacher[r:r+1], labels[r:r+1], reduction="sum",
                                          **settings of config)
    grad_student[r], grad_teacher[r] = grad_scale * torch.autograd.grad(rows[r], (student[r], teacher[r]))
"""

from __future__ import annotations

from typing import Optional

import torch

from .config import DistillConfig
from .reference import accumulation_dtype

try:
    from . import _C  # noqa: F401  (loading the library registers the ops)
except ImportError as exc:
    raise ImportError(
        f"the C++ extension logitstd_kernels._C is not built ({exc}); build it with "
        f"`pip install --no-build-isolation -e .` (see setup.py)"
    ) from exc

__all__ = ["fused_forward", "fused_regrad_", "has_kernel", "scale_rows_"]

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def has_kernel(device_type: str) -> bool:
    """Whether the extension has a kernel for ``device_type`` ("cpu" or "cuda")."""
    key = _DISPATCH_KEYS.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("logitstd::fused_kd_forward", key)


def _kernel_args(config: DistillConfig) -> tuple:
    """The settings of the C++ ops' schemas (csrc/logitstd.cpp), in their order, after the tensors."""
    return (config.temperature, config.teacher_temperature, config.standardize, config.correction, config.eps)


def _objective_args(labels: Optional[torch.Tensor], config: DistillConfig) -> tuple:
    """The trailing (labels, ignore_index, label_smoothing, ce_weight, kd_weight, divergence, beta,
    dkd_alpha, dkd_beta) of the C++ ops."""
    return (labels, config.ignore_index, config.label_smoothing, config.ce_weight, config.kd_weight,
            config.divergence, config.beta, config.dkd_alpha, config.dkd_beta)


def fused_forward(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                  mask: Optional[torch.Tensor], grad_scale: torch.Tensor, config: DistillConfig, grad_student: bool,
                  grad_teacher: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row loss and the gradients scaled by ``grad_scale``: the kernel contract of ``_backends``.

    Returns ``(rows, grad_student, grad_teacher, ce_rows, kd_rows)``: ``rows`` is (N,) in the
    accumulation dtype, each gradient a new contiguous (N, V) tensor in its input's dtype, or an empty
    (0,) tensor when not requested; ``ce_rows``/``kd_rows`` the objective's parts per row.
    """
    return torch.ops.logitstd.fused_kd_forward(student, teacher, mask, grad_scale, *_kernel_args(config),
                                               bool(grad_student), bool(grad_teacher),
                                               *_objective_args(labels, config))[:5]


def fused_forward_with_temperature(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                                   mask: Optional[torch.Tensor], grad_scale: torch.Tensor, config: DistillConfig,
                                   grad_student: bool, grad_teacher: bool, temperature_rows: torch.Tensor,
                                   grad_temperature: bool) -> tuple[torch.Tensor, ...]:
    """``fused_forward`` with a per-row temperature ``temperature_rows`` ((N,) or (1,), accumulation
    dtype) for student and teacher in place of the config's; a sixth output, when ``grad_temperature``,
    holds ``grad_scale[r] * d rows[r] / d temperature`` per row (else an empty tensor)."""
    return torch.ops.logitstd.fused_kd_forward(student, teacher, mask, grad_scale, *_kernel_args(config),
                                               bool(grad_student), bool(grad_teacher), *_objective_args(labels, config),
                                               temperature_rows, bool(grad_temperature))


def fused_regrad_(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor], active: torch.Tensor,
                  grad_scale: torch.Tensor, config: DistillConfig, grad_x: torch.Tensor, grad_y: torch.Tensor,
                  temperature_rows: Optional[torch.Tensor] = None) -> None:
    """Recompute in place the gradients of the rows where ``active`` is true (factor ``grad_scale[r]``);
    other rows are not touched. ``grad_x``/``grad_y``: (N, V) buffers from ``fused_forward``, or empty;
    ``temperature_rows``: the forward's per-row temperature, if it had one."""
    torch.ops.logitstd.fused_kd_regrad_(student, teacher, active, grad_scale, *_kernel_args(config), grad_x, grad_y,
                                        *_objective_args(labels, config), temperature_rows)


def scale_rows_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """In place ``grad[r] *= scale[r]`` (``scale`` of shape () or (N,)); rows whose scale is 1 are skipped.

    Equivalent eager code: ``grad.mul_(scale.reshape(-1, 1) if scale.dim() else scale)``.
    """
    torch.ops.logitstd.scale_rows_(grad, scale)


@torch.library.register_fake("logitstd::fused_kd_forward")
def _fused_kd_forward_fake(student, teacher, mask, grad_scale, tau_s, tau_t, standardize, correction, eps,
                           grad_student, grad_teacher, labels=None, ignore_index=-100, label_smoothing=0.0,
                           ce_weight=0.0, kd_weight=1.0, divergence="forward_kl", beta=0.5, dkd_alpha=1.0,
                           dkd_beta=8.0, temperature_rows=None, grad_temperature=False):
    torch._check(student.dim() == 2, lambda: f"student must be 2-D, got {student.dim()}-D")
    torch._check(teacher.shape == student.shape, lambda: "teacher and student must have the same shape")
    rows = student.new_empty((student.shape[0],), dtype=accumulation_dtype(student, teacher))
    grad_x = student.new_empty(student.shape) if grad_student else student.new_empty((0,))
    grad_y = teacher.new_empty(teacher.shape) if grad_teacher else teacher.new_empty((0,))
    tau_grad = torch.empty_like(rows) if grad_temperature else rows.new_empty((0,))
    return rows, grad_x, grad_y, torch.empty_like(rows), torch.empty_like(rows), tau_grad


@torch.library.register_fake("logitstd::fused_kd_regrad_")
def _fused_kd_regrad_fake(student, teacher, active, grad_scale, tau_s, tau_t, standardize, correction, eps, grad_x,
                          grad_y, labels=None, ignore_index=-100, label_smoothing=0.0, ce_weight=0.0, kd_weight=1.0,
                          divergence="forward_kl", beta=0.5, dkd_alpha=1.0, dkd_beta=8.0, temperature_rows=None):
    return None


@torch.library.register_fake("logitstd::scale_rows_")
def _scale_rows_fake(grad, scale):
    return None
