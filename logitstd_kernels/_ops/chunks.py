"""The chunk loop of the fused lm_head: the objective of hidden states without their logits.

Rows go through in chunks of C; per chunk

    xs = hs[chunk] @ ws.T (+ bs)                  # C x V student logits, in the input dtype
    xt = ht[chunk] @ wt.T (+ bt)  or  teacher_logits[chunk]
    g  = d objective / d xs                       # the per-chunk row function (a fused kernel launch,
                                                  # or the vocabulary-parallel phases)
    grad_hs[chunk] = g @ ws;  grad_ws += g.T @ hs[chunk];  grad_bs += g.sum(0)

so the gradients are computed in the forward (like Liger-Kernel's fused linear losses). Peak memory
beyond the inputs and the parameter gradients: the C x V blocks (xs, xt, g), never N x V. The
single-device op (``fused_linear_op.py``) and the vocabulary-parallel loss (``distributed/``) run this
one loop with their own row function.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

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
    labels: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]


class ChunkRows(NamedTuple):
    """What a row function returns for one chunk: the sums over its rows of the objective and its two
    parts (a (3,) tensor), and the logits' gradient (C, V) in the logits' dtype (None: not requested)."""

    sums: torch.Tensor
    grad: Optional[torch.Tensor]


#: ``rows_fn(student_logits, teacher_logits, labels, mask) -> ChunkRows`` for one chunk of rows.
RowsFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]], ChunkRows]


@functools.lru_cache(maxsize=None)
def gemm_writes_float32(device: torch.device) -> bool:
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


def add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` in its own (accumulation) dtype, rounded once into it.

    bf16/fp16 factors with a float32 ``acc``: on CUDA the GEMM accumulates into ``acc`` itself where
    :func:`gemm_writes_float32`; elsewhere the factors are converted first (C x V floats, the size of
    one logits block, and the other factor).
    """
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.dtype == b.dtype and a.dtype in LOW_PRECISION and acc.dtype == torch.float32 and \
            gemm_writes_float32(acc.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


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


def _zero_gradients(inputs: LinearInputs, accum_dtype: torch.dtype, wants: tuple[bool, bool, bool]) -> Gradients:
    hidden, weight = inputs.hidden, inputs.weight
    return Gradients(
        torch.zeros(hidden.shape, dtype=grad_dtype(hidden.dtype, accum_dtype), device=hidden.device)
        if wants[0] else None,
        torch.zeros(weight.shape, dtype=accum_dtype, device=weight.device) if wants[1] else None,
        torch.zeros(weight.shape[0], dtype=accum_dtype, device=weight.device) if wants[2] else None)


def _chunk_logits(inputs: LinearInputs, pick, keep: Optional[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """(hidden, student logits, teacher logits) of the rows ``pick``; excluded rows (``keep`` False)
    get a zero hidden state, so that a NaN there cannot reach the weight's gradient through 0 * NaN."""
    hs = inputs.hidden[pick]
    if keep is not None:
        hs = hs.masked_fill(~keep[pick].unsqueeze(1), 0)
    xs = F.linear(hs, inputs.weight, inputs.bias)
    if inputs.teacher_logits is not None:
        xt = inputs.teacher_logits[pick]
    else:
        xt = F.linear(inputs.teacher_hidden[pick], inputs.teacher_weight, inputs.teacher_bias)
    return hs, xs, xt


def _accumulate(grads: Gradients, g: torch.Tensor, hs: torch.Tensor, pick, gathered: bool,
                hidden_weight: torch.Tensor) -> None:
    """Add one chunk's logits gradient ``g`` to the hidden state's, the weight's and the bias's."""
    if grads.hidden is not None:
        if not gathered:
            add_product(grads.hidden[pick], g, hidden_weight)  # a view of the rows: in place
        else:
            part = grads.hidden.new_zeros((pick.shape[0], grads.hidden.shape[1]))
            add_product(part, g, hidden_weight)
            grads.hidden[pick] = part
    if grads.weight is not None:
        add_product(grads.weight, g.t(), hs)
    if grads.bias is not None:
        grads.bias.add_(g.sum(0, dtype=grads.bias.dtype))


def run_chunks(inputs: LinearInputs, keep: Optional[torch.Tensor], rows_fn: RowsFn, chunk_size: int,
               accum_dtype: torch.dtype, wants: tuple[bool, bool, bool],
               totals_dtype: torch.dtype) -> tuple[torch.Tensor, Gradients]:
    """The chunk loop: ``(totals, gradients)``, the (3,) sums over every row of the objective and its
    parts (in ``totals_dtype``) and the unnormalized gradients (``wants``: hidden, weight, bias).

    ``keep``: the included rows (None: all). On the CPU they are gathered first, so that excluded
    rows cost no matmul (counting them costs no device synchronization there); on other devices the
    excluded rows go through the matmuls with a zero hidden state and must get a zero gradient from
    ``rows_fn``.
    """
    device = inputs.hidden.device
    rows_index = keep.nonzero().squeeze(1) if keep is not None and gathers_rows(device) else None
    totals = torch.zeros(3, dtype=totals_dtype, device=device)
    grads = _zero_gradients(inputs, accum_dtype, wants)
    # The weight as the hidden gradient's GEMM takes it: converted once, not per chunk, where the
    # GEMM cannot write a float32 result from low-precision factors itself.
    hidden_weight = inputs.weight
    if grads.hidden is not None and inputs.weight.dtype in LOW_PRECISION and not gemm_writes_float32(device):
        hidden_weight = inputs.weight.to(grads.hidden.dtype)
    work = inputs.hidden.shape[0] if rows_index is None else rows_index.shape[0]
    with torch.autocast(device.type, enabled=False):
        for start in range(0, work, chunk_size):
            if rows_index is None:
                pick = slice(start, min(start + chunk_size, work))
                hs, xs, xt = _chunk_logits(inputs, pick, keep)
                chunk_mask = None if inputs.mask is None else inputs.mask[pick]
            else:
                pick = rows_index[start:start + chunk_size]
                hs, xs, xt = _chunk_logits(inputs, pick, None)
                chunk_mask = None
            out = rows_fn(xs, xt, None if inputs.labels is None else inputs.labels[pick], chunk_mask)
            del xs, xt
            totals += out.sums.to(totals_dtype)
            if out.grad is not None:
                _accumulate(grads, out.grad, hs, pick, rows_index is not None, hidden_weight)
    return totals, grads
