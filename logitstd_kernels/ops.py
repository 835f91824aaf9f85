"""``torch.ops.logitstd.kd_loss``: the autograd-capable fused op, its fake kernel and backward.

The fused kernels compute the loss and, when an input requires grad, its gradient in the same
launch (the row is already on chip; a separate backward would read both inputs again). The
gradient is written pre-scaled by the reduction (``1/count`` for ``"batchmean"``) and saved; the
backward multiplies it by the incoming gradient in place (out of place when the graph is retained
or traced), so the peak memory is the inputs plus one gradient buffer per input that requires grad.
The Triton scaling kernel skips rows whose incoming gradient is exactly 1 on the device (no host
synchronization), so ``loss.backward()`` on a scalar loss costs no second pass over the gradient.

Equivalent eager code: ``reference.logitstd_kd_loss`` with the same arguments.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._backends import backend_module
from ._checks import check_op_args
from .reference import accumulation_dtype


def _reduction_denominator(mask: Optional[torch.Tensor], num_rows: int, num_classes: int,
                           reduction: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """What the summed row losses are divided by, as a (1,) device tensor (no host sync)."""
    if reduction in ("none", "sum"):
        return torch.ones(1, dtype=dtype, device=device)
    if mask is None:
        count = torch.full((1,), float(max(num_rows, 1)), dtype=dtype, device=device)
    else:
        count = mask.sum().reshape(1).clamp_min(1).to(dtype)
    return count * num_classes if reduction == "mean" else count


def _saved_grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16's exponent range is too narrow for a gradient pre-scaled by 1/count: it would underflow
    before a loss-scaling factor (GradScaler) could lift it. Such gradients are kept in float32 and
    cast after the incoming gradient is applied, as eager PyTorch does; other dtypes keep their own."""
    return torch.float32 if dtype == torch.float16 else dtype


def _kernel_input(logits: torch.Tensor, needs_grad: bool) -> torch.Tensor:
    """The kernels write gradients in their input's dtype: a float16 input that needs a gradient is
    handed over as a float32 copy (a temporary; the loss is the same, the inputs are upcast anyway)."""
    return logits.float() if needs_grad and _saved_grad_dtype(logits.dtype) != logits.dtype else logits


@torch.library.custom_op("logitstd::kd_loss", mutates_args=())
def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: Optional[torch.Tensor],
    temperature: float,
    teacher_temperature: float,
    standardize: bool,
    correction: int,
    eps: float,
    reduction: str,
    grad_student: bool,
    grad_teacher: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused (logit-standardized) KD loss of (N, V) logits with a fused backend.

    Returns ``(loss, saved_grad_student, saved_grad_teacher)``; the last two are internal (the
    pre-scaled gradients, or empty tensors when not requested) and not differentiable.
    ``loss`` has shape (N,) for ``reduction="none"`` and () otherwise.
    """
    check_op_args(student, teacher, mask, temperature, teacher_temperature, standardize, correction, eps,
                  reduction, backend)
    num_rows, num_classes = student.shape
    acc = accumulation_dtype(student, teacher)
    denominator = _reduction_denominator(mask, num_rows, num_classes, reduction, student.device, acc)
    grad_scale = denominator.reciprocal()
    rows, grad_s, grad_t = backend_module(backend).fused_kd_forward(
        _kernel_input(student, grad_student), _kernel_input(teacher, grad_teacher), mask, grad_scale, temperature, teacher_temperature, standardize, correction,
        eps, grad_student, grad_teacher,
    )
    if reduction == "none":
        return rows, grad_s, grad_t
    return (rows.sum() / denominator).reshape(()), grad_s, grad_t


@kd_loss.register_fake
def _kd_loss_fake(student, teacher, mask, temperature, teacher_temperature, standardize, correction, eps,
                  reduction, grad_student, grad_teacher, backend):
    num_rows = student.shape[0]
    loss = student.new_empty((num_rows,) if reduction == "none" else (), dtype=accumulation_dtype(student, teacher))
    grad_s = (student.new_empty(student.shape, dtype=_saved_grad_dtype(student.dtype)) if grad_student
              else student.new_empty((0,)))
    grad_t = (teacher.new_empty(teacher.shape, dtype=_saved_grad_dtype(teacher.dtype)) if grad_teacher
              else teacher.new_empty((0,)))
    return loss, grad_s, grad_t


def _setup_context(ctx, inputs, output) -> None:
    _, grad_s, grad_t = output
    ctx.mark_non_differentiable(grad_s, grad_t)
    ctx.set_materialize_grads(False)  # no N x V zeros for the non-differentiable outputs
    ctx.save_for_backward(grad_s, grad_t)
    ctx.backend = inputs[-1]
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)
    ctx.requested = (inputs[9], inputs[10])


def _may_overwrite_saved(saved: torch.Tensor) -> bool:
    """True when the saved gradient will never be needed again, so it can become the gradient.

    Not under torch.compile / AOT tracing (functionalized graphs cannot mutate saved tensors), and
    not when the autograd graph is kept (``retain_graph=True``, gradcheck): a later backward through
    the same graph must find the saved gradient unchanged.
    """
    if torch.compiler.is_compiling() or torch._guards.detect_fake_mode(saved) is not None:
        return False
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keep_graph is not None and not keep_graph()


def _apply_upstream(ctx, saved: torch.Tensor, grad_loss: torch.Tensor, requested: bool, name: str,
                    dtype: torch.dtype) -> torch.Tensor:
    if not requested:
        raise RuntimeError(
            f"logitstd.kd_loss was called with grad_{name}=False but autograd asks for the {name} "
            f"gradient; pass grad_{name}=True when the {name} logits require grad"
        )
    if not _may_overwrite_saved(saved):
        scale = grad_loss.reshape(-1, 1) if grad_loss.dim() == 1 else grad_loss
        return (saved * scale).to(dtype)
    # The saved buffer becomes the gradient in place: no second N x V allocation, and the Triton
    # scaling kernel skips rows whose incoming gradient is exactly 1.
    backend_module(ctx.backend).scale_rows_(saved, grad_loss)
    return saved.to(dtype)


def _backward(ctx, grad_loss, _grad_s, _grad_t):
    if grad_loss is None:
        return (None,) * 12
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            "logitstd.kd_loss does not support double backward (create_graph=True): its gradient is "
            "computed by the fused kernel; use backend=\"torch\" for higher-order gradients"
        )
    saved_s, saved_t = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_s = _apply_upstream(ctx, saved_s, grad_loss, ctx.requested[0], "student", ctx.dtypes[0]) if need_s else None
    grad_t = _apply_upstream(ctx, saved_t, grad_loss, ctx.requested[1], "teacher", ctx.dtypes[1]) if need_t else None
    return (grad_s, grad_t) + (None,) * 10


kd_loss.register_autograd(_backward, setup_context=_setup_context)
