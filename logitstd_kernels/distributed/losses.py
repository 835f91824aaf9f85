"""The public vocabulary-parallel losses: logits sharded by class, and lm_heads split by vocabulary.

Every argument is checked locally first; with ``check_shards=True`` (the default) a header exchange
follows (``collectives.agree_on_shards``), so that a bad argument or mismatched shards raise on every
rank instead of hanging the process group.
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional, Union

import torch
import torch.distributed as dist

from .. import config as cfg
from .._checks import check_labels, check_mask, check_pair
from .._ops.chunks import ChunkRows, LinearInputs, default_accum_dtype, run_chunks, scaled_gradient
from .._ops.loss_op import included_rows
from ..config import DistillConfig, LogitTransforms
from ..fused_linear import checked_linear_inputs, default_chunk_size, flat_rows
from ..reference import DistillationParts, accumulation_dtype
from ..sparse import SparseTeacher
from .collectives import Layout, agree_on_shards, local_shards
from .phases import phase_backend
from .sharded import ShardedLoss, no_double_backward, sharded_rows


def refuse_sparse_teacher(teacher_logits: object) -> None:
    """The vocabulary-parallel losses take dense teacher shards: a SparseTeacher raises (on every rank,
    before any collective)."""
    if isinstance(teacher_logits, SparseTeacher):
        raise NotImplementedError("teacher_logits: a SparseTeacher needs the single-device losses "
                                  "(distillation_loss, fused_linear_distillation_loss); the vocabulary-parallel "
                                  "losses take dense teacher shards")

_LOCAL_ERRORS = (TypeError, ValueError, IndexError, RuntimeError)


def _check_divergence(config: cfg.DistillConfig, caller: str) -> None:
    if config.divergence in cfg.LABEL_DIVERGENCES:
        raise ValueError(f"{caller}: divergence={config.divergence!r} is computed by the single-device losses only")


def _check_local(student_logits, teacher_logits, labels, mask, settings: dict, reduction: str, backend: object):
    """The checks that need no other rank; the class count (for ``correction`` and the labels' upper
    bound) is the whole row's, checked after phase 1."""
    config = cfg.config_from(settings, cfg.OBJECTIVE_SETTINGS, "vocab_parallel_distillation_loss",
                             reduction=cfg.objective_reduction(reduction))
    _check_divergence(config, "vocab_parallel_distillation_loss")
    student, teacher = check_pair(student_logits, teacher_logits)
    labels = check_labels(labels, student, config.ignore_index, num_classes=None)
    return student, teacher, labels, check_mask(mask, student), config, phase_backend(backend, student.device)


@cfg.settings_keywords(cfg.OBJECTIVE_SETTINGS, docs=("mask", "return_components"))
def vocab_parallel_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    process_group: Optional[dist.ProcessGroup] = None,
    vocab_range: Optional[tuple[int, int]] = None,
    check_shards: bool = True,
    mask: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    return_components: bool = False,
    backend: str = "auto",
    **settings,
) -> Union[torch.Tensor, DistillationParts]:
    """:func:`logitstd_kernels.distillation_loss` of logits sharded by class across ``process_group``.

    Equivalent single-process code::

        distillation_loss(torch.cat(all student shards, -1), torch.cat(all teacher shards, -1), labels, ...)

    Args:
        student_logits, teacher_logits: this rank's ``(..., V_r)`` slices (the same rows on every
            rank; classes contiguous and in rank order), or DTensors with ``placements=[Shard(-1)]``
            on a 1-D mesh (then ``process_group`` is the mesh's). Gradients flow to both.
        labels: the global labels (the same on every rank), class indices in ``[0, V)``.
        process_group: the tensor-parallel group (default: the default group).
        vocab_range: this rank's ``(V_start, V_end)``, checked against the others' (optional).
        check_shards: exchange a constant-size header first so that mismatched shards (rows, dtypes,
            ranges) raise a ValueError naming the problem on every rank; False saves that collective.
        reduction: ``"mean"`` (over the included rows), ``"sum"`` or ``"none"``.
        backend: the three local phases as Triton kernels (``"triton"``, one launch each) or PyTorch
            operations over chunks of rows (``"torch"``); ``"auto"``: Triton on CUDA, else PyTorch.
            Every rank must resolve to the same one (the results differ in rounding).
        {keywords}
    """
    refuse_sparse_teacher(teacher_logits)
    student_logits, teacher_logits, group = local_shards(student_logits, teacher_logits, process_group)
    local_error = None
    try:
        student, teacher, labels, mask, config, phases = _check_local(student_logits, teacher_logits, labels, mask,
                                                                      settings, reduction, backend)
    except _LOCAL_ERRORS as exc:
        if not check_shards:
            raise
        local_error = exc
    layout_ = None
    if check_shards:  # every rank raises, or none does
        device = student_logits.device if isinstance(student_logits, torch.Tensor) else torch.device("cpu")
        layout_ = agree_on_shards(student_logits, teacher_logits, labels, mask, vocab_range, local_error, group, device)
    lead, width = student.shape[:-1], student.shape[-1]
    grads = (torch.is_grad_enabled() and student.requires_grad, torch.is_grad_enabled() and teacher.requires_grad)
    loss, ce, kd = ShardedLoss.apply(
        student.reshape(-1, width), teacher.reshape(-1, width), None if labels is None else labels.reshape(-1).long(),
        None if mask is None else mask.reshape(-1), group, config, layout_, phases, grads)
    if config.reduction == "none":
        loss, ce, kd = loss.reshape(lead), ce.reshape(lead), kd.reshape(lead)
    return DistillationParts(loss, ce, kd) if return_components else loss


