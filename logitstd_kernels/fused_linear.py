"""The distillation objective of an lm_head without its logits: chunked, fused linear + loss.

At LLM scale the logits are the memory (16k tokens x 128k classes is 4 GB per bf16 tensor, and a
step holds the student's, the teacher's and the gradient). ``fused_linear_distillation_loss`` never
materializes them: the rows go through in chunks of C, and per chunk

    xs = hs[chunk] @ ws.T (+ bs)                  # C x V student logits, in the input dtype
    xt = ht[chunk] @ wt.T (+ bt)  or  teacher_logits[chunk]
    g  = d objective / d xs                       # the fused objective kernel, one launch
    grad_hs[chunk] = g @ ws;  grad_ws += g.T @ hs[chunk];  grad_bs += g.sum(0)

so the gradients are computed in the forward (like Liger-Kernel's fused linear losses) and the
backward only multiplies them by the incoming gradient. Peak memory beyond the inputs and the
parameter gradients: the three C x V blocks (xs, xt, g), never N x V. See docs/design.md, "fused
linear".

Equivalent eager code (``backend="torch"`` runs exactly this, with the full logits)::

    distillation_loss(F.linear(student_hidden, student_weight, student_bias),
                      F.linear(teacher_hidden, teacher_weight, teacher_bias) (or teacher_logits),
                      labels, **options)
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import torch
import torch.nn.functional as F

from . import reference
from ._backends import resolve_backend_name
from ._checks import check_backend, check_fused_linear_args
from .functional import _as_rows
from .objective import DistillationParts, fused_objective_rows, included_count, included_rows
from .reference import accumulation_dtype

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


LOW_PRECISION = (torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def _gemm_writes_float32(device: torch.device) -> bool:
    """Whether GEMMs of bf16/fp16 inputs can accumulate into a float32 output on ``device``
    (``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)``): CUDA, torch >= 2.10 (earlier
    versions lack the overload or require ``acc`` in the inputs' dtype), sm_80 or newer; probed once."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return False
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        acc = torch.ones(2, 2, dtype=torch.float32, device=device)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return bool((acc == 3).all())
    except (TypeError, RuntimeError):
        return False


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` in its own (accumulation) dtype, rounded once into it.

    bf16/fp16 factors with a float32 ``acc``: on CUDA the GEMM accumulates into ``acc`` itself where
    :func:`_gemm_writes_float32`; elsewhere the factors are converted first (C x V floats, the size of
    one logits block, and the other factor).
    """
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.dtype == b.dtype and a.dtype in LOW_PRECISION and acc.dtype == torch.float32 and \
            _gemm_writes_float32(acc.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _gathers_rows(device: torch.device) -> bool:
    """Whether the op gathers the included rows before the matmuls: on the CPU, where counting them
    costs no device synchronization."""
    return device.type == "cpu"


def grad_dtype(dtype: torch.dtype, accum_dtype: torch.dtype) -> torch.dtype:
    """The dtype a parameter's gradient is accumulated in: ``accum_dtype`` for bf16/fp16, else its own."""
    return accum_dtype if dtype in LOW_PRECISION else dtype


@torch.library.custom_op("logitstd::fused_linear_distillation_loss", mutates_args=())
def fused_linear_op(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: Optional[torch.Tensor],
    teacher_hidden: Optional[torch.Tensor],
    teacher_weight: Optional[torch.Tensor],
    teacher_bias: Optional[torch.Tensor],
    teacher_logits: Optional[torch.Tensor],
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
    chunk_size: int,
    accum_dtype: torch.dtype,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunked fused linear objective of (N, H) hidden states; see the module docstring.

    Returns ``(loss, ce, kd, grad_hidden, grad_weight, grad_bias)``: the reduced objective and its
    parts, then the internal gradients of the loss (empty (0,) tensors when not requested): the
    weight's and bias's in ``accum_dtype``, the hidden state's in ``accum_dtype`` for bf16/fp16 hidden
    states (else their dtype); the backward rounds each once to its input's dtype.
    """
    device = student_hidden.device
    num_rows = student_hidden.shape[0]
    num_classes = student_weight.shape[0]
    teacher_parts = [t for t in (teacher_hidden, teacher_weight, teacher_logits) if t is not None]
    acc = accumulation_dtype(student_hidden, student_weight, *teacher_parts)
    keep = included_rows(labels, mask, ignore_index)
    # On the CPU the included rows are gathered first, so that ignored rows cost no matmul; on CUDA
    # that would take a host synchronization: excluded rows go through the matmuls with their hidden
    # state zeroed (a NaN there must not reach grad_W through 0 * NaN) and get a zero gradient.
    rows_index = keep.nonzero().squeeze(1) if keep is not None and _gathers_rows(device) else None
    count = included_count(labels, mask, ignore_index, num_rows, acc, device)
    totals = torch.zeros(3, dtype=acc, device=device)

    def empty() -> torch.Tensor:  # a distinct placeholder per output (outputs may not alias)
        return student_hidden.new_empty((0,))

    # The gradients are accumulated unnormalized (the kernel's factor is 1: a bf16/fp16 G of O(1)
    # entries, where G / n would underflow in fp16) and scaled by 1/n once at the end.
    g_hidden = (torch.zeros(student_hidden.shape, dtype=grad_dtype(student_hidden.dtype, accum_dtype), device=device)
                if grad_hidden else empty())
    g_weight = torch.zeros(student_weight.shape, dtype=accum_dtype, device=device) if grad_weight else empty()
    g_bias = torch.zeros(num_classes, dtype=accum_dtype, device=device) if grad_bias else empty()
    wants_grad = grad_hidden or grad_weight or grad_bias
    # The weight as the hidden gradient's GEMM takes it: converted once, not per chunk, where the
    # GEMM cannot write a float32 result from low-precision factors itself.
    hidden_weight = student_weight
    if grad_hidden and student_weight.dtype in LOW_PRECISION and not _gemm_writes_float32(device):
        hidden_weight = student_weight.to(g_hidden.dtype)
    unit = torch.ones(1, dtype=acc, device=device)
    kernel_args = (temperature, teacher_temperature, standardize, correction, eps)
    objective_args = (ignore_index, label_smoothing, ce_weight, kd_weight)
    work_rows = num_rows if rows_index is None else rows_index.shape[0]
    with torch.autocast(device.type, enabled=False):
        for start in range(0, work_rows, chunk_size):
            if rows_index is None:
                pick = slice(start, min(start + chunk_size, work_rows))
                chunk_mask = None if mask is None else mask[pick]
            else:
                pick = rows_index[start:start + chunk_size]
                chunk_mask = None
            hs = student_hidden[pick]
            if rows_index is None and keep is not None:
                hs = hs.masked_fill(~keep[pick].unsqueeze(1), 0)
            xs = F.linear(hs, student_weight, student_bias)
            if teacher_logits is not None:
                xt = teacher_logits[pick]
            else:
                xt = F.linear(teacher_hidden[pick], teacher_weight, teacher_bias)
            chunk_labels = None if labels is None else labels[pick]
            rows, g, _, ce, kd = fused_objective_rows(backend, xs, xt, chunk_labels, chunk_mask, unit, kernel_args,
                                                      objective_args, wants_grad, False)
            del xs, xt
            totals += torch.stack((rows.sum(), ce.sum(), kd.sum()))
            if grad_hidden:
                if rows_index is None:
                    _add_product(g_hidden[pick], g, hidden_weight)  # a view of the rows: in place
                else:
                    part = g_hidden.new_zeros((pick.shape[0], g_hidden.shape[1]))
                    _add_product(part, g, hidden_weight)
                    g_hidden[pick] = part
            if grad_weight:
                _add_product(g_weight, g.t(), hs)
            if grad_bias:
                g_bias += g.sum(0, dtype=accum_dtype)
    if reduction == "mean":
        totals = totals / count
        for grad in (g_hidden, g_weight, g_bias):
            grad.mul_(count.reciprocal().to(grad.dtype))
    loss, ce, kd = (part.clone() for part in totals.unbind())  # three outputs, not views of one tensor
    return loss, ce, kd, g_hidden, g_weight, g_bias


@fused_linear_op.register_fake
def _fused_linear_fake(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                       teacher_logits, labels, mask, temperature, teacher_temperature, standardize, correction, eps,
                       ignore_index, label_smoothing, ce_weight, kd_weight, reduction, chunk_size, accum_dtype,
                       grad_hidden, grad_weight, grad_bias, backend):
    teacher_parts = [t for t in (teacher_hidden, teacher_weight, teacher_logits) if t is not None]
    acc = accumulation_dtype(student_hidden, student_weight, *teacher_parts)
    parts = tuple(student_hidden.new_empty((), dtype=acc) for _ in range(3))
    return parts + (
        student_hidden.new_empty(student_hidden.shape, dtype=grad_dtype(student_hidden.dtype, accum_dtype))
        if grad_hidden else student_hidden.new_empty((0,)),
        student_weight.new_empty(student_weight.shape, dtype=accum_dtype) if grad_weight
        else student_hidden.new_empty((0,)),
        student_weight.new_empty((student_weight.shape[0],), dtype=accum_dtype) if grad_bias
        else student_hidden.new_empty((0,)),
    )


def _setup_context(ctx, inputs, output) -> None:
    student_hidden, student_weight, student_bias = inputs[:3]
    _, ce, kd, g_hidden, g_weight, g_bias = output
    ctx.mark_non_differentiable(ce, kd, g_hidden, g_weight, g_bias)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(g_hidden, g_weight, g_bias)
    ctx.dtypes = (student_hidden.dtype, student_weight.dtype, None if student_bias is None else student_bias.dtype)
    ctx.requested = inputs[21:24]


def _backward(ctx, grad_loss, _grad_ce, _grad_kd, _grad_h, _grad_w, _grad_b):
    if grad_loss is None:
        return (None,) * 25
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
    return tuple(grads) + (None,) * 22


fused_linear_op.register_autograd(_backward, setup_context=_setup_context)


def _autocast(tensors: list[Optional[torch.Tensor]], device_type: str) -> list[Optional[torch.Tensor]]:
    """What ``F.linear`` under an active ``torch.autocast`` would compute in: float32 tensors in the
    autocast dtype (float64 ones stay, as autocast leaves them)."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return [t if t is None or t.dtype != torch.float32 else t.to(dtype) for t in tensors]  # float64 stays


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
    """The distillation objective of two lm_heads, computed in chunks so that the logits never exist.

    Equivalent eager code::

        student_logits = F.linear(student_hidden, student_weight, student_bias)
        teacher_logits = F.linear(teacher_hidden, teacher_weight, teacher_bias)  # unless given
        distillation_loss(student_logits, teacher_logits, labels, ce_weight=..., kd_weight=..., ...)

    Args:
        student_hidden: ``(..., H_s)`` hidden states (e.g. a causal LM's last hidden state, (B, T, H)).
        student_weight: ``(V, H_s)``, the lm_head weight (may be tied to the embedding).
        teacher_hidden, teacher_weight: ``(..., H_t)`` and ``(V, H_t)``; ``H_t`` may differ from
            ``H_s``. Or pass ``teacher_logits`` ``(..., V)`` instead (computed elsewhere). The teacher
            is constant: none of its tensors may require grad.
        labels, mask, ce_weight, kd_weight, temperature, teacher_temperature, standardize,
            correction, eps, ignore_index, label_smoothing, return_components: as in
            :func:`logitstd_kernels.distillation_loss`.
        student_bias, teacher_bias: optional ``(V,)`` lm_head biases.
        chunk_size: rows per chunk; None: :func:`default_chunk_size` (three C x V blocks within
            1 GiB on CUDA, 64 MiB elsewhere).
        accum_dtype: the dtype ``student_weight``'s and ``student_bias``'s gradients are accumulated
            in over the chunks; None: float32 for bf16/fp16 weights, the weight's dtype otherwise.
        reduction: ``"mean"`` (over included rows) or ``"sum"``. ``"none"`` is not offered: the
            gradients are computed in the forward, for a scalar loss.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` (the fused kernels, chunked) or
            ``"torch"`` (the eager composition above, full logits, for reference).

    Gradients reach ``student_hidden``, ``student_weight`` and ``student_bias`` (those that require
    grad). Under ``torch.autocast`` the matmuls run in the autocast dtype, as ``F.linear`` would.
    """
    (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
     labels, mask, options) = check_fused_linear_args(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
        labels, mask, chunk_size=chunk_size, accum_dtype=accum_dtype, ce_weight=ce_weight, kd_weight=kd_weight,
        temperature=temperature, teacher_temperature=teacher_temperature, standardize=standardize,
        correction=correction, eps=eps, ignore_index=ignore_index, label_smoothing=label_smoothing,
        reduction=reduction)
    device = student_hidden.device
    (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias) = _autocast(
        [student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias], device.type)
    name = resolve_backend_name(check_backend(backend), device.type)
    if name == "torch":
        student_logits = F.linear(student_hidden, student_weight, student_bias)
        if teacher_logits is None:
            with torch.no_grad():
                teacher_logits = F.linear(teacher_hidden, teacher_weight, teacher_bias)
        return reference.distillation_loss(student_logits, teacher_logits, labels, mask=mask,
                                           return_components=return_components, **options)
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    num_classes = student_weight.shape[0]
    if accum_dtype is None:
        accum_dtype = torch.float32 if student_weight.dtype in (torch.bfloat16, torch.float16) else student_weight.dtype
    if chunk_size is None:
        logits_dtype = hidden.dtype if teacher_logits is None else max(
            (hidden.dtype, teacher_logits.dtype), key=lambda d: torch.empty((), dtype=d).element_size())
        chunk_size = default_chunk_size(hidden.shape[0], num_classes, logits_dtype, device)
    grad_on = torch.is_grad_enabled()
    loss, ce, kd, _, _, _ = torch.ops.logitstd.fused_linear_distillation_loss(
        hidden, student_weight, student_bias,
        None if teacher_hidden is None else teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
        teacher_weight, teacher_bias,
        None if teacher_logits is None else _as_rows(teacher_logits),
        None if labels is None else labels.reshape(-1).long(),
        None if mask is None else mask.reshape(-1).contiguous(),
        options["temperature"], options["teacher_temperature"], options["standardize"], options["correction"],
        options["eps"], options["ignore_index"], options["label_smoothing"], options["ce_weight"],
        options["kd_weight"], options["reduction"], int(chunk_size), accum_dtype,
        grad_on and student_hidden.requires_grad, grad_on and student_weight.requires_grad,
        grad_on and student_bias is not None and student_bias.requires_grad, name,
    )
    return DistillationParts(loss, ce, kd) if return_components else loss
