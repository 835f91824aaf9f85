"""``torch.ops.logitstd.kd_loss``: the autograd-capable fused op, its fake kernel and backward.

The fused kernels compute the loss and, when an input requires grad, its gradient in the same
launch (the row is already on chip; a separate backward would read both inputs again). The
gradient is written pre-scaled by the reduction (``1/count`` for ``"batchmean"``) and saved; the
backward applies the incoming gradient to it in place (out of place when the graph is retained or
traced), so the peak memory is the inputs plus one gradient buffer per input that requires grad:

- an incoming gradient of exactly 1 (``loss.backward()`` on the scalar loss) costs nothing: the
  saved gradient is the gradient, rounded once to the input's dtype;
- float32/float64 gradients are multiplied by other incoming gradients in place (``scale_rows_``,
  rows whose factor is 1 skipped on the device: no host synchronization);
- bfloat16/float16 gradients are recomputed from the logits instead, with the incoming gradient
  folded into the kernel's factor (``fused_kd_regrad_``, in place, rows whose factor is 1 skipped
  on the device), so that they are rounded once, like eager PyTorch's, whatever the factor (a
  ``loss * 9`` or a GradScaler's 65536; scaling the rounded gradient would round twice, and a float16
  gradient pre-scaled by ``1/count`` would underflow before the scaler lifts it). For this the op
  keeps references to the low-precision logits until the backward; the recomputation reads them
  again (6 bytes per element in bfloat16 for the student gradient).

Equivalent eager code: ``reference.logitstd_kd_loss`` with the same arguments. The autograd
machinery (``save_gradients`` / ``saved_gradients_backward``) is shared with the distillation
objective's op (``objective.py``).
"""

from __future__ import annotations

from typing import Optional

import torch

from ._backends import Objective, backend_module
from ._checks import check_op_args
from .reference import accumulation_dtype

LOW_PRECISION = (torch.float16, torch.bfloat16)


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
    mask = None if mask is None else mask.contiguous()
    num_rows, num_classes = student.shape
    acc = accumulation_dtype(student, teacher)
    denominator = _reduction_denominator(mask, num_rows, num_classes, reduction, student.device, acc)
    rows, grad_s, grad_t, _, _ = backend_module(backend).fused_kd_forward(
        student, teacher, mask, denominator.reciprocal(), temperature, teacher_temperature, standardize,
        correction, eps, grad_student, grad_teacher,
    )
    if reduction == "none":
        return rows, grad_s, grad_t
    return (rows.sum() / denominator).reshape(()), grad_s, grad_t


@kd_loss.register_fake
def _kd_loss_fake(student, teacher, mask, temperature, teacher_temperature, standardize, correction, eps,
                  reduction, grad_student, grad_teacher, backend):
    num_rows = student.shape[0]
    loss = student.new_empty((num_rows,) if reduction == "none" else (), dtype=accumulation_dtype(student, teacher))
    grad_s = student.new_empty(student.shape) if grad_student else student.new_empty((0,))
    grad_t = teacher.new_empty(teacher.shape) if grad_teacher else teacher.new_empty((0,))
    return loss, grad_s, grad_t


