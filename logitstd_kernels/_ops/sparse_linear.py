"""The fused lm_head with a sparse teacher: the chunk loop of ``chunks.py`` with one sparse kernel launch
per chunk (``_backends.sparse_backend_module``): the student's logits exist one chunk at a time, dense,
the teacher is its stored top-k rows (:class:`~logitstd_kernels.sparse.SparseRows`).

Equivalent eager code::

    student_logits = transform_logits(F.linear(hidden, weight, bias), *transforms.student())
    reference.loss_of_config(student_logits, sparse_teacher, labels, mask, config)

The gradients of the hidden states, the weight and the bias are computed in the forward (as in
``fused_linear_op.py``) and scaled by the incoming gradient in the backward. It is an
``autograd.Function`` (no ``torch.library`` op: ``torch.compile`` graph-breaks around it).
"""

from __future__ import annotations

import torch

from .._backends import sparse_backend_module
from ..config import DistillConfig, LogitTransforms
from ..reference import accumulation_dtype
from ..sparse import SparseRows
from .chunks import ChunkRows, LinearInputs, run_chunks, scaled_gradient
from .fused_linear_op import folds_reduction
from .loss_op import included_count, included_rows


class SparseLinearArgs(tuple):
    """What the autograd function needs besides the differentiable tensors (a tuple: not traced)."""


def _rows_fn(teacher: SparseRows, config: DistillConfig, backend: str, factor: torch.Tensor, wants_grad: bool):
    module = sparse_backend_module(backend)

    def rows_fn(xs, pick, labels, mask) -> ChunkRows:
        rows, g, ce, kd = module.sparse_forward(xs, teacher[pick], labels, mask, factor, config, wants_grad)
        return ChunkRows(torch.stack((rows.sum(), ce.sum(), kd.sum())), g if wants_grad else None)

    return rows_fn


class _SparseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, args: SparseLinearArgs):
        teacher, labels, mask, config, chunk_size, accum_dtype, backend, transforms, wants = args
        acc = accumulation_dtype(hidden, weight, teacher.values)
        keep = included_rows(labels, mask, config.ignore_index)
        count = included_count(labels, mask, config.ignore_index, hidden.shape[0], acc, hidden.device) \
            if config.reduction == "mean" else torch.ones(1, dtype=acc, device=hidden.device)
        folded = folds_reduction(hidden.dtype)
        factor = count.reciprocal() if folded else torch.ones_like(count)
        inputs = LinearInputs(hidden, weight, bias, None, None, None, None, labels, mask)
        totals, grads = run_chunks(inputs, keep, _rows_fn(teacher, config, backend, factor, any(wants)), chunk_size,
                                   accum_dtype, wants, acc, transforms)
        totals = totals / count
        if not folded and config.reduction == "mean":
            for grad in grads:
                if grad is not None:
                    grad.mul_(count.reciprocal().to(grad.dtype))
        ctx.save_for_backward(*(hidden.new_empty((0,)) if g is None else g for g in grads))
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        loss, ce, kd = (part.clone() for part in totals.unbind())
        ctx.mark_non_differentiable(ce, kd)
        return loss, ce, kd

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        if torch.is_grad_enabled():
            raise RuntimeError("the fused linear loss of a SparseTeacher does not support double backward "
                               "(create_graph=True): its gradients are computed in the forward; use backend=\"torch\"")
        grads = [scaled_gradient(saved, grad_loss, dtype) if need else None
                 for saved, need, dtype in zip(ctx.saved_tensors, ctx.needs_input_grad[:3], ctx.dtypes)]
        return (*grads, None)


def sparse_linear_loss(tensors: LinearInputs, teacher: SparseRows, config: DistillConfig, chunk_size: int,
                       accum_dtype: torch.dtype, backend: str,
                       transforms: LogitTransforms = LogitTransforms()) -> tuple[torch.Tensor, ...]:
    """``(loss, ce, kd)`` of checked, flattened student tensors (``tensors``' teacher fields None) and a
    flat sparse teacher of the same rows."""
    grad_on = torch.is_grad_enabled()
    wants = tuple(grad_on and t is not None and t.requires_grad for t in (tensors.hidden, tensors.weight, tensors.bias))
    args = SparseLinearArgs((teacher, tensors.labels, tensors.mask, config, chunk_size, accum_dtype, backend,
                             transforms, wants))
    return _SparseLinear.apply(tensors.hidden, tensors.weight, tensors.bias, args)
