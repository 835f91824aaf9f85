"""Launchers of the Triton kernels, implementing the kernel contract of ``logitstd_kernels._backends``.

No host synchronization: every argument that depends on tensor data (the mask, the gradient scale)
is read by the kernels on the device, so the launchers can be captured in a CUDA graph.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton

from ..config import DistillConfig
from .config import SCALE_BLOCK, SCALE_WARPS, KernelConfig, kd_config, tuning_constexprs, vector_width
from .blocked_kernel import kd_blocked_kernel
from .register_kernel import kd_register_kernel
from .scale_kernel import scale_rows_kernel


def _row_vec(num_classes: int, *tensors: torch.Tensor) -> int:
    """VEC for these rows: the 16-byte run of ``config.vector_width``, halved until every row start
    (of the inputs and of the contiguous gradients, whose row stride is V) is aligned to a run."""
    def aligned(vec: int) -> bool:
        return num_classes % vec == 0 and all(
            t.stride(0) % vec == 0 and t.data_ptr() % (vec * t.element_size()) == 0 for t in tensors)

    vec = vector_width(*(t.dtype for t in tensors))
    while vec > 1 and not aligned(vec):
        vec //= 2
    return vec


def _check_rows(name: str, t: torch.Tensor) -> None:
    """The contract's input layout: (N, V) with unit stride along V (any row stride)."""
    if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
        raise ValueError(f"{name} must be a 2-d tensor with unit stride along the classes, got shape "
                         f"{tuple(t.shape)} and strides {t.stride()}")


def device_guard(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``tensor``'s GPU the current device for the launch (Triton launches on the current one)."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def _launch(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor], keep: Optional[torch.Tensor],
            grad_scale: torch.Tensor, rows: torch.Tensor, parts: tuple[torch.Tensor, torch.Tensor],
            gx: Optional[torch.Tensor], gy: Optional[torch.Tensor], config: DistillConfig, zero_excluded: bool,
            kernel_config: Optional[KernelConfig]) -> None:
    """One launch of the fused kernel over every row (see ``fused_forward`` for the arguments)."""
    if config.divergence == "dkd":
        raise NotImplementedError("divergence='dkd' runs on the cpu and torch backends; the Triton kernels do not "
                                  "compute decoupled KD")
    num_rows, num_classes = student.shape
    acc64 = torch.float64 in (student.dtype, teacher.dtype)
    vec = _row_vec(num_classes, student, teacher)
    full_vectors = vec == vector_width(student.dtype, teacher.dtype)
    cfg = kernel_config if kernel_config is not None else kd_config(num_classes, acc64, full_vectors)
    kernel = kd_register_kernel if cfg.register else kd_blocked_kernel
    if cfg.register and cfg.block < num_classes:
        raise ValueError(f"register path needs BLOCK >= V, got BLOCK={cfg.block} for V={num_classes}")
    vec = min(vec, cfg.block)  # a tile holds at least one run
    factors = grad_scale.reshape(-1)
    dof = float(num_classes - config.correction) if config.standardize else 1.0
    # The interpreter (CPU tensors) rounds float32 -> bfloat16 wrongly: the kernels round on the bits.
    round_bf16 = student.device.type == "cpu" and any(
        g is not None and g.dtype == torch.bfloat16 for g in (gx, gy))
    with device_guard(student):
        kernel[(num_rows,)](
            student, teacher, keep if keep is not None else rows, factors, rows,
            gx if gx is not None else rows, gy if gy is not None else rows,
            labels if labels is not None else rows, parts[0], parts[1],
            num_classes, num_classes // vec, student.stride(0) // vec, teacher.stride(0) // vec,
            factors.stride(0) if factors.numel() > 1 else 0, config.ignore_index,
            config.temperature, config.teacher_temperature, config.eps, dof, float(num_classes),
            config.label_smoothing, config.ce_weight, config.kd_weight, config.beta,
            BLOCK=cfg.block, VEC=vec, STANDARDIZE=config.standardize, GRAD_S=gx is not None,
            GRAD_T=gy is not None, HAS_MASK=keep is not None, ACC64=acc64, ZERO_EXCLUDED=zero_excluded,
            ROUND_BF16=round_bf16, HAS_LABELS=labels is not None, DIV=config.kernel_divergence(),
            num_warps=cfg.num_warps, **tuning_constexprs(cfg, config.label_smoothing > 0),
        )