@torch.library.custom_op("logitstd::kd_grad", mutates_args=())
def kd_grad(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: Optional[torch.Tensor],
    grad_scale: torch.Tensor,
    temperature: float,
    teacher_temperature: float,
    standardize: bool,
    correction: int,
    eps: float,
    grad_student: bool,
    grad_teacher: bool,
    backend: str,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of the fused rows times ``grad_scale`` ((1,) or (N,)), recomputed in new buffers.

    Equivalent eager code: ``grad_scale[:, None] * d rows / d student`` (and the teacher), rounded
    once to each input's dtype, where ``rows`` are the KD rows, or the objective's rows when
    ``labels`` is given. The backward uses it for low-precision gradients when it may not overwrite
    the saved ones (a retained graph, torch.compile).
    """
    objective = (None if labels is None
                 else Objective(labels, ignore_index, label_smoothing, ce_weight, kd_weight))
    _, grad_s, grad_t, _, _ = backend_module(backend).fused_kd_forward(
        student, teacher, None if mask is None else mask.contiguous(), grad_scale, temperature,
        teacher_temperature, standardize, correction, eps, grad_student, grad_teacher, objective,
    )
    return grad_s, grad_t


@kd_grad.register_fake
def _kd_grad_fake(student, teacher, mask, grad_scale, temperature, teacher_temperature, standardize, correction,
                  eps, grad_student, grad_teacher, backend, labels=None, ignore_index=-100, label_smoothing=0.0,
                  ce_weight=0.0, kd_weight=1.0):
    grad_s = student.new_empty(student.shape) if grad_student else student.new_empty((0,))
    grad_t = teacher.new_empty(teacher.shape) if grad_teacher else teacher.new_empty((0,))
    return grad_s, grad_t


def save_gradients(ctx, student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor],
                   labels: Optional[torch.Tensor], grad_s: torch.Tensor, grad_t: torch.Tensor,
                   kernel_args: tuple, objective_args: Optional[tuple], reduction_scale: torch.Tensor,
                   requested: tuple[bool, bool], backend: str) -> None:
    """Remember what the backward needs: the saved (pre-scaled) gradients and, for a low-precision
    gradient, what recomputing it takes (the logits, mask, labels, and the forward's factor).

    ``kernel_args`` = (tau_s, tau_t, standardize, correction, eps); ``objective_args`` = None or
    (ignore_index, label_smoothing, ce_weight, kd_weight); ``reduction_scale``: the (1,) factor the
    forward scaled the gradients by (1 / count).
    """
    ctx.mark_non_differentiable(grad_s, grad_t)
    ctx.set_materialize_grads(False)  # no N x V zeros for the non-differentiable outputs
    ctx.recompute = ((requested[0] and student.dtype in LOW_PRECISION),
                     (requested[1] and teacher.dtype in LOW_PRECISION))
    if any(ctx.recompute):  # the logits are needed again to recompute a low-precision gradient
        ctx.save_for_backward(grad_s, grad_t, student, teacher, mask, labels, reduction_scale)
    else:
        ctx.save_for_backward(grad_s, grad_t)
    ctx.kernel_args = kernel_args
    ctx.objective_args = objective_args
    ctx.backend = backend
    ctx.requested = requested


def _setup_context(ctx, inputs, output) -> None:
    (student, teacher, mask, temperature, teacher_temperature, standardize, correction, eps, reduction,
     grad_student, grad_teacher, backend) = inputs
    _, grad_s, grad_t = output
    scale = None
    if (grad_student and student.dtype in LOW_PRECISION) or (grad_teacher and teacher.dtype in LOW_PRECISION):
        num_rows, num_classes = student.shape
        scale = _reduction_denominator(mask, num_rows, num_classes, reduction, student.device,
                                       accumulation_dtype(student, teacher)).reciprocal()
    save_gradients(ctx, student, teacher, mask, None, grad_s, grad_t,
                   (temperature, teacher_temperature, standardize, correction, eps), None, scale,
                   (grad_student, grad_teacher), backend)


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


def _scale_saved(ctx, saved: torch.Tensor, grad_loss: torch.Tensor, in_place: bool) -> torch.Tensor:
    """A float32/float64 saved gradient times the incoming gradient (in place when allowed)."""
    if not in_place:
        return saved * (grad_loss.reshape(-1, 1) if grad_loss.dim() == 1 else grad_loss)
    # The saved buffer becomes the gradient in place: no second N x V allocation, and rows whose
    # incoming gradient is exactly 1 are skipped.
    backend_module(ctx.backend).scale_rows_(saved, grad_loss)
    return saved


def _recompute(ctx, saved_s: torch.Tensor, saved_t: torch.Tensor, grad_loss: torch.Tensor,
               in_place: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The low-precision gradients (those in ``ctx.recompute``) for the incoming gradient, rounded once."""
    _, _, student, teacher, mask, labels, reduction_scale = ctx.saved_tensors
    acc = accumulation_dtype(student, teacher)
    factor = grad_loss.to(acc).reshape(-1) * reduction_scale
    redo_s, redo_t = ctx.recompute
    objective = None if ctx.objective_args is None else Objective(labels, *ctx.objective_args)
    if not in_place:
        extra = () if objective is None else (labels, *ctx.objective_args)
        new_s, new_t = kd_grad(student, teacher, mask, factor, *ctx.kernel_args, redo_s, redo_t, ctx.backend, *extra)
        return (new_s if redo_s else saved_s), (new_t if redo_t else saved_t)
    # Rows whose incoming gradient is exactly 1 keep the forward's gradient (skipped on the device).
    active = (grad_loss.reshape(-1) != 1).expand(student.shape[0])
    active = active if mask is None else active & mask
    if student.device.type != "cpu" or bool(active.any()):
        backend_module(ctx.backend).fused_kd_regrad_(
            student, teacher, active.contiguous(), factor, *ctx.kernel_args,
            saved_s if redo_s else student.new_empty((0,)), saved_t if redo_t else teacher.new_empty((0,)),
            objective)
    return saved_s, saved_t


def saved_gradients_backward(ctx, grad_loss: Optional[torch.Tensor], op_name: str) -> tuple:
    """(grad_student, grad_teacher) from what :func:`save_gradients` kept, for the incoming gradient."""
    if grad_loss is None:
        return None, None
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"logitstd.{op_name} does not support double backward (create_graph=True): its gradient is "
            f"computed by the fused kernel; use backend=\"torch\" for higher-order gradients"
        )
    saved_s, saved_t = ctx.saved_tensors[:2]
    needs = ctx.needs_input_grad[:2]
    for name, need, requested in zip(("student", "teacher"), needs, ctx.requested):
        if need and not requested:
            raise RuntimeError(
                f"logitstd.{op_name} was called with grad_{name}=False but autograd asks for the {name} "
                f"gradient; pass grad_{name}=True when the {name} logits require grad"
            )
    in_place = _may_overwrite_saved(saved_s if ctx.requested[0] else saved_t)
    if any(ctx.recompute):
        saved_s, saved_t = _recompute(ctx, saved_s, saved_t, grad_loss, in_place)
    grads = []
    for saved, need, redo in zip((saved_s, saved_t), needs, ctx.recompute):
        grads.append(None if not need else saved if redo else _scale_saved(ctx, saved, grad_loss, in_place))
    return grads[0], grads[1]


def _backward(ctx, grad_loss, _grad_s, _grad_t):
    return saved_gradients_backward(ctx, grad_loss, "kd_loss") + (None,) * 10


kd_loss.register_autograd(_backward, setup_context=_setup_context)
