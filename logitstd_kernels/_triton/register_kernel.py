"""The register path of the fused loss: V <= BLOCK, the whole row pair lives in registers.

One program per row: one read of x and y, one write per requested gradient (6 bytes per element in
bf16 with the student gradient: the floor of the fused op). The phases run on the registers:

1. statistics: maxima and minima (the magnitude scale c, row_math.h), then mean and M2 of the
   shifted row c x - c x[0] in two passes (mean, then the squared deviations);
2. exponents ``da = (u - max u) log2(e) / tau`` (u the standardized row, or c x), ``ea = 2^da``,
   partition sums, and the divergence's loss (its KLs from the sums, refined by the Bregman form
   where they cancel; jsd and tvd from their non-negative per-element losses), and the CE;
3. gradients: the divergence's per-element terms (divergence.py) and the chain rule through the mean
   and the std applied to the same rounded terms (row_math.h, term_coefficients): faithful where the
   two parts of the chain rule cancel (V = 2, in closed form).
"""

import triton
import triton.language as tl

from .divergence import dkd_row, dkd_student_term, dkd_teacher_term, pointwise_terms, student_term, teacher_term
from .row_math import (DKD, FORWARD_KL, JEFFREYS, JSD, LN2, LOG2E, REVERSE_KL, TVD, bregman_terms, keep_row,
                       magnitude_scale, max2, min2, needs_refinement, row_ce, row_label, scalar, sqrt_rn, store_grad,
                       store_row_results, tile_offsets, to_acc, total)


@triton.jit
def _standardize(v, v0_raw, valid, mv, nv, top_v, dof_a, eps_a, ACC64: tl.constexpr):
    """(centered c v, sigma, s, 1 / s, c, the standardized top_v) of one row in registers; top_v: the
    row's max (decoupled KD: its largest non-target class)."""
    c = magnitude_scale(mv, nv, ACC64)
    vs = v * c - to_acc(v0_raw, ACC64) * c  # shifted by the first element: exact for offset rows
    mean = total(vs) / tl.sum(tl.sum(valid.to(vs.dtype), axis=1), axis=0)
    dev = tl.where(valid, vs - mean, 0.0)
    sigma = sqrt_rn(total(dev * dev) / dof_a, ACC64)
    s = sigma + eps_a * c
    inv_s = 1.0 / s
    top = (top_v * c - to_acc(v0_raw, ACC64) * c - mean) * inv_s
    return dev, sigma, s, inv_s, c, top


@triton.jit
def _term_coefficients(G, S, sigma, s, c, eps_a, dof_a, v_f, a_full, STANDARDIZE: tl.constexpr):
    """(a, b, a_mean) of ``a g - b dev - a_mean`` (row_math.h, term_coefficients): a = a_full c / s;
    the standardization terms from G = sum g and S = sum g dev; V = 2 in closed form."""
    a = a_full * c / s
    if STANDARDIZE:
        two = (v_f == 2.0) & (sigma > 0.0)
        b_general = tl.where(sigma > 0.0, a * S / (dof_a * sigma * s), 0.0)
        b_two = -a * (S / (dof_a * sigma * sigma)) * (eps_a * c / s)
        b = tl.where(two, b_two, b_general)
        a_mean = tl.where(two, 0.0, a * (G / v_f))
        a = tl.where(two, 0.0, a)
    else:
        b = a * 0.0
        a_mean = b
    return a, b, a_mean


@triton.jit
def _linear_kl(ea, eb, da, db, za, zb, lz, FORWARD: tl.constexpr):
    """A KL from the partition sums: forward sum p (ln p - ln q), or reverse sum q (ln q - ln p), with
    its Bregman refinement where it cancels (bregman_terms). A class whose own exponential is 0
    contributes 0 (a -inf logit; -inf in both rows too)."""
    if FORWARD:
        e_own = eb
        z_own = zb
        sign = 1.0
    else:
        e_own = ea
        z_own = za
        sign = -1.0
    eh = tl.where(e_own > 0.0, e_own * (db - da), 0.0)
    kl = total(eh) * LN2 * sign / z_own + lz * sign
    if needs_refinement(kl, total(tl.abs(eh)) * LN2 / z_own, lz):  # (rare: a uniform branch)
        lv = (db - da) * LN2 + lz  # ln p - ln q
        if FORWARD:
            kl = total(bregman_terms(eb, ea, -lv, 1.0 / zb, 1.0 / za))
        else:
            kl = total(bregman_terms(ea, eb, lv, 1.0 / za, 1.0 / zb))
    return kl


