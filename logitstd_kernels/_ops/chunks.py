"""The chunk loop of the fused lm_head: the objective of hidden states without their logits.

Rows go through in chunks of C; per chunk

    xs = T_s(hs[chunk] @ ws.T (+ bs))             # C x V student logits, in the input dtype; T_s, T_t:
    xt = T_t(ht[chunk] @ wt.T (+ bt)  or  teacher_logits[chunk])     # the logit transforms (in place)
    g  = d objective / d xs * T_s'                # the per-chunk row function (a fused kernel launch,
                                                  # or the vocabulary-parallel phases), then T_s's chain rule
    grad_hs[chunk] = g @ ws;  grad_ws += g.T @ hs[chunk];  grad_bs += g.sum(0)

so the gradients are computed in the forward (like Liger-Kernel's fused linear losses). Peak memory
beyond the inputs and the parameter gradients: the C x V blocks (xs, xt, g), never N x V, and the
chunk-sized conversions of ``add_product``; no weight-sized buffer but the weight's gradient (the first
chunk's GEMM overwrites it, the others accumulate into it with ``beta = 1``). The backward multiplies
the saved gradients by the incoming gradient (``scaled_gradient``). The single-device op
(``fused_linear_op.py``) and the vocabulary-parallel loss (``distributed/``) run this one loop with
their own row function.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..config import LogitTransforms
from .autograd import is_traced, may_overwrite_saved
from .logit_transforms import chain_, transform_

LOW_PRECISION = (torch.bfloat16, torch.float16)


class LinearInputs(NamedTuple):
    """The tensors of a fused lm_head call, rows flattened: (N, H) hidden states, (V, H) weights."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    teacher_hidden: Optional[torch.Tensor]
    teacher_weight: Optional[torch.Tensor]
    teacher_bias: Optional[torch.Tensor]
    teacher_logits: Optional[torch.Tensor]  # (N, V) instead of the teacher's lm_head
    # (neither the teacher's lm_head nor its logits: a sparse teacher, kept by the row function, which
    # receives the chunk's rows, a slice or an index tensor, in place of the teacher's logits)
    labels: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]


class ChunkRows(NamedTuple):
    """What a row function returns for one chunk: the sums over its rows of the objective and its two
    parts (a (3,) tensor), and the logits' gradient (C, V) in the logits' dtype (None: not requested)."""

    sums: torch.Tensor
    grad: Optional[torch.Tensor]


#: ``rows_fn(student_logits, teacher_logits, labels, mask) -> ChunkRows`` for one chunk of rows (a
#: sparse teacher's row function gets the chunk's rows in place of ``teacher_logits``).
RowsFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]], ChunkRows]


def _float32_gemm(device: torch.device, beta: int) -> bool:
    """Whether ``torch.addmm(acc, a, b, beta=beta, out_dtype=torch.float32, out=acc)`` with bf16 ``a``,
    ``b`` and a float32 ``acc`` runs and gives ``beta * acc + a @ b`` (with ``beta=0``, NaN in ``acc``
    ignored) on ``device``."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return False
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        acc = torch.full((2, 2), 1.0 if beta else float("nan"), dtype=torch.float32, device=device)
        torch.addmm(acc, a, a, beta=beta, out_dtype=torch.float32, out=acc)
        return bool((acc == 2 + beta).all())
    except (TypeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=None)
def gemm_writes_float32(device: torch.device) -> bool:
    """Whether GEMMs of bf16/fp16 inputs can accumulate into a float32 output on ``device``
    (``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)``): CUDA, torch >= 2.10 (earlier
    versions lack the overload or require ``acc`` in the inputs' dtype), sm_80 or newer; probed once."""
    return _float32_gemm(device, 1)


@functools.lru_cache(maxsize=None)
def gemm_overwrites_float32(device: torch.device) -> bool:
    """Whether that GEMM also overwrites ``acc`` with ``beta=0``; probed once."""
    return _float32_gemm(device, 0)


def add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool = True) -> None:
    """``acc += a @ b`` (``accumulate=False``: ``acc = a @ b``, its old contents, even NaN, ignored)
    with ``acc`` in its own (accumulation) dtype, rounded once into it: the GEMM accumulates into
    ``acc`` itself (``beta``), no product is materialized beside it.

    bf16/fp16 factors with a float32 ``acc``: on CUDA the GEMM writes float32 where
    :func:`gemm_writes_float32` (zeroing ``acc`` first where it cannot overwrite it); elsewhere the
    factors are converted first (so ``a`` and ``b`` should be chunk-sized: the weight's gradient takes
    the C x V logits gradient and the C x H hidden states).
    """
    beta = 1 if accumulate else 0
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        acc.addmm_(a, b, beta=beta)
    elif a.dtype == b.dtype and a.dtype in LOW_PRECISION and acc.dtype == torch.float32 and \
            gemm_writes_float32(acc.device):
        if not accumulate and not gemm_overwrites_float32(acc.device):
            acc.zero_()
            beta = 1
        torch.addmm(acc, a, b, beta=beta, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype), beta=beta)


