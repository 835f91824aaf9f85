"""``torch.ops.logitstd.sparse_distillation_loss``: the objective of a dense student and a sparse teacher.

The op takes (N, V) student logits, the teacher's top-k as flat tensors (``ids`` and ``values`` (N, k),
the entries' mask, the rows' stored statistics and log-normalizer, ``kind``), the labels and the row
mask, and the settings of a :class:`~logitstd_kernels.config.DistillConfig` (``OP_FIELDS``,
``OP_TAIL_FIELDS``, ``SPARSE_OP_FIELDS``). One launch of a backend's sparse kernel computes every row's
objective and the student's gradient (the teacher is constant); the gradient is saved pre-scaled by
the reduction, and the backward applies the incoming gradient to it: in place for float32/float64,
recomputed with the factor folded in for bfloat16/float16 (one rounding, docs/design.md section 6e;
rows whose factor is exactly 1 keep the forward's gradient).

Equivalent eager code: ``reference.distillation_loss(student, SparseTeacher(...), labels, ...)``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import config as cfg
from .._backends import sparse_backend_module
from ..config import DistillConfig
from ..reference import accumulation_dtype
from ..sparse import SparseRows
from .autograd import may_overwrite_saved
from .loss_op import included_count

SCHEMA = ("(Tensor student, Tensor ids, Tensor values, Tensor? teacher_mask, Tensor? row_mean, Tensor? row_std, "
          "Tensor? log_normalizer, str kind, Tensor? labels, Tensor? mask, " + cfg.op_schema_fields()
          + ", str reduction, bool grad_student, str backend, " + cfg.op_schema_tail() + ", " + cfg.op_schema_sparse()
          + ") -> (Tensor, Tensor, Tensor, Tensor)")


class SparseOpInputs(NamedTuple):
    """The op's arguments by name; :meth:`parse` is the one place that knows their flat layout."""

    student: torch.Tensor
    teacher: SparseRows
    labels: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]
    config: DistillConfig
    grad_student: bool
    backend: str

    @classmethod
    def parse(cls, args: tuple) -> "SparseOpInputs":
        """From the op's flat arguments (the public functions checked every value before the call)."""
        count, tail = len(cfg.OP_FIELDS), len(cfg.OP_TAIL_FIELDS)
        student, ids, values, teacher_mask, row_mean, row_std, log_normalizer, kind, labels, mask = args[:10]
        settings = args[10:10 + count]
        reduction, grad_student, backend, *rest = args[10 + count:]
        config = DistillConfig.from_op_args(*settings, tail=tuple(rest[:tail]), sparse=tuple(rest[tail:]),
                                            reduction=reduction, validate=False)
        teacher = SparseRows(ids, values, teacher_mask, row_mean, row_std, log_normalizer, kind)
        return cls(student, teacher, labels, mask, config, bool(grad_student), backend)

    def flat(self) -> tuple:
        """The op's arguments (the inverse of :meth:`parse`)."""
        config = self.config
        return (self.student, *self.teacher.tensors(), self.teacher.kind, self.labels, self.mask, *config.op_args(),
                config.reduction, self.grad_student, self.backend, *config.op_tail_args(), *config.sparse_op_args())

    def accumulation_dtype(self) -> torch.dtype:
        return accumulation_dtype(self.student, self.teacher.values)


def _denominator(inputs: SparseOpInputs) -> torch.Tensor:
    """What the summed rows are divided by, a (1,) device tensor in the accumulation dtype."""
    student, config, acc = inputs.student, inputs.config, inputs.accumulation_dtype()
    if config.reduction in ("none", "sum"):
        return torch.ones(1, dtype=acc, device=student.device)
    count = included_count(inputs.labels, inputs.mask, config.ignore_index, student.shape[0], acc, student.device)
    return count * student.shape[1] if config.reduction == "class_mean" else count


def _forward(*args) -> tuple[torch.Tensor, ...]:
    """``(loss, ce, kd, saved_grad_student)``: the reduced objective, its parts, the pre-scaled gradient."""
    inputs = SparseOpInputs.parse(args)
    denominator = _denominator(inputs)
    rows, grad, ce, kd = sparse_backend_module(inputs.backend).sparse_forward(
        inputs.student, inputs.teacher, inputs.labels, inputs.mask, denominator.reciprocal(), inputs.config,
        inputs.grad_student)
    if inputs.config.reduction == "none":
        return rows, ce, kd, grad
    return tuple((v.sum() / denominator).reshape(()) for v in (rows, ce, kd)) + (grad,)


