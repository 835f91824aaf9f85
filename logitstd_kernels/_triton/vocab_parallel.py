"""The three local phases of the vocabulary-parallel objective as Triton kernels (one launch each).

Each rank holds a ``(N, W)`` slice of every row (``W = V_r`` classes). One program per row, looping
over ``VP_BLOCK``-wide tiles of its slice, accumulating in float32 (float64 for float64 inputs). The
collectives and Chan's merge between the phases are in ``logitstd_kernels/distributed/``, which also
holds the same phases as PyTorch operations (``phases.py``: the ``"torch"`` backend, and these
kernels' reference in the tests). Per-row quantities computed there (the global statistics) reach the
kernels as columns of a small ``(N, C)`` tensor in the accumulation dtype; nothing is read back on
the host.

Memory traffic per element of the slice, inputs of ``s`` bytes (2 for bf16):

1. ``vp_stats_kernel``: per row, for x and y, the slice's mean, scale ``c = max|v - mean|``, scaled
   sum of squares ``sum((v - mean) / c)^2`` and max (two passes): reads ``4s`` (x and y twice);
2. ``vp_sums_kernel``: the partial sums under the global statistics, with ``a = (x - shift_x) ka``,
   ``b = (y - shift_y) kb``, ``u = (x - mean_x) / sigma_x``, ``w`` alike: ``sum e^(a - a_max)``,
   ``sum e^(b - b_max)``, ``sum e^(b - b_max)(b - a)``, with standardization ``sum e^(a - a_max) u``,
   ``sum e^(b - b_max) u``, ``sum e^(b - b_max) w``, ``sum e^(b - b_max)(b - a) w``, and with labels
   ``sum e^(x - max x)``, the owned label logit, the ownership flag and ``sum x``: reads ``2s``;
3. ``vp_grads_kernel``: the slice's gradients (docs/tensor-parallel.md, phase 3), written in the
   accumulation dtype (the autograd function rounds them once to the inputs' dtype): reads ``2s``,
   writes 4 bytes per gradient (8 in float64).

Together ``8s`` read and 8 written per element with both gradients, against ``2s`` read and ``2s``
written by the single-device fused kernel's floor: the price of slices whose statistics are only
known after a collective.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..distributed import layout
from .config import VP_BLOCK, VP_BLOCK_F64, VP_WARPS
from .row_math import scalar, to_acc
from .launch import device_guard

# The columns of the per-row coefficient tensor (``distributed/layout.py``), as the kernels' constants.
SHIFT_X, SHIFT_Y, KA, KB, A_MAX, B_MAX, SIGMA_X, SIGMA_Y, MAX_X, OWNS = (
    tl.constexpr(j) for j in (layout.SHIFT_X, layout.SHIFT_Y, layout.KA, layout.KB, layout.A_MAX, layout.B_MAX,
                              layout.SIGMA_X, layout.SIGMA_Y, layout.MAX_X, layout.OWNS))
INV_ZA, INV_ZB, FACTOR_X, FACTOR_Y, LOG_RATIO, KL, LSE, SMOOTH_OVER_V, KEEP = (
    tl.constexpr(j) for j in (layout.INV_ZA, layout.INV_ZB, layout.FACTOR_X, layout.FACTOR_Y, layout.LOG_RATIO,
                              layout.KL, layout.LSE, layout.SMOOTH_OVER_V, layout.KEEP))


@triton.jit
def _coef(coef_ptr, row, j, C: tl.constexpr):
    return tl.load(coef_ptr + row.to(tl.int64) * C + j)


@triton.jit
def vp_stats_kernel(x_ptr, y_ptr, out_ptr, W, stride_x, stride_y,
                    TINY: tl.constexpr, BLOCK: tl.constexpr, ACC64: tl.constexpr):
    """out[row] = (mean, c, sum((x - mean) / c)^2, max) of x's slice, then the same of y's (float64)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    x_row, y_row = x_ptr + row * stride_x, y_ptr + row * stride_y
    sx = tl.zeros([BLOCK], dtype=tl.float64 if ACC64 else tl.float32)
    sy = tl.zeros([BLOCK], dtype=tl.float64 if ACC64 else tl.float32)
    hx = tl.full([BLOCK], float("-inf"), dtype=sx.dtype)
    hy = tl.full([BLOCK], float("-inf"), dtype=sx.dtype)
    lx = tl.full([BLOCK], float("inf"), dtype=sx.dtype)
    ly = tl.full([BLOCK], float("inf"), dtype=sx.dtype)
    for start in range(0, W, BLOCK):
        valid = start + offs < W
        x = to_acc(tl.load(x_row + start + offs, mask=valid, other=0.0), ACC64)
        y = to_acc(tl.load(y_row + start + offs, mask=valid, other=0.0), ACC64)
        sx += x
        sy += y
        hx = tl.maximum(hx, tl.where(valid, x, float("-inf")))
        hy = tl.maximum(hy, tl.where(valid, y, float("-inf")))
        lx = tl.minimum(lx, tl.where(valid, x, float("inf")))
        ly = tl.minimum(ly, tl.where(valid, y, float("inf")))
    mean_x, mean_y = tl.sum(sx, axis=0) / W, tl.sum(sy, axis=0) / W
    max_x, max_y = tl.max(hx, axis=0), tl.max(hy, axis=0)
    # max |v - mean| = max(max - mean, mean - min): rounding is monotonic
    c_x = tl.maximum(tl.maximum(max_x - mean_x, mean_x - tl.min(lx, axis=0)), TINY)
    c_y = tl.maximum(tl.maximum(max_y - mean_y, mean_y - tl.min(ly, axis=0)), TINY)
    qx = tl.zeros([BLOCK], dtype=sx.dtype)
    qy = tl.zeros([BLOCK], dtype=sx.dtype)
    for start in range(0, W, BLOCK):
        valid = start + offs < W
        dx = (to_acc(tl.load(x_row + start + offs, mask=valid, other=0.0), ACC64) - mean_x) / c_x
        dy = (to_acc(tl.load(y_row + start + offs, mask=valid, other=0.0), ACC64) - mean_y) / c_y
        qx += tl.where(valid, dx * dx, 0.0)
        qy += tl.where(valid, dy * dy, 0.0)
    out = out_ptr + row * 8
    tl.store(out + 0, mean_x.to(tl.float64))
    tl.store(out + 1, c_x.to(tl.float64))
    tl.store(out + 2, tl.sum(qx, axis=0).to(tl.float64))
    tl.store(out + 3, max_x.to(tl.float64))
    tl.store(out + 4, mean_y.to(tl.float64))
    tl.store(out + 5, c_y.to(tl.float64))
    tl.store(out + 6, tl.sum(qy, axis=0).to(tl.float64))
    tl.store(out + 7, max_y.to(tl.float64))


