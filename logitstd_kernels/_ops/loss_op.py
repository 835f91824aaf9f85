"""``torch.ops.logitstd.distillation_loss``: the fused objective as one op with autograd.

The op takes (N, V) student and teacher logits, the labels (None: pure KD, the objective without its
CE term), the row mask and the settings of a :class:`~logitstd_kernels.config.DistillConfig` as flat
arguments (``config.OP_FIELDS``). One launch of a fused backend computes every row's objective and,
when an input requires grad, its gradient (the row is on chip already; a separate backward would read
both inputs again). The gradients are written pre-scaled by the reduction and saved; the backward
applies the incoming gradient to them (``autograd.py``).

``torch.ops.logitstd.kd_loss`` is the same op for pure KD under ``F.kl_div``'s reduction names
(composite: it calls this op, so it has no fake kernel or autograd of its own).

Equivalent eager code: ``reference.distillation_loss`` with the same arguments.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import config as cfg
from .._backends import backend_module
from .._checks import check_op_tensors
from ..config import DistillConfig
from ..reference import accumulation_dtype
from . import autograd

SCHEMA = ("(Tensor student, Tensor teacher, Tensor? labels, Tensor? mask, " + cfg.op_schema_fields() +
          ", str reduction, bool grad_student, bool grad_teacher, str backend, bool validated=False, "
          + cfg.op_schema_tail() + ", Tensor? temperature_rows=None, bool grad_temperature=False) "
          "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
_TAIL = len(cfg.OP_TAIL_FIELDS)


class LossOpInputs(NamedTuple):
    """The op's arguments by name; :meth:`parse` is the one place that knows their flat layout."""

    student: torch.Tensor
    teacher: torch.Tensor
    labels: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]
    config: DistillConfig
    grad_student: bool
    grad_teacher: bool
    backend: str
    validated: bool = False  # the caller (the package's functions) checked every argument already
    # A learnable temperature: (N,) in the accumulation dtype, for student and teacher (the config's
    # temperatures are then unused), and whether its gradient is wanted.
    temperature_rows: Optional[torch.Tensor] = None
    grad_temperature: bool = False

    @classmethod
    def parse(cls, args: tuple, trusted: bool = False) -> "LossOpInputs":
        """From the op's flat arguments: the tensors, ``OP_FIELDS``, reduction, the two gradient
        requests, the backend, ``validated`` and ``OP_TAIL_FIELDS`` (those absent take their defaults).
        The settings are checked unless the call says they were (``validated``) or the caller knows
        (``trusted``: fake kernel, autograd)."""
        student, teacher, labels, mask = args[:4]
        count = len(cfg.OP_FIELDS)
        settings = args[4:4 + count]
        reduction, grad_student, grad_teacher, backend, *rest = args[4 + count:]
        validated = bool(rest and rest[0])
        config = DistillConfig.from_op_args(*settings, tail=tuple(rest[1:1 + _TAIL]), reduction=reduction,
                                            validate=not (validated or trusted))
        tau, grad_tau = (tuple(rest[1 + _TAIL:]) + (None, False))[:2]
        return cls(student, teacher, labels, mask, config, bool(grad_student), bool(grad_teacher), backend, validated,
                   tau, bool(grad_tau))

    def flat(self) -> tuple:
        """The op's arguments (the inverse of :meth:`parse`)."""
        return (self.student, self.teacher, self.labels, self.mask, *self.config.op_args(), self.config.reduction,
                self.grad_student, self.grad_teacher, self.backend, self.validated, *self.config.op_tail_args(),
                self.temperature_rows, self.grad_temperature)


def included_rows(labels: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                  ignore_index: int) -> Optional[torch.Tensor]:
    """The rows of the objective, ``mask & (labels != ignore_index)``, as a bool (N,) tensor; None
    when every row is included (no mask, no labels)."""
    if labels is None:
        return mask
    keep = labels != ignore_index
    return keep if mask is None else keep & mask