sparse_loss_op = torch.library.custom_op("logitstd::sparse_distillation_loss", _forward, mutates_args=(),
                                         schema=SCHEMA)


@sparse_loss_op.register_fake
def _fake(*args) -> tuple[torch.Tensor, ...]:
    inputs = SparseOpInputs.parse(args)
    student = inputs.student
    shape = (student.shape[0],) if inputs.config.reduction == "none" else ()
    parts = tuple(student.new_empty(shape, dtype=inputs.accumulation_dtype()) for _ in range(3))
    return parts + (student.new_empty(student.shape) if inputs.grad_student else student.new_empty((0,)),)


def _setup_context(ctx, inputs, output) -> None:
    parsed = SparseOpInputs.parse(tuple(inputs))
    _, ce, kd, grad = output
    ctx.mark_non_differentiable(ce, kd, grad)
    ctx.set_materialize_grads(False)
    ctx.recompute = parsed.grad_student and parsed.student.dtype != parsed.accumulation_dtype()
    if ctx.recompute:  # a low-precision gradient is recomputed for a factor other than 1 (rounded once)
        ctx.save_for_backward(grad, parsed.student, *parsed.teacher.tensors(), parsed.labels, parsed.mask,
                              _denominator(parsed).reciprocal())
    else:
        ctx.save_for_backward(grad)
    ctx.config, ctx.backend, ctx.kind, ctx.requested = parsed.config, parsed.backend, parsed.teacher.kind, \
        parsed.grad_student
    ctx.num_op_args = len(inputs)


def _recomputed(ctx, saved: torch.Tensor, grad_loss: torch.Tensor, in_place: bool) -> torch.Tensor:
    """The low-precision gradient for the incoming ``grad_loss``, recomputed with it in the row factor."""
    _, student, *teacher, labels, mask, reduction_scale = ctx.saved_tensors
    rows = SparseRows(*teacher, ctx.kind)
    factor = grad_loss.to(reduction_scale.dtype).reshape(-1) * reduction_scale
    module = sparse_backend_module(ctx.backend)
    if not in_place:
        _, grad, _, _ = module.sparse_forward(student, rows, labels, mask, factor, ctx.config, True)
        return grad
    active = (grad_loss.reshape(-1) != 1).expand(student.shape[0])
    active = active if mask is None else active & mask
    if student.device.type != "cpu" or bool(active.any()):
        module.sparse_regrad_(student, rows, labels, active.contiguous(), factor, ctx.config, saved)
    return saved


def _backward(ctx, grad_loss, _grad_ce, _grad_kd, _grad):
    nothing = (None,) * (ctx.num_op_args - 1)
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return (None,) + nothing
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError("logitstd.sparse_distillation_loss does not support double backward (create_graph=True): "
                           "its gradient is computed by the fused kernel; use backend=\"torch\"")
    if not ctx.requested:
        raise RuntimeError("logitstd.sparse_distillation_loss was called with grad_student=False but autograd asks "
                           "for the student gradient; pass grad_student=True when the student requires grad")
    saved = ctx.saved_tensors[0]
    in_place = may_overwrite_saved(saved)
    if ctx.recompute:
        return (_recomputed(ctx, saved, grad_loss, in_place),) + nothing
    if not in_place:
        return (saved * (grad_loss.reshape(-1, 1) if grad_loss.dim() == 1 else grad_loss),) + nothing
    sparse_backend_module(ctx.backend).scale_rows_(saved, grad_loss)
    return (saved,) + nothing


sparse_loss_op.register_autograd(_backward, setup_context=_setup_context)


def call_sparse_op(student: torch.Tensor, teacher: SparseRows, labels: Optional[torch.Tensor],
                   mask: Optional[torch.Tensor], config: DistillConfig, backend: str) -> tuple[torch.Tensor, ...]:
    """``(loss, ce, kd)`` of checked (N, V) student rows and a flat sparse teacher through the op."""
    grad_on = torch.is_grad_enabled() and student.requires_grad
    inputs = SparseOpInputs(student, teacher, labels, mask, config, grad_on, backend)
    loss, ce, kd, _ = torch.ops.logitstd.sparse_distillation_loss(*inputs.flat())
    return loss, ce, kd

