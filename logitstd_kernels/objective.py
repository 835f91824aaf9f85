"""The distillation objective in one fused pass: hard-label cross-entropy plus (LS-)KD.

``distillation_loss`` computes the paper's Algorithm 2 objective with token labels::

    ce_weight * CE(labels, softmax(x)) + kd_weight * tau_s**2 * KL(softmax(Z(y)/tau_t) || softmax(Z(x)/tau_s))

averaged over the included rows (``mask`` and ``labels != ignore_index``). The CE term costs the
fused kernels one more exponential per element of the student row they already hold; the two
gradients are summed in registers and written once, already weighted and normalized (docs/design.md,
"the distillation objective"). The op ``torch.ops.logitstd.distillation_loss`` shares the autograd of
``torch.ops.logitstd.kd_loss`` (``ops.py``).

Equivalent eager code: ``reference.distillation_loss``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from . import reference
from ._backends import Objective, backend_module, resolve_backend_name
from ._checks import check_backend, check_objective_args, check_op_args
from .functional import _as_rows
from .ops import LOW_PRECISION, save_gradients, saved_gradients_backward
from .reference import DistillationParts, accumulation_dtype

__all__ = ["distillation_loss", "DistillationParts"]


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


def _check_op_labels(labels: Optional[torch.Tensor], student: torch.Tensor) -> None:
    if labels is None:
        return
    if labels.dtype != torch.int64 or labels.dim() != 1 or labels.shape[0] != student.shape[0]:
        raise ValueError(f"labels must be an int64 tensor of shape ({student.shape[0]},), got {labels.dtype} "
                         f"of shape {tuple(labels.shape)}")
    if labels.device != student.device:
        raise ValueError(f"labels is on {labels.device} but student is on {student.device}")


def fused_objective_rows(backend: str, student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                         mask: Optional[torch.Tensor], factor: torch.Tensor, kernel_args: tuple, objective_args: tuple,
                         grad_student: bool, grad_teacher: bool) -> tuple[torch.Tensor, ...]:
    """One launch of the objective's fused kernel over (N, V) rows: ``(rows, grad_s, grad_t, ce, kd)``.

    ``rows`` is ``ce_weight * CE + kd_weight * tau_s**2 * KL`` per row (0 where excluded), ``ce`` and
    ``kd`` its parts; the gradients are those of ``factor * rows`` ((1,) or (N,) factor).
    ``kernel_args`` = (tau_s, tau_t, standardize, correction, eps); ``objective_args`` =
    (ignore_index, label_smoothing, ce_weight, kd_weight). Without labels (pure KD) the KD weight is
    folded into the kernel's factor.
    """
    ignore_index, label_smoothing, ce_weight, kd_weight = objective_args
    module = backend_module(backend)
    if labels is None:
        rows, grad_s, grad_t, ce, kd = module.fused_kd_forward(student, teacher, mask, kd_weight * factor, *kernel_args,
                                                               grad_student, grad_teacher)
        return kd_weight * rows, grad_s, grad_t, ce, kd
    objective = Objective(labels.contiguous(), ignore_index, label_smoothing, ce_weight, kd_weight)
    return module.fused_kd_forward(student, teacher, mask, factor, *kernel_args, grad_student, grad_teacher, objective)


@torch.library.custom_op("logitstd::distillation_loss", mutates_args=())
def distillation_loss_op(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    temperature: float,
    teacher_temperature: float,
    standardize: bool,
    correction: int,
    eps: float,
    ignore_index: int,
    label_smoothing: float,
    ce_weight: float,
    kd_weight: float,
    reduction: str,
    grad_student: bool,
    grad_teacher: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused objective of (N, V) logits and (N,) int64 labels (or None: pure KD).

    Returns ``(loss, ce, kd, saved_grad_student, saved_grad_teacher)``: the objective and its two
    parts (reduced alike; ``ce``/``kd`` are not differentiable), then the internal pre-scaled
    gradients. ``reduction``: "mean" (over included rows), "sum" or "none" ((N,) each).
    """
    check_op_args(student, teacher, mask, temperature, teacher_temperature, standardize, correction, eps,
                  "sum" if reduction == "mean" else reduction, backend)
    _check_op_labels(labels, student)
    if labels is not None and labels.device.type == "cpu":
        check_objective_args(student, teacher, labels, ce_weight=ce_weight, kd_weight=kd_weight,
                             temperature=temperature, teacher_temperature=teacher_temperature,
                             standardize=standardize, correction=correction, eps=eps, ignore_index=ignore_index,
                             label_smoothing=label_smoothing, mask=mask, reduction=reduction)
    mask = None if mask is None else mask.contiguous()
    acc = accumulation_dtype(student, teacher)
    count = (included_count(labels, mask, ignore_index, student.shape[0], acc, student.device)
             if reduction == "mean" else torch.ones(1, dtype=acc, device=student.device))
    rows, grad_s, grad_t, ce, kd = fused_objective_rows(
        backend, student, teacher, labels, mask, count.reciprocal(),
        (temperature, teacher_temperature, standardize, correction, eps),
        (ignore_index, label_smoothing, ce_weight, kd_weight), grad_student, grad_teacher)
    if reduction == "none":
        return rows, ce, kd, grad_s, grad_t
    return tuple(  # type: ignore[return-value]
        (v.sum() / count).reshape(()) for v in (rows, ce, kd)) + (grad_s, grad_t)


