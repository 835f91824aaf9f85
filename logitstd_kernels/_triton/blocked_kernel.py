"""The blocked path of the fused loss: rows of any length, in BLOCK-wide tiles, one program per row.

Tiles are 2-d, ``[BLOCK // VEC, VEC]``: each thread owns runs of VEC contiguous classes (one 16-byte
access of the wider input when the rows are aligned to it) and sums over a run stay inside a thread,
so no loop has a barrier. The V // BLOCK full tiles are loaded under a mask that is uniform over each
tile (only the row's mask flag), so their loads are 16-byte vectors whatever V is; the partial last
tile is handled apart. Every loop loads the next tile before working on the current one.

Phases, each a loop over the row (e0 = c x - c x[0], c the row's magnitude scale; exponents in log2
units, ``da = e0 Ka + Ba`` with one FMA, <= 0):

1. statistics (``_stats_phase``): max, min, and per run of VEC classes the sum and the sum of squares
   of c x around the run's first element, merged across runs by Chan's formula (no division per
   element); again on c x for the rare row of extreme magnitude;
2. sums (``_sums_phase``), last tile first (the tiles pass 1 read last are still in L2): the
   partition sums Za, Zb, the KLs' sums (sum e^b (b - a) and its size), the standardization's sums
   (e.g. sum e^a e0) and the CE's sums;
3. for jsd and tvd only (``_pointwise_phase``): their non-negative per-element losses, E_q g, E_p h and
   the standardization's sums of the terms;
4. gradients (``_grads_phase``): a few FMAs of per-row coefficients per element (forward KL:
   ``ea A + eb B + e0 C + D``; the others from their per-element terms, divergence.py);
5. the Bregman form of a KL (``_refine_phase``), only for the rows where the sums cancel.

Memory per element: passes 1 and 2 read x and y; the gradient pass reads them again and writes each
requested gradient; jsd and tvd read them once more. In bf16 with the student gradient: 14 bytes
per element issued, 6 of them the floor; the re-reads come from L2 while the rows in flight fit in
it. EVICT_HINTS (the launch table's column, on for the long rows): passes 1 and 2 load with
evict_last, the row's last read with evict_first, and the gradients are stored streaming (.cs).
"""

import triton
import triton.language as tl

from .blocked_phases import (grads_phase, load_full, load_tile, nontarget_max_phase, pointwise_phase, refine_phase,
                             sums_phase)
from .divergence import dkd_row
from .row_math import (DKD, DKD_RESUM_BELOW, FORWARD_KL, JEFFREYS, JSD, LN2, LOG2E, REVERSE_KL, TVD, keep_row,
                       magnitude_scale, max2, min2, needs_refinement, row_ce, row_label, scalar, sqrt_rn,
                       store_row_results, tile_offsets, to_acc)


@triton.jit
def _run_merge(n_r, shift_r, s1_r, s2_r, shift0):
    """(mean, M2) of a row around ``shift0`` from per-run (count, shift, sum, sum of squares) around
    each run's shift: each run's mean and M2, then Chan's merge (runs with no element count 0)."""
    has = n_r > 0.0
    n_safe = tl.where(has, n_r, 1.0)
    mean_r = (shift_r - shift0) + s1_r / n_safe
    m2_r = s2_r - s1_r * (s1_r / n_safe)
    mean = tl.sum(tl.where(has, n_r * mean_r, 0.0), axis=0) / tl.sum(n_r, axis=0)
    d = mean_r - mean
    return mean, tl.sum(tl.where(has, m2_r + n_r * d * d, 0.0), axis=0)


