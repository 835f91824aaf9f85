"""The objective of logits sharded by class: local phases around two collectives of O(rows) (three
for jsd and tvd).

Each rank holds the classes ``[V_start, V_end)`` of every row (contiguous, in rank order, ``V_r`` may
differ between ranks), the same rows on every rank, and the global labels. Every rank gets the same
loss and the gradients of its own slice (docs/tensor-parallel.md):

1. the slice's statistics (``phases``), **all_gather**, Chan's merge in rank order (``merge.py``);
2. the slice's partial sums under the global statistics, **all_gather**, summed in rank order;
   jsd and tvd then take the pointwise phase: their per-element terms under the global normalizers,
   a third **all_gather**, summed in rank order;
3. loss and the slice's gradients: every term of the chain rule is a per-element quantity times a
   per-row global sum.

Equivalent single-process code: ``distillation_loss(cat(student_shards, -1), cat(teacher_shards, -1),
labels, ...)``.
"""

from __future__ import annotations

from types import ModuleType
from typing import NamedTuple, Optional, Union

import torch
import torch.distributed as dist

from .._ops.loss_op import included_rows
from ..config import DistillConfig
from ..reference import accumulation_dtype
from . import layout, merge, torch_phases
from .collectives import Layout, gather


class ShardedRows(NamedTuple):
    """Per-row results of the sharded objective and the local slice's unreduced gradients."""

    rows: torch.Tensor  # (N,) ce_weight * CE + kd_weight * KD (0 where excluded)
    ce: torch.Tensor
    kd: torch.Tensor
    grad_student: Optional[torch.Tensor]  # (N, V_r): d rows[r] / d x[r, local classes], accumulation dtype
    grad_teacher: Optional[torch.Tensor]


