"""The distillation objective of an lm_head without its logits: chunked, fused linear + loss.

At LLM scale the logits are the memory (16k tokens x 128k classes is 4 GB per bf16 tensor, and a
step holds the student's, the teacher's and the gradient). ``fused_linear_distillation_loss`` never
materializes them: the rows go through in chunks (``_ops/chunks.py``), each chunk's logits made by a
matmul, turned into their gradient by one fused kernel launch and multiplied back into the hidden
states' and the weight's gradients. See docs/design.md, "fused linear".

Equivalent eager code (``backend="torch"`` runs exactly this, ``reference.linear_loss_of_config``, with
the full logits)::

    distillation_loss(transform_logits(F.linear(student_hidden, student_weight, student_bias), student_*),
                      transform_logits(F.linear(teacher_hidden, teacher_weight, teacher_bias) (or teacher_logits),
                                       teacher_*),
                      labels, **options)
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from . import config as cfg
from . import reference
from ._backends import resolve_backend_name, resolve_sparse_backend_name
from ._checks import check_dense_teacher_settings, check_linear, check_rows_of, check_sparse_teacher, check_teacher
from ._ops.chunks import LinearInputs, default_accum_dtype
from ._ops.fused_linear_op import call_fused_linear_op
from ._ops.logit_transforms import is_identity
from ._ops.sparse_linear import sparse_linear_loss
from .config import DistillConfig, LogitTransforms
from .functional import as_rows
from .reference import DistillationParts
from .sparse import SparseTeacher

__all__ = ["fused_linear_distillation_loss", "default_chunk_size"]

# The chunk rule. Each chunk holds three C x V blocks in the logits' dtype (student logits, teacher
# logits, student gradient); C is the largest power of two whose blocks fit the budget:
# - CUDA, 1 GiB: C = 1024 rows at V = 128k in bf16 (768 MB), 4096 at V = 32k. A 1024 x H @ H x V
#   matmul keeps the tensor cores busy (the matmuls, not the loss, dominate a fused step), and 1 GiB
#   is small next to the 4-68 GB the full logits of such a step take.
# - CPU, 64 MiB: 128 rows at V = 32k in float32 (48 MB); larger chunks only add memory, the CPU
#   matmuls reach their throughput at a few dozen rows.
_CHUNK_BUDGET_BYTES = {"cuda": 1 << 30, "cpu": 64 << 20}
_LOGIT_BLOCKS = 3


def default_chunk_size(num_rows: int, num_classes: int, dtype: torch.dtype, device: torch.device) -> int:
    """The rows per chunk for ``chunk_size=None``: the largest power of two C with
    ``3 * C * num_classes * dtype.itemsize <= budget`` (1 GiB on CUDA, 64 MiB elsewhere), at least 1
    and no more than ``num_rows`` rounded up to a power of two."""
    budget = _CHUNK_BUDGET_BYTES.get(device.type, _CHUNK_BUDGET_BYTES["cpu"])
    per_row = _LOGIT_BLOCKS * max(num_classes, 1) * torch.empty((), dtype=dtype).element_size()
    fit = max(budget // per_row, 1)
    chunk = 1 << (fit.bit_length() - 1)
    return max(1, min(chunk, 1 << max(num_rows - 1, 0).bit_length()))


def autocast_linear(tensors: list[Optional[torch.Tensor]], device_type: str) -> list[Optional[torch.Tensor]]:
    """What ``F.linear`` under an active ``torch.autocast`` would compute in: float32 tensors in the
    autocast dtype (float64 ones stay, as autocast leaves them)."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return [t if t is None or t.dtype != torch.float32 else t.to(dtype) for t in tensors]