@triton.jit
def _divergence(ea, eb, da, db, za, zb, beta, DIV: tl.constexpr):
    """(D, kl_f, kl_r, l, pointwise g, h, E_q g, E_p h) of a row in registers (natural units)."""
    lz = tl.log2(za / zb) * LN2
    l = (db - da) * LN2 + lz
    zero = za * 0.0
    kl_f = zero
    kl_r = zero
    g = l * 0.0
    h = g
    e_qg = zero
    e_ph = zero
    if (DIV == FORWARD_KL) or (DIV == JEFFREYS) or (DIV == DKD):  # (DKD: NCKD, the target's exponentials 0)
        kl_f = _linear_kl(ea, eb, da, db, za, zb, lz, True)
    if (DIV == REVERSE_KL) or (DIV == JEFFREYS):
        kl_r = _linear_kl(ea, eb, da, db, za, zb, lz, False)
    if (DIV == JSD) or (DIV == TVD):
        q = ea / za
        p = eb / zb
        loss_terms, g, h = pointwise_terms(q, p, l, beta, DIV)
        d = total(loss_terms)
        e_qg = total(q * g)
        e_ph = total(p * h)
    else:
        d = kl_f + kl_r
    return d, kl_f, kl_r, l, g, h, e_qg, e_ph


@triton.jit
def _ce(x, valid, offs, label, label_ok, mx, x_row, keep, smooth, v_f, x_label, ACC64: tl.constexpr):
    """(CE, Zc, E, 2^sz) of the raw student row (row_math.h, row_ce); sz = (x - max x) log2(e).
    ``x_label``: the label's logit when already loaded (decoupled KD), else None."""
    sz = (x - mx) * LOG2E
    ez = tl.where(valid, tl.exp2(sz), 0.0)
    zc = total(ez)
    excl = total(tl.where(offs == label, 0.0, ez))
    if x_label is None:
        x_label = to_acc(tl.load(x_row + label, mask=keep & label_ok, other=0.0), ACC64)
    sz_label = tl.where(label_ok, (x_label - mx) * LOG2E, float("nan"))
    return row_ce(zc, total(tl.where(valid, sz, 0.0)), excl, sz_label, smooth, v_f), zc, excl, ez


@triton.jit
def _target_args(x_row, y_row, label, keep, label_ok, ax, ay, cx, cy, s_x, s_y, ts, tt, k, ACC64: tl.constexpr):
    """(x_g, a_g, b_g) of decoupled KD's target g, loaded once: its student logit and both exponents
    (log2 units, relative to the largest non-target class: ``(c v_g - c max' v) log2(e) / (s tau) - k``,
    the exponents of phase 1); NaN exponents for a label outside [0, V) (a NaN row)."""
    x_g = to_acc(tl.load(x_row + label, mask=keep & label_ok, other=0.0), ACC64)
    y_g = to_acc(tl.load(y_row + label, mask=keep & label_ok, other=0.0), ACC64)
    da_g = (x_g * cx - ax * cx) * (LOG2E / (ts * s_x)) - k
    db_g = (y_g * cy - ay * cy) * (LOG2E / (tt * s_y)) - k
    return x_g, tl.where(label_ok, da_g, float("nan")), tl.where(label_ok, db_g, float("nan"))