def hidden_product(g: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """``out = g @ weight``, one chunk's rows of the hidden states' gradient (each row is written once).

    Where the GEMM cannot write ``out``'s float32 from bf16/fp16 factors, the product is made in the
    factors' dtype (float32 accumulation inside the GEMM, one rounding, as eager's ``G @ W``) and then
    widened: converting the weight instead would be a weight-sized copy.
    """
    if g.dtype != out.dtype and not gemm_writes_float32(out.device):
        out.copy_(torch.mm(g, weight))
    else:
        add_product(out, g, weight, accumulate=False)


def grad_dtype(dtype: torch.dtype, accum_dtype: torch.dtype) -> torch.dtype:
    """The dtype a parameter's gradient is accumulated in: ``accum_dtype`` for bf16/fp16, else its own."""
    return accum_dtype if dtype in LOW_PRECISION else dtype


def gathers_rows(device: torch.device) -> bool:
    """Whether the chunk loop gathers the included rows before the matmuls: on the CPU, where
    counting them costs no device synchronization."""
    return device.type == "cpu"


def default_accum_dtype(weight: torch.Tensor) -> torch.dtype:
    """float32 for bf16/fp16 weights, the weight's dtype otherwise."""
    return torch.float32 if weight.dtype in LOW_PRECISION else weight.dtype


class Gradients(NamedTuple):
    """The accumulated gradients of the student's hidden states, weight and bias (None: not requested)."""

    hidden: Optional[torch.Tensor]
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]


def _new_gradients(inputs: LinearInputs, accum_dtype: torch.dtype, wants: tuple[bool, bool, bool],
                   gathered: bool) -> Gradients:
    """The gradients' buffers. The first chunk overwrites the weight's and the bias's (no zero fill);
    every row of the hidden states' gradient is written once, except, when the included rows are
    gathered, the excluded ones, which stay 0."""
    hidden, weight = inputs.hidden, inputs.weight
    new_hidden = torch.zeros if gathered else torch.empty
    return Gradients(
        new_hidden(hidden.shape, dtype=grad_dtype(hidden.dtype, accum_dtype), device=hidden.device)
        if wants[0] else None,
        torch.empty(weight.shape, dtype=accum_dtype, device=weight.device) if wants[1] else None,
        torch.empty(weight.shape[0], dtype=accum_dtype, device=weight.device) if wants[2] else None)


def _chunk_logits(inputs: LinearInputs, pick, keep: Optional[torch.Tensor],
                  transforms: LogitTransforms) -> tuple[torch.Tensor, ...]:
    """(hidden, student logits, teacher logits) of the rows ``pick``, transformed; excluded rows
    (``keep`` False) get a zero hidden state, so that a NaN there cannot reach the weight's gradient
    through 0 * NaN."""
    hs = inputs.hidden[pick]
    if keep is not None:
        hs = hs.masked_fill(~keep[pick].unsqueeze(1), 0)
    xs = transform_(F.linear(hs, inputs.weight, inputs.bias), *transforms.student(), in_place=True)
    if inputs.teacher_logits is not None:  # a slice is the caller's memory: transformed out of place
        xt = transform_(inputs.teacher_logits[pick], *transforms.teacher(), in_place=not isinstance(pick, slice))
    elif inputs.teacher_hidden is None:  # a sparse teacher: the row function picks its rows itself
        xt = pick
    else:
        xt = transform_(F.linear(inputs.teacher_hidden[pick], inputs.teacher_weight, inputs.teacher_bias),
                        *transforms.teacher(), in_place=True)
    return hs, xs, xt


def _accumulate(grads: Gradients, g: torch.Tensor, hs: torch.Tensor, pick, gathered: bool, first: bool,
                weight: torch.Tensor) -> None:
    """Add one chunk's logits gradient ``g`` to the weight's and the bias's (the first chunk
    overwrites them) and write its rows of the hidden states'."""
    if grads.hidden is not None:
        if not gathered:
            hidden_product(g, weight, grads.hidden[pick])  # a view of the rows: in place
        else:
            part = grads.hidden.new_empty((pick.shape[0], grads.hidden.shape[1]))
            hidden_product(g, weight, part)
            grads.hidden[pick] = part
    if grads.weight is not None:
        add_product(grads.weight, g.t(), hs, accumulate=not first)
    if grads.bias is not None:
        if first:
            torch.sum(g, 0, dtype=grads.bias.dtype, out=grads.bias)
        else:
            grads.bias.add_(g.sum(0, dtype=grads.bias.dtype))