def checked_linear_inputs(student_hidden: object, student_weight: object, student_bias: object, teacher_hidden: object,
                          teacher_weight: object, teacher_bias: object, teacher_logits: object, labels: object,
                          mask: object, config: DistillConfig, num_classes: Optional[int] = -1) -> LinearInputs:
    """Every tensor check of a fused lm_head call; the tensors under autocast, leading dims kept.
    ``num_classes``: the whole row's class count (-1: the weight's; None: unknown, a vocabulary shard)."""
    hidden, weight, bias = check_linear("student", student_hidden, student_weight, student_bias)
    teacher = check_teacher(teacher_hidden, teacher_weight, teacher_bias, teacher_logits, hidden, weight.shape[0])
    labels, mask = check_rows_of(labels, mask, hidden, weight.shape[0] if num_classes == -1 else num_classes, config)
    head = autocast_linear([hidden, weight, bias, *teacher[:3]], hidden.device.type)
    return LinearInputs(*head, teacher[3], labels, mask)


def flat_rows(t: LinearInputs) -> LinearInputs:
    """The inputs with their rows flattened: (N, H) hidden states, (N, V) teacher logits, (N,) labels."""
    width = t.weight.shape[0]
    return t._replace(
        hidden=t.hidden.reshape(-1, t.hidden.shape[-1]),
        teacher_hidden=None if t.teacher_hidden is None else t.teacher_hidden.reshape(-1, t.teacher_hidden.shape[-1]),
        teacher_logits=None if t.teacher_logits is None else as_rows(t.teacher_logits.reshape(-1, width)),
        labels=None if t.labels is None else t.labels.reshape(-1).long(),
        mask=None if t.mask is None else t.mask.reshape(-1).contiguous())


def _eager(t: LinearInputs, config: DistillConfig, transforms: LogitTransforms,
           return_components: bool) -> Union[torch.Tensor, DistillationParts]:
    """``backend="torch"``: the eager composition, full logits."""
    teacher_logits = t.teacher_logits
    if teacher_logits is None:
        with torch.no_grad():
            teacher_logits = F.linear(t.teacher_hidden, t.teacher_weight, t.teacher_bias)
    return reference.linear_loss_of_config(t.hidden, t.weight, t.bias, teacher_logits, t.labels, t.mask, config,
                                           transforms, return_components)