@triton.jit
def _stats_tile(x, y, m, cx, cy, sh_x, sh_y, mx, nx, s1x, s2x, my, ny, s1y, s2y, SCALED: tl.constexpr,
                STANDARDIZE: tl.constexpr, MINIMA: tl.constexpr):
    """One tile added to the per-run statistics of c x and of c y: the max, the min (``MINIMA``),
    the sum and the sum of squares around the run's shift (``STANDARDIZE``); ``m``: the lanes inside
    the row, None for a full tile."""
    if SCALED:
        x = x * cx
        y = y * cy
    mx = tl.maximum(mx, tl.max(x, axis=1))
    my = tl.maximum(my, tl.max(y, axis=1))
    if MINIMA:
        nx = tl.minimum(nx, tl.min(x, axis=1))
        ny = tl.minimum(ny, tl.min(y, axis=1))
    if STANDARDIZE:
        dx = x - sh_x[:, None]
        dy = y - sh_y[:, None]
        if m is not None:
            dx = tl.where(m, dx, 0.0)
            dy = tl.where(m, dy, 0.0)
        s1x += tl.sum(dx, axis=1)
        s2x += tl.sum(dx * dx, axis=1)
        s1y += tl.sum(dy, axis=1)
        s2y += tl.sum(dy * dy, axis=1)
    return mx, nx, s1x, s2x, my, ny, s1y, s2y


@triton.jit
def _magnitude_bounds(mx, nx, sh, s2, MINIMA: tl.constexpr):
    """(lower, upper) bounds of the row's largest magnitude max |v|: exact from the max and the min
    (``MINIMA``), else from the max, the runs' shifts (elements of the row) and their sums of
    squares: |v| <= |shift| + sqrt(sum (v - shift)^2) in each run."""
    if MINIMA:
        r = tl.maximum(tl.abs(tl.max(mx, axis=0)), tl.abs(tl.min(nx, axis=0)))
        lower = r
        upper = r
    else:
        lower = tl.maximum(tl.abs(tl.max(mx, axis=0)), tl.max(tl.abs(sh), axis=0))
        upper = tl.max(tl.abs(sh) + tl.sqrt(s2), axis=0)
    return lower, upper


@triton.jit
def _stats_phase(x_row, y_row, x0_raw, y0_raw, cx, cy, V, v_load, num_full, offs0, BLOCK: tl.constexpr,
                 VEC: tl.constexpr, STANDARDIZE: tl.constexpr, ACC64: tl.constexpr, EVICT_HINTS: tl.constexpr,
                 SCALED: tl.constexpr, MINIMA: tl.constexpr):
    """Phase 1: (mean, M2, max, and bounds of the largest magnitude) of c x around c x[0], and of c y
    (unstandardized: mean = M2 = 0). ``SCALED``: the row's magnitude scale c is not 1. ``MINIMA``:
    the bounds exact, from the minima (a pass of its own for a standardized row outside the range
    of magnitudes whose moments need no scale, and the only statistics of an unstandardized one)."""
    v_full = num_full * BLOCK
    x, y = load_tile(x_row, y_row, offs0, tl.maximum(v_load, v_full), x0_raw, y0_raw, EVICT_HINTS, False)
    xa = to_acc(x, ACC64)
    ya = to_acc(y, ACC64)
    if SCALED:
        xa = xa * cx
        ya = ya * cy
    first = tl.arange(0, VEC)[None, :] == 0  # each run's shift: its first element in tile 0
    sh_x = tl.sum(tl.where(first, xa, 0.0), axis=1)
    sh_y = tl.sum(tl.where(first, ya, 0.0), axis=1)
    s1x = tl.sum(xa * 0.0, axis=1)
    s2x = s1x
    s1y = s1x
    s2y = s1x
    mx = s1x - float("inf")
    my = mx
    nx = s1x + float("inf")
    ny = nx
    x_next, y_next = to_acc(x, ACC64), to_acc(y, ACC64)
    for blk in range(0, num_full):
        xt = to_acc(x_next, ACC64)
        yt = to_acc(y_next, ACC64)
        x_next, y_next = load_full(x_row, y_row, blk + 1, num_full, BLOCK, VEC, ACC64, EVICT_HINTS, False)
        mx, nx, s1x, s2x, my, ny, s1y, s2y = _stats_tile(xt, yt, None, cx, cy, sh_x, sh_y, mx, nx, s1x, s2x, my, ny,
                                                         s1y, s2y, SCALED, STANDARDIZE and not MINIMA, MINIMA)
    if num_full * BLOCK < V:
        offs = num_full * BLOCK + offs0
        x, y = load_tile(x_row, y_row, offs, v_load, x0_raw, y0_raw, EVICT_HINTS, False)
        mx, nx, s1x, s2x, my, ny, s1y, s2y = _stats_tile(to_acc(x, ACC64), to_acc(y, ACC64), offs < V, cx, cy, sh_x,
                                                         sh_y, mx, nx, s1x, s2x, my, ny, s1y, s2y, SCALED,
                                                         STANDARDIZE and not MINIMA, MINIMA)
    lo_x, hi_x = _magnitude_bounds(mx, nx, sh_x, s2x, MINIMA)
    lo_y, hi_y = _magnitude_bounds(my, ny, sh_y, s2y, MINIMA)
    max_x, max_y = max2(mx, my)
    mean_x = max_x * 0.0
    m2_x = mean_x
    mean_y = mean_x
    m2_y = mean_x
    if STANDARDIZE and not MINIMA:
        # every run saw VEC elements of each full tile, and those of the partial one inside the row
        n_r = tl.sum((offs0 + num_full * BLOCK < V).to(xa.dtype), axis=1) + (num_full * VEC).to(xa.dtype)
        mean_x, m2_x = _run_merge(n_r, sh_x, s1x, s2x, to_acc(x0_raw, ACC64) * cx)
        mean_y, m2_y = _run_merge(n_r, sh_y, s1y, s2y, to_acc(y0_raw, ACC64) * cy)
    return mean_x, m2_x, max_x, lo_x, hi_x, mean_y, m2_y, max_y, lo_y, hi_y