@distillation_loss_op.register_fake
def _distillation_loss_fake(student, teacher, labels, mask, temperature, teacher_temperature, standardize, correction,
                            eps, ignore_index, label_smoothing, ce_weight, kd_weight, reduction, grad_student,
                            grad_teacher, backend):
    shape = (student.shape[0],) if reduction == "none" else ()
    acc = accumulation_dtype(student, teacher)
    parts = tuple(student.new_empty(shape, dtype=acc) for _ in range(3))
    grad_s = student.new_empty(student.shape) if grad_student else student.new_empty((0,))
    grad_t = teacher.new_empty(teacher.shape) if grad_teacher else teacher.new_empty((0,))
    return parts + (grad_s, grad_t)


def _setup_context(ctx, inputs, output) -> None:
    (student, teacher, labels, mask, temperature, teacher_temperature, standardize, correction, eps, ignore_index,
     label_smoothing, ce_weight, kd_weight, reduction, grad_student, grad_teacher, backend) = inputs
    _, ce, kd, grad_s, grad_t = output
    ctx.mark_non_differentiable(ce, kd)
    scale = None
    if (grad_student and student.dtype in LOW_PRECISION) or (grad_teacher and teacher.dtype in LOW_PRECISION):
        acc = accumulation_dtype(student, teacher)
        count = (included_count(labels, mask, ignore_index, student.shape[0], acc, student.device)
                 if reduction == "mean" else torch.ones(1, dtype=acc, device=student.device))
        scale = (kd_weight if labels is None else 1.0) / count
    objective_args = None if labels is None else (ignore_index, label_smoothing, ce_weight, kd_weight)
    save_gradients(ctx, student, teacher, mask, labels, grad_s, grad_t,
                   (temperature, teacher_temperature, standardize, correction, eps), objective_args, scale,
                   (grad_student, grad_teacher), backend)


def _backward(ctx, grad_loss, _grad_ce, _grad_kd, _grad_s, _grad_t):
    grad_s, grad_t = saved_gradients_backward(ctx, grad_loss, "distillation_loss")
    return (grad_s, grad_t) + (None,) * 15