def run_chunks(inputs: LinearInputs, keep: Optional[torch.Tensor], rows_fn: RowsFn, chunk_size: int,
               accum_dtype: torch.dtype, wants: tuple[bool, bool, bool], totals_dtype: torch.dtype,
               transforms: LogitTransforms = LogitTransforms()) -> tuple[torch.Tensor, Gradients]:
    """The chunk loop: ``(totals, gradients)``, the (3,) sums over every row of the objective and its
    parts (in ``totals_dtype``) and the gradients (``wants``: hidden, weight, bias) of the sum of
    ``rows_fn``'s gradients (unnormalized, or with the factor ``rows_fn`` applies).

    ``keep``: the included rows (None: all). On the CPU they are gathered first, so that excluded
    rows cost no matmul (counting them costs no device synchronization there); on other devices the
    excluded rows go through the matmuls with a zero hidden state and must get a zero gradient from
    ``rows_fn``. ``transforms``: applied to each chunk's logits before ``rows_fn``, and their
    derivative to its gradient.
    """
    device = inputs.hidden.device
    rows_index = keep.nonzero().squeeze(1) if keep is not None and gathers_rows(device) else None
    totals = torch.zeros(3, dtype=totals_dtype, device=device)
    grads = _new_gradients(inputs, accum_dtype, wants, rows_index is not None)
    work = inputs.hidden.shape[0] if rows_index is None else rows_index.shape[0]
    with torch.autocast(device.type, enabled=False):
        for start in range(0, work, chunk_size):
            if rows_index is None:
                pick = slice(start, min(start + chunk_size, work))
                hs, xs, xt = _chunk_logits(inputs, pick, keep, transforms)
                chunk_mask = None if inputs.mask is None else inputs.mask[pick]
            else:
                pick = rows_index[start:start + chunk_size]
                hs, xs, xt = _chunk_logits(inputs, pick, None, transforms)
                chunk_mask = None
            out = rows_fn(xs, xt, None if inputs.labels is None else inputs.labels[pick], chunk_mask)
            del xt
            totals += out.sums.to(totals_dtype)
            if out.grad is not None:
                chain_(out.grad, xs, *transforms.student())
            del xs
            if out.grad is not None:
                _accumulate(grads, out.grad, hs, pick, rows_index is not None, start == 0, inputs.weight)
    if work == 0:  # no chunk wrote them
        for grad in (grads.weight, grads.bias):
            if grad is not None:
                grad.zero_()
    return totals, grads


def scaled_gradient(saved: torch.Tensor, grad_loss: torch.Tensor, dtype: torch.dtype,
                    scale_rows_: Optional[Callable[[torch.Tensor, torch.Tensor], object]] = None) -> torch.Tensor:
    """``(saved * grad_loss).to(dtype)``, the backward of a gradient computed in the forward, bit for
    bit, with no temporary of ``saved``'s size where ``saved`` is never read again
    (``autograd.may_overwrite_saved``; not with ``retain_graph=True``, nor under tracing):

    - the same dtype: ``saved`` is scaled in place and handed over as the gradient;
    - another dtype (a float32 accumulator of bf16/fp16 parameters): on the CPU ``saved`` is scaled in
      place and cast once (a mixed-dtype ``out=`` there would allocate a float32 temporary); on GPUs
      one ``torch.mul(..., out=)`` pass writes the new gradient (their kernels cast on the store).

    A ``grad_loss`` of exactly 1 (``loss.backward()``) costs no multiply: checked on the host for a CPU
    ``grad_loss``, on the device by ``scale_rows_`` where given (a backend's row scaling, which skips
    factors of 1 without a host synchronization).
    """
    if is_traced(saved):
        return (saved * grad_loss).to(dtype)
    overwrite = may_overwrite_saved(saved)
    unit = grad_loss.device.type == "cpu" and bool(grad_loss == 1)
    if saved.dtype != dtype and saved.device.type != "cpu":
        return torch.mul(saved, grad_loss, out=torch.empty_like(saved, dtype=dtype))
    if not overwrite:
        return saved.to(dtype, copy=True) if unit else (saved * grad_loss).to(dtype)
    if not unit:
        if scale_rows_ is not None and saved.numel() > 0:
            scale_rows_(saved.view(-1, saved.shape[-1]), grad_loss.reshape(()))
        else:
            saved.mul_(grad_loss)
    return saved.to(dtype)