def _keep(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The mask as the kernels read it: one contiguous byte per row."""
    return None if mask is None else mask.contiguous().view(torch.uint8)


def fused_forward(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                  mask: Optional[torch.Tensor], grad_scale: torch.Tensor, config: DistillConfig, grad_student: bool,
                  grad_teacher: bool, *, kernel_config: Optional[KernelConfig] = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row objective of (N, V) logits and, if requested, the scaled gradients (``_backends``' contract).

    Equivalent eager code (``acc`` = float64 if an input is float64, else float32)::

        rows = reference.distillation_loss(student, teacher, labels, mask=mask, reduction="none", **settings)
        grad_student = (grad_scale[:, None] * d rows / d student).to(student.dtype)   # same for teacher

    A label outside [0, V) gives its row NaN (no host synchronization). ``kernel_config`` overrides
    the table of ``config.kd_config`` (tests use it to force the blocked path at small V).
    Returns ``(rows, grad_student, grad_teacher, ce_rows, kd_rows)``; a gradient that is not
    requested is an empty (0,) tensor.
    """
    _check_rows("student", student)
    _check_rows("teacher", teacher)
    num_rows, num_classes = student.shape
    acc = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    rows = torch.empty(num_rows, dtype=acc, device=student.device)
    gx = (torch.empty((num_rows, num_classes), dtype=student.dtype, device=student.device)
          if grad_student else student.new_empty((0,)))
    gy = (torch.empty((num_rows, num_classes), dtype=teacher.dtype, device=teacher.device)
          if grad_teacher else teacher.new_empty((0,)))
    parts = (torch.empty_like(rows), torch.empty_like(rows))
    if num_rows > 0:
        _launch(student, teacher, labels, _keep(mask), grad_scale, rows, parts, gx if grad_student else None,
                gy if grad_teacher else None, config, True, kernel_config)
    return rows, gx, gy, parts[0], parts[1]


def fused_regrad_(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor], active: torch.Tensor,
                  grad_scale: torch.Tensor, config: DistillConfig, grad_x: torch.Tensor, grad_y: torch.Tensor,
                  temperature_rows: Optional[torch.Tensor] = None, *,
                  kernel_config: Optional[KernelConfig] = None) -> None:
    """Recompute, in place, the gradients of the rows where ``active`` is true with their factor
    ``grad_scale[r]`` (one element or one per row); other rows are not touched and cost no traffic.
    ``grad_x``/``grad_y``: the (N, V) buffers ``fused_forward`` returned, or empty to leave alone.

    Equivalent eager code::

        _, gx, gy, _, _ = fused_forward(student, teacher, labels, active, grad_scale, config, ...)
        grad_x[active] = gx[active]; grad_y[active] = gy[active]
    """
    _check_rows("student", student)
    _check_rows("teacher", teacher)
    if temperature_rows is not None:
        raise NotImplementedError("the Triton kernels take no per-row temperature; use backend='cpu' or 'torch'")
    want_x, want_y = grad_x.numel() > 0, grad_y.numel() > 0
    if student.shape[0] == 0 or not (want_x or want_y):
        return
    acc = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    scratch = torch.empty(student.shape[0], dtype=acc, device=student.device)
    _launch(student, teacher, labels, _keep(active), grad_scale, scratch, (scratch, scratch),
            grad_x if want_x else None, grad_y if want_y else None, config, False, kernel_config)


def scale_rows_(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """In place ``grad[r] *= scale[r]`` for a (N, V) gradient and a scale of shape () or (N,).

    Equivalent eager code: ``grad.mul_(scale.reshape(-1, 1).to(grad.dtype))``. Rows whose scale is
    exactly 1 are skipped on the device (no pass over the gradient, no host synchronization).
    Returns ``grad``.
    """
    if grad.dim() != 2:
        raise ValueError(f"grad must be 2-d (N, V), got shape {tuple(grad.shape)}")
    num_rows, num_classes = grad.shape
    if scale.dim() > 1 or (scale.dim() == 1 and scale.shape[0] != num_rows):
        raise ValueError(f"scale must have shape () or ({num_rows},), got {tuple(scale.shape)}")
    if num_rows == 0 or num_classes == 0:
        return grad
    if num_classes > 1 and grad.stride(1) != 1:
        grad.mul_(scale.reshape(-1, 1))
        return grad
    stride_s = scale.stride(0) if scale.dim() == 1 else 0
    grid = (num_rows, triton.cdiv(num_classes, SCALE_BLOCK))
    with device_guard(grad):
        scale_rows_kernel[grid](
            grad, scale, num_classes, grad.stride(0), stride_s,
            BLOCK=SCALE_BLOCK, ACC64=torch.float64 in (grad.dtype, scale.dtype), num_warps=SCALE_WARPS,
        )
    return grad
