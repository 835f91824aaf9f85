"""The local phases of the vocabulary-parallel objective as Triton kernels (one launch each).

Each rank holds a ``(N, W)`` slice of every row (``W = V_r`` classes). One program per row, looping
over ``VP_BLOCK``-wide tiles of its slice, accumulating in float32 (float64 for float64 inputs). The
collectives and the merges between the phases are in ``logitstd_kernels/distributed/``, which also
holds the same phases as PyTorch operations (``torch_phases.py``: the ``"torch"`` backend, and these
kernels' reference in the tests). Per-row quantities computed there (the global statistics) reach the
kernels as columns of a small ``(N, C)`` tensor in the accumulation dtype (``distributed/layout.py``);
nothing is read back on the host. The divergence is the constexpr ``DIV`` (``row_math``'s codes).

Memory traffic per element of the slice, inputs of ``s`` bytes (2 for bf16):

1. ``vp_stats_kernel``: per row, for x and y, the slice's mean, scale ``c = max|v - mean|``, scaled
   sum of squares ``sum((v - mean) / c)^2`` and max (two passes): reads ``4s`` (x and y twice);
2. ``vp_sums_kernel``: the partial sums under the global statistics, with ``a = (x - shift_x) ka``,
   ``b = (y - shift_y) kb``, ``d = b - a``, ``ea = e^(a - a_max)``, ``eb = e^(b - b_max)``,
   ``u = (x - mean_x) / sigma_x``, ``w`` alike: ``sum ea``, ``sum eb``; standardized ``sum ea u``,
   ``sum eb w``; per KL direction (forward: ``e = eb``, reverse: ``e = ea``) ``sum e d``,
   ``sum |e d|``, the Bregman sum ``sum e phi(t)`` and the chain rule's two; with labels
   ``sum e^(x - max x)``, the owned label logit, the ownership flag and ``sum x``: reads ``2s``;
2b. ``vp_pointwise_kernel`` (jsd, tvd only): the sums of the per-element loss, ``q g``, ``p h`` (and
   ``q g u``, ``p h w``) under the global normalizers: reads ``2s``;
3. ``vp_grads_kernel``: the slice's gradients (docs/tensor-parallel.md, phase 3), written in the
   accumulation dtype (the autograd function rounds them once to the inputs' dtype): reads ``2s``,
   writes 4 bytes per gradient (8 in float64).

Together ``8s`` read (``10s`` for jsd and tvd) and 8 written per element with both gradients, against
``2s`` read and ``2s`` written by the single-device fused kernel's floor: the price of slices whose
statistics are only known after a collective.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..distributed import layout
from .config import VP_WARPS, vp_block
from .divergence import pointwise_terms, student_term, teacher_term
from .launch import device_guard
from .row_math import JSD, TVD, bregman_terms, scalar, to_acc

# The columns of the per-row coefficient tensor (``distributed/layout.py``), as the kernels' constants.
SHIFT_X, SHIFT_Y, KA, KB, A_MAX, B_MAX, SIGMA_X, SIGMA_Y, MAX_X, OWNS, SHIFT_D, K_F, K_R = (
    tl.constexpr(j) for j in (layout.SHIFT_X, layout.SHIFT_Y, layout.KA, layout.KB, layout.A_MAX, layout.B_MAX,
                              layout.SIGMA_X, layout.SIGMA_Y, layout.MAX_X, layout.OWNS, layout.SHIFT_D, layout.K_F,
                              layout.K_R))
INV_ZA, INV_ZB, LOG_RATIO, FACTOR_X, FACTOR_Y, KL, KL_R, E_QG, E_PH, LSE, SMOOTH_OVER_V, KEEP = (
    tl.constexpr(j) for j in (layout.INV_ZA, layout.INV_ZB, layout.LOG_RATIO, layout.FACTOR_X, layout.FACTOR_Y,
                              layout.KL, layout.KL_R, layout.E_QG, layout.E_PH, layout.LSE, layout.SMOOTH_OVER_V,
                              layout.KEEP))
# The positions of the partial sums (``layout``): in a row, and in a group from its offset.
ZA, ZB, AU, BW, ZC, X_LABEL, OWNERS, SUM_X = (
    tl.constexpr(j) for j in (layout.ZA, layout.ZB, layout.AU, layout.BW, layout.ZC, layout.X_LABEL, layout.OWNERS,
                              layout.SUM_X))
# The groups of ``_store_group``: positions 0-4 in these orders.
assert (layout.KL_D, layout.KL_ABS, layout.KL_BREG, layout.KL_U, layout.KL_W) == tuple(range(5))
assert (layout.PW_LOSS, layout.PW_QG, layout.PW_PH, layout.PW_QGU, layout.PW_PHW) == tuple(range(5))


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
def _kl_tile(e, other, diff, t, k, u, w, ea, eb, acc_d, acc_abs, acc_breg, acc_u, acc_w, FORWARD: tl.constexpr,
             STANDARDIZE: tl.constexpr):
    """One KL direction's phase 2 terms (``layout.KL_D`` ...): e d (0 where e = 0: a -inf logit adds
    nothing, not 0 * inf), |e d|, the Bregman term e phi(t) (``other k = e e^t``) and the chain rule's
    two (forward eb u and eb d w, reverse ea d u and ea w)."""
    ed = tl.where(e == 0.0, 0.0, e * diff)
    acc_d += ed
    acc_abs += tl.abs(ed)
    acc_breg += bregman_terms(e, other, t, 1.0, k)
    if STANDARDIZE:
        if FORWARD:
            acc_u += eb * u
            acc_w += ed * w
        else:
            acc_u += ed * u
            acc_w += ea * w
    return acc_d, acc_abs, acc_breg, acc_u, acc_w


@triton.jit
def _store_group(out, s0, s1, s2, s3, s4, FIVE: tl.constexpr):
    """A group of three partial sums at ``out``, five with ``FIVE``, in float64: a KL direction's of
    phase 2 (``layout.KL_D`` ...) or the pointwise phase's (``layout.PW_LOSS`` ...)."""
    tl.store(out + 0, tl.sum(s0, axis=0).to(tl.float64))
    tl.store(out + 1, tl.sum(s1, axis=0).to(tl.float64))
    tl.store(out + 2, tl.sum(s2, axis=0).to(tl.float64))
    if FIVE:
        tl.store(out + 3, tl.sum(s3, axis=0).to(tl.float64))
        tl.store(out + 4, tl.sum(s4, axis=0).to(tl.float64))