class _ShardedFusedLinear(torch.autograd.Function):
    """The chunk loop (``_ops/chunks.py``) with the sharded objective as its row function; the
    gradients are computed in the forward (divided by the count in place) and scaled in the backward
    (``chunks.scaled_gradient``)."""

    @staticmethod
    def forward(ctx, tensors: LinearInputs, group, config: DistillConfig, layout_: Optional[Layout],
                phases: ModuleType, chunk_size: int, accum_dtype: torch.dtype, wants: tuple[bool, bool, bool],
                transforms: LogitTransforms, *parameters: torch.Tensor):
        weight = tensors.weight

        def rows_fn(xs, xt, labels, mask) -> ChunkRows:
            out = sharded_rows(xs, xt, labels, mask, group, config, (any(wants), False), layout_, phases)
            grad = None if out.grad_student is None else out.grad_student.to(weight.dtype)  # eager's logits dtype
            return ChunkRows(torch.stack([v.double().sum() for v in (out.rows, out.ce, out.kd)]), grad)

        keep = included_rows(tensors.labels, tensors.mask, config.ignore_index)
        totals, grads = run_chunks(tensors, keep, rows_fn, chunk_size, accum_dtype, wants, torch.float64, transforms)
        if config.reduction == "mean":
            count = (keep.sum() if keep is not None else totals.new_tensor(float(tensors.hidden.shape[0])))
            count = count.clamp_min(1).double()
        else:
            count = totals.new_ones(())
        loss, ce, kd = (part.to(accumulation_dtype(tensors.hidden, weight)).clone() for part in (totals / count).unbind())
        ctx.save_for_backward(*(g if g is None else g.div_(count.to(g.dtype)) for g in grads))
        ctx.dtypes = tuple(None if p is None else p.dtype for p in (tensors.hidden, weight, tensors.bias))
        ctx.mark_non_differentiable(ce, kd)
        return loss, ce, kd

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        no_double_backward()
        grads = [None if g is None else scaled_gradient(g, grad_loss, dtype) for g, dtype in zip(ctx.saved_tensors,
                                                                                                  ctx.dtypes)]
        return (None,) * 9 + tuple(grads)


def _check_linear_local(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                        teacher_logits, labels, mask, objective: dict, reduction: str, chunk_size, accum_dtype,
                        backend, transforms: dict):
    """The local checks of the fused vocabulary-parallel loss: the tensors against this rank's slice,
    the labels against the whole row (>= 0 here; < V after phase 1)."""
    config = cfg.config_from(objective, cfg.OBJECTIVE_SETTINGS, "vocab_parallel_fused_linear_distillation_loss",
                             reduction=cfg.objective_reduction(reduction, cfg.FUSED_LINEAR_REDUCTIONS))
    _check_divergence(config, "vocab_parallel_fused_linear_distillation_loss")
    cfg.check_chunk_size(chunk_size)
    cfg.check_accum_dtype(accum_dtype)
    checked_transforms = cfg.check_logit_transforms(**transforms)
    tensors = checked_linear_inputs(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                    teacher_bias, teacher_logits, labels, mask, config, num_classes=None)
    return flat_rows(tensors), config, phase_backend(backend, tensors.hidden.device), checked_transforms