@triton.jit
def _exponent(mean, m2, vmax, v0_raw, c, tau, dof_a, eps_a, k, ACC64: tl.constexpr, STD: tl.constexpr):
    """(c v[0], sigma, s, K, B) of one input: ``e0 K + B`` is the exponent (log2 units, relative to the
    row's max and shifted down by ``k``): K = log2(e) / (s tau) (s = c without standardization)."""
    v0c = to_acc(v0_raw, ACC64) * c
    if STD:
        sigma = sqrt_rn(m2 / dof_a, ACC64)
        s = sigma + eps_a * c
    else:
        sigma = c
        s = c
    kk = LOG2E / (s * tau)
    return v0c, sigma, s, kk, -(vmax - v0c) * kk - k


@triton.jit
def _chain(total_term_e0, a_full, c, s, sigma, mean, dof_a, STD: tl.constexpr):
    """(A, C, D) of ``term A + e0 C + D`` (docs/design.md section 1): A = a_full c / s, and the
    standardization's C = -A S / (dof sigma s), S = sum term e0 (0 for a constant row), D = -C mean."""
    a = a_full * c / s
    if STD:
        c_e0 = tl.where(sigma > 0.0, -a * total_term_e0 / (dof_a * sigma * s), 0.0)
    else:
        c_e0 = a * 0.0
    return a, c_e0, -c_e0 * mean


@triton.jit
def _term_sums(sea, seb, ser, teb, teh, tea, r_za, r_zb, lz, kl_f, kl_r, e_qg, e_ph, eqx, epy, DIV: tl.constexpr):
    """sum term e0 of the student's and of the teacher's terms (divergence.py), from the sums."""
    sum_s = sea * r_za * 0.0
    sum_t = sum_s
    if (DIV == FORWARD_KL) or (DIV == JEFFREYS):
        sum_s += sea * r_za - seb * r_zb
        sum_t += (teh * LN2 + teb * lz) * r_zb - kl_f * teb * r_zb
    if (DIV == REVERSE_KL) or (DIV == JEFFREYS):
        sum_s += -((ser * LN2 + sea * lz) * r_za) - kl_r * sea * r_za
        sum_t += teb * r_zb - tea * r_za
    if (DIV == JSD) or (DIV == TVD):
        sum_s = eqx - e_qg * sea * r_za
        sum_t = epy - e_ph * teb * r_zb
    return sum_s, sum_t