def _label_columns(labels: Optional[torch.Tensor], start: Union[int, torch.Tensor], width: int, keep: torch.Tensor,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(whether this slice owns each included row's label, the label's index in the slice, clamped)."""
    if labels is None:
        zeros = torch.zeros(keep.shape[0], dtype=torch.long, device=keep.device)
        return torch.zeros_like(keep), zeros
    local = labels - start
    owns = (local >= 0) & (local < width) & keep
    return owns, local.clamp(0, width - 1).contiguous()


def _whole_row(gathered: torch.Tensor, layout_: Optional[Layout], group, config: DistillConfig):
    """(widths, start, V) from the gathered statistics; a host int with the header's layout, else
    device tensors (no host synchronization)."""
    widths = gathered[:, 0, -1]
    if layout_ is None:
        return widths, widths[:dist.get_rank(group)].sum().long(), widths.sum()
    if config.standardize and layout_.num_classes - config.correction <= 0:
        raise ValueError(f"correction={config.correction} leaves no degrees of freedom for the "
                         f"{layout_.num_classes} classes of the whole row")
    return widths, layout_.start, layout_.num_classes


def _raise_unowned(labels: torch.Tensor, totals: torch.Tensor, keep: torch.Tensor, num_classes,
                   config: DistillConfig, sums: layout.SumLayout) -> None:
    """A label no rank owns (outside [0, V)) raises on the CPU: every rank sees the same totals, so
    every rank raises; elsewhere the row is NaN, as on the single-device CUDA kernels (no host sync)."""
    unowned = merge.unowned_labels(totals, keep, sums)
    if labels.device.type == "cpu" and bool(unowned.any()):
        row = int(unowned.nonzero()[0])
        raise IndexError(f"labels[{row}] = {int(labels[row])} is outside [0, {int(num_classes)}) (the whole row's "
                         f"classes) and is not ignore_index ({config.ignore_index})")


def _empty(student: torch.Tensor, teacher: torch.Tensor, grads: tuple[bool, bool], acc: torch.dtype) -> ShardedRows:
    zeros = torch.zeros(student.shape[0], dtype=acc, device=student.device)
    return ShardedRows(zeros, zeros, zeros, student.new_zeros(student.shape) if grads[0] else None,
                       teacher.new_zeros(teacher.shape) if grads[1] else None)


class _Step(NamedTuple):
    """What phase 1 and its merge established for the later phases."""

    scales: merge.RowScales
    keep: torch.Tensor
    label_column: torch.Tensor
    coef: torch.Tensor  # phase 2's coefficients
    num_classes: Union[int, torch.Tensor]


def _phase_one(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
               mask: Optional[torch.Tensor], group, config: DistillConfig, layout_: Optional[Layout],
               phases: ModuleType, acc: torch.dtype) -> _Step:
    """Phase 1, its collective and the merge: the whole row's scales and phase 2's coefficients."""
    rows, width = student.shape
    local = phases.slice_stats(student, teacher, acc)
    width_column = torch.full((rows, 1), float(width), dtype=torch.float64, device=student.device)
    gathered = gather(torch.cat((local, width_column), -1), group)
    widths, start, num_classes = _whole_row(gathered, layout_, group, config)
    scales = merge.row_scales(gathered, widths, num_classes, config, acc)
    keep = included_rows(labels, mask, config.ignore_index)
    keep = torch.ones(rows, dtype=torch.bool, device=student.device) if keep is None else keep
    owns, label_column = _label_columns(labels, start, width, keep)
    return _Step(scales, keep, label_column, merge.sums_coefficients(scales, owns, acc), num_classes)


def _pointwise(student: torch.Tensor, teacher: torch.Tensor, step: _Step, totals: torch.Tensor,
               loss: merge.RowLoss, group, config: DistillConfig,
               phases: ModuleType) -> tuple[torch.Tensor, torch.Tensor, merge.RowLoss]:
    """jsd and tvd: the pointwise phase and its collective (the third); (coefficients, sums, loss)."""
    coef = merge.pointwise_coefficients(step.coef, totals, loss)
    partial = phases.slice_pointwise(student, teacher, coef, standardize=config.standardize,
                                     divergence=config.kernel_divergence(), beta=config.beta)
    pointwise = gather(partial, group).sum(0)  # rank order: deterministic
    return coef, pointwise, merge.with_pointwise(loss, pointwise, config)


def sharded_rows(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                 mask: Optional[torch.Tensor], group, config: DistillConfig, grads: tuple[bool, bool],
                 layout_: Optional[Layout] = None, phases: ModuleType = torch_phases) -> ShardedRows:
    """The phases on (N, V_r) slices; see the module docstring. Excluded rows (mask, labels at
    ``ignore_index``) get 0 and a zero gradient. ``layout_``: from ``collectives.agree_on_shards``
    (the class offsets on the host); None derives them from phase 1's gather on the device.
    ``phases``: a phase backend (``phases.phase_backend``)."""
    acc = accumulation_dtype(student, teacher)
    if student.shape[0] == 0:  # every rank has no rows (the header said so, or the caller guarantees it)
        return _empty(student, teacher, grads, acc)
    student, teacher = (t if t.stride(-1) == 1 else t.contiguous() for t in (student, teacher))
    step = _phase_one(student, teacher, labels, mask, group, config, layout_, phases, acc)
    divergence = config.kernel_divergence()
    sums = layout.sum_layout(config.standardize, labels is not None, divergence)
    partial = phases.slice_sums(student, teacher, step.coef, step.label_column, sums)
    totals = gather(partial, group).sum(0)  # rank order: deterministic
    if labels is not None:
        _raise_unowned(labels, totals, step.keep, step.num_classes, config, sums)
    loss = merge.row_loss(totals, step.scales, config, step.keep, sums, step.num_classes)
    coef, pointwise = step.coef, None
    if layout.is_pointwise(divergence):
        coef, pointwise, loss = _pointwise(student, teacher, step, totals, loss, group, config, phases)
    grad_x = torch.empty(student.shape, dtype=acc, device=student.device) if grads[0] else None
    grad_y = torch.empty(teacher.shape, dtype=acc, device=student.device) if grads[1] else None
    if any(grads):
        coef = merge.grads_coefficients(coef, totals, pointwise, step.scales, loss, step.keep, config, sums,
                                        step.num_classes)
        phases.slice_grads(student, teacher, coef, step.label_column, grad_x, grad_y,
                           t2=config.temperature * config.temperature, kd_weight=config.kd_weight,
                           ce_weight=config.ce_weight, label_smoothing=config.label_smoothing,
                           standardize=config.standardize, has_labels=labels is not None, divergence=divergence,
                           beta=config.beta)
    objective = config.ce_weight * loss.ce + config.kd_weight * loss.kd if labels is not None \
        else config.kd_weight * loss.kd
    zero = torch.zeros_like(loss.kd)
    rows_out, ce, kd = (torch.where(step.keep, v, zero).to(acc) for v in (objective, loss.ce, loss.kd))
    return ShardedRows(rows_out, ce, kd, grad_x, grad_y)


def no_double_backward() -> None:
    if torch.is_grad_enabled():
        raise RuntimeError("the vocab-parallel losses do not support double backward (create_graph=True): their "
                           "gradients are computed in the forward")


class ShardedLoss(torch.autograd.Function):
    """Loss from :func:`sharded_rows`; the gradients, computed in the forward, scaled in the backward."""

    @staticmethod
    def forward(ctx, student, teacher, labels, mask, group, config, layout_, phases, grads):
        out = sharded_rows(student, teacher, labels, mask, group, config, grads, layout_, phases)
        keep = included_rows(labels, mask, config.ignore_index)
        count = (out.rows.new_ones(()) if config.reduction != "mean" else
                 out.rows.new_tensor(float(max(out.rows.shape[0], 1))) if keep is None else keep.sum().clamp_min(1))
        ctx.save_for_backward(out.grad_student, out.grad_teacher, count.to(out.rows.dtype))
        ctx.reduction = config.reduction
        ctx.dtypes = (student.dtype, teacher.dtype)
        parts = (out.rows, out.ce, out.kd)
        if config.reduction == "none":
            reduced = parts
        else:
            reduced = tuple(v.sum() / count if config.reduction == "mean" else v.sum() for v in parts)
        ctx.mark_non_differentiable(reduced[1], reduced[2])
        return reduced

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        no_double_backward()
        grad_x, grad_y, count = ctx.saved_tensors
        scale = grad_loss.unsqueeze(-1) if ctx.reduction == "none" else grad_loss
        if ctx.reduction == "mean":
            scale = scale / count
        grads = [None if g is None else (g * scale).to(dtype) for g, dtype in zip((grad_x, grad_y), ctx.dtypes)]
        return grads[0], grads[1], None, None, None, None, None, None, None