@triton.jit
def _inv_sigmas(coef_ptr, row, TINY: tl.constexpr, C: tl.constexpr):
    """1 / sigma_x and 1 / sigma_y of the row (sigma at least TINY): one division per row, not per
    element (the per-element IEEE division's slow-path call made ptxas spill in the jsd gradients)."""
    return (1.0 / tl.maximum(_coef(coef_ptr, row, SIGMA_X, C), TINY),
            1.0 / tl.maximum(_coef(coef_ptr, row, SIGMA_Y, C), TINY))


@triton.jit
def _z_scores(x, y, valid, coef_ptr, row, inv_sig_x, inv_sig_y, C: tl.constexpr):
    """u = (x - shift_x) / sigma_x and w alike (0 outside the slice)."""
    u = tl.where(valid, (x - _coef(coef_ptr, row, SHIFT_X, C)) * inv_sig_x, 0.0)
    w = tl.where(valid, (y - _coef(coef_ptr, row, SHIFT_Y, C)) * inv_sig_y, 0.0)
    return u, w


@triton.jit
def vp_sums_kernel(x_ptr, y_ptr, coef_ptr, labels_ptr, out_ptr, W, stride_x, stride_y,
                   TINY: tl.constexpr, C: tl.constexpr, S: tl.constexpr, BLOCK: tl.constexpr, OFF_STD: tl.constexpr,
                   OFF_FWD: tl.constexpr, OFF_REV: tl.constexpr, OFF_LAB: tl.constexpr, ACC64: tl.constexpr):
    """out[row] = the slice's S partial sums at the offsets of ``layout.sum_layout`` (-1: the group
    is absent; see the module docstring), float64."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    x_row, y_row = x_ptr + row * stride_x, y_ptr + row * stride_y
    STD: tl.constexpr = OFF_STD >= 0
    z = tl.zeros([BLOCK], dtype=tl.float64 if ACC64 else tl.float32)
    s_ea, s_eb, s_au, s_bw, s_ex, s_x = z, z, z, z, z, z
    f_d, f_abs, f_breg, f_u, f_w = z, z, z, z, z
    r_d, r_abs, r_breg, r_u, r_w = z, z, z, z, z
    inv_sig_x, inv_sig_y = _inv_sigmas(coef_ptr, row, TINY, C)
    shift_d = _coef(coef_ptr, row, SHIFT_D, C)
    k_f, k_r = _coef(coef_ptr, row, K_F, C), _coef(coef_ptr, row, K_R, C)
    for start in range(0, W, BLOCK):
        valid, x, y, ea, eb, diff = _terms(x_row, y_row, start, offs, W, coef_ptr, row, C, ACC64)
        s_ea += ea
        s_eb += eb
        u, w = z, z
        if STD:
            u, w = _z_scores(x, y, valid, coef_ptr, row, inv_sig_x, inv_sig_y, C)
            s_au += ea * u
            s_bw += eb * w
        if OFF_FWD >= 0:  # t = -(d + c): e^t = q / p up to a row constant
            f_d, f_abs, f_breg, f_u, f_w = _kl_tile(eb, ea, diff, -(diff + shift_d), k_f, u, w, ea, eb, f_d, f_abs,
                                                    f_breg, f_u, f_w, True, STD)
        if OFF_REV >= 0:
            r_d, r_abs, r_breg, r_u, r_w = _kl_tile(ea, eb, diff, diff + shift_d, k_r, u, w, ea, eb, r_d, r_abs,
                                                    r_breg, r_u, r_w, False, STD)
        if OFF_LAB >= 0:
            s_ex += tl.where(valid, tl.exp(x - _coef(coef_ptr, row, MAX_X, C)), 0.0)
            s_x += x
    out = out_ptr + row * S
    tl.store(out + ZA, tl.sum(s_ea, axis=0).to(tl.float64))
    tl.store(out + ZB, tl.sum(s_eb, axis=0).to(tl.float64))
    if STD:
        tl.store(out + OFF_STD + AU, tl.sum(s_au, axis=0).to(tl.float64))
        tl.store(out + OFF_STD + BW, tl.sum(s_bw, axis=0).to(tl.float64))
    if OFF_FWD >= 0:
        _store_group(out + OFF_FWD, f_d, f_abs, f_breg, f_u, f_w, STD)
    if OFF_REV >= 0:
        _store_group(out + OFF_REV, r_d, r_abs, r_breg, r_u, r_w, STD)
    if OFF_LAB >= 0:
        owns = _coef(coef_ptr, row, OWNS, C)
        col = tl.minimum(tl.maximum(tl.load(labels_ptr + row), 0), W - 1)
        picked = to_acc(tl.load(x_ptr + row * stride_x + col), ACC64)
        tl.store(out + OFF_LAB + ZC, tl.sum(s_ex, axis=0).to(tl.float64))
        tl.store(out + OFF_LAB + X_LABEL, tl.where(owns != 0, picked, 0.0).to(tl.float64))
        tl.store(out + OFF_LAB + OWNERS, owns.to(tl.float64))
        tl.store(out + OFF_LAB + SUM_X, tl.sum(s_x, axis=0).to(tl.float64))


@triton.jit
def vp_pointwise_kernel(x_ptr, y_ptr, coef_ptr, out_ptr, W, stride_x, stride_y, beta: tl.float64,
                        TINY: tl.constexpr, C: tl.constexpr, P: tl.constexpr, BLOCK: tl.constexpr,
                        STANDARDIZE: tl.constexpr, DIV: tl.constexpr, ACC64: tl.constexpr):
    """jsd, tvd: out[row] = the slice's sums of the per-element loss, q g and p h, and standardized
    q g u and p h w (``layout.PW_LOSS`` ...; ``divergence.pointwise_terms``), float64."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    x_row, y_row = x_ptr + row * stride_x, y_ptr + row * stride_y
    z = tl.zeros([BLOCK], dtype=tl.float64 if ACC64 else tl.float32)
    s_loss, s_qg, s_ph, s_qgu, s_phw = z, z, z, z, z
    inv_sig_x, inv_sig_y = _inv_sigmas(coef_ptr, row, TINY, C)
    inv_za, inv_zb = _coef(coef_ptr, row, INV_ZA, C), _coef(coef_ptr, row, INV_ZB, C)
    log_ratio = _coef(coef_ptr, row, LOG_RATIO, C)
    beta = scalar(beta, ACC64)
    for start in range(0, W, BLOCK):
        valid, x, y, ea, eb, diff = _terms(x_row, y_row, start, offs, W, coef_ptr, row, C, ACC64)
        q, p = ea * inv_za, eb * inv_zb
        loss, g, h = pointwise_terms(q, p, diff + log_ratio, beta, DIV)
        s_loss += tl.where(valid, loss, 0.0)
        s_qg += q * g
        s_ph += p * h
        if STANDARDIZE:
            u, w = _z_scores(x, y, valid, coef_ptr, row, inv_sig_x, inv_sig_y, C)
            s_qgu += q * g * u
            s_phw += p * h * w
    _store_group(out_ptr + row * P, s_loss, s_qg, s_ph, s_qgu, s_phw, STANDARDIZE)