@triton.jit
def _terms(x_row, y_row, start, offs, W, coef_ptr, row, C: tl.constexpr, ACC64: tl.constexpr):
    """One tile's x, e^(a - a_max), e^(b - b_max) and b - a (0 outside the slice)."""
    valid = start + offs < W
    x = to_acc(tl.load(x_row + start + offs, mask=valid, other=0.0), ACC64)
    y = to_acc(tl.load(y_row + start + offs, mask=valid, other=0.0), ACC64)
    a = (x - _coef(coef_ptr, row, SHIFT_X, C)) * _coef(coef_ptr, row, KA, C)
    b = (y - _coef(coef_ptr, row, SHIFT_Y, C)) * _coef(coef_ptr, row, KB, C)
    ea = tl.where(valid, tl.exp(a - _coef(coef_ptr, row, A_MAX, C)), 0.0)
    eb = tl.where(valid, tl.exp(b - _coef(coef_ptr, row, B_MAX, C)), 0.0)
    return valid, x, y, ea, eb, tl.where(valid, b - a, 0.0)


@triton.jit
def vp_sums_kernel(x_ptr, y_ptr, coef_ptr, labels_ptr, out_ptr, W, stride_x, stride_y,
                   TINY: tl.constexpr, C: tl.constexpr, S: tl.constexpr, BLOCK: tl.constexpr, STANDARDIZE: tl.constexpr,
                   HAS_LABELS: tl.constexpr, ACC64: tl.constexpr):
    """out[row] = the slice's S partial sums (see the module docstring), float64."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    x_row, y_row = x_ptr + row * stride_x, y_ptr + row * stride_y
    dt = tl.float64 if ACC64 else tl.float32
    s_ea = tl.zeros([BLOCK], dtype=dt)
    s_eb = tl.zeros([BLOCK], dtype=dt)
    s_ebd = tl.zeros([BLOCK], dtype=dt)
    s_eau = tl.zeros([BLOCK], dtype=dt)
    s_ebu = tl.zeros([BLOCK], dtype=dt)
    s_ebw = tl.zeros([BLOCK], dtype=dt)
    s_ebdw = tl.zeros([BLOCK], dtype=dt)
    s_ex = tl.zeros([BLOCK], dtype=dt)
    s_x = tl.zeros([BLOCK], dtype=dt)
    sig_x = tl.maximum(_coef(coef_ptr, row, SIGMA_X, C), TINY)
    sig_y = tl.maximum(_coef(coef_ptr, row, SIGMA_Y, C), TINY)
    for start in range(0, W, BLOCK):
        valid, x, y, ea, eb, diff = _terms(x_row, y_row, start, offs, W, coef_ptr, row, C, ACC64)
        ebd = tl.where(eb == 0, 0.0, eb * diff)  # p = 0 (a -inf teacher logit) adds nothing, not 0 * inf
        s_ea += ea
        s_eb += eb
        s_ebd += ebd
        if STANDARDIZE:
            u = tl.where(valid, (x - _coef(coef_ptr, row, SHIFT_X, C)) / sig_x, 0.0)
            w = tl.where(valid, (y - _coef(coef_ptr, row, SHIFT_Y, C)) / sig_y, 0.0)
            s_eau += ea * u
            s_ebu += eb * u
            s_ebw += eb * w
            s_ebdw += ebd * w
        if HAS_LABELS:
            s_ex += tl.where(valid, tl.exp(x - _coef(coef_ptr, row, MAX_X, C)), 0.0)
            s_x += x
    out = out_ptr + row * S
    tl.store(out + 0, tl.sum(s_ea, axis=0).to(tl.float64))
    tl.store(out + 1, tl.sum(s_eb, axis=0).to(tl.float64))
    tl.store(out + 2, tl.sum(s_ebd, axis=0).to(tl.float64))
    k = 3
    if STANDARDIZE:
        tl.store(out + 3, tl.sum(s_eau, axis=0).to(tl.float64))
        tl.store(out + 4, tl.sum(s_ebu, axis=0).to(tl.float64))
        tl.store(out + 5, tl.sum(s_ebw, axis=0).to(tl.float64))
        tl.store(out + 6, tl.sum(s_ebdw, axis=0).to(tl.float64))
        k = 7
    if HAS_LABELS:
        owns = _coef(coef_ptr, row, OWNS, C)
        col = tl.minimum(tl.maximum(tl.load(labels_ptr + row), 0), W - 1)
        picked = to_acc(tl.load(x_ptr + row * stride_x + col), ACC64)
        tl.store(out + k, tl.sum(s_ex, axis=0).to(tl.float64))
        tl.store(out + k + 1, tl.where(owns != 0, picked, 0.0).to(tl.float64))
        tl.store(out + k + 2, owns.to(tl.float64))
        tl.store(out + k + 3, tl.sum(s_x, axis=0).to(tl.float64))


@triton.jit
def vp_grads_kernel(x_ptr, y_ptr, coef_ptr, labels_ptr, gx_ptr, gy_ptr, W, stride_x, stride_y,
                    t2: tl.float64, kd_weight: tl.float64, ce_weight: tl.float64, one_minus_smoothing: tl.float64,
                    TINY: tl.constexpr, C: tl.constexpr, BLOCK: tl.constexpr,
                    STANDARDIZE: tl.constexpr, HAS_LABELS: tl.constexpr, GRAD_S: tl.constexpr,
                    GRAD_T: tl.constexpr, ACC64: tl.constexpr):
    """The slice's gradients, (N, W) each in the accumulation dtype, 0 in excluded rows:

    ``gx = kd_weight ka (t2 (q - p) - u factor_x) + ce_weight (softmax(x) - smoothing / V - onehot)``,
    ``gy = kd_weight kb (t2 p (b - a + log_ratio - KL) - w factor_y)`` (``factor`` 0 unstandardized).
    The four weights are float64 arguments (annotated: an unannotated float is a float32), taken to
    the accumulation dtype once."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    x_row, y_row = x_ptr + row * stride_x, y_ptr + row * stride_y
    keep = _coef(coef_ptr, row, KEEP, C) != 0
    inv_za, inv_zb = _coef(coef_ptr, row, INV_ZA, C), _coef(coef_ptr, row, INV_ZB, C)
    ka, kb = _coef(coef_ptr, row, KA, C), _coef(coef_ptr, row, KB, C)
    sig_x = tl.maximum(_coef(coef_ptr, row, SIGMA_X, C), TINY)
    sig_y = tl.maximum(_coef(coef_ptr, row, SIGMA_Y, C), TINY)
    shift_x, shift_y = _coef(coef_ptr, row, SHIFT_X, C), _coef(coef_ptr, row, SHIFT_Y, C)
    t2, kd_weight, ce_weight = scalar(t2, ACC64), scalar(kd_weight, ACC64), scalar(ce_weight, ACC64)
    label = -1
    onehot = 0.0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        onehot = _coef(coef_ptr, row, OWNS, C) * scalar(one_minus_smoothing, ACC64)
    for start in range(0, W, BLOCK):
        valid, x, y, ea, eb, diff = _terms(x_row, y_row, start, offs, W, coef_ptr, row, C, ACC64)
        p = eb * inv_zb
        if GRAD_S:
            g = t2 * (ea * inv_za - p)
            if STANDARDIZE:
                g = g - (x - shift_x) / sig_x * _coef(coef_ptr, row, FACTOR_X, C)
            g = kd_weight * (g * ka)
            if HAS_LABELS:
                soft = tl.exp(x - _coef(coef_ptr, row, LSE, C)) - _coef(coef_ptr, row, SMOOTH_OVER_V, C)
                g = g + ce_weight * (soft - tl.where(start + offs == label, onehot, 0.0))
            tl.store(gx_ptr + row * W + start + offs, tl.where(keep, g, 0.0), mask=valid)
        if GRAD_T:
            delta = diff + _coef(coef_ptr, row, LOG_RATIO, C) - _coef(coef_ptr, row, KL, C)
            h = tl.where(p == 0, 0.0, t2 * p * delta)  # p = 0: nothing, not 0 * inf
            if STANDARDIZE:
                h = h - (y - shift_y) / sig_y * _coef(coef_ptr, row, FACTOR_Y, C)
            tl.store(gy_ptr + row * W + start + offs, tl.where(keep, kd_weight * (h * kb), 0.0), mask=valid)


