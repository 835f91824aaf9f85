"""The backward of the fused loss op: the gradients were computed in the forward; apply the incoming one.

The forward writes each requested gradient pre-scaled by the reduction (``1/count`` for "mean") and
saves it; the backward turns it into the gradient for the incoming ``grad_loss``, in place when the
saved buffer is never needed again (out of place when the graph is retained or traced), so the peak
memory is the inputs plus one gradient buffer per input that requires grad:

- an incoming gradient of exactly 1 (``loss.backward()`` on the scalar loss) costs nothing: the
  saved gradient is the gradient, rounded once to the input's dtype;
- float32/float64 gradients are multiplied by other incoming gradients in place (``scale_rows_``;
  rows whose factor is 1 are skipped on the device: no host synchronization);
- gradients in a dtype below the accumulation dtype (bfloat16/float16, or float32 next to a float64
  input) are recomputed from the logits instead, with the incoming gradient
  folded into the kernel's factor (``fused_regrad_``, in place, rows whose factor is 1 skipped on the
  device), so that they are rounded once, like eager PyTorch's, whatever the factor (a ``loss * 9``
  or a GradScaler's 65536; scaling the rounded gradient would round twice, and a float16 gradient
  pre-scaled by ``1/count`` would underflow before the scaler lifts it). For this the op keeps
  references to the low-precision logits until the backward; recomputing reads them again (6 bytes
  per element in bfloat16 for the student gradient).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import config as cfg
from .._backends import backend_module
from ..config import DistillConfig
from ..reference import accumulation_dtype


_RECOMPUTE_SCHEMA = ("(Tensor student, Tensor teacher, Tensor? labels, Tensor? mask, Tensor grad_scale, "
                     + cfg.op_schema_fields() + ", bool grad_student, bool grad_teacher, str backend, "
                     + cfg.op_schema_tail() + ", Tensor? temperature_rows=None) -> (Tensor, Tensor)")


def _recompute_grads(student, teacher, labels, mask, grad_scale, *rest):
    """The gradients of the fused rows times ``grad_scale`` ((1,) or (N,)), recomputed in new buffers.

    Equivalent eager code: ``grad_scale[:, None] * d rows / d student`` (and the teacher), rounded
    once to each input's dtype. The backward uses it for low-precision gradients when it may not
    overwrite the saved ones (a retained graph, torch.compile).
    """
    count = len(cfg.OP_FIELDS)
    settings, (grad_student, grad_teacher, backend), tail = rest[:count], rest[count:count + 3], rest[count + 3:]
    tail, temperature_rows = tail[:len(cfg.OP_TAIL_FIELDS)], (tail[len(cfg.OP_TAIL_FIELDS):] or (None,))[0]
    config = DistillConfig.from_op_args(*settings, tail=tail, validate=False)  # from a checked config
    module = backend_module(backend)
    args = (student, teacher, labels, None if mask is None else mask.contiguous(), grad_scale, config, grad_student,
            grad_teacher)
    if temperature_rows is None:
        _, grad_s, grad_t, _, _ = module.fused_forward(*args)
    else:
        _, grad_s, grad_t, *_ = module.fused_forward_with_temperature(*args, temperature_rows, False)
    return grad_s, grad_t


recompute_grads = torch.library.custom_op("logitstd::recompute_grads", _recompute_grads, mutates_args=(),
                                          schema=_RECOMPUTE_SCHEMA)


@recompute_grads.register_fake
def _recompute_grads_fake(student, teacher, labels, mask, grad_scale, *rest):
    count = len(cfg.OP_FIELDS)
    grad_student, grad_teacher = rest[count:count + 2]
    grad_s = student.new_empty(student.shape) if grad_student else student.new_empty((0,))
    grad_t = teacher.new_empty(teacher.shape) if grad_teacher else teacher.new_empty((0,))
    return grad_s, grad_t


def save_gradients(ctx, inputs, grad_s: torch.Tensor, grad_t: torch.Tensor,
                   reduction_scale: Callable[[], torch.Tensor]) -> None:
    """Remember what the backward needs: the saved (pre-scaled) gradients and, for a gradient in a
    dtype below the accumulation dtype, what recomputing it takes (the logits, mask, labels and the forward's factor
    ``reduction_scale()``, the (1,) tensor the forward scaled the gradients by). ``inputs``: the op's
    ``LossOpInputs``."""
    ctx.mark_non_differentiable(grad_s, grad_t)
    ctx.set_materialize_grads(False)  # no N x V zeros for the non-differentiable outputs
    student, teacher = inputs.student, inputs.teacher
    acc = accumulation_dtype(student, teacher)  # a gradient rounded below it must not be rounded twice
    ctx.recompute = ((inputs.grad_student and student.dtype != acc),
                     (inputs.grad_teacher and teacher.dtype != acc))
    if any(ctx.recompute):  # the logits are needed again to recompute a low-precision gradient
        ctx.save_for_backward(grad_s, grad_t, student, teacher, inputs.mask, inputs.labels, reduction_scale())
    else:
        ctx.save_for_backward(grad_s, grad_t)
    ctx.config = inputs.config
    ctx.backend = inputs.backend
    ctx.requested = (inputs.grad_student, inputs.grad_teacher)
    ctx.temperature_rows = None if inputs.temperature_rows is None else inputs.temperature_rows.detach()


def is_traced(saved: torch.Tensor) -> bool:
    """True under torch.compile / AOT tracing: no host checks of values, no mutation of saved tensors."""
    return torch.compiler.is_compiling() or torch._guards.detect_fake_mode(saved) is not None


def may_overwrite_saved(saved: torch.Tensor) -> bool:
    """True when the saved gradient will never be needed again, so it can become the gradient.

    Not under torch.compile / AOT tracing (functionalized graphs cannot mutate saved tensors), and
    not when the autograd graph is kept (``retain_graph=True``, gradcheck): a later backward through
    the same graph must find the saved gradient unchanged.
    """
    if is_traced(saved):
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
    """The gradients below the accumulation dtype (those in ``ctx.recompute``) for the incoming
    gradient, rounded once."""
    _, _, student, teacher, mask, labels, reduction_scale = ctx.saved_tensors
    factor = grad_loss.to(accumulation_dtype(student, teacher)).reshape(-1) * reduction_scale
    redo_s, redo_t = ctx.recompute
    config: DistillConfig = ctx.config
    if not in_place:
        new_s, new_t = recompute_grads(student, teacher, labels, mask, factor, *config.op_args(), redo_s, redo_t,
                                       ctx.backend, *config.op_tail_args(), ctx.temperature_rows)
        return (new_s if redo_s else saved_s), (new_t if redo_t else saved_t)
    # Rows whose incoming gradient is exactly 1 keep the forward's gradient (skipped on the device;
    # on the CPU no launch at all when every row is such a row).
    active = (grad_loss.reshape(-1) != 1).expand(student.shape[0])
    active = active if mask is None else active & mask
    if student.device.type != "cpu" or bool(active.any()):
        backend_module(ctx.backend).fused_regrad_(
            student, teacher, labels, active.contiguous(), factor, config,
            saved_s if redo_s else student.new_empty((0,)), saved_t if redo_t else teacher.new_empty((0,)),
            ctx.temperature_rows)
    return saved_s, saved_t


def _check_requests(ctx, op_name: str) -> None:
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"logitstd.{op_name} does not support double backward (create_graph=True): its gradient is "
            f"computed by the fused kernel; use backend=\"torch\" for higher-order gradients"
        )
    for name, need, requested in zip(("student", "teacher"), ctx.needs_input_grad[:2], ctx.requested):
        if need and not requested:
            raise RuntimeError(
                f"logitstd.{op_name} was called with grad_{name}=False but autograd asks for the {name} "
                f"gradient; pass grad_{name}=True when the {name} logits require grad"
            )


def saved_gradients_backward(ctx, grad_loss: Optional[torch.Tensor],
                             op_name: str) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(grad_student, grad_teacher) from what :func:`save_gradients` kept, for the incoming gradient."""
    if grad_loss is None:
        return None, None
    _check_requests(ctx, op_name)
    saved_s, saved_t = ctx.saved_tensors[:2]
    in_place = may_overwrite_saved(saved_s if ctx.requested[0] else saved_t)
    if any(ctx.recompute):
        saved_s, saved_t = _recompute(ctx, saved_s, saved_t, grad_loss, in_place)
    grads = []
    for saved, need, redo in zip((saved_s, saved_t), ctx.needs_input_grad[:2], ctx.recompute):
        grads.append(None if not need else saved if redo else _scale_saved(ctx, saved, grad_loss, in_place))
    return grads[0], grads[1]