@triton.jit
def kd_register_kernel(
    x_ptr, y_ptr, keep_ptr, scale_ptr, rows_ptr, gx_ptr, gy_ptr, labels_ptr, ce_ptr, kd_ptr,
    V, v_runs, runs_x, runs_y, scale_stride, ignore_index,
    tau_s: tl.float64, tau_t: tl.float64, eps: tl.float64, dof: tl.float64, v_float: tl.float64,
    smoothing: tl.float64, ce_weight: tl.float64, kd_weight: tl.float64, beta: tl.float64, dkd_alpha: tl.float64,
    dkd_beta: tl.float64, BLOCK: tl.constexpr, VEC: tl.constexpr, STANDARDIZE: tl.constexpr, GRAD_S: tl.constexpr,
    GRAD_T: tl.constexpr, HAS_MASK: tl.constexpr, ACC64: tl.constexpr, ZERO_EXCLUDED: tl.constexpr,
    ROUND_BF16: tl.constexpr, HAS_LABELS: tl.constexpr, DIV: tl.constexpr,
):
    """Loss (and gradients) of one row with V <= BLOCK: one read of x and y, one write per gradient."""
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    keep, label, label_ok = row_label(labels_ptr, row, V, ignore_index, keep_row(keep_ptr, row, HAS_MASK), HAS_LABELS)
    if DIV == DKD:  # (a label in [0, V) where it is used: 32-bit lane compares)
        label = label.to(tl.int32)
    # row offsets in runs of VEC classes times VEC: the compiler sees VEC-aligned rows (vector access)
    x_row = x_ptr + row64 * runs_x * VEC
    y_row = y_ptr + row64 * runs_y * VEC
    ts = scalar(tau_s, ACC64)
    tt = scalar(tau_t, ACC64)
    v_f = scalar(v_float, ACC64)
    dof_a = scalar(dof, ACC64)
    eps_a = scalar(eps, ACC64)
    offs = tile_offsets(BLOCK, VEC)
    valid = offs < V
    ld = offs < V * keep.to(tl.int32)  # (a product keeps V's divisibility: vectorized masked loads)
    x0_raw = tl.load(x_row, mask=keep, other=0.0)
    y0_raw = tl.load(y_row, mask=keep, other=0.0)
    x = to_acc(tl.load(x_row + offs, mask=ld, other=x0_raw), ACC64)
    y = to_acc(tl.load(y_row + offs, mask=ld, other=y0_raw), ACC64)  # lanes past V: x[0], y[0]
    mx, my = max2(tl.max(x, axis=1), tl.max(y, axis=1))
    nx, ny = min2(tl.min(x, axis=1), tl.min(y, axis=1))

    # Phase 1: the statistics (exponent arguments in log2 units, <= 0 exactly: rounding is monotone).
    ax = mx  # the exponents' 0: the row's max
    ay = my
    in_sums = valid
    if DIV == DKD:  # decoupled KD: the target out of the sums (Za', Zb'), exponents from the non-target max
        in_sums = valid & (offs != label)
        ax, ay = max2(tl.max(tl.where(in_sums, x, float("-inf")), axis=1),
                      tl.max(tl.where(in_sums, y, float("-inf")), axis=1))
    if STANDARDIZE:
        dx, sigma_x, s_x, inv_sx, cx, u_max = _standardize(x, x0_raw, valid, mx, nx, ax, dof_a, eps_a, ACC64)
        dy, sigma_y, s_y, inv_sy, cy, w_max = _standardize(y, y0_raw, valid, my, ny, ay, dof_a, eps_a, ACC64)
        da = (dx * inv_sx - u_max) * (LOG2E / ts)
        db = (dy * inv_sy - w_max) * (LOG2E / tt)
        k = v_f * 0.0
    else:  # (c x - max c x) / (tau c): no overflow of x - max x on rows of extreme magnitude
        cx = magnitude_scale(mx, nx, ACC64)
        cy = magnitude_scale(my, ny, ACC64)
        sigma_x = cx
        sigma_y = cy
        s_x = cx
        s_y = cy
        dx = tl.zeros(x.shape, dtype=x.dtype)  # no standardization term: a -inf logit must not give 0 * inf
        dy = dx
        # rows of extreme magnitude: both exponentials 2^-k smaller (the ratios are the same), so that
        # sums of e^b (b - a) cannot overflow where |b - a| nears the float range (row_math.h)
        k = tl.where((cx != 1.0) | (cy != 1.0), tl.log2(v_f) + 1.0, 0.0)
        da = (x * cx - ax * cx) * (LOG2E / (ts * cx)) - k
        db = (y * cy - ay * cy) * (LOG2E / (tt * cy)) - k

    # Phase 2: the partition sums, the divergence and the CE.
    x_g = None
    if DIV == DKD:  # the target's exponents (> 0 where it leads the other classes) from its logits
        x_g, da_g, db_g = _target_args(x_row, y_row, label, keep, label_ok, ax, ay, cx, cy, s_x, s_y, ts, tt, k, ACC64)
    ea = tl.where(in_sums, tl.exp2(da), 0.0)
    eb = tl.where(in_sums, tl.exp2(db), 0.0)
    za = total(ea)
    zb = total(eb)
    d, kl_f, kl_r, l, g_pw, h_pw, e_qg, e_ph = _divergence(ea, eb, da, db, za, zb, scalar(beta, ACC64), DIV)
    if DIV == DKD:
        d, dkd = dkd_row(da_g, db_g, za, zb, kl_f, scalar(dkd_alpha, ACC64), scalar(dkd_beta, ACC64))
    ce_w = scalar(ce_weight, ACC64)
    kd_w = scalar(kd_weight, ACC64)
    smooth = scalar(smoothing, ACC64)
    ce = d * 0.0
    if HAS_LABELS:
        ce, zc, excl, ez = _ce(x, valid, offs, label, label_ok, mx, x_row, keep, smooth, v_f, x_g, ACC64)
    store_row_results(rows_ptr, ce_ptr, kd_ptr, row, keep, ce, ts * ts * d, ce_w, kd_w, HAS_LABELS)

    # Phase 3: the gradients from the per-element terms.
    if GRAD_S or GRAD_T:
        scale = to_acc(tl.load(scale_ptr + row64 * scale_stride), ACC64)
        kd_scale = scale * kd_w
        out_offs = row64 * v_runs * VEC + offs
        r_za = 1.0 / za
        r_zb = 1.0 / zb
        if GRAD_S:
            if DIV == DKD:
                t = dkd_student_term(ea, eb, offs == label, dkd)
            else:
                t = tl.where(valid, student_term(ea, eb, l, r_za, r_zb, kl_r, g_pw, e_qg, DIV), 0.0)
            a, b, a_mean = _term_coefficients(total(t), total(t * dx), sigma_x, s_x, cx, eps_a, dof_a, v_f,
                                              kd_scale * ts, STANDARDIZE)
            out = a * t - b * dx - a_mean
            if HAS_LABELS:  # + ce_w (softmax(x) - s / V - (1 - s) onehot); a NaN row for a bad label
                ce_scale = scale * ce_w
                r_zc = 1.0 / zc
                label_grad = smooth - smooth / v_f - excl * r_zc  # row_math.h, ce_label_grad
                out += ce_scale * tl.where(offs == label, label_grad, ez * r_zc - smooth / v_f)
                out = tl.where(label_ok, out, float("nan"))
            store_grad(gx_ptr, out_offs, valid, out, keep, ZERO_EXCLUDED, ROUND_BF16, False)
        if GRAD_T:
            if DIV == DKD:  # (a NaN row for a label outside [0, V))
                t = tl.where(label_ok, dkd_teacher_term(eb, l, offs == label, kl_f, dkd), float("nan"))
            else:
                t = tl.where(valid, teacher_term(ea, eb, l, r_za, r_zb, kl_f, h_pw, e_ph, DIV), 0.0)
            a, b, a_mean = _term_coefficients(total(t), total(t * dy), sigma_y, s_y, cy, eps_a, dof_a, v_f,
                                              kd_scale * ts * ts / tt, STANDARDIZE)
            store_grad(gy_ptr, out_offs, valid, a * t - b * dy - a_mean, keep, ZERO_EXCLUDED, ROUND_BF16, False)
