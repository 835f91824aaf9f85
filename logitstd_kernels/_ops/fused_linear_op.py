"""``torch.ops.logitstd.fused_linear_distillation_loss``: the chunked fused lm_head as one op.

The op runs the chunk loop of ``chunks.py`` with one fused kernel launch per chunk (the objective's
rows and the logits' gradient). For ``reduction="mean"`` the kernel folds 1 / n into the gradient it
writes (C x V per chunk, not the weight-sized result); in fp16, where G / n would underflow, G stays
unnormalized (O(1) entries) and the accumulated gradients are scaled in place once at the end. The
backward multiplies them by the incoming gradient (``chunks.scaled_gradient``: in place, or not at all
for a gradient of exactly 1, and rounded once to the parameters' dtypes).

Equivalent eager code: ``reference.linear_loss_of_config(hs, ws, bs, F.linear(ht, wt, bt), labels, ...)``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import config as cfg
from .._backends import backend_module
from ..config import DistillConfig, LogitTransforms
from ..reference import accumulation_dtype
from .chunks import ChunkRows, LinearInputs, grad_dtype, run_chunks, scaled_gradient
from .loss_op import included_count, included_rows

SCHEMA = ("(Tensor student_hidden, Tensor student_weight, Tensor? student_bias, Tensor? teacher_hidden, "
          "Tensor? teacher_weight, Tensor? teacher_bias, Tensor? teacher_logits, Tensor? labels, Tensor? mask, "
          + cfg.op_schema_fields() + ", str reduction, int chunk_size, ScalarType accum_dtype, bool grad_hidden, "
          "bool grad_weight, bool grad_bias, str backend, " + cfg.op_schema_tail()
          + ", float student_logit_scale=1.0, float teacher_logit_scale=1.0, "
          "float? student_final_logit_softcapping=None, float? teacher_final_logit_softcapping=None"
          ") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


class LinearOpInputs(NamedTuple):
    """The op's arguments by name; :meth:`parse` is the one place that knows their flat layout."""

    tensors: LinearInputs
    config: DistillConfig
    chunk_size: int
    accum_dtype: torch.dtype
    wants: tuple[bool, bool, bool]  # gradients of the hidden states, the weight, the bias
    backend: str
    transforms: LogitTransforms = LogitTransforms()

    @classmethod
    def parse(cls, args: tuple) -> "LinearOpInputs":
        """From the op's flat arguments (the public function checked every value before the call)."""
        count = len(cfg.OP_FIELDS)
        tensors = LinearInputs(*args[:9])
        settings = args[9:9 + count]
        reduction, chunk_size, accum_dtype, grad_hidden, grad_weight, grad_bias, backend, *tail = args[9 + count:]
        tail_count = len(cfg.OP_TAIL_FIELDS)
        config = DistillConfig.from_op_args(*settings, tail=tuple(tail[:tail_count]), reduction=reduction,
                                            validate=False)
        return cls(tensors, config, int(chunk_size), accum_dtype, (bool(grad_hidden), bool(grad_weight),
                                                                    bool(grad_bias)), backend,
                   LogitTransforms(*tail[tail_count:]))

    def flat(self) -> tuple:
        """The op's arguments (the inverse of :meth:`parse`)."""
        return (*self.tensors, *self.config.op_args(), self.config.reduction, self.chunk_size, self.accum_dtype,
                *self.wants, self.backend, *self.config.op_tail_args(), *self.transforms)

    def accumulation_dtype(self) -> torch.dtype:
        t = self.tensors
        teacher = [x for x in (t.teacher_hidden, t.teacher_weight, t.teacher_logits) if x is not None]
        return accumulation_dtype(t.hidden, t.weight, *teacher)


def folds_reduction(logits_dtype: torch.dtype) -> bool:
    """Whether the kernel writes the chunk's gradient already divided by the reduction's count: not in
    fp16, where G / n underflows (16k tokens put O(1e-4) entries below fp16's smallest subnormal)."""
    return logits_dtype != torch.float16


def _kernel_rows(inputs: LinearOpInputs, factor: torch.Tensor):
    """The row function of one fused kernel launch per chunk, its gradient times ``factor`` ((1,))."""
    module = backend_module(inputs.backend)
    wants_grad = any(inputs.wants)

    def rows_fn(xs, xt, labels, mask) -> ChunkRows:
        rows, g, _, ce, kd = module.fused_forward(xs, xt, labels, mask, factor, inputs.config, wants_grad, False)
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
    count = included_count(t.labels, t.mask, config.ignore_index, t.hidden.shape[0], acc, t.hidden.device) \
        if config.reduction == "mean" else torch.ones(1, dtype=acc, device=t.hidden.device)
    folded = folds_reduction(t.hidden.dtype)
    factor = count.reciprocal() if folded else torch.ones_like(count)
    totals, grads = run_chunks(t, keep, _kernel_rows(inputs, factor), inputs.chunk_size, inputs.accum_dtype,
                               inputs.wants, acc, inputs.transforms)
    totals = totals / count
    if not folded and config.reduction == "mean":
        for grad in grads:
            if grad is not None:
                grad.mul_(count.reciprocal().to(grad.dtype))  # in place: no weight-sized temporary
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


def row_scaling(backend: str, device: torch.device):
    """The backward's in-place scaling of a saved gradient on CUDA: the backend's ``scale_rows_``, which
    skips a factor of 1 on the device (no host synchronization); None elsewhere (the host checks it)."""
    return backend_module(backend).scale_rows_ if device.type == "cuda" else None


def _setup_context(ctx, inputs, output) -> None:
    parsed = LinearOpInputs.parse(tuple(inputs))
    t = parsed.tensors
    _, ce, kd, g_hidden, g_weight, g_bias = output
    ctx.mark_non_differentiable(ce, kd, g_hidden, g_weight, g_bias)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(g_hidden, g_weight, g_bias)
    ctx.dtypes = (t.hidden.dtype, t.weight.dtype, None if t.bias is None else t.bias.dtype)
    ctx.requested = parsed.wants
    ctx.scale_rows_ = row_scaling(parsed.backend, t.hidden.device)
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
    scale_rows_ = ctx.scale_rows_
    grads = [scaled_gradient(saved, grad_loss, dtype, scale_rows_) if need else None
             for saved, need, dtype in zip(ctx.saved_tensors, ctx.needs_input_grad[:3], ctx.dtypes)]
    return tuple(grads) + (None,) * (ctx.num_op_args - 3)


fused_linear_op.register_autograd(_backward, setup_context=_setup_context)


def call_fused_linear_op(tensors: LinearInputs, config: DistillConfig, chunk_size: int, accum_dtype: torch.dtype,
                         backend: str, transforms: LogitTransforms = LogitTransforms(),
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce, kd)`` of checked, flattened tensors through the op."""
    grad_on = torch.is_grad_enabled()
    wants = (grad_on and tensors.hidden.requires_grad, grad_on and tensors.weight.requires_grad,
             grad_on and tensors.bias is not None and tensors.bias.requires_grad)
    inputs = LinearOpInputs(tensors, config, chunk_size, accum_dtype, wants, backend, transforms)
    loss, ce, kd, _, _, _ = torch.ops.logitstd.fused_linear_distillation_loss(*inputs.flat())
    return loss, ce, kd
