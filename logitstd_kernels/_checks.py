"""Checks of the tensors the losses take; the settings are checked by ``config.DistillConfig``.

Each check raises before any kernel runs and names the offending argument, so a user sees
``ValueError: teacher_logits has shape (4, 9) but student_logits has shape (4, 10)`` instead of an
index error deep inside a kernel.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .config import DIVERGENCE_CODES, LABEL_DIVERGENCES, DistillConfig, check_backend
from .sparse import SparseTeacher

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FUSED_BACKENDS = ("triton", "cuda", "cpu")


def check_logits(name: str, logits: object) -> torch.Tensor:
    """A floating tensor with at least one dimension (the class dimension)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (the class dimension), got a 0-d tensor")
    return logits


def check_pair(student_logits: object, teacher_logits: object,
               names: tuple[str, str] = ("student_logits", "teacher_logits")) -> tuple[torch.Tensor, torch.Tensor]:
    """Two logit tensors of the same shape on the same device."""
    student = check_logits(names[0], student_logits)
    teacher = check_logits(names[1], teacher_logits)
    if student.shape != teacher.shape:
        raise ValueError(f"{names[1]} has shape {tuple(teacher.shape)} but {names[0]} has shape "
                         f"{tuple(student.shape)}; they must match")
    if student.device != teacher.device:
        raise ValueError(f"{names[0]} is on {student.device} but {names[1]} is on {teacher.device}; they must be "
                         f"on the same device")
    if student.shape[-1] < 1:
        raise ValueError(f"{names[0]} has an empty class dimension (last dimension is 0)")
    return student, teacher


def _check_per_row(name: str, tensor: object, kind: str, dtype: str, dtype_ok: bool, student: torch.Tensor) -> None:
    """``tensor``, one value per row, is ``kind`` torch.Tensor of ``dtype`` (``dtype_ok``) shaped like
    the leading dimensions of the logits ``student``, on their device."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be {kind} torch.Tensor or None, got {type(tensor).__name__}")
    if not dtype_ok:
        raise TypeError(f"{name} must have {dtype}, got {tensor.dtype}")
    if tensor.shape != student.shape[:-1]:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)} but must match the leading dimensions of the "
                         f"logits {tuple(student.shape[:-1])}")
    if tensor.device != student.device:
        raise ValueError(f"{name} is on {tensor.device} but the logits are on {student.device}")


def check_mask(mask: object, student: torch.Tensor) -> Optional[torch.Tensor]:
    """``None`` or a bool tensor shaped like the leading (row) dimensions of the logits."""
    if mask is not None:
        _check_per_row("mask", mask, "a bool", "dtype torch.bool", isinstance(mask, torch.Tensor) and mask.dtype == torch.bool, student)
    return mask


def check_labels(labels: object, student: torch.Tensor, ignore_index: int,
                 num_classes: Optional[int] = -1) -> Optional[torch.Tensor]:
    """``None`` or an integer tensor of the leading shape on the logits' device.

    On the CPU the values are checked too (a label outside [0, V) that is not ``ignore_index``
    raises; V is ``num_classes``, by default ``student.shape[-1]``, and ``None`` checks only >= 0, for
    logits sharded by class); on other devices that would need a host synchronization, and the
    kernels make such a row's loss NaN instead.
    """
    if labels is None:
        return None
    integer = isinstance(labels, torch.Tensor) and not (
        labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool)
    _check_per_row("labels", labels, "an integer", "an integer dtype (e.g. torch.long)", integer, student)
    if labels.device.type == "cpu" and labels.numel() and not torch.compiler.is_compiling():
        _check_label_values(labels, student.shape[-1] if num_classes == -1 else num_classes, ignore_index)
    return labels


def _check_label_values(labels: torch.Tensor, upper: Optional[int], ignore_index: int) -> None:
    """Every label is ``ignore_index`` or in ``[0, upper)`` (``upper`` None: only >= 0); compared in
    int64, so that a bound above a narrow dtype's range (V > 32767 with int16 labels) cannot wrap."""
    wide = labels.long()
    bad = (wide != ignore_index) & ((wide < 0) | (wide >= upper if upper is not None else False))
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise IndexError(f"labels{list(index)} = {int(wide[index])} is outside [0, {upper or 'V'}) and is not "
                         f"ignore_index ({ignore_index})")