def vocab_parallel_fused_linear_distillation_loss(
    student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None, *,
    teacher_logits: Optional[torch.Tensor] = None, student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None, process_group: Optional[dist.ProcessGroup] = None,
    vocab_range: Optional[tuple[int, int]] = None, check_shards: bool = True, chunk_size: Optional[int] = None,
    accum_dtype: Optional[torch.dtype] = None, student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: Optional[float] = None, teacher_final_logit_softcapping: Optional[float] = None,
    mask: Optional[torch.Tensor] = None, reduction: str = "mean", return_components: bool = False,
    backend: str = "auto", **objective,
) -> Union[torch.Tensor, DistillationParts]:
    """:func:`logitstd_kernels.fused_linear_distillation_loss` with lm_heads split by vocabulary.

    Each rank passes the full (replicated) hidden states and its rows ``[V_start, V_end)`` of the
    lm_head weights (Megatron's ``ColumnParallelLinear(gather_output=False)`` layout), or its
    ``(..., V_r)`` slice of ``teacher_logits``. Equivalent single-process code::

        fused_linear_distillation_loss(student_hidden, cat(all student_weight shards), teacher_hidden,
                                       cat(all teacher_weight shards), labels, ...)

    The gradient of ``student_weight`` (and bias) is this rank's shard of the full gradient. The
    gradient of ``student_hidden`` is this rank's *partial* sum ``G_r @ W_r``: the full gradient is
    the sum over the ranks, an all-reduce that belongs to the tensor-parallel layer's backward (in
    Megatron, the input of a column-parallel layer is all-reduced there). Two collectives of O(rows)
    per chunk of rows, plus the header exchange once per call with ``check_shards``. ``chunk_size``:
    the same on every rank; None: :func:`~logitstd_kernels.default_chunk_size` of the widest slice
    (from the header, so ``check_shards=False`` needs an explicit ``chunk_size``). ``objective``: the
    keywords of ``distillation_loss`` (``ce_weight``, ``kd_weight``, ``temperature``, ...);
    ``reduction`` is ``"mean"`` or ``"sum"``; ``backend``: the local phases', as in
    :func:`vocab_parallel_distillation_loss`. ``student_logit_scale``, ``teacher_logit_scale``,
    ``student_final_logit_softcapping``, ``teacher_final_logit_softcapping``: the logit transforms of
    :func:`logitstd_kernels.fused_linear_distillation_loss`, applied to each rank's slice.
    """
    refuse_sparse_teacher(teacher_logits)
    if not check_shards and chunk_size is None:
        raise ValueError("pass chunk_size with check_shards=False: every rank must use the same chunks, and the "
                         "default is derived from the widest slice, which only the header exchange reveals")
    local_error, rows_view = None, None
    try:
        transforms = dict(student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
                          student_final_logit_softcapping=student_final_logit_softcapping,
                          teacher_final_logit_softcapping=teacher_final_logit_softcapping)
        tensors, config, phases, transforms = _check_linear_local(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
            labels, mask, objective, reduction, chunk_size, accum_dtype, backend, transforms)
        rows_view = tensors.hidden.new_empty(()).expand(tensors.hidden.shape[0], tensors.weight.shape[0])
    except _LOCAL_ERRORS as exc:
        if not check_shards:
            raise
        local_error = exc
    layout_ = None
    if check_shards:  # once per call, for every chunk: every rank raises, or none does
        device = student_hidden.device if isinstance(student_hidden, torch.Tensor) else torch.device("cpu")
        layout_ = agree_on_shards(rows_view, rows_view, labels, mask, vocab_range, local_error, process_group, device)
    if chunk_size is None:
        chunk_size = default_chunk_size(tensors.hidden.shape[0], layout_.max_width, tensors.hidden.dtype,
                                        tensors.hidden.device)
    grad_on = torch.is_grad_enabled()
    wants = (grad_on and tensors.hidden.requires_grad, grad_on and tensors.weight.requires_grad,
             grad_on and tensors.bias is not None and tensors.bias.requires_grad)
    parameters = (tensors.hidden, tensors.weight, tensors.bias)
    loss, ce, kd = _ShardedFusedLinear.apply(tensors, process_group, config, layout_, phases, int(chunk_size),
                                             accum_dtype or default_accum_dtype(tensors.weight), wants, transforms,
                                             *parameters)
    return DistillationParts(loss, ce, kd) if return_components else loss