def included_count(labels: Optional[torch.Tensor], mask: Optional[torch.Tensor], ignore_index: int,
                   num_rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The number of rows in the objective, at least 1, as a (1,) device tensor (no host sync)."""
    keep = included_rows(labels, mask, ignore_index)
    if keep is None:
        return torch.full((1,), float(max(num_rows, 1)), dtype=dtype, device=device)
    return keep.sum().reshape(1).clamp_min(1).to(dtype)


def reduction_denominator(inputs: LossOpInputs) -> torch.Tensor:
    """What the summed rows are divided by, as a (1,) device tensor in the accumulation dtype."""
    student, config = inputs.student, inputs.config
    acc = accumulation_dtype(student, inputs.teacher)
    if config.reduction in ("none", "sum"):
        return torch.ones(1, dtype=acc, device=student.device)
    count = included_count(inputs.labels, inputs.mask, config.ignore_index, student.shape[0], acc, student.device)
    return count * student.shape[1] if config.reduction == "class_mean" else count


def _run_backend(inputs: LossOpInputs, grad_scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The backend's per-row outputs and, with a learnable temperature, ``d rows / d temperature``."""
    module = backend_module(inputs.backend)
    args = (inputs.student, inputs.teacher, inputs.labels, inputs.mask, grad_scale, inputs.config,
            inputs.grad_student, inputs.grad_teacher)
    if inputs.temperature_rows is None:
        return (*module.fused_forward(*args), inputs.student.new_empty((0,)))
    if not hasattr(module, "fused_forward_with_temperature"):
        raise NotImplementedError(f"backend {inputs.backend!r} takes no tensor temperature; use backend='cpu' or "
                                  "'torch'")
    return module.fused_forward_with_temperature(*args, inputs.temperature_rows, inputs.grad_temperature)


def _forward(*args) -> tuple[torch.Tensor, ...]:
    """``(loss, ce, kd, saved_grad_student, saved_grad_teacher, saved_grad_temperature)``: the reduced
    objective and its two parts (not differentiable), then the pre-scaled gradients (internal; empty
    when not requested)."""
    inputs = LossOpInputs.parse(args)
    if not inputs.validated:
        check_op_tensors(inputs.student, inputs.teacher, inputs.labels, inputs.mask, inputs.config, inputs.backend)
    inputs = inputs._replace(mask=None if inputs.mask is None else inputs.mask.contiguous(),
                             labels=None if inputs.labels is None else inputs.labels.contiguous())
    denominator = reduction_denominator(inputs)
    rows, grad_s, grad_t, ce, kd, grad_tau = _run_backend(inputs, denominator.reciprocal())
    if inputs.config.reduction == "none":
        return rows, ce, kd, grad_s, grad_t, grad_tau
    return tuple((v.sum() / denominator).reshape(()) for v in (rows, ce, kd)) + (grad_s, grad_t, grad_tau)


distillation_loss_op = torch.library.custom_op("logitstd::distillation_loss", _forward, mutates_args=(),
                                               schema=SCHEMA)


@distillation_loss_op.register_fake
def _fake(*args) -> tuple[torch.Tensor, ...]:
    inputs = LossOpInputs.parse(args, trusted=True)  # shapes only: the real call checks the values
    student, teacher = inputs.student, inputs.teacher
    shape = (student.shape[0],) if inputs.config.reduction == "none" else ()
    acc = accumulation_dtype(student, teacher)
    parts = tuple(student.new_empty(shape, dtype=acc) for _ in range(3))
    grad_s = student.new_empty(student.shape) if inputs.grad_student else student.new_empty((0,))
    grad_t = teacher.new_empty(teacher.shape) if inputs.grad_teacher else teacher.new_empty((0,))
    grad_tau = student.new_empty((student.shape[0],), dtype=acc) if inputs.grad_temperature else student.new_empty((0,))
    return parts + (grad_s, grad_t, grad_tau)


def _setup_context(ctx, inputs, output) -> None:
    parsed = LossOpInputs.parse(tuple(inputs), trusted=True)  # the forward checked them
    _, ce, kd, grad_s, grad_t, grad_tau = output
    ctx.mark_non_differentiable(ce, kd, grad_tau)
    ctx.num_op_args = len(inputs)
    ctx.grad_tau = grad_tau if parsed.grad_temperature else None
    autograd.save_gradients(ctx, parsed, grad_s, grad_t, lambda: reduction_denominator(parsed).reciprocal())


def _backward(ctx, grad_loss, _grad_ce, _grad_kd, _grad_s, _grad_t, _grad_tau):
    saved_tau = ctx.grad_tau  # read before the saved gradients may be overwritten in place
    grad_s, grad_t = autograd.saved_gradients_backward(ctx, grad_loss, "distillation_loss")
    grads = [grad_s, grad_t] + [None] * (ctx.num_op_args - 2)
    if saved_tau is not None and grad_loss is not None:  # (temperature_rows is the second to last argument)
        grads[-2] = saved_tau * grad_loss
    return tuple(grads)


distillation_loss_op.register_autograd(_backward, setup_context=_setup_context)


def call_loss_op(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                 mask: Optional[torch.Tensor], config: DistillConfig, backend: str,
                 temperature_rows: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
    """``(loss, ce, kd)`` of checked (N, V) rows through the op (gradients for the inputs that need them;
    ``temperature_rows``: a checked (N,) learnable temperature in the accumulation dtype)."""
    grad_on = torch.is_grad_enabled()
    inputs = LossOpInputs(student, teacher, labels, mask, config, grad_on and student.requires_grad,
                          grad_on and teacher.requires_grad, backend, validated=True,
                          temperature_rows=temperature_rows,
                          grad_temperature=grad_on and temperature_rows is not None and temperature_rows.requires_grad)
    loss, ce, kd, *_ = torch.ops.logitstd.distillation_loss(*inputs.flat())
    return loss, ce, kd


# ``torch.ops.logitstd.kd_loss``: pure KD with ``F.kl_div``'s reductions, returning (loss, saved
# gradients); a composite of the op above.
torch.library.define(
    "logitstd::kd_loss",
    "(Tensor student, Tensor teacher, Tensor? mask, float temperature, float teacher_temperature, bool standardize, "
    "int correction, float eps, str reduction, bool grad_student, bool grad_teacher, str backend, "
    + cfg.op_schema_tail() + ") -> (Tensor, Tensor, Tensor)")


@torch.library.impl("logitstd::kd_loss", "CompositeImplicitAutograd")
def _kd_loss(student, teacher, mask, temperature, teacher_temperature, standardize, correction, eps, reduction,
             grad_student, grad_teacher, backend, *tail):
    config = DistillConfig.from_op_args(temperature, teacher_temperature, standardize, correction, eps, -100, 0.0,
                                        0.0, 1.0, tail=tail, reduction=cfg.kd_reduction(reduction))
    check_op_tensors(student, teacher, None, mask, config, backend)
    inputs = LossOpInputs(student, teacher, None, mask, config, grad_student, grad_teacher, backend, validated=True)
    loss, _, _, grad_s, grad_t, _ = torch.ops.logitstd.distillation_loss(*inputs.flat())
    return loss, grad_s, grad_t