def check_inputs(student_logits: object, teacher_logits: object, labels: object, mask: object,
                 config: DistillConfig) -> tuple[torch.Tensor, Union[torch.Tensor, SparseTeacher],
                                                 Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Every tensor check of the losses of (..., V) logits (the teacher dense, or a
    :class:`~logitstd_kernels.sparse.SparseTeacher`); returns them checked."""
    if isinstance(teacher_logits, SparseTeacher):
        student = check_logits("student_logits", student_logits)
        teacher = check_sparse_teacher(teacher_logits, student.shape[:-1], student.shape[-1], student.device, config)
    else:
        student, teacher = check_pair(student_logits, teacher_logits)
        check_dense_teacher_settings(config)
    config.check_classes(student.shape[-1], "student_logits")
    _check_labels_given(labels, config)
    checked_labels = check_labels(labels, student, config.ignore_index)
    return student, teacher, checked_labels, check_mask(mask, student)


def _check_labels_given(labels: object, config: DistillConfig) -> None:
    if labels is None and config.divergence in LABEL_DIVERGENCES:
        raise ValueError(f"labels is None, but divergence={config.divergence!r} needs the labels (its target class)")


def check_op_tensors(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                     mask: Optional[torch.Tensor], config: DistillConfig, backend: str) -> None:
    """The checks of the op itself, called directly (the public functions check before they reshape):
    (N, V) rows with unit class stride, (N,) int64 labels, a bool (N,) mask, a fused backend."""
    check_pair(student, teacher)
    for name, t in (("student", student), ("teacher", teacher)):
        if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
            raise ValueError(f"{name} must be a 2-d (N, V) tensor with unit stride along V, got shape "
                             f"{tuple(t.shape)} and strides {t.stride()}")
    config.check_classes(student.shape[1], "student")
    check_backend(backend, FUSED_BACKENDS)
    check_mask(mask, student)
    _check_labels_given(labels, config)
    if labels is not None:
        if labels.dtype != torch.int64 or labels.dim() != 1 or labels.shape[0] != student.shape[0]:
            raise ValueError(f"labels must be an int64 tensor of shape ({student.shape[0]},), got {labels.dtype} "
                             f"of shape {tuple(labels.shape)}")
        check_labels(labels, student, config.ignore_index)


def _check_matrix(name: str, tensor: object, dims: int) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {tensor.dtype}")
    if (tensor.dim() != dims) if dims else tensor.dim() < 1:
        want = f"{dims}-d" if dims else "at least 1-d"
        raise ValueError(f"{name} must be {want}, got shape {tuple(tensor.shape)}")
    return tensor


def check_linear(prefix: str, hidden: object, weight: object, bias: object) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      Optional[torch.Tensor]]:
    """``{prefix}_hidden`` (..., H), ``{prefix}_weight`` (V, H) and ``{prefix}_bias`` (V,) or None."""
    hidden = _check_matrix(f"{prefix}_hidden", hidden, 0)
    weight = _check_matrix(f"{prefix}_weight", weight, 2)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{prefix}_weight has shape {tuple(weight.shape)}: its second dimension must be the hidden "
                         f"size of {prefix}_hidden ({hidden.shape[-1]})")
    if bias is not None:
        bias = _check_matrix(f"{prefix}_bias", bias, 1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{prefix}_bias has shape {tuple(bias.shape)} but {prefix}_weight has "
                             f"{weight.shape[0]} rows (classes)")
    tensors = [("weight", weight)] + ([] if bias is None else [("bias", bias)])
    autocast = torch.is_autocast_enabled(hidden.device.type)
    for part, t in tensors:
        if t.device != hidden.device:
            raise ValueError(f"{prefix}_{part} is on {t.device} but {prefix}_hidden is on {hidden.device}")
        if t.dtype != hidden.dtype and not autocast:
            raise TypeError(f"{prefix}_{part} is {t.dtype} but {prefix}_hidden is {hidden.dtype}; the matmul needs "
                            f"one dtype (cast them, or run under torch.autocast)")
    return hidden, weight, bias


def _check_teacher_logits(teacher_logits: object, lead: tuple, num_classes: int,
                          device: torch.device) -> torch.Tensor:
    teacher_logits = check_logits("teacher_logits", teacher_logits)
    if tuple(teacher_logits.shape) != lead + (num_classes,):
        raise ValueError(f"teacher_logits has shape {tuple(teacher_logits.shape)} but must be {lead + (num_classes,)} "
                         f"(student_hidden's leading dimensions, then the {num_classes} classes of student_weight)")
    if teacher_logits.device != device:
        raise ValueError(f"teacher_logits is on {teacher_logits.device} but student_hidden is on {device}")
    return teacher_logits


def _check_teacher_head(teacher_hidden: object, teacher_weight: object, teacher_bias: object, lead: tuple,
                        num_classes: int, device: torch.device) -> tuple:
    if teacher_hidden is None or teacher_weight is None:
        missing = "teacher_hidden" if teacher_hidden is None else "teacher_weight"
        raise ValueError(f"{missing} is missing: pass the teacher as teacher_hidden + teacher_weight, or as "
                         f"teacher_logits")
    hidden, weight, bias = check_linear("teacher", teacher_hidden, teacher_weight, teacher_bias)
    if tuple(hidden.shape[:-1]) != lead:
        raise ValueError(f"teacher_hidden has leading shape {tuple(hidden.shape[:-1])} but student_hidden has "
                         f"{lead}; the rows must match")
    if weight.shape[0] != num_classes:
        raise ValueError(f"teacher_weight has {weight.shape[0]} classes but student_weight has {num_classes}")
    if hidden.device != device:
        raise ValueError(f"teacher_hidden is on {hidden.device} but student_hidden is on {device}")
    return hidden, weight, bias


def check_teacher(teacher_hidden: object, teacher_weight: object, teacher_bias: object, teacher_logits: object,
                  student_hidden: torch.Tensor, num_classes: int) -> tuple:
    """The teacher of a fused lm_head: ``(teacher_hidden, teacher_weight, teacher_bias, teacher_logits)``,
    either the last or the first three given; constant (none may require grad)."""
    lead, device = tuple(student_hidden.shape[:-1]), student_hidden.device
    if teacher_logits is not None:
        if teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None:
            raise ValueError("pass the teacher either as teacher_logits or as teacher_hidden + teacher_weight "
                             "(+ teacher_bias), not both")
        teacher = (None, None, None, _check_teacher_logits(teacher_logits, lead, num_classes, device))
    else:
        teacher = _check_teacher_head(teacher_hidden, teacher_weight, teacher_bias, lead, num_classes, device) + (None,)
    if torch.is_grad_enabled():
        for name, t in zip(("teacher_hidden", "teacher_weight", "teacher_bias", "teacher_logits"), teacher):
            if t is not None and t.requires_grad:
                raise ValueError(f"{name} requires grad, but the teacher is constant in the fused linear loss: "
                                 f"pass {name}.detach(), or compute it under torch.no_grad()")
    return teacher


def check_rows_of(labels: object, mask: object, student_hidden: torch.Tensor, num_classes: Optional[int],
                  config: DistillConfig, name: str = "student_weight") -> tuple[Optional[torch.Tensor],
                                                                                Optional[torch.Tensor]]:
    """The labels and mask of hidden states whose lm_head has ``num_classes`` classes (None: a shard
    of them, labels checked against >= 0 only); ``name`` is what the class count is checked on."""
    if num_classes is not None:
        config.check_classes(num_classes, name)
    # a stand-in of the logits' shape (a zero-stride view: no memory)
    logits = student_hidden.new_empty(()).expand(tuple(student_hidden.shape[:-1]) + (max(num_classes or 1, 1),))
    return check_labels(labels, logits, config.ignore_index, num_classes), check_mask(mask, logits)


def check_dense_teacher_settings(config: DistillConfig) -> None:
    """``generation_temperature`` belongs to a sparse teacher of log-probabilities only."""
    if config.generation_temperature != 1.0:
        raise ValueError(f"generation_temperature={config.generation_temperature} rescales a SparseTeacher of "
                         f"kind='logprobs'; dense teacher logits have none (leave it at 1)")


def _check_sparse_settings(teacher: SparseTeacher, config: DistillConfig) -> None:
    if config.divergence in LABEL_DIVERGENCES or config.kernel_divergence() != DIVERGENCE_CODES["forward_kl"]:
        raise ValueError(f"a SparseTeacher's loss is the forward KL (p the teacher over its support); "
                         f"divergence={config.divergence!r} (beta={config.beta}) needs a dense teacher")
    if config.generation_temperature != 1.0 and teacher.kind != "logprobs":
        raise ValueError(f"generation_temperature={config.generation_temperature} rescales stored log-probabilities, "
                         f"but the SparseTeacher holds kind={teacher.kind!r}")
    if config.support != "tail" or teacher.log_normalizer is not None:
        if config.support == "tail" and config.standardize and not teacher.has_stats:
            raise ValueError("support='tail' with standardization needs the SparseTeacher's row_mean and row_std: its "
                             "log_normalizer is defined with the full row's statistics")
        return
    derivable = teacher.kind == "logprobs" and not config.standardize and \
        config.generation_temperature == config.teacher_temperature
    if not derivable:
        raise ValueError("support='tail' needs the teacher's log_normalizer at the KD temperature (store it at dump time), "
                         "unless the values are log-probabilities at that temperature (kind='logprobs', "
                         "standardize=False, generation_temperature == teacher_temperature)")


def _check_sparse_ids(teacher: SparseTeacher, num_classes: int) -> None:
    """On the CPU: every valid entry's id in [0, V), and distinct within its row (a host check; on other
    devices it would synchronize, and ids out of range there give their row NaN)."""
    rows = teacher.rows()
    valid = rows.valid()
    ids = rows.ids
    bad = valid & ((ids < 0) | (ids >= num_classes))
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise IndexError(f"SparseTeacher.ids: row {index[0]}, entry {index[1]} is {int(ids[index])}, outside [0, "
                         f"{num_classes})")
    # invalid entries get distinct negative stand-ins, then equal neighbours of the sorted row are duplicates
    stand_in = -1 - torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    ordered = torch.where(valid, ids, stand_in).sort(-1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(-1)
    if bool(repeated.any()):
        row = int(repeated.nonzero()[0])
        raise ValueError(f"SparseTeacher.ids: row {row} repeats a class among its valid entries; the ids of a row must "
                         f"be distinct")


def check_sparse_teacher(teacher: SparseTeacher, lead: tuple, num_classes: int, device: torch.device,
                         config: DistillConfig, name: str = "teacher_logits") -> SparseTeacher:
    """A sparse teacher of the rows ``lead`` of ``num_classes`` classes, on ``device``, fit for ``config``."""
    if tuple(teacher.shape) != tuple(lead):
        raise ValueError(f"{name} (a SparseTeacher) has rows {tuple(teacher.shape)} but the student has "
                         f"{tuple(lead)}; they must match")
    if teacher.device != device:
        raise ValueError(f"{name} (a SparseTeacher) is on {teacher.device} but the student is on {device}")
    if teacher.k > num_classes:
        raise ValueError(f"{name} (a SparseTeacher) has k = {teacher.k} entries per row, more than the "
                         f"{num_classes} classes")
    _check_sparse_settings(teacher, config)
    if device.type == "cpu" and teacher.ids.numel() and not torch.compiler.is_compiling():
        _check_sparse_ids(teacher, num_classes)
    return teacher
