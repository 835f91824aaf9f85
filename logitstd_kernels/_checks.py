"""Input validation shared by the reference and every fast path.

Each check raises before any kernel runs and names the offending argument, so a
user sees ``ValueError: teacher_logits has shape (4, 9) but student_logits has
shape (4, 10)`` instead of an index error deep inside a kernel.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

REDUCTIONS = ("none", "sum", "batchmean", "mean")
OBJECTIVE_REDUCTIONS = ("none", "sum", "mean")
BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_logits(name: str, logits: object) -> torch.Tensor:
    """A floating tensor with at least one dimension (the class dimension)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), "
            f"got {logits.dtype}"
        )
    if logits.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (the class dimension), got a 0-d tensor")
    return logits


_REAL = (numbers.Real, torch.SymInt, torch.SymFloat)  # SymFloat: a temperature torch.compile made dynamic


def check_temperature(name: str, value: object) -> float:
    """A finite, strictly positive number (comparisons only, so torch.compile can trace them)."""
    if isinstance(value, bool) or not isinstance(value, _REAL):
        raise TypeError(f"{name} must be a positive number, got {type(value).__name__}")
    if not (0.0 < value < math.inf):  # False for NaN too
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return float(value)


def check_std_args(num_classes: int, correction: object, eps: object, *, name: str = "logits") -> tuple[int, float]:
    """``correction`` is a non-negative int below the class count; ``eps`` is finite and >= 0."""
    if isinstance(correction, bool) or not isinstance(correction, numbers.Integral):
        raise TypeError(f"correction must be an int (1 = torch.std default, 0 = Algorithm 1), got {correction!r}")
    if correction < 0:
        raise ValueError(f"correction must be >= 0, got {correction}")
    if isinstance(eps, bool) or not isinstance(eps, _REAL):
        raise TypeError(f"eps must be a number, got {type(eps).__name__}")
    if not (0.0 <= eps < math.inf):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if num_classes < 2:
        raise ValueError(
            f"{name} has {num_classes} class(es) in its last dimension; standardization needs at least 2"
        )
    if num_classes - correction <= 0:
        raise ValueError(
            f"correction={correction} leaves no degrees of freedom for {num_classes} classes "
            f"(needs correction < number of classes)"
        )
    return int(correction), float(eps)


def check_reduction(reduction: object) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction  # type: ignore[return-value]


def check_backend(backend: object) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend  # type: ignore[return-value]


def check_pair(student_logits: object, teacher_logits: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Two logit tensors of the same shape on the same device."""
    student = check_logits("student_logits", student_logits)
    teacher = check_logits("teacher_logits", teacher_logits)
    if student.shape != teacher.shape:
        raise ValueError(
            f"teacher_logits has shape {tuple(teacher.shape)} but student_logits has shape "
            f"{tuple(student.shape)}; they must match"
        )
    if student.device != teacher.device:
        raise ValueError(
            f"student_logits is on {student.device} but teacher_logits is on {teacher.device}; "
            f"they must be on the same device"
        )
    if student.shape[-1] < 1:
        raise ValueError("student_logits has an empty class dimension (last dimension is 0)")
    return student, teacher


def check_mask(mask: object, student: torch.Tensor) -> Optional[torch.Tensor]:
    """``None`` or a bool tensor shaped like the leading (row) dimensions of the logits."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool, got {mask.dtype}")
    if mask.shape != student.shape[:-1]:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but must match the leading dimensions of the logits "
            f"{tuple(student.shape[:-1])}"
        )
    if mask.device != student.device:
        raise ValueError(f"mask is on {mask.device} but the logits are on {student.device}")
    return mask


def check_kd_args(
    student_logits: object,
    teacher_logits: object,
    *,
    temperature: object,
    teacher_temperature: object,
    standardize: bool,
    correction: object,
    eps: object,
    reduction: object,
    mask: object,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], float, float]:
    """All checks of ``logitstd_kd_loss``; returns the validated tensors and temperatures."""
    student, teacher = check_pair(student_logits, teacher_logits)
    tau_s = check_temperature("temperature", temperature)
    tau_t = tau_s if teacher_temperature is None else check_temperature("teacher_temperature", teacher_temperature)
    if standardize:
        check_std_args(student.shape[-1], correction, eps, name="student_logits")
    check_reduction(reduction)
    checked_mask = check_mask(mask, student)
    return student, teacher, checked_mask, tau_s, tau_t