distillation_loss_op.register_autograd(_backward, setup_context=_setup_context)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    ce_weight: float = 0.1,
    kd_weight: float = 9.0,
    temperature: float = 2.0,
    teacher_temperature: Optional[float] = None,
    standardize: bool = True,
    correction: int = 1,
    eps: float = 1e-7,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    mask: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    return_components: bool = False,
    backend: str = "auto",
) -> Union[torch.Tensor, DistillationParts]:
    """Hard-label CE and (logit-standardized) KD in one fused pass.

    Equivalent eager code (``reference.distillation_loss``)::

        included = mask & (labels != ignore_index)
        ce = F.cross_entropy(x[included], labels[included], label_smoothing=label_smoothing, reduction="none")
        kd = logitstd_kd_loss(x, y, ..., reduction="none")[included]          # tau_s**2 * KL per row
        loss = (ce_weight * ce + kd_weight * kd).sum() / max(included.sum(), 1)

    Defaults are the paper's official code (``CE_WEIGHT = 0.1``, ``KD_WEIGHT = 9``, base temperature 2,
    ``correction=1``, ``eps=1e-7``). Liger-Kernel's distillation losses default to
    ``weight_hard_loss = weight_soft_loss = 0.5`` (and no standardization, no ``tau**2``: pass
    ``ce_weight=0.5, kd_weight=0.5 / temperature**2, standardize=False`` to match its forward-KL loss).

    Args:
        student_logits, teacher_logits: ``(..., V)``; the last dim holds the classes.
        labels: integer tensor of the leading shape (e.g. ``input_ids`` shifted by one, padding
            ``-100``), or None for pure KD through the same kernel. A row whose label is
            ``ignore_index`` contributes to neither term and is not counted. A label outside
            ``[0, V)`` that is not ``ignore_index`` raises on the CPU; on CUDA (no host
            synchronization) it makes its row's loss and gradient NaN.
        ce_weight, kd_weight: the weights of the two terms (finite, >= 0).
        temperature, teacher_temperature, standardize, correction, eps: as in ``logitstd_kd_loss``.
        label_smoothing: in ``[0, 1)``, as in ``F.cross_entropy``.
        mask: optional bool tensor of the leading shape; False rows are excluded from both terms.
        reduction: ``"mean"`` (over included rows; ``batchmean`` for classification batches),
            ``"sum"`` or ``"none"`` (per row, excluded rows 0).
        return_components: also return the detached parts: ``DistillationParts(loss, ce, kd)``,
            ``kd`` being ``tau_s**2 * KL`` (unweighted), reduced like the loss, from the same launch.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"torch"`` (the eager reference).
    """
    (student, teacher, labels, mask, tau_s, tau_t, ce_weight, kd_weight, label_smoothing) = check_objective_args(
        student_logits, teacher_logits, labels, ce_weight=ce_weight, kd_weight=kd_weight, temperature=temperature,
        teacher_temperature=teacher_temperature, standardize=standardize, correction=correction, eps=eps,
        ignore_index=ignore_index, label_smoothing=label_smoothing, mask=mask, reduction=reduction,
    )
    name = resolve_backend_name(check_backend(backend), student.device.type)
    if name == "torch":
        return reference.distillation_loss(
            student, teacher, labels, ce_weight=ce_weight, kd_weight=kd_weight, temperature=tau_s,
            teacher_temperature=tau_t, standardize=standardize, correction=correction, eps=eps,
            ignore_index=ignore_index, label_smoothing=label_smoothing, mask=mask, reduction=reduction,
            return_components=return_components,
        )
    grad_enabled = torch.is_grad_enabled()
    loss, ce, kd, _, _ = torch.ops.logitstd.distillation_loss(
        _as_rows(student), _as_rows(teacher), None if labels is None else labels.reshape(-1).long().contiguous(),
        None if mask is None else mask.reshape(-1).contiguous(), tau_s, tau_t, bool(standardize), int(correction),
        float(eps), int(ignore_index), label_smoothing, ce_weight, kd_weight, reduction,
        grad_enabled and student.requires_grad, grad_enabled and teacher.requires_grad, name,
    )
    if reduction == "none":
        lead = student.shape[:-1]
        loss, ce, kd = loss.reshape(lead), ce.reshape(lead), kd.reshape(lead)
    return DistillationParts(loss, ce, kd) if return_components else loss