@triton.jit
def _dkd_target(x_row, y_row, label, keep, label_ok, cx, cy, x0c, y0c, ka, ba, kb, bb, za, zb, nckd, weights,
                ACC64: tl.constexpr):
    """(e0x_g, e0y_g, alpha TCKD + beta NCKD, coefficients) of decoupled KD (divergence.py, dkd_row):
    the target's logits loaded once, e0 = c v_g - c v[0] and the exponents of phase 2 (NaN for a
    label outside [0, V): a NaN row); za, zb: the non-target sums."""
    alpha, beta = weights
    x_g = to_acc(tl.load(x_row + label, mask=keep & label_ok, other=0.0), ACC64)
    y_g = to_acc(tl.load(y_row + label, mask=keep & label_ok, other=0.0), ACC64)
    e0x_g = tl.where(label_ok, x_g * cx - x0c, float("nan"))
    e0y_g = tl.where(label_ok, y_g * cy - y0c, float("nan"))
    d, dkd = dkd_row(e0x_g * ka + ba, e0y_g * kb + bb, za, zb, nckd, scalar(alpha, ACC64), scalar(beta, ACC64))
    return e0x_g, e0y_g, d, dkd


@triton.jit
def _dkd_term_sums(sea, seb, teb, teh, lz, nckd, dkd, e0x_g, e0y_g):
    """Decoupled KD's sum term e0: the non-target sums' (sea, seb, teb, teh exclude the target) with
    its coefficients, plus the target's own terms times its e0."""
    rza, rzb, shift, tgt_s, tgt_t = dkd
    sum_s = rza * sea - rzb * seb + tgt_s * e0x_g
    sum_t = rzb * ((teh * LN2 + teb * lz) - nckd * teb) - shift * teb + tgt_t * e0y_g
    return sum_s, sum_t