def check_op_args(student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor], temperature: float,
                  teacher_temperature: float, standardize: bool, correction: int, eps: float, reduction: str,
                  backend: str) -> None:
    """The checks of ``torch.ops.logitstd.kd_loss`` itself, which takes (N, V) rows with unit class stride.

    The public functions check their arguments before they reshape them; the op checks again so that
    calling it directly can never hand a kernel mismatched shapes, a short mask or a bad temperature.
    """
    check_pair(student, teacher)
    for name, t in (("student", student), ("teacher", teacher)):
        if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
            raise ValueError(f"{name} must be a 2-d (N, V) tensor with unit stride along V, got shape "
                             f"{tuple(t.shape)} and strides {t.stride()}")
    check_temperature("temperature", temperature)
    check_temperature("teacher_temperature", teacher_temperature)
    if standardize:
        check_std_args(student.shape[1], correction, eps, name="student")
    check_reduction(reduction)
    if backend not in ("triton", "cuda", "cpu"):
        raise ValueError(f"backend must be a fused backend ('triton', 'cuda' or 'cpu'), got {backend!r}")
    check_mask(mask, student)


def check_weight(name: str, value: object) -> float:
    """A finite number >= 0 (comparisons only, so torch.compile can trace them)."""
    if isinstance(value, bool) or not isinstance(value, _REAL):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (0.0 <= value < math.inf):
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return float(value)


def check_label_smoothing(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, _REAL):
        raise TypeError(f"label_smoothing must be a number, got {type(value).__name__}")
    if not (0.0 <= value < 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1), got {value}")
    return float(value)


def check_labels(labels: object, student: torch.Tensor, ignore_index: object,
                 num_classes: Optional[int] = -1) -> Optional[torch.Tensor]:
    """``None`` or an integer tensor of the leading shape on the logits' device.

    On the CPU the values are checked too (a label outside [0, V) that is not ``ignore_index``
    raises; V is ``num_classes``, by default ``student.shape[-1]``, and ``None`` checks only >= 0, for
    logits sharded by class); on other devices that would need a host synchronization, and the
    kernels make such a row's loss NaN instead.
    """
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be an integer torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must have an integer dtype (e.g. torch.long), got {labels.dtype}")
    if labels.shape != student.shape[:-1]:
        raise ValueError(f"labels has shape {tuple(labels.shape)} but must match the leading dimensions of the "
                         f"logits {tuple(student.shape[:-1])}")
    if labels.device != student.device:
        raise ValueError(f"labels is on {labels.device} but the logits are on {student.device}")
    if labels.device.type == "cpu" and labels.numel() and not torch.compiler.is_compiling():
        upper = student.shape[-1] if num_classes == -1 else num_classes
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= upper if upper is not None else False))
        if bool(bad.any()):
            index = tuple(int(i) for i in bad.nonzero()[0])
            raise IndexError(f"labels{list(index)} = {int(labels[index])} is outside [0, {upper or 'V'}) and is not "
                             f"ignore_index ({ignore_index})")
    return labels


def check_objective_args(student_logits: object, teacher_logits: object, labels: object, *, ce_weight: object,
                         kd_weight: object, temperature: object, teacher_temperature: object, standardize: bool,
                         correction: object, eps: object, ignore_index: object, label_smoothing: object,
                         mask: object, reduction: object):
    """All checks of ``distillation_loss``; returns (student, teacher, labels, mask, tau_s, tau_t, ce_weight,
    kd_weight, label_smoothing)."""
    student, teacher, checked_mask, tau_s, tau_t = check_kd_args(
        student_logits, teacher_logits, temperature=temperature, teacher_temperature=teacher_temperature,
        standardize=standardize, correction=correction, eps=eps, reduction="sum", mask=mask,
    )
    if reduction not in OBJECTIVE_REDUCTIONS:
        raise ValueError(f"reduction must be one of {OBJECTIVE_REDUCTIONS}, got {reduction!r}")
    checked_labels = check_labels(labels, student, ignore_index)
    return (student, teacher, checked_labels, checked_mask, tau_s, tau_t, check_weight("ce_weight", ce_weight),
            check_weight("kd_weight", kd_weight), check_label_smoothing(label_smoothing))


FUSED_LINEAR_REDUCTIONS = ("sum", "mean")


def _check_matrix(name: str, tensor: object, dims: int) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {tensor.dtype}")
    if (tensor.dim() != dims) if dims else tensor.dim() < 1:
        want = f"{dims}-d" if dims else "at least 1-d"
        raise ValueError(f"{name} must be {want}, got shape {tuple(tensor.shape)}")
    return tensor