def _chunk_size(t: LinearInputs, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        return chunk_size
    logits_dtype = t.hidden.dtype if t.teacher_logits is None else max(
        (t.hidden.dtype, t.teacher_logits.dtype), key=lambda d: torch.empty((), dtype=d).element_size())
    return default_chunk_size(t.hidden.shape[0], t.weight.shape[0], logits_dtype, t.hidden.device)


def _sparse_teacher_loss(hidden: object, weight: object, bias: object, teacher_head: tuple, teacher: SparseTeacher,
                         labels: object, mask: object, config: DistillConfig, transforms: LogitTransforms,
                         chunk_size: Optional[int], accum_dtype: Optional[torch.dtype], backend: str,
                         ) -> tuple[torch.Tensor, ...]:
    """``(loss, ce, kd)`` of a fused lm_head and a :class:`SparseTeacher` (checked here), or the
    reference's ``DistillationParts`` for ``backend="torch"``."""
    if any(t is not None for t in teacher_head):
        raise ValueError("teacher_logits is a SparseTeacher: leave teacher_hidden, teacher_weight and teacher_bias None")
    if not is_identity(*transforms.teacher()):
        raise ValueError("teacher_logit_scale / teacher_final_logit_softcapping: a SparseTeacher's values are the "
                         "teacher's final logits or log-probabilities; leave them at 1.0 / None")
    hidden, weight, bias = check_linear("student", hidden, weight, bias)
    teacher = check_sparse_teacher(teacher, hidden.shape[:-1], weight.shape[0], hidden.device, config)
    config.check_classes(weight.shape[0], "student_weight")
    labels, mask = check_rows_of(labels, mask, hidden, weight.shape[0], config)
    hidden, weight, bias = autocast_linear([hidden, weight, bias], hidden.device.type)
    name = resolve_sparse_backend_name(cfg.check_backend(backend), hidden.device.type)
    if name == "torch":
        student = reference.transform_logits(F.linear(hidden, weight, bias), *transforms.student())
        return reference.loss_of_config(student, teacher, labels, mask, config, True)
    tensors = flat_rows(LinearInputs(hidden, weight, bias, None, None, None, None, labels, mask))
    chunk = chunk_size or default_chunk_size(tensors.hidden.shape[0], weight.shape[0], hidden.dtype, hidden.device)
    return sparse_linear_loss(tensors, teacher.rows(), config, chunk, accum_dtype or default_accum_dtype(weight), name,
                              transforms)


@cfg.settings_keywords(cfg.OBJECTIVE_SETTINGS, docs=("labels", "mask", "return_components", "chunk_size",
                                                     "accum_dtype", *cfg.LOGIT_TRANSFORMS))
def fused_linear_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    *,
    teacher_logits: Optional[torch.Tensor] = None,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    accum_dtype: Optional[torch.dtype] = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: Optional[float] = None,
    teacher_final_logit_softcapping: Optional[float] = None,
    mask: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    return_components: bool = False,
    backend: str = "auto",
    **settings,
) -> Union[torch.Tensor, DistillationParts]:
    """The distillation objective of two lm_heads, computed in chunks so that the logits never exist.

    Equivalent eager code::

        student_logits = F.linear(student_hidden, student_weight, student_bias)
        teacher_logits = F.linear(teacher_hidden, teacher_weight, teacher_bias)  # unless given
        student_logits = transform_logits(student_logits, student_logit_scale, student_final_logit_softcapping)
        teacher_logits = transform_logits(teacher_logits, teacher_logit_scale, teacher_final_logit_softcapping)
        distillation_loss(student_logits, teacher_logits, labels, ce_weight=..., kd_weight=..., ...)

    Args:
        student_hidden: ``(..., H_s)`` hidden states (e.g. a causal LM's last hidden state, (B, T, H)).
        student_weight: ``(V, H_s)``, the lm_head weight (may be tied to the embedding).
        teacher_hidden, teacher_weight: ``(..., H_t)`` and ``(V, H_t)``; ``H_t`` may differ from
            ``H_s``. Or pass ``teacher_logits`` ``(..., V)`` instead (computed elsewhere), or a
            :class:`~logitstd_kernels.SparseTeacher` of the rows ``(...)`` (the teacher's stored top-k;
            ``support``; docs/design.md section 9). The teacher is constant: none of its tensors may
            require grad.
        student_bias, teacher_bias: optional ``(V,)`` lm_head biases.
        reduction: ``"mean"`` (over included rows) or ``"sum"``. ``"none"`` is not offered: the
            gradients are computed in the forward, for a scalar loss.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` (the fused kernels, chunked) or
            ``"torch"`` (the eager composition above, full logits, for reference).
        {keywords}

    Gradients reach ``student_hidden``, ``student_weight`` and ``student_bias`` (those that require
    grad). Under ``torch.autocast`` the matmuls run in the autocast dtype, as ``F.linear`` would.
    """
    config = cfg.config_from(settings, cfg.OBJECTIVE_SETTINGS, "fused_linear_distillation_loss",
                             reduction=cfg.objective_reduction(reduction, cfg.FUSED_LINEAR_REDUCTIONS))
    chunk_size, accum_dtype = cfg.check_chunk_size(chunk_size), cfg.check_accum_dtype(accum_dtype)
    transforms = cfg.check_logit_transforms(student_logit_scale, teacher_logit_scale, student_final_logit_softcapping,
                                            teacher_final_logit_softcapping)
    if isinstance(teacher_logits, SparseTeacher):
        parts = _sparse_teacher_loss(student_hidden, student_weight, student_bias, (teacher_hidden, teacher_weight,
                                     teacher_bias), teacher_logits, labels, mask, config, transforms, chunk_size,
                                     accum_dtype, backend)
        return DistillationParts(*parts) if return_components else parts[0]
    check_dense_teacher_settings(config)
    tensors = checked_linear_inputs(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                    teacher_bias, teacher_logits, labels, mask, config)
    name = resolve_backend_name(cfg.check_backend(backend), tensors.hidden.device.type)
    if name == "torch":
        return _eager(tensors, config, transforms, return_components)
    tensors = flat_rows(tensors)
    loss, ce, kd = call_fused_linear_op(tensors, config, _chunk_size(tensors, chunk_size),
                                        accum_dtype or default_accum_dtype(tensors.weight), name, transforms)
    return DistillationParts(loss, ce, kd) if return_components else loss
