"""``torch.ops.logitstd.fused_linear_distillation_loss``: the chunked fused lm_head as one op.

The op runs the chunk loop of ``chunks.py`` with one fused kernel launch per chunk (the objective's
rows and the logits' gradient, unnormalized: a bf16/fp16 gradient of O(1) entries, where G / n would
underflow in fp16) and scales the accumulated gradients by the reduction once at the end. The
backward multiplies them by the incoming gradient.

Equivalent eager code: ``reference.distillation_loss(F.linear(hs, ws, bs), F.linear(ht, wt, bt), labels, ...)``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import config as cfg
from .._backends import backend_module
from ..config import DistillConfig
from ..reference import accumulation_dtype
from .chunks import ChunkRows, LinearInputs, grad_dtype, run_chunks
from .loss_op import included_count, included_rows

SCHEMA = ("(Tensor student_hidden, Tensor student_weight, Tensor? student_bias, Tensor? teacher_hidden, "
          "Tensor? teacher_weight, Tensor? teacher_bias, Tensor? teacher_logits, Tensor? labels, Tensor? mask, "
          + cfg.op_schema_fields() + ", str reduction, int chunk_size, ScalarType accum_dtype, bool grad_hidden, "
          "bool grad_weight, bool grad_bias, str backend, " + cfg.op_schema_tail()
          + ") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


class LinearOpInputs(NamedTuple):
    """The op's arguments by name; :meth:`parse` is the one place that knows their flat layout."""

    tensors: LinearInputs
    config: DistillConfig
    chunk_size: int
    accum_dtype: torch.dtype
    wants: tuple[bool, bool, bool]  # gradients of the hidden states, the weight, the bias
    backend: str

    @classmethod
    def parse(cls, args: tuple) -> "LinearOpInputs":
        """From the op's flat arguments (the public function checked every value before the call)."""
        count = len(cfg.OP_FIELDS)
        tensors = LinearInputs(*args[:9])
        settings = args[9:9 + count]
        reduction, chunk_size, accum_dtype, grad_hidden, grad_weight, grad_bias, backend, *tail = args[9 + count:]
        config = DistillConfig.from_op_args(*settings, tail=tuple(tail), reduction=reduction, validate=False)
        return cls(tensors, config, int(chunk_size), accum_dtype, (bool(grad_hidden), bool(grad_weight),
                                                                    bool(grad_bias)), backend)

    def flat(self) -> tuple:
        """The op's arguments (the inverse of :meth:`parse`)."""
        return (*self.tensors, *self.config.op_args(), self.config.reduction, self.chunk_size, self.accum_dtype,
                *self.wants, self.backend, *self.config.op_tail_args())

    def accumulation_dtype(self) -> torch.dtype:
        t = self.tensors
        teacher = [x for x in (t.teacher_hidden, t.teacher_weight, t.teacher_logits) if x is not None]
        return accumulation_dtype(t.hidden, t.weight, *teacher)


def _kernel_rows(inputs: LinearOpInputs):
    """The row function of one fused kernel launch per chunk (gradient factor 1: unnormalized)."""
    module = backend_module(inputs.backend)
    unit = torch.ones(1, dtype=inputs.accumulation_dtype(), device=inputs.tensors.hidden.device)
    wants_grad = any(inputs.wants)

    def rows_fn(xs, xt, labels, mask) -> ChunkRows:
        rows, g, _, ce, kd = module.fused_forward(xs, xt, labels, mask, unit, inputs.config, wants_grad, False)
        return ChunkRows(torch.stack((rows.sum(), ce.sum(), kd.sum())), g if wants_grad else None)

    return rows_fn