@triton.jit
def vp_grads_kernel(x_ptr, y_ptr, coef_ptr, labels_ptr, gx_ptr, gy_ptr, W, stride_x, stride_y,
                    t2: tl.float64, kd_weight: tl.float64, ce_weight: tl.float64, one_minus_smoothing: tl.float64,
                    beta: tl.float64, TINY: tl.constexpr, C: tl.constexpr, BLOCK: tl.constexpr,
                    STANDARDIZE: tl.constexpr, HAS_LABELS: tl.constexpr, GRAD_S: tl.constexpr,
                    GRAD_T: tl.constexpr, DIV: tl.constexpr, ACC64: tl.constexpr):
    """The slice's gradients, (N, W) each in the accumulation dtype, 0 in excluded rows:

    ``gx = kd_weight ka (t2 s - u factor_x) + ce_weight (softmax(x) - smoothing / V - onehot)``,
    ``gy = kd_weight kb (t2 t - w factor_y)`` (``factor`` 0 unstandardized), with the divergence's
    per-element terms ``s = q (g - E_q g)`` and ``t = p (h - E_p h)`` (``divergence.student_term``,
    ``teacher_term``; forward KL: ``s = q - p``, ``t = p (l - KL)``), ``l = b - a + L``.
    The five weights are float64 arguments (annotated: an unannotated float is a float32), taken to
    the accumulation dtype once."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    x_row, y_row = x_ptr + row * stride_x, y_ptr + row * stride_y
    keep = _coef(coef_ptr, row, KEEP, C) != 0
    inv_za, inv_zb = _coef(coef_ptr, row, INV_ZA, C), _coef(coef_ptr, row, INV_ZB, C)
    ka, kb = _coef(coef_ptr, row, KA, C), _coef(coef_ptr, row, KB, C)
    inv_sig_x, inv_sig_y = _inv_sigmas(coef_ptr, row, TINY, C)
    log_ratio = _coef(coef_ptr, row, LOG_RATIO, C)
    kl_f, kl_r = _coef(coef_ptr, row, KL, C), _coef(coef_ptr, row, KL_R, C)
    e_qg, e_ph = _coef(coef_ptr, row, E_QG, C), _coef(coef_ptr, row, E_PH, C)
    t2, kd_weight, ce_weight = scalar(t2, ACC64), scalar(kd_weight, ACC64), scalar(ce_weight, ACC64)
    beta = scalar(beta, ACC64)
    label = -1
    onehot = 0.0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        onehot = _coef(coef_ptr, row, OWNS, C) * scalar(one_minus_smoothing, ACC64)
    for start in range(0, W, BLOCK):
        valid, x, y, ea, eb, diff = _terms(x_row, y_row, start, offs, W, coef_ptr, row, C, ACC64)
        l = diff + log_ratio
        g = l * 0.0
        h = g
        if (DIV == JSD) or (DIV == TVD):
            _, g, h = pointwise_terms(ea * inv_za, eb * inv_zb, l, beta, DIV)
        if STANDARDIZE:
            u, w = _z_scores(x, y, valid, coef_ptr, row, inv_sig_x, inv_sig_y, C)
        if GRAD_S:
            gs = t2 * student_term(ea, eb, l, inv_za, inv_zb, kl_r, g, e_qg, DIV)
            if STANDARDIZE:
                gs = gs - u * _coef(coef_ptr, row, FACTOR_X, C)
            gs = kd_weight * (gs * ka)
            if HAS_LABELS:
                soft = tl.exp(x - _coef(coef_ptr, row, LSE, C)) - _coef(coef_ptr, row, SMOOTH_OVER_V, C)
                gs = gs + ce_weight * (soft - tl.where(start + offs == label, onehot, 0.0))
            tl.store(gx_ptr + row * W + start + offs, tl.where(keep, gs, 0.0), mask=valid)
        if GRAD_T:
            gt = t2 * teacher_term(ea, eb, l, inv_za, inv_zb, kl_f, h, e_ph, DIV)
            if STANDARDIZE:
                gt = gt - w * _coef(coef_ptr, row, FACTOR_Y, C)
            tl.store(gy_ptr + row * W + start + offs, tl.where(keep, kd_weight * (gt * kb), 0.0), mask=valid)


def _block(acc: torch.dtype, sums: int = 0) -> int:
    return vp_block(acc == torch.float64, sums)


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


def sums_constexprs(sums: layout.SumLayout) -> dict:
    """``vp_sums_kernel``'s constexprs for the positions ``sums`` (``layout.sum_layout``)."""
    return dict(S=sums.count, OFF_STD=sums.std, OFF_FWD=sums.forward, OFF_REV=sums.reverse, OFF_LAB=sums.labels)