@triton.jit
def kd_blocked_kernel(
    x_ptr, y_ptr, keep_ptr, scale_ptr, rows_ptr, gx_ptr, gy_ptr, labels_ptr, ce_ptr, kd_ptr,
    V, v_runs, runs_x, runs_y, scale_stride, ignore_index,
    tau_s: tl.float64, tau_t: tl.float64, eps: tl.float64, dof: tl.float64, v_float: tl.float64,
    smoothing: tl.float64, ce_weight: tl.float64, kd_weight: tl.float64, beta: tl.float64, dkd_alpha: tl.float64,
    dkd_beta: tl.float64, BLOCK: tl.constexpr, VEC: tl.constexpr, STANDARDIZE: tl.constexpr, GRAD_S: tl.constexpr,
    GRAD_T: tl.constexpr, HAS_MASK: tl.constexpr, ACC64: tl.constexpr, ZERO_EXCLUDED: tl.constexpr,
    ROUND_BF16: tl.constexpr, HAS_LABELS: tl.constexpr, EVICT_HINTS: tl.constexpr, DIV: tl.constexpr,
    SMOOTH: tl.constexpr,
):
    """Loss (and gradients) of one row of any length, in the phases of the module docstring."""
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    keep, label, label_ok = row_label(labels_ptr, row, V, ignore_index, keep_row(keep_ptr, row, HAS_MASK), HAS_LABELS)
    run = keep
    if ZERO_EXCLUDED:
        run = keep | True
    if run:  # (a row excluded from a recomputation of other rows' gradients returns at once)
        x_row = x_ptr + row64 * runs_x * VEC  # in runs of VEC classes: the compiler sees VEC-aligned rows
        y_row = y_ptr + row64 * runs_y * VEC
        ts = scalar(tau_s, ACC64)
        tt = scalar(tau_t, ACC64)
        dof_a = scalar(dof, ACC64)
        eps_a = scalar(eps, ACC64)
        v_f = scalar(v_float, ACC64)
        offs0 = tile_offsets(BLOCK, VEC)
        keep_i = keep.to(tl.int32)
        # a masked-out row loads nothing: every load limit is 0
        num_full = (V // BLOCK) * keep_i
        has_tail = (num_full * BLOCK < V) & keep
        v_load = V * keep_i
        x0_raw = tl.load(x_row, mask=keep, other=0.0)
        y0_raw = tl.load(y_row, mask=keep, other=0.0)
        one = scalar(1.0, ACC64)
        mean_x, m2_x, max_x, lo_x, hi_x, mean_y, m2_y, max_y, lo_y, hi_y = _stats_phase(
            x_row, y_row, x0_raw, y0_raw, one, one, V, v_load, num_full, offs0, BLOCK, VEC, STANDARDIZE, ACC64,
            EVICT_HINTS, False, not STANDARDIZE)
        cx = magnitude_scale(lo_x, lo_x, ACC64)  # 1 when both bounds lie in the unscaled range
        cy = magnitude_scale(lo_y, lo_y, ACC64)
        # (an upper bound that overflowed while the lower one did not leaves the scale open too)
        unsure = ((magnitude_scale(hi_x, hi_x, ACC64) != cx) | (magnitude_scale(hi_y, hi_y, ACC64) != cy)
                  | ((tl.abs(hi_x) == float("inf")) & (tl.abs(lo_x) < float("inf")))
                  | ((tl.abs(hi_y) == float("inf")) & (tl.abs(lo_y) < float("inf"))))
        if STANDARDIZE and unsure:  # rare: the exact largest magnitudes, from the minima
            _a, _b, mx, lo_x, hi_x, _c, _d, my, lo_y, hi_y = _stats_phase(
                x_row, y_row, x0_raw, y0_raw, one, one, V, v_load, num_full, offs0, BLOCK, VEC, STANDARDIZE, ACC64,
                EVICT_HINTS, False, True)
            cx = magnitude_scale(lo_x, lo_x, ACC64)
            cy = magnitude_scale(lo_y, lo_y, ACC64)
        if (cx != 1.0) | (cy != 1.0):  # a row of extreme magnitude (rare): the statistics of c x, c y
            mean_x, m2_x, max_x, _e, _f, mean_y, m2_y, max_y, _g, _h = _stats_phase(
                x_row, y_row, x0_raw, y0_raw, cx, cy, V, v_load, num_full, offs0, BLOCK, VEC, STANDARDIZE, ACC64,
                EVICT_HINTS, True, not STANDARDIZE)
        # without standardization both exponentials of such a row are 2^-k smaller (the same ratios),
        # so that sums of e^b (b - a) cannot overflow where |b - a| nears the float range
        if STANDARDIZE:
            k = v_f * 0.0
        else:
            k = tl.where((cx != 1.0) | (cy != 1.0), tl.log2(v_f) + 1.0, 0.0)
        x0c, sigma_x, s_x, ka, ba = _exponent(mean_x, m2_x, max_x, x0_raw, cx, ts, dof_a, eps_a, k, ACC64, STANDARDIZE)
        y0c, sigma_y, s_y, kb, bb = _exponent(mean_y, m2_y, max_y, y0_raw, cy, tt, dof_a, eps_a, k, ACC64, STANDARDIZE)
        kz = LOG2E / cx  # the CE's exponent (x - max x) log2(e)
        bz = -(max_x - x0c) * kz
        _blocked_row(x_row, y_row, x0_raw, y0_raw, row, row64, keep, label, label_ok, V, v_load, num_full, has_tail,
                     offs0, cx, cy, x0c, y0c, ka, ba, kb, bb, k, kz, bz, mean_x, mean_y, sigma_x, sigma_y, s_x, s_y, ts,
                     tt, dof_a, v_f, scale_ptr, scale_stride, rows_ptr, ce_ptr, kd_ptr, gx_ptr, gy_ptr, v_runs,
                     scalar(beta, ACC64), scalar(smoothing, ACC64), scalar(ce_weight, ACC64),
                     scalar(kd_weight, ACC64), (dkd_alpha, dkd_beta), BLOCK, VEC, STANDARDIZE, GRAD_S, GRAD_T, ACC64,
                     ZERO_EXCLUDED, ROUND_BF16, HAS_LABELS, EVICT_HINTS, DIV, SMOOTH)


@triton.jit
def _blocked_row(x_row, y_row, x0_raw, y0_raw, row, row64, keep, label, label_ok, V, v_load, num_full, has_tail, offs0,
                 cx, cy, x0c, y0c, ka, ba, kb, bb, k, kz, bz, mean_x, mean_y, sigma_x, sigma_y, s_x, s_y, ts, tt, dof_a,
                 v_f, scale_ptr, scale_stride, rows_ptr, ce_ptr, kd_ptr, gx_ptr, gy_ptr, v_runs, beta, smooth, ce_w,
                 kd_w, dkd_weights, BLOCK: tl.constexpr, VEC: tl.constexpr, STD: tl.constexpr, GRAD_S: tl.constexpr,
                 GRAD_T: tl.constexpr, ACC64: tl.constexpr, ZERO_EXCLUDED: tl.constexpr, ROUND_BF16: tl.constexpr,
                 HAS_LABELS: tl.constexpr, EVICT_HINTS: tl.constexpr, DIV: tl.constexpr, SMOOTH: tl.constexpr):
    """Phases 2 to 5 of a row (after its statistics): sums, loss, and the gradients."""
    if DIV == DKD:  # (a label in [0, V) where it is used: 32-bit lane compares)
        label = label.to(tl.int32)
    last_use: tl.constexpr = not (GRAD_S or GRAD_T or DIV == JSD or DIV == TVD)  # the sums pass reads last
    sums = sums_phase(x_row, y_row, x0_raw, y0_raw, V, v_load, num_full, has_tail, offs0, label, cx, cy, x0c, y0c, ka,
                      ba, kb, bb, kz, bz, BLOCK, VEC, ACC64, STD, GRAD_S, GRAD_T, HAS_LABELS, SMOOTH, DIV, EVICT_HINTS,
                      last_use)
    if DIV == DKD:
        if keep & ((sums[0] < DKD_RESUM_BELOW) | (sums[1] < DKD_RESUM_BELOW)):  # rare: from the non-target max
            top_x, top_y = nontarget_max_phase(x_row, y_row, x0_raw, y0_raw, V, v_load, num_full, has_tail, offs0,
                                               label, cx, cy, x0c, y0c, BLOCK, VEC, ACC64, EVICT_HINTS)
            ba = -top_x * ka - k  # (_exponent's B with the largest non-target class for the row's max)
            bb = -top_y * kb - k
            sums = sums_phase(x_row, y_row, x0_raw, y0_raw, V, v_load, num_full, has_tail, offs0, label, cx, cy, x0c,
                              y0c, ka, ba, kb, bb, kz, bz, BLOCK, VEC, ACC64, STD, GRAD_S, GRAD_T, HAS_LABELS, SMOOTH,
                              DIV, EVICT_HINTS, last_use)
    za, zb, tf, tfa, tr, tra, sea, seb, ser, teb, teh, tea, zo, lt, ltx, zs = sums
    r_za = 1.0 / za
    r_zb = 1.0 / zb
    lz = tl.log2(za * r_zb) * LN2
    kl_f = tf * r_zb * LN2 + lz  # forward KL from the sums
    kl_r = -(tr * r_za * LN2) - lz  # reverse KL
    refine_f = (kl_f != kl_f) & False
    refine_r = refine_f
    if (DIV == FORWARD_KL) or (DIV == JEFFREYS) or (DIV == DKD):  # (DKD: NCKD, from the non-target sums)
        refine_f = needs_refinement(kl_f, tfa * r_zb * LN2, lz)
    if (DIV == REVERSE_KL) or (DIV == JEFFREYS):
        refine_r = needs_refinement(kl_r, tra * r_za * LN2, lz)
    if refine_f | refine_r:  # rare (high temperatures, a student close to its teacher): the Bregman forms
        bf, br = refine_phase(x_row, y_row, x0_raw, y0_raw, V, v_load, num_full, has_tail, offs0, label, cx, cy, x0c,
                              y0c, ka, ba, kb, bb, r_za, r_zb, lz, BLOCK, VEC, ACC64,
                              (DIV == FORWARD_KL) or (DIV == JEFFREYS) or (DIV == DKD),
                              (DIV == REVERSE_KL) or (DIV == JEFFREYS), EVICT_HINTS, DIV)
        kl_f = tl.where(refine_f, bf, kl_f)
        kl_r = tl.where(refine_r, br, kl_r)
    e_qg = za * 0.0
    e_ph = e_qg
    eqx = e_qg
    epy = e_qg
    if (DIV == JSD) or (DIV == TVD):
        d, e_qg, e_ph, eqx, epy = pointwise_phase(x_row, y_row, x0_raw, y0_raw, V, v_load, num_full, has_tail, offs0,
                                                   cx, cy, x0c, y0c, ka, ba, kb, bb, r_za, r_zb, lz, beta, BLOCK, VEC,
                                                   ACC64, STD, GRAD_S, GRAD_T, DIV, EVICT_HINTS)
    elif DIV == JEFFREYS:
        d = kl_f + kl_r
    elif DIV == REVERSE_KL:
        d = kl_r
    elif DIV == DKD:  # alpha TCKD + beta NCKD, from the target's logits (loaded once)
        e0x_g, e0y_g, d, dkd = _dkd_target(x_row, y_row, label, keep, label_ok, cx, cy, x0c, y0c, ka, ba, kb, bb, za,
                                           zb, kl_f, dkd_weights, ACC64)
    else:
        d = kl_f
    ce = d * 0.0
    zc = zo + lt
    excl = zo + ltx
    if HAS_LABELS:  # the objective's CE (row_math.h, row_ce)
        if DIV == DKD:
            sz_label = e0x_g * kz + bz  # (NaN for a label outside [0, V))
        else:
            x_label = to_acc(tl.load(x_row + label, mask=keep & label_ok, other=0.0), ACC64)
            sz_label = tl.where(label_ok, (x_label * cx - x0c) * kz + bz, float("nan"))
        ce = row_ce(zc, zs, excl, sz_label, smooth, v_f)
    store_row_results(rows_ptr, ce_ptr, kd_ptr, row, keep, ce, ts * ts * d, ce_w, kd_w, HAS_LABELS)
    if GRAD_S or GRAD_T:
        scale = to_acc(tl.load(scale_ptr + row64 * scale_stride), ACC64)
        kd_scale = scale * kd_w
        if DIV == DKD:
            sum_s, sum_t = _dkd_term_sums(sea, seb, teb, teh, lz, kl_f, dkd, e0x_g, e0y_g)
        else:
            sum_s, sum_t = _term_sums(sea, seb, ser, teb, teh, tea, r_za, r_zb, lz, kl_f, kl_r, e_qg, e_ph, eqx, epy,
                                      DIV)
        a_s, c_s, d_s = _chain(sum_s, kd_scale * ts, cx, s_x, sigma_x, mean_x, dof_a, STD)
        a_t, c_t, d_t = _chain(sum_t, kd_scale * ts * ts / tt, cy, s_y, sigma_y, mean_y, dof_a, STD)
        ce_scale = scale * ce_w
        ce_b = ce_scale * smooth / v_f
        ce_l = ce_scale * (smooth - smooth / v_f - excl / zc)  # row_math.h, ce_label_grad
        if DIV == DKD:  # the student's term coefficients are DKD's; its target's term joins the label's element
            r_za, r_zb, _shift, tgt_s, _tgt_t = dkd
            ce_l += a_s * tgt_s
        else:
            dkd = (r_za, r_zb, r_za, r_za, r_za)  # (unused)
        if ZERO_EXCLUDED:  # every tile of a masked-out row, to store its zeros
            num_pass = V // BLOCK
            tail = num_pass * BLOCK < V
        else:
            num_pass = num_full
            tail = has_tail
        grads_phase(x_row, y_row, x0_raw, y0_raw, V, v_load, num_pass, tail, row64 * v_runs * VEC, offs0, gx_ptr,
                     gy_ptr, keep, cx, cy, x0c, y0c, ka, ba, kb, bb, r_za, r_zb, lz, beta, kl_f, kl_r, e_qg, e_ph,
                     (a_s, c_s, d_s), (a_t, c_t, d_t), (kz, bz, 1.0 / zc, ce_scale, ce_b, ce_l), label, label_ok, dkd,
                     BLOCK, VEC, ACC64, ZERO_EXCLUDED, ROUND_BF16, GRAD_S, GRAD_T, HAS_LABELS, DIV, EVICT_HINTS)