def _forward(*args) -> tuple[torch.Tensor, ...]:
    """``(loss, ce, kd, grad_hidden, grad_weight, grad_bias)``: the reduced objective and its parts,
    then the gradients of the loss (internal; empty (0,) tensors when not requested): the weight's
    and bias's in ``accum_dtype``, the hidden state's in ``accum_dtype`` for bf16/fp16 hidden states
    (else their dtype); the backward rounds each once to its input's dtype."""
    inputs = LinearOpInputs.parse(args)
    t, config = inputs.tensors, inputs.config
    acc = inputs.accumulation_dtype()
    keep = included_rows(t.labels, t.mask, config.ignore_index)
    totals, grads = run_chunks(t, keep, _kernel_rows(inputs), inputs.chunk_size, inputs.accum_dtype, inputs.wants,
                               acc)
    if config.reduction == "mean":
        count = included_count(t.labels, t.mask, config.ignore_index, t.hidden.shape[0], acc, t.hidden.device)
        totals = totals / count
        for grad in grads:
            if grad is not None:
                grad.mul_(count.reciprocal().to(grad.dtype))
    loss, ce, kd = (part.clone() for part in totals.unbind())  # three outputs, not views of one tensor
    return (loss, ce, kd) + tuple(t.hidden.new_empty((0,)) if g is None else g for g in grads)


fused_linear_op = torch.library.custom_op("logitstd::fused_linear_distillation_loss", _forward, mutates_args=(),
                                          schema=SCHEMA)


@fused_linear_op.register_fake
def _fake(*args) -> tuple[torch.Tensor, ...]:
    inputs = LinearOpInputs.parse(args)
    hidden, weight = inputs.tensors.hidden, inputs.tensors.weight
    acc = inputs.accumulation_dtype()
    parts = tuple(hidden.new_empty((), dtype=acc) for _ in range(3))
    shapes = ((hidden.shape, grad_dtype(hidden.dtype, inputs.accum_dtype)), (weight.shape, inputs.accum_dtype),
              ((weight.shape[0],), inputs.accum_dtype))
    return parts + tuple(hidden.new_empty(shape, dtype=dtype) if want else hidden.new_empty((0,))
                         for want, (shape, dtype) in zip(inputs.wants, shapes))


def _setup_context(ctx, inputs, output) -> None:
    parsed = LinearOpInputs.parse(tuple(inputs))
    t = parsed.tensors
    _, ce, kd, g_hidden, g_weight, g_bias = output
    ctx.mark_non_differentiable(ce, kd, g_hidden, g_weight, g_bias)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(g_hidden, g_weight, g_bias)
    ctx.dtypes = (t.hidden.dtype, t.weight.dtype, None if t.bias is None else t.bias.dtype)
    ctx.requested = parsed.wants
    ctx.num_op_args = len(inputs)


def _backward(ctx, grad_loss, _grad_ce, _grad_kd, _grad_h, _grad_w, _grad_b):
    if grad_loss is None:
        return (None,) * ctx.num_op_args
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError("logitstd.fused_linear_distillation_loss does not support double backward "
                           "(create_graph=True): its gradients are computed in the forward; use backend=\"torch\"")
    for name, need, requested in zip(("student_hidden", "student_weight", "student_bias"), ctx.needs_input_grad[:3],
                                     ctx.requested):
        if need and not requested:
            raise RuntimeError(f"logitstd.fused_linear_distillation_loss was called without the {name} gradient but "
                               f"autograd asks for it; call it with grad enabled when {name} requires grad")
    grads = []
    for saved, need, dtype in zip(ctx.saved_tensors, ctx.needs_input_grad[:3], ctx.dtypes):
        grads.append((saved * grad_loss).to(dtype) if need else None)
    return tuple(grads) + (None,) * (ctx.num_op_args - 3)


fused_linear_op.register_autograd(_backward, setup_context=_setup_context)


def call_fused_linear_op(tensors: LinearInputs, config: DistillConfig, chunk_size: int, accum_dtype: torch.dtype,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce, kd)`` of checked, flattened tensors through the op."""
    grad_on = torch.is_grad_enabled()
    wants = (grad_on and tensors.hidden.requires_grad, grad_on and tensors.weight.requires_grad,
             grad_on and tensors.bias is not None and tensors.bias.requires_grad)
    inputs = LinearOpInputs(tensors, config, chunk_size, accum_dtype, wants, backend)
    loss, ce, kd, _, _, _ = torch.ops.logitstd.fused_linear_distillation_loss(*inputs.flat())
    return loss, ce, kd