def slice_sums(x: torch.Tensor, y: torch.Tensor, coef: torch.Tensor, labels: torch.Tensor,
               sums: layout.SumLayout) -> torch.Tensor:
    """Phase 2: (N, ``sums.count``) float64 partial sums; ``coef`` (N, SUMS_COLUMNS), ``labels`` the
    local label column per row (int64; any value where the row owns no label)."""
    rows, width = x.shape
    out = torch.empty((rows, sums.count), dtype=torch.float64, device=x.device)
    if rows:
        with device_guard(x):
            vp_sums_kernel[(rows,)](x, y, coef, labels, out, width, x.stride(0), y.stride(0),
                                    TINY=_tiny(coef.dtype), C=coef.shape[1], BLOCK=_block(coef.dtype, sums.count),
                                    ACC64=coef.dtype == torch.float64, num_warps=VP_WARPS, **sums_constexprs(sums))
    return out


def slice_pointwise(x: torch.Tensor, y: torch.Tensor, coef: torch.Tensor, *, standardize: bool, divergence: int,
                    beta: float) -> torch.Tensor:
    """The pointwise phase (jsd, tvd): (N, ``layout.pointwise_count``) float64; ``coef`` (N, POINTWISE_COLUMNS)."""
    rows, width = x.shape
    count = layout.pointwise_count(standardize)
    out = torch.empty((rows, count), dtype=torch.float64, device=x.device)
    if rows:
        with device_guard(x):
            vp_pointwise_kernel[(rows,)](x, y, coef, out, width, x.stride(0), y.stride(0), float(beta),
                                         TINY=_tiny(coef.dtype), C=coef.shape[1], P=count,
                                         BLOCK=_block(coef.dtype), STANDARDIZE=standardize, DIV=divergence, ACC64=coef.dtype == torch.float64,
                                         num_warps=VP_WARPS)
    return out