def _block(acc: torch.dtype) -> int:
    return VP_BLOCK_F64 if acc == torch.float64 else VP_BLOCK


def _tiny(acc: torch.dtype) -> float:
    """A constexpr (a float argument would be float32, where float64's tiny is 0)."""
    return float(torch.finfo(acc).tiny)


def slice_stats(x: torch.Tensor, y: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Phase 1: (N, ``layout.STATS_COLUMNS``) float64 (``layout``: mean, scale, scaled M2, max of x, then of y)."""
    rows, width = x.shape
    out = torch.empty((rows, layout.STATS_COLUMNS), dtype=torch.float64, device=x.device)
    if rows:
        with device_guard(x):
            vp_stats_kernel[(rows,)](x, y, out, width, x.stride(0), y.stride(0), TINY=_tiny(acc),
                                     BLOCK=_block(acc), ACC64=acc == torch.float64, num_warps=VP_WARPS)
    return out


def slice_sums(x: torch.Tensor, y: torch.Tensor, coef: torch.Tensor, labels: torch.Tensor, standardize: bool,
               has_labels: bool) -> torch.Tensor:
    """Phase 2: (N, S) float64 partial sums; ``coef`` (N, SUMS_COLUMNS), ``labels`` the local label
    column per row (int64; any value where the row owns no label)."""
    rows, width = x.shape
    count = layout.sums_count(standardize, has_labels)
    out = torch.empty((rows, count), dtype=torch.float64, device=x.device)
    if rows:
        with device_guard(x):
            vp_sums_kernel[(rows,)](x, y, coef, labels, out, width, x.stride(0), y.stride(0),
                                    TINY=_tiny(coef.dtype), C=coef.shape[1], S=count, BLOCK=_block(coef.dtype),
                                    STANDARDIZE=standardize, HAS_LABELS=has_labels, ACC64=coef.dtype == torch.float64,
                                    num_warps=VP_WARPS)
    return out


def slice_grads(x: torch.Tensor, y: torch.Tensor, coef: torch.Tensor, labels: torch.Tensor,
                grad_x: torch.Tensor | None, grad_y: torch.Tensor | None, *, t2: float, kd_weight: float,
                ce_weight: float, label_smoothing: float, standardize: bool, has_labels: bool) -> None:
    """Phase 3: writes the (N, W) gradients (contiguous, the accumulation dtype); ``coef`` (N, GRADS_COLUMNS)."""
    rows, width = x.shape
    if not rows or (grad_x is None and grad_y is None):
        return
    with device_guard(x):
        vp_grads_kernel[(rows,)](x, y, coef, labels, grad_x if grad_x is not None else coef,
                                 grad_y if grad_y is not None else coef, width, x.stride(0), y.stride(0),
                                 float(t2), float(kd_weight), float(ce_weight), float(1.0 - label_smoothing),
                                 TINY=_tiny(coef.dtype), C=coef.shape[1], BLOCK=_block(coef.dtype),
                                 STANDARDIZE=standardize, HAS_LABELS=has_labels, GRAD_S=grad_x is not None,
                                 GRAD_T=grad_y is not None, ACC64=coef.dtype == torch.float64, num_warps=VP_WARPS)