def _check_linear(prefix: str, hidden: object, weight: object, bias: object) -> tuple[torch.Tensor, torch.Tensor,
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
    tensors = [("hidden", hidden), ("weight", weight)] + ([] if bias is None else [("bias", bias)])
    autocast = torch.is_autocast_enabled(hidden.device.type)
    for part, t in tensors[1:]:
        if t.device != hidden.device:
            raise ValueError(f"{prefix}_{part} is on {t.device} but {prefix}_hidden is on {hidden.device}")
        if t.dtype != hidden.dtype and not autocast:
            raise TypeError(f"{prefix}_{part} is {t.dtype} but {prefix}_hidden is {hidden.dtype}; the matmul needs "
                            f"one dtype (cast them, or run under torch.autocast)")
    return hidden, weight, bias


def check_fused_linear_args(student_hidden: object, student_weight: object, student_bias: object,
                            teacher_hidden: object, teacher_weight: object, teacher_bias: object,
                            teacher_logits: object, labels: object, mask: object, *, chunk_size: object,
                            accum_dtype: object, reduction: object, **objective: object):
    """All checks of ``fused_linear_distillation_loss``; returns the validated tensors and a dict of the
    objective's keywords (those of ``reference.distillation_loss``, temperatures resolved)."""
    hidden, weight, bias = _check_linear("student", student_hidden, student_weight, student_bias)
    num_classes = weight.shape[0]
    lead = tuple(hidden.shape[:-1])
    if teacher_logits is not None:
        if teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None:
            raise ValueError("pass the teacher either as teacher_logits or as teacher_hidden + teacher_weight "
                             "(+ teacher_bias), not both")
        teacher_logits = check_logits("teacher_logits", teacher_logits)
        if tuple(teacher_logits.shape) != lead + (num_classes,):
            raise ValueError(f"teacher_logits has shape {tuple(teacher_logits.shape)} but must be "
                             f"{lead + (num_classes,)} (student_hidden's leading dimensions, then the "
                             f"{num_classes} classes of student_weight)")
        if teacher_logits.device != hidden.device:
            raise ValueError(f"teacher_logits is on {teacher_logits.device} but student_hidden is on {hidden.device}")
        teacher_parts = [("teacher_logits", teacher_logits)]
    else:
        if teacher_hidden is None or teacher_weight is None:
            missing = "teacher_hidden" if teacher_hidden is None else "teacher_weight"
            raise ValueError(f"{missing} is missing: pass the teacher as teacher_hidden + teacher_weight, or as "
                             f"teacher_logits")
        teacher_hidden, teacher_weight, teacher_bias = _check_linear("teacher", teacher_hidden, teacher_weight,
                                                                     teacher_bias)
        if tuple(teacher_hidden.shape[:-1]) != lead:
            raise ValueError(f"teacher_hidden has leading shape {tuple(teacher_hidden.shape[:-1])} but "
                             f"student_hidden has {lead}; the rows must match")
        if teacher_weight.shape[0] != num_classes:
            raise ValueError(f"teacher_weight has {teacher_weight.shape[0]} classes but student_weight has "
                             f"{num_classes}")
        if teacher_hidden.device != hidden.device:
            raise ValueError(f"teacher_hidden is on {teacher_hidden.device} but student_hidden is on {hidden.device}")
        teacher_parts = [("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                         ("teacher_bias", teacher_bias)]
    if torch.is_grad_enabled():
        for name, t in teacher_parts:
            if t is not None and t.requires_grad:
                raise ValueError(f"{name} requires grad, but the teacher is constant in the fused linear loss: "
                                 f"pass {name}.detach(), or compute it under torch.no_grad()")
    if reduction not in FUSED_LINEAR_REDUCTIONS:
        raise ValueError(f"reduction must be one of {FUSED_LINEAR_REDUCTIONS} for the fused linear loss (its "
                         f"gradients are computed in the forward, for a scalar loss), got {reduction!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if accum_dtype is not None and accum_dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise TypeError(f"accum_dtype must be a floating dtype or None, got {accum_dtype!r}")
    # The objective's checks on a stand-in of the logits' shape (a zero-stride view: no memory).
    logits = hidden.new_empty(()).expand(lead + (num_classes,))
    (_, _, labels, mask, tau_s, tau_t, ce_weight, kd_weight, label_smoothing) = check_objective_args(
        logits, logits, labels, mask=mask, reduction=reduction, **objective)
    options = dict(ce_weight=ce_weight, kd_weight=kd_weight, temperature=tau_s, teacher_temperature=tau_t,
                   standardize=bool(objective["standardize"]), correction=int(objective["correction"]),
                   eps=float(objective["eps"]), ignore_index=int(objective["ignore_index"]),
                   label_smoothing=label_smoothing, reduction=reduction)
    return (hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, labels, mask, options)