def slice_grads(x: torch.Tensor, y: torch.Tensor, coef: torch.Tensor, labels: torch.Tensor,
                grad_x: torch.Tensor | None, grad_y: torch.Tensor | None, *, t2: float, kd_weight: float,
                ce_weight: float, label_smoothing: float, standardize: bool, has_labels: bool, divergence: int,
                beta: float) -> None:
    """Phase 3: writes the (N, W) gradients (contiguous, the accumulation dtype); ``coef`` (N, GRADS_COLUMNS)."""
    rows, width = x.shape
    if not rows or (grad_x is None and grad_y is None):
        return
    with device_guard(x):
        vp_grads_kernel[(rows,)](x, y, coef, labels, grad_x if grad_x is not None else coef,
                                 grad_y if grad_y is not None else coef, width, x.stride(0), y.stride(0),
                                 float(t2), float(kd_weight), float(ce_weight), float(1.0 - label_smoothing),
                                 float(beta), TINY=_tiny(coef.dtype), C=coef.shape[1], BLOCK=_block(coef.dtype),
                                 STANDARDIZE=standardize, HAS_LABELS=has_labels, GRAD_S=grad_x is not None,
                                 GRAD_T=grad_y is not None, DIV=divergence, ACC64=coef.dtype == torch.float64,
                                 num_warps=VP_WARPS)
