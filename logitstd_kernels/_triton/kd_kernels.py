"""Triton kernels of the fused (logit-standardized) KD loss and of the in-place row scaling.

One program handles one row pair (student row ``x``, teacher row ``y``, V classes each). The math is
docs/design.md section 1; in the notation used here (all sums over the V classes of the row)::

    c       = 1, or 2^-e for the rare row whose magnitude max|x| lies outside [2^-20, 2^40]
                                             # (float32; see row_math.h, magnitude_scale): the
                                             # z-score is scale-free, c x is exact, and the squared
                                             # deviations then neither overflow nor underflow
    xs      = c x - c x[0]                   # shift by the first element: exact for rows like
                                             # 1000 + 0.01 * randn, and exactly 0 for constant rows
    mu      = mean(xs)   sigma = sqrt(sum((xs - mu)^2) / (V - corr))   s = sigma + c eps
    u       = (xs - mu) / s                  # the standardized student (u = x without standardize)
    da      = (u - max(u)) * log2(e) / tau_s # a - max(a) in base 2, <= 0 exactly (rounding is
                                             # monotone, and max(u) = (max(xs) - mu) / s)
    ea      = 2^da   Za = sum(ea)            # q = ea / Za       (teacher: w, db, eb, Zb, p likewise)
    T       = sum(eb * (db - da))            # (a class with eb == 0 counts 0, as in kl_div)
    KL      = ln2 * (T / Zb + log2(Za / Zb)) # = sum p (log p - log q)
                                             # rows where this cancels (E_p|db - da| + |log(Za/Zb)|
                                             # > 4 KL: high temperatures) use the Bregman form
                                             # sum p phi(t), phi(t) = e^t - 1 - t (row_math.h)
    loss    = tau_s^2 * KL
    g_u     = tau_s * (q - p)                                    S_u = sum(g_u * u)
    dL/dx   = c (g_u / s - u * S_u / ((V - corr) * sigma))       (second term 0 when sigma == 0)
    g_w     = tau_s^2 / tau_t * p * ln2 * (db - da - T / Zb)     S_w = sum(g_w * w)
    dL/dy   = c_y (g_w / s_y - w * S_w / ((V - corr) * sigma_y))

Without standardization ``u = x``, ``s = 1``, ``c = 1`` and the second gradient terms vanish. A
class with p = 0 (a -inf teacher logit, underflow) contributes exactly 0 to both gradients.
Gradients are written multiplied by the row's ``grad_scale`` (one value, or one per row).

Tiles are 2-d, ``[BLOCK // VEC, VEC]``: each thread owns runs of VEC contiguous classes (one 16-byte
access of the wider input when the rows are aligned to it), the same layout for a bf16 student and a
float32 teacher, and the sums over axis 1 stay inside a thread. Row strides arrive in units of VEC
(``runs_x = stride_x / VEC``, ``v_runs = V / VEC`` for the gradient rows), which tells the compiler
that every row starts VEC-aligned; the launcher lowers VEC (down to 1: consecutive threads, scalar
coalesced accesses) when the strides or V do not allow it. Lanes past V are loaded as ``x[0]``: a
neutral value for the shifted sums (it adds 0) and for the max; they are excluded where it matters
(M2, the exponentials).

Masked-out rows load nothing (every load's limit is 0 for them) and, with ``ZERO_EXCLUDED``, store
loss 0 and gradient 0; without it (``fused_kd_regrad_``: recomputing some rows' gradients in place)
they store no gradient and the blocked path skips their loops. Every result is selected with
``tl.where`` so that the garbage computed for them never reaches memory.

Accumulation is float32 (float64 when ``ACC64``: an input is float64). Exponentials use ``exp2``
with the ``log2(e)`` factor folded into the temperature scale, logarithms use ``log2``.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Row magnitudes whose moments are computed unscaled (row_math.h, MagnitudeRange).
MAG_LO_F32 = tl.constexpr(2.0 ** -20)
MAG_HI_F32 = tl.constexpr(2.0 ** 40)
MAG_LO_F64 = tl.constexpr(2.0 ** -400)
MAG_HI_F64 = tl.constexpr(2.0 ** 400)
# The KL cancellation ratio above which a row's loss is taken from the Bregman form (row_math.h).
KL_REFINE_RATIO = tl.constexpr(4.0)


@triton.jit
def to_acc(x, ACC64: tl.constexpr):
    """``x`` converted to the accumulation dtype (float64 if ``ACC64`` else float32)."""
    if ACC64:
        r = x.to(tl.float64)
    else:
        r = x.to(tl.float32)
    return r


@triton.jit
def scalar(v, ACC64: tl.constexpr):
    """A float kernel argument in the accumulation dtype, as a scalar tensor.

    Compiled, ``v`` is a float64 argument; interpreted, it is a Python float (combined with a tensor
    it takes the tensor's dtype, so float64 keeps every bit there too).
    """
    return tl.sum(to_acc(to_acc(tl.zeros([1], dtype=tl.float32), ACC64) + v, ACC64), axis=0)


@triton.jit
def _sqrt(x, ACC64: tl.constexpr):
    """IEEE-rounded square root (``tl.sqrt`` is approximate in float32, exact in float64)."""
    if ACC64:
        r = tl.sqrt(x)
    else:
        r = tl.sqrt_rn(x)
    return r


@triton.jit
def _magnitude_scale(mx, mn, ACC64: tl.constexpr):
    """The row's magnitude scale c from its max and min (row_math.h, magnitude_scale): 1 when
    r = max(|mx|, |mn|) lies in [lo, hi], is 0 or is not finite; else 2^-e, e the binary exponent
    of r clamped to the normal range, built from the bits (exact on every device)."""
    r = tl.maximum(tl.abs(mx), tl.abs(mn))
    if ACC64:
        e = ((r.to(tl.int64, bitcast=True) >> 52) & 0x7FF) - 1023
        e = tl.minimum(tl.maximum(e, -1022), 1022)
        c = ((1023 - e) << 52).to(tl.float64, bitcast=True)
        inside = (r >= MAG_LO_F64) & (r <= MAG_HI_F64)
    else:
        e = ((r.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        e = tl.minimum(tl.maximum(e, -126), 126)
        c = ((127 - e) << 23).to(tl.float32, bitcast=True)
        inside = (r >= MAG_LO_F32) & (r <= MAG_HI_F32)
    unscaled = inside | (r == 0.0) | (r != r) | (r == float("inf"))
    return tl.where(unscaled, 1.0, c)


@triton.jit
def _phi_series(t):
    """e^t - 1 - t from its Taylor series (terms 2..17): accurate to float64 for |t| <= 1/2."""
    r = t * (1.0 / 355687428096000.0) + (1.0 / 20922789888000.0)
    r = r * t + (1.0 / 1307674368000.0)
    r = r * t + (1.0 / 87178291200.0)
    r = r * t + (1.0 / 6227020800.0)
    r = r * t + (1.0 / 479001600.0)
    r = r * t + (1.0 / 39916800.0)
    r = r * t + (1.0 / 3628800.0)
    r = r * t + (1.0 / 362880.0)
    r = r * t + (1.0 / 40320.0)
    r = r * t + (1.0 / 5040.0)
    r = r * t + (1.0 / 720.0)
    r = r * t + (1.0 / 120.0)
    r = r * t + (1.0 / 24.0)
    r = r * t + (1.0 / 6.0)
    r = r * t + 0.5
    return r * t * t


@triton.jit
def _bregman_terms(ea, eb, delta, r_za, r_zb, neg_lz):
    """p_k phi(t_k), t_k = -(delta_k ln2 + log(Za/Zb)) (delta in log2 units): the series where
    |t| <= 1/2, else q_k - p_k (1 + t_k) (no overflow of e^t where p is tiny); q_k where p = 0."""
    t = neg_lz - delta * LN2
    p = eb * r_zb
    term = tl.where(tl.abs(t) <= 0.5, p * _phi_series(t), ea * r_za - (p * t + p))
    return tl.where(eb > 0.0, term, ea * r_za)  # p = 0: the limit q (row_math.h, bregman_term)


@triton.jit
def _kl_parts(za, zb, t2, tabs):
    """(KL from the partition sums, whether that sum cancels so that the Bregman form is needed,
    -log(Za/Zb)); t2 = sum eb (db - da), tabs = sum eb |db - da| (log2 units)."""
    r_zb = 1.0 / zb
    lz = LN2 * tl.log2(za * r_zb)
    kl = LN2 * (t2 * r_zb) + lz
    finite = (kl == kl) & (tl.abs(kl) < float("inf")) & (tabs < float("inf"))
    refine = finite & (kl * KL_REFINE_RATIO < LN2 * tabs * r_zb + tl.abs(lz))
    return kl, refine, -lz


@triton.jit
def _keep_row(keep_ptr, row, HAS_MASK: tl.constexpr):
    """The row's mask flag as an int1 scalar (always true without a mask)."""
    if HAS_MASK:
        keep = tl.load(keep_ptr + row) != 0
    else:
        keep = row >= 0
    return keep


@triton.jit
def _row_label(labels_ptr, row, V, ignore_index, keep, HAS_LABELS: tl.constexpr):
    """(keep and the label is not ignore_index, the label, whether it lies in [0, V))."""
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        keep = keep & (label != ignore_index)
        label_ok = (label >= 0) & (label < V)
    else:
        label = row.to(tl.int64) * 0
        label_ok = keep | True
    return keep, label, label_ok


@triton.jit
def _row_ce(zc, zsum, excl, sz_label, smoothing, v_f):
    """CE = (1 - s) nll + s (log Zc - ln2 zsum / V), nll = log1p(E / 2^sz_label) (row_math.h, row_ce;
    sz in log2 units; E the sum over the classes other than the label)."""
    log_z = LN2 * tl.log2(zc)
    ez_label = tl.exp2(sz_label)
    ratio = excl / ez_label
    # log1p(r) = log(1 + r) * r / ((1 + r) - 1): exact to a few ulps without a log1p primitive
    one_plus = 1.0 + ratio
    log1p = tl.where(one_plus == 1.0, ratio, LN2 * tl.log2(one_plus) * ratio / (one_plus - 1.0))
    nll = tl.where(ez_label > 1e-30, log1p, log_z - LN2 * sz_label)
    return (1.0 - smoothing) * nll + smoothing * (log_z - LN2 * zsum / v_f)


@triton.jit
def _store_row_results(rows_ptr, ce_ptr, kd_ptr, row, keep, ce, kd, ce_w, kd_w, HAS_LABELS: tl.constexpr):
    """The row's objective ce_w CE + kd_w KD (kd_w KD without labels) and its two parts."""
    if HAS_LABELS:
        obj = ce_w * ce + kd_w * kd
    else:
        obj = kd_w * kd
    tl.store(rows_ptr + row, tl.where(keep, obj, 0.0))
    tl.store(ce_ptr + row, tl.where(keep, ce, 0.0))
    tl.store(kd_ptr + row, tl.where(keep, kd, 0.0))


@triton.jit
def _total(t):
    """Sum of a [R, VEC] tile: inside each thread along VEC, then across threads."""
    return tl.sum(tl.sum(t, axis=1), axis=0)


@triton.jit
def _max2(a, b):
    """Maxima of two [R] vectors in one cross-warp reduction."""
    return tl.split(tl.max(tl.join(a, b), axis=0))


@triton.jit
def _min2(a, b):
    """Minima of two [R] vectors in one cross-warp reduction."""
    return tl.split(tl.min(tl.join(a, b), axis=0))


@triton.jit
def _round_bf16(g):
    """float32 -> bfloat16 with round-to-nearest-even done on the bits, then an exact conversion.

    The Triton interpreter converts float32 to bfloat16 by truncation and float64 to bfloat16
    wrongly (a Triton bug); compiled kernels round correctly and do not use this.
    """
    g32 = g.to(tl.float32)
    bits = g32.to(tl.int32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return tl.where(g32 != g32, g32, rounded).to(tl.bfloat16)


@triton.jit
def _store_grad(g_ptr, offs, valid, g, scale, keep, ZERO_EXCLUDED: tl.constexpr, ROUND_BF16: tl.constexpr,
                STREAM: tl.constexpr):
    """Store ``scale * g`` in the gradient's dtype where ``valid`` (None: all): 0 for a masked-out
    row with ``ZERO_EXCLUDED``, else nothing for it. ``STREAM``: streaming stores (``.cs``, evict
    first: the kernel never reads the gradient back)."""
    out = tl.where(keep, g * scale, 0.0)
    if not ZERO_EXCLUDED:
        keep_tile = (tl.zeros(offs.shape, dtype=tl.int32) + keep.to(tl.int32)) != 0
        if valid is None:
            valid = keep_tile
        else:
            valid = valid & keep_tile
    ptrs = g_ptr + offs
    if ROUND_BF16 and g_ptr.dtype.element_ty == tl.bfloat16:
        out = _round_bf16(out)
    else:
        out = out.to(g_ptr.dtype.element_ty)
    if STREAM:
        tl.store(ptrs, out, mask=valid, cache_modifier=".cs")
    else:
        tl.store(ptrs, out, mask=valid)


@triton.jit
def _tile(BLOCK: tl.constexpr, VEC: tl.constexpr):
    """Offsets 0..BLOCK-1 as a [BLOCK // VEC, VEC] tile of VEC-contiguous runs."""
    return tl.arange(0, BLOCK // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]


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


# ------------------------------------------------------------------------------------------------
# Register path: V <= BLOCK, the whole row pair lives in registers.
#
# Math: the module docstring; the statistics are two-pass (mean, then M2 of the deviations) over the
# registers, after the maxima and minima that give the magnitude scale. The gradients are evaluated
# from the per-element terms (g = q - p, p (log p - log q - KL)) with the chain rule through the
# mean and the std applied to the same rounded g (row_math.h, term_coefficients), as the C++
# kernels do; the Bregman form of the loss costs no memory traffic here and is selected where the
# partition-sum form cancels.
# Memory per element: reads x and y once, writes each requested gradient once; in bf16 with the
# student gradient that is 6 bytes per element, the floor of the fused op.
# ------------------------------------------------------------------------------------------------
@triton.jit
def kd_register_kernel(
    x_ptr, y_ptr, keep_ptr, scale_ptr, rows_ptr, gx_ptr, gy_ptr, labels_ptr, ce_ptr, kd_ptr,
    V, v_runs, runs_x, runs_y, scale_stride, ignore_index,
    tau_s: tl.float64, tau_t: tl.float64, eps: tl.float64, dof: tl.float64, v_float: tl.float64,
    smoothing: tl.float64, ce_weight: tl.float64, kd_weight: tl.float64,
    BLOCK: tl.constexpr, VEC: tl.constexpr, STANDARDIZE: tl.constexpr, GRAD_S: tl.constexpr,
    GRAD_T: tl.constexpr, HAS_MASK: tl.constexpr, ACC64: tl.constexpr, ZERO_EXCLUDED: tl.constexpr,
    ROUND_BF16: tl.constexpr, HAS_LABELS: tl.constexpr,
):
    """Loss (and gradients) of one row with V <= BLOCK: one read of x and y, one write per gradient."""
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    keep, label, label_ok = _row_label(labels_ptr, row, V, ignore_index, _keep_row(keep_ptr, row, HAS_MASK),
                                       HAS_LABELS)
    # row offsets in runs of VEC classes times VEC: the compiler sees VEC-aligned rows (vector access)
    x_row = x_ptr + row64 * runs_x * VEC
    y_row = y_ptr + row64 * runs_y * VEC
    ts = scalar(tau_s, ACC64)
    tt = scalar(tau_t, ACC64)
    v_f = scalar(v_float, ACC64)

    offs = _tile(BLOCK, VEC)
    valid = offs < V
    ld = offs < V * keep.to(tl.int32)  # (a product keeps V's divisibility: vectorized masked loads)
    x0_raw = tl.load(x_row, mask=keep, other=0.0)
    y0_raw = tl.load(y_row, mask=keep, other=0.0)
    x = to_acc(tl.load(x_row + offs, mask=ld, other=x0_raw), ACC64)
    y = to_acc(tl.load(y_row + offs, mask=ld, other=y0_raw), ACC64)  # lanes past V: x[0], y[0]

    dof_a = scalar(dof, ACC64)
    eps_a = scalar(eps, ACC64)
    one = scalar(1.0, ACC64)
    mx, my = _max2(tl.max(x, axis=1), tl.max(y, axis=1))
    nx, ny = _min2(tl.min(x, axis=1), tl.min(y, axis=1))
    cx = _magnitude_scale(mx, nx, ACC64)
    cy = _magnitude_scale(my, ny, ACC64)
    # exponent scales: log2(e) / tau, and / c without standardization, where u = c x (so that the
    # differences u - max u of rows of extreme magnitude cannot overflow)
    ca = LOG2E / ts
    cb = LOG2E / tt
    if STANDARDIZE:
        xs = x * cx - to_acc(x0_raw, ACC64) * cx
        ys = y * cy - to_acc(y0_raw, ACC64) * cy
        mean_x = _total(xs) / v_f
        mean_y = _total(ys) / v_f
        dx = tl.where(valid, xs - mean_x, 0.0)
        dy = tl.where(valid, ys - mean_y, 0.0)
        sigma_x = _sqrt(_total(dx * dx) / dof_a, ACC64)
        sigma_y = _sqrt(_total(dy * dy) / dof_a, ACC64)
        s_x = sigma_x + eps_a * cx
        s_y = sigma_y + eps_a * cy
        inv_sx = 1.0 / s_x
        inv_sy = 1.0 / s_y
        u = dx * inv_sx
        w = dy * inv_sy
        u_max = (mx * cx - to_acc(x0_raw, ACC64) * cx - mean_x) * inv_sx
        w_max = (my * cy - to_acc(y0_raw, ACC64) * cy - mean_y) * inv_sy
    else:
        sigma_x = one
        sigma_y = one
        s_x = cx
        s_y = cy
        dx = tl.zeros(x.shape, dtype=x.dtype)  # no standardization term: a -inf logit must not give 0 * inf
        dy = dx
        u = x * cx
        w = y * cy
        u_max = mx * cx
        w_max = my * cy
        ca = ca / cx
        cb = cb / cy

    da = (u - u_max) * ca
    db = (w - w_max) * cb
    ea = tl.where(valid, tl.exp2(da), 0.0)
    eb = tl.where(valid, tl.exp2(db), 0.0)
    delta = tl.where(eb > 0.0, db, 0.0) - da  # a class with p = 0 counts 0 (0 * -inf would be NaN)
    eh = eb * delta
    za = _total(ea)
    zb = _total(eb)
    t2 = _total(eh)
    r_za = 1.0 / za
    r_zb = 1.0 / zb
    kl, refine, neg_lz = _kl_parts(za, zb, t2, _total(tl.abs(eh)))
    kl = tl.where(refine, _total(_bregman_terms(ea, eb, delta, r_za, r_zb, neg_lz)), kl)
    ce_w = scalar(ce_weight, ACC64)
    kd_w = scalar(kd_weight, ACC64)
    smooth = scalar(smoothing, ACC64)
    ce = kl * 0.0
    if HAS_LABELS:
        # The objective's CE over the raw student row (row_math.h): sz = (x - max x) log2(e).
        sz = (x - mx) * LOG2E
        ez = tl.where(valid, tl.exp2(sz), 0.0)
        zc = _total(ez)
        r_zc = 1.0 / zc
        excl = _total(tl.where(offs == label, 0.0, ez))
        x_label = to_acc(tl.load(x_ptr + row64 * runs_x * VEC + label, mask=keep & label_ok, other=0.0), ACC64)
        sz_label = tl.where(label_ok, (x_label - mx) * LOG2E, float("nan"))
        ce = _row_ce(zc, _total(tl.where(valid, sz, 0.0)), excl, sz_label, smooth, v_f)
    _store_row_results(rows_ptr, ce_ptr, kd_ptr, row, keep, ce, ts * ts * kl, ce_w, kd_w, HAS_LABELS)

    if GRAD_S or GRAD_T:
        scale = to_acc(tl.load(scale_ptr + row64 * scale_stride), ACC64)
        kd_scale = scale * kd_w
        out_offs = row64 * v_runs * VEC + offs
        p = eb * r_zb
        if GRAD_S:
            g = ea * r_za - p
            a, b, a_mean = _term_coefficients(_total(g), _total(g * dx), sigma_x, s_x, cx, eps_a, dof_a, v_f,
                                              kd_scale * ts, STANDARDIZE)
            out = a * g - b * dx - a_mean
            if HAS_LABELS:  # + ce_w (softmax(x) - s / V - (1 - s) onehot); a NaN row for a bad label
                ce_scale = scale * ce_w
                label_grad = smooth - smooth / v_f - excl * r_zc  # row_math.h, ce_label_grad
                out += ce_scale * tl.where(offs == label, label_grad, ez * r_zc - smooth / v_f)
                out = tl.where(label_ok, out, float("nan"))
            _store_grad(gx_ptr, out_offs, valid, out, one, keep, ZERO_EXCLUDED, ROUND_BF16, False)
        if GRAD_T:
            g = tl.where(eb > 0.0, p * (delta * LN2 - LN2 * (t2 * r_zb)), 0.0)
            a, b, a_mean = _term_coefficients(_total(g), _total(g * dy), sigma_y, s_y, cy, eps_a, dof_a, v_f,
                                              kd_scale * ts * ts / tt, STANDARDIZE)
            _store_grad(gy_ptr, out_offs, valid, a * g - b * dy - a_mean, one, keep, ZERO_EXCLUDED, ROUND_BF16,
                        False)


# ------------------------------------------------------------------------------------------------
# Blocked path: any V, three passes over BLOCK-wide tiles.
#
# Pass 1 (forward): per-lane Welford (mean, M2), max and min over the tiles, merged across lanes at
#   the end (mean first, then M2 plus the spread of the lane means around it); a row whose
#   magnitude is outside the unscaled range (rare) takes pass 1 again on c x.
# Pass 2 (backward, so that the tiles pass 1 read last are re-read first, while still in L2):
#   Z_a, Z_b, T, sum eb |db - da| and the sums the gradients need (sum ea*u, eb*u, eb*w, eb*h*w),
#   accumulated per run.
# Pass 3 (forward): recompute q and p, write the gradients, and accumulate the Bregman form of the
#   loss (used where the partition-sum form cancels). Without gradients, only the rows whose loss
#   needs the Bregman form take a pass 3 (reading x and y, writing nothing).
# The V // BLOCK full tiles are loaded under a mask that is uniform over each tile (only the row's
# mask flag), so the loads are 16-byte vectors whatever V is, and need no per-class selects; the
# partial last tile, if any, is handled apart with per-class masks. Pass 2's accumulators hold one
# value per run of VEC classes (sums over a run stay inside a thread), so no loop has a barrier: the
# warps of a program stream independently. Every loop loads the next tile before working on the
# current one (two tiles in flight per thread; plain loads get no software pipelining).
# EVICT_HINTS (the launch table's column, on for the long rows): passes 1 and 2 load with evict_last
#   (the row pair is read again in pass 3; a launch without gradients re-reads only the rows that need
#   the refined loss, so its pass 2 loads evict_first, as the row's last read), pass 3 with
#   evict_first (its last use), and the gradients are stored streaming (.cs): the same bytes issued,
#   fewer of pass 3's re-reads missing L2 when the rows in flight exceed it.
# Memory per element: passes 1 and 2 read x and y, pass 3 reads them again and writes each requested
#   gradient. In bf16 with the student gradient: 14 bytes per element issued, 6 of them the floor; the
#   8 bytes of re-reads come from L2 when the rows in flight fit in it (V up to ~32k on H100), partly
#   otherwise. Without a gradient: 8 bytes per element (12 for rows that need the Bregman form).
# ------------------------------------------------------------------------------------------------
@triton.jit
def _load_tile(x_row, y_row, offs, lim, x0_raw, y0_raw, EVICT_HINTS: tl.constexpr, LAST_USE: tl.constexpr):
    """Raw (input dtype) x and y at ``offs`` where ``offs < lim``; other lanes get x[0] / y[0].

    ``EVICT_HINTS``: L2 eviction hints, ``evict_first`` for the row's last read (``LAST_USE``: pass
    3), else ``evict_last`` (passes 1 and 2: the row is read again).
    """
    if EVICT_HINTS:
        if LAST_USE:
            x = tl.load(x_row + offs, mask=offs < lim, other=x0_raw, eviction_policy="evict_first")
            y = tl.load(y_row + offs, mask=offs < lim, other=y0_raw, eviction_policy="evict_first")
        else:
            x = tl.load(x_row + offs, mask=offs < lim, other=x0_raw, eviction_policy="evict_last")
            y = tl.load(y_row + offs, mask=offs < lim, other=y0_raw, eviction_policy="evict_last")
    else:
        x = tl.load(x_row + offs, mask=offs < lim, other=x0_raw)
        y = tl.load(y_row + offs, mask=offs < lim, other=y0_raw)
    return x, y


@triton.jit
def _welford_tile(xs, ys, m, r, mean_x, m2_x, mean_y, m2_y, MASKED: tl.constexpr):
    """Pass 1 on one tile of shifted values: each lane's Welford update with weight r = 1 / count.

    Lanes past V (MASKED tiles only, ``m`` false there; ``m`` is None for full tiles) skip the update.
    """
    dx = xs - mean_x
    dy = ys - mean_y
    new_x = mean_x + dx * r
    new_y = mean_y + dy * r
    if MASKED:
        m2_x = tl.where(m, m2_x + dx * (xs - new_x), m2_x)
        m2_y = tl.where(m, m2_y + dy * (ys - new_y), m2_y)
        mean_x = tl.where(m, new_x, mean_x)
        mean_y = tl.where(m, new_y, mean_y)
    else:
        m2_x = m2_x + dx * (xs - new_x)
        m2_y = m2_y + dy * (ys - new_y)
        mean_x = new_x
        mean_y = new_y
    return mean_x, m2_x, mean_y, m2_y


@triton.jit
def _lane_merge(n_l, mean_l, m2_l):
    """(mean, M2) of a row from per-lane Welford summaries: mean = sum(n mean) / sum(n), then
    M2 = sum(M2_l + n_l (mean_l - mean)^2); two passes over the lanes, both pairwise sums."""
    mean = _total(n_l * mean_l) / _total(n_l)
    d = mean_l - mean
    return mean, _total(m2_l + n_l * d * d)


@triton.jit
def _row_stats(x_row, y_row, x0_raw, y0_raw, cx, cy, V, v_load, num_full, offs0, BLOCK: tl.constexpr,
               STANDARDIZE: tl.constexpr, ACC64: tl.constexpr, EVICT_HINTS: tl.constexpr):
    """Pass 1: (mean, M2, max, min) of c x - c x0 and of c y - c y0 (max and min of c x, c y);
    unstandardized: mean = M2 = 0, max and min of x and y. The next full tile is loaded ahead.

    Lanes past V hold x[0], neutral for the max and min (and 0 after the shift, neutral for sums).
    ``num_full`` is 0 for a masked-out row (no loads).
    """
    v_full = num_full * BLOCK
    zero = to_acc(tl.zeros(offs0.shape, dtype=tl.float32), ACC64)
    if STANDARDIZE:
        x0 = to_acc(x0_raw, ACC64) * cx
        y0 = to_acc(y0_raw, ACC64) * cy
    else:
        x0 = tl.sum(tl.sum(zero, axis=1), axis=0)
        y0 = x0
    mean_x = zero
    m2_x = zero
    mean_y = zero
    m2_y = zero
    max_x = zero + float("-inf")
    max_y = max_x
    min_x = zero + float("inf")
    min_y = min_x
    one = scalar(1.0, ACC64)
    x_next, y_next = _load_tile(x_row, y_row, offs0, v_full, x0_raw, y0_raw, EVICT_HINTS, False)
    for blk in range(0, num_full):
        xc = to_acc(x_next, ACC64) * cx
        yc = to_acc(y_next, ACC64) * cy
        # prefetch the next full tile (none after the last: masked, no traffic) before this one's math
        x_next, y_next = _load_tile(x_row, y_row, (blk + 1) * BLOCK + offs0, v_full, x0_raw, y0_raw,
                                    EVICT_HINTS, False)
        max_x = tl.maximum(max_x, xc)
        max_y = tl.maximum(max_y, yc)
        min_x = tl.minimum(min_x, xc)
        min_y = tl.minimum(min_y, yc)
        if STANDARDIZE:
            mean_x, m2_x, mean_y, m2_y = _welford_tile(xc - x0, yc - y0, None, 1.0 / (one + blk),
                                                       mean_x, m2_x, mean_y, m2_y, False)
    if num_full * BLOCK < V:
        offs = num_full * BLOCK + offs0
        x, y = _load_tile(x_row, y_row, offs, v_load, x0_raw, y0_raw, EVICT_HINTS, False)
        xc = to_acc(x, ACC64) * cx
        yc = to_acc(y, ACC64) * cy
        max_x = tl.maximum(max_x, xc)
        max_y = tl.maximum(max_y, yc)
        min_x = tl.minimum(min_x, xc)
        min_y = tl.minimum(min_y, yc)
        if STANDARDIZE:
            mean_x, m2_x, mean_y, m2_y = _welford_tile(xc - x0, yc - y0, offs < V, 1.0 / (one + num_full),
                                                       mean_x, m2_x, mean_y, m2_y, True)
    max_x, max_y = _max2(tl.max(max_x, axis=1), tl.max(max_y, axis=1))
    min_x, min_y = _min2(tl.min(min_x, axis=1), tl.min(min_y, axis=1))
    if STANDARDIZE:
        # every lane saw the full tiles, and the partial last tile where it lies inside the row
        n_l = to_acc(num_full + (offs0 + num_full * BLOCK < V).to(tl.int32), ACC64)
        mean_x, m2_x = _lane_merge(n_l, mean_x, m2_x)
        mean_y, m2_y = _lane_merge(n_l, mean_y, m2_y)
    else:
        mean_x = x0
        m2_x = x0
        mean_y = x0
        m2_y = x0
    return mean_x, m2_x, max_x, min_x, mean_y, m2_y, max_y, min_y


@triton.jit
def _std_args(x, y, x0, y0, cx, cy, mean_x, mean_y, inv_sx, inv_sy, u_max, w_max, ca, cb,
              STANDARDIZE: tl.constexpr):
    """(u, w, da, db) of a tile: the standardized logits and the log2-unit exponents."""
    if STANDARDIZE:
        u = ((x * cx - x0) - mean_x) * inv_sx
        w = ((y * cy - y0) - mean_y) * inv_sy
    else:
        u = x * cx
        w = y * cy
    return u, w, (u - u_max) * ca, (w - w_max) * cb


@triton.jit
def _ce_tile(x, m, offs, label, raw_max, zc_r, zsum_r, excl_r):
    """The objective's CE sums of one tile (raw x): e^sz, sz, and e^sz off the label; sz = (x - max x) log2(e)."""
    sz = (x - raw_max) * LOG2E
    ez = tl.exp2(sz)
    if m is not None:
        ez = tl.where(m, ez, 0.0)
        sz = tl.where(m, sz, 0.0)
    return (zc_r + tl.sum(ez, axis=1), zsum_r + tl.sum(sz, axis=1),
            excl_r + tl.sum(tl.where(offs == label, 0.0, ez), axis=1))


@triton.jit
def _sums_tile(x, y, m, x0, y0, cx, cy, mean_x, mean_y, inv_sx, inv_sy, u_max, w_max, ca, cb,
               za_r, zb_r, t2_r, tabs_r, sau_r, sbu_r, sbw_r, tbw_r,
               STANDARDIZE: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, MASKED: tl.constexpr):
    """Pass 2 on one tile: add its partition sums (and the gradient sums) to the per-run accumulators.

    ``m`` (lanes inside the row) is used by MASKED tiles only; full tiles pass None.
    """
    u, w, da, db = _std_args(x, y, x0, y0, cx, cy, mean_x, mean_y, inv_sx, inv_sy, u_max, w_max, ca, cb,
                             STANDARDIZE)
    ea = tl.exp2(da)
    eb = tl.exp2(db)
    if MASKED:
        ea = tl.where(m, ea, 0.0)
        eb = tl.where(m, eb, 0.0)
    eh = eb * (tl.where(eb > 0.0, db, 0.0) - da)
    za_r += tl.sum(ea, axis=1)
    zb_r += tl.sum(eb, axis=1)
    t2_r += tl.sum(eh, axis=1)
    tabs_r += tl.sum(tl.abs(eh), axis=1)
    if STANDARDIZE:
        if GRAD_S:
            sau_r += tl.sum(ea * u, axis=1)
            sbu_r += tl.sum(eb * u, axis=1)
        if GRAD_T:
            sbw_r += tl.sum(eb * w, axis=1)
            tbw_r += tl.sum(eh * w, axis=1)
    return za_r, zb_r, t2_r, tabs_r, sau_r, sbu_r, sbw_r, tbw_r


@triton.jit
def _grad_tile(x, y, m, offs, out_offs, gx_ptr, gy_ptr, scale_x, scale_y, keep, x0, y0, cx, cy, mean_x, mean_y,
               inv_sx, inv_sy, u_max, w_max, ca, cb, r_za, r_zb, ts, kt, t2n, coef_x, coef_y, neg_lz, br_r,
               raw_max, r_zc, ce_scale, ce_b, ce_l, label, label_ok,
               STANDARDIZE: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr,
               ZERO_EXCLUDED: tl.constexpr, ROUND_BF16: tl.constexpr, HAS_LABELS: tl.constexpr,
               EVICT_HINTS: tl.constexpr):
    """Pass 3 on one tile: write ``scale * dL/dx`` and/or ``scale * dL/dy`` (t2n = T / Z_b), and add
    the tile's Bregman terms of the loss to ``br_r``. With labels the student gradient also gets the
    CE term ``ce_scale e^sz / Zc - ce_b``, and ``ce_l`` at the label (``scale_x`` holds the KD
    weight; ce_b = ce_scale s / V, ce_l = ce_scale (s - s / V - E / Zc); a NaN row for a label
    outside [0, V)).

    ``m`` masks the stores of the partial tile; full tiles pass None (unmasked vector stores).
    ``EVICT_HINTS``: the gradients are stored streaming.
    """
    u, w, da, db = _std_args(x, y, x0, y0, cx, cy, mean_x, mean_y, inv_sx, inv_sy, u_max, w_max, ca, cb,
                             STANDARDIZE)
    ea = tl.exp2(da)
    eb = tl.exp2(db)
    if m is not None:
        ea = tl.where(m, ea, 0.0)
        eb = tl.where(m, eb, 0.0)
    delta = tl.where(eb > 0.0, db, 0.0) - da
    br_r += tl.sum(_bregman_terms(ea, eb, delta, r_za, r_zb, neg_lz), axis=1)
    p = eb * r_zb
    if GRAD_S:
        g = ts * (ea * r_za - p)
        if STANDARDIZE:
            g = g * inv_sx - u * coef_x
        g = g * scale_x
        if HAS_LABELS:
            g += tl.where(offs == label, ce_l, ce_scale * tl.exp2((x - raw_max) * LOG2E) * r_zc - ce_b)
            g = tl.where(label_ok, g, float("nan"))
        _store_grad(gx_ptr, out_offs, m, g, 1.0, keep, ZERO_EXCLUDED, ROUND_BF16, EVICT_HINTS)
    if GRAD_T:
        g = tl.where(eb > 0.0, kt * p * (delta - t2n), 0.0)
        if STANDARDIZE:
            g = g * inv_sy - w * coef_y
        _store_grad(gy_ptr, out_offs, m, g, scale_y, keep, ZERO_EXCLUDED, ROUND_BF16, EVICT_HINTS)
    return br_r


@triton.jit
def _bregman_tile(x, y, m, x0, y0, cx, cy, mean_x, mean_y, inv_sx, inv_sy, u_max, w_max, ca, cb, r_za, r_zb,
                  neg_lz, br_r, STANDARDIZE: tl.constexpr):
    """The Bregman terms of one tile (the loss-only pass 3 of rows whose loss needs them)."""
    u, w, da, db = _std_args(x, y, x0, y0, cx, cy, mean_x, mean_y, inv_sx, inv_sy, u_max, w_max, ca, cb,
                             STANDARDIZE)
    ea = tl.exp2(da)
    eb = tl.exp2(db)
    if m is not None:
        ea = tl.where(m, ea, 0.0)
        eb = tl.where(m, eb, 0.0)
    delta = tl.where(eb > 0.0, db, 0.0) - da
    return br_r + tl.sum(_bregman_terms(ea, eb, delta, r_za, r_zb, neg_lz), axis=1)


@triton.jit
def kd_blocked_kernel(
    x_ptr, y_ptr, keep_ptr, scale_ptr, rows_ptr, gx_ptr, gy_ptr, labels_ptr, ce_ptr, kd_ptr,
    V, v_runs, runs_x, runs_y, scale_stride, ignore_index,
    tau_s: tl.float64, tau_t: tl.float64, eps: tl.float64, dof: tl.float64, v_float: tl.float64,
    smoothing: tl.float64, ce_weight: tl.float64, kd_weight: tl.float64,
    BLOCK: tl.constexpr, VEC: tl.constexpr, STANDARDIZE: tl.constexpr, GRAD_S: tl.constexpr,
    GRAD_T: tl.constexpr, HAS_MASK: tl.constexpr, ACC64: tl.constexpr, ZERO_EXCLUDED: tl.constexpr,
    ROUND_BF16: tl.constexpr, HAS_LABELS: tl.constexpr, EVICT_HINTS: tl.constexpr,
):
    """Loss (and gradients) of one row of any length: three passes over BLOCK-wide tiles.

    ``EVICT_HINTS``: L2 eviction hints (the launch table's column; the block comment above).
    """
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    keep, label, label_ok = _row_label(labels_ptr, row, V, ignore_index, _keep_row(keep_ptr, row, HAS_MASK),
                                       HAS_LABELS)
    # row offsets in runs of VEC classes times VEC: the compiler sees VEC-aligned rows (vector access)
    x_row = x_ptr + row64 * runs_x * VEC
    y_row = y_ptr + row64 * runs_y * VEC
    ts = scalar(tau_s, ACC64)
    tt = scalar(tau_t, ACC64)
    ca = LOG2E / ts
    cb = LOG2E / tt
    one = scalar(1.0, ACC64)
    offs0 = _tile(BLOCK, VEC)
    keep_i = keep.to(tl.int32)
    # A masked-out row runs no loop of passes 1 and 2 (and no pass 3 when it writes nothing): its
    # full-tile count is 0. Load limits are 0 for it: V for the partial tile; for the full tiles a
    # multiple of BLOCK, so that their mask is uniform over each 16-byte vector (vectorized loads).
    num_full = (V // BLOCK) * keep_i
    has_tail = (num_full * BLOCK < V) & keep
    v_load = V * keep_i
    v_full = num_full * BLOCK
    x0_raw = tl.load(x_row, mask=keep, other=0.0)
    y0_raw = tl.load(y_row, mask=keep, other=0.0)

    # Pass 1: statistics, maxima and minima (again on c x, c y for a row of extreme magnitude).
    mean_x, m2_x, max_x, min_x, mean_y, m2_y, max_y, min_y = _row_stats(
        x_row, y_row, x0_raw, y0_raw, one, one, V, v_load, num_full, offs0, BLOCK, STANDARDIZE, ACC64, EVICT_HINTS)
    cx = _magnitude_scale(max_x, min_x, ACC64)
    cy = _magnitude_scale(max_y, min_y, ACC64)
    if STANDARDIZE:
        if (cx != 1.0) | (cy != 1.0):
            mean_x, m2_x, max_x, min_x, mean_y, m2_y, max_y, min_y = _row_stats(
                x_row, y_row, x0_raw, y0_raw, cx, cy, V, v_load, num_full, offs0, BLOCK, STANDARDIZE, ACC64,
                EVICT_HINTS)
        dof_a = scalar(dof, ACC64)
        eps_a = scalar(eps, ACC64)
        x0 = to_acc(x0_raw, ACC64) * cx
        y0 = to_acc(y0_raw, ACC64) * cy
        sigma_x = _sqrt(m2_x / dof_a, ACC64)
        sigma_y = _sqrt(m2_y / dof_a, ACC64)
        inv_sx = 1.0 / (sigma_x + eps_a * cx)
        inv_sy = 1.0 / (sigma_y + eps_a * cy)
        u_max = (max_x - x0 - mean_x) * inv_sx
        w_max = (max_y - y0 - mean_y) * inv_sy
        raw_max = max_x / cx  # exact: cx is a power of two
    else:  # u = c x (_std_args), exponents (u - max u) log2(e) / (tau c): no overflow of x - max x
        x0 = mean_x
        y0 = mean_x
        sigma_x = mean_x
        sigma_y = mean_x
        inv_sx = one
        inv_sy = one
        u_max = max_x * cx
        w_max = max_y * cy
        ca = ca / cx
        cb = cb / cy
        raw_max = max_x

    # Pass 2, last tile first: the partial tile, then the full tiles backwards.
    zero = to_acc(tl.zeros([BLOCK // VEC], dtype=tl.float32), ACC64)
    za_r = zero
    zb_r = zero
    t2_r = zero
    tabs_r = zero
    sau_r = zero
    sbu_r = zero
    sbw_r = zero
    tbw_r = zero
    zc_r = zero
    zsum_r = zero
    excl_r = zero
    if has_tail:
        offs = num_full * BLOCK + offs0
        x, y = _load_tile(x_row, y_row, offs, v_load, x0_raw, y0_raw, EVICT_HINTS, not (GRAD_S or GRAD_T))
        za_r, zb_r, t2_r, tabs_r, sau_r, sbu_r, sbw_r, tbw_r = _sums_tile(
            to_acc(x, ACC64), to_acc(y, ACC64), offs < V, x0, y0, cx, cy, mean_x, mean_y, inv_sx, inv_sy,
            u_max, w_max, ca, cb, za_r, zb_r, t2_r, tabs_r, sau_r, sbu_r, sbw_r, tbw_r, STANDARDIZE, GRAD_S,
            GRAD_T, True)
        if HAS_LABELS:
            zc_r, zsum_r, excl_r = _ce_tile(to_acc(x, ACC64), offs < V, offs, label, raw_max, zc_r, zsum_r, excl_r)
    x_next, y_next = _load_tile(x_row, y_row, tl.maximum(num_full - 1, 0) * BLOCK + offs0, v_full,
                                x0_raw, y0_raw, EVICT_HINTS, not (GRAD_S or GRAD_T))
    for i in range(0, num_full):
        x = to_acc(x_next, ACC64)
        y = to_acc(y_next, ACC64)
        # prefetch the tile before this one; none before tile 0 (limit 0: no traffic)
        prev = tl.maximum(num_full - 2 - i, 0) * BLOCK + offs0
        x_next, y_next = _load_tile(x_row, y_row, prev, v_full * (i + 1 < num_full).to(tl.int32),
                                    x0_raw, y0_raw, EVICT_HINTS, not (GRAD_S or GRAD_T))
        za_r, zb_r, t2_r, tabs_r, sau_r, sbu_r, sbw_r, tbw_r = _sums_tile(
            x, y, None, x0, y0, cx, cy, mean_x, mean_y, inv_sx, inv_sy, u_max, w_max, ca, cb,
            za_r, zb_r, t2_r, tabs_r, sau_r, sbu_r, sbw_r, tbw_r, STANDARDIZE, GRAD_S, GRAD_T, False)
        if HAS_LABELS:
            tile = (num_full - 1 - i) * BLOCK + offs0
            zc_r, zsum_r, excl_r = _ce_tile(x, None, tile, label, raw_max, zc_r, zsum_r, excl_r)
    ce_w = scalar(ce_weight, ACC64)
    kd_w = scalar(kd_weight, ACC64)
    smooth = scalar(smoothing, ACC64)
    v_f = scalar(v_float, ACC64)
    zc = tl.sum(zc_r, axis=0)
    r_zc = 1.0 / zc
    ce = zc * 0.0
    excl = ce
    if HAS_LABELS:  # the objective's CE (row_math.h, row_ce)
        x_label = to_acc(tl.load(x_row + label, mask=keep & label_ok, other=0.0), ACC64)
        sz_label = tl.where(label_ok, (x_label - raw_max) * LOG2E, float("nan"))
        excl = tl.sum(excl_r, axis=0)
        ce = _row_ce(zc, tl.sum(zsum_r, axis=0), excl, sz_label, smooth, v_f)
    za = tl.sum(za_r, axis=0)
    zb = tl.sum(zb_r, axis=0)
    t2 = tl.sum(t2_r, axis=0)
    r_za = 1.0 / za
    r_zb = 1.0 / zb
    kl, refine, neg_lz = _kl_parts(za, zb, t2, tl.sum(tabs_r, axis=0))
    br_r = zero

    # Pass 3: the gradients (and the Bregman terms), full tiles forward, then the partial tile; for
    # the loss alone, only rows whose loss needs the Bregman form.
    if GRAD_S or GRAD_T:
        # a masked-out row: every tile stores zeros (ZERO_EXCLUDED), or there is no tile at all
        if ZERO_EXCLUDED:
            num_pass3 = V // BLOCK
            tail3 = num_pass3 * BLOCK < V
        else:
            num_pass3 = num_full
            tail3 = has_tail
        scale = to_acc(tl.load(scale_ptr + row64 * scale_stride), ACC64)
        kd_scale = scale * kd_w
        ce_scale = scale * ce_w
        # d/dx = c d/d(c x) with standardization; without it the scale only formed the exponents
        gcx = cx if STANDARDIZE else one
        gcy = cy if STANDARDIZE else one
        ce_b = ce_scale * smooth / v_f
        ce_l = ce_scale * (smooth - smooth / v_f - excl * r_zc)  # row_math.h, ce_label_grad
        kt = ts * ts / tt * LN2
        coef_x = sigma_x
        coef_y = sigma_y
        if STANDARDIZE:
            if GRAD_S:
                s_u = ts * (tl.sum(sau_r, axis=0) * r_za - tl.sum(sbu_r, axis=0) * r_zb)
                coef_x = tl.where(sigma_x > 0.0, s_u / (dof_a * sigma_x), 0.0)
            if GRAD_T:
                s_w = kt * r_zb * (tl.sum(tbw_r, axis=0) - t2 * r_zb * tl.sum(sbw_r, axis=0))
                coef_y = tl.where(sigma_y > 0.0, s_w / (dof_a * sigma_y), 0.0)
        t2n = t2 * r_zb
        out_row = row64 * v_runs * VEC
        x_next, y_next = _load_tile(x_row, y_row, offs0, v_full, x0_raw, y0_raw, EVICT_HINTS, True)
        for blk in range(0, num_pass3):
            offs = blk * BLOCK + offs0
            x = to_acc(x_next, ACC64)
            y = to_acc(y_next, ACC64)
            x_next, y_next = _load_tile(x_row, y_row, offs + BLOCK, v_full, x0_raw, y0_raw, EVICT_HINTS, True)
            br_r = _grad_tile(x, y, None, offs, out_row + offs, gx_ptr, gy_ptr, kd_scale * gcx, kd_scale * gcy, keep,
                              x0, y0, cx, cy, mean_x, mean_y, inv_sx, inv_sy, u_max, w_max, ca, cb, r_za, r_zb, ts,
                              kt, t2n, coef_x, coef_y, neg_lz, br_r, raw_max, r_zc, ce_scale, ce_b, ce_l, label,
                              label_ok, STANDARDIZE, GRAD_S, GRAD_T, ZERO_EXCLUDED, ROUND_BF16, HAS_LABELS,
                              EVICT_HINTS)
        if tail3:
            offs = num_pass3 * BLOCK + offs0
            x, y = _load_tile(x_row, y_row, offs, v_load, x0_raw, y0_raw, EVICT_HINTS, True)
            br_r = _grad_tile(to_acc(x, ACC64), to_acc(y, ACC64), offs < V, offs, out_row + offs, gx_ptr, gy_ptr,
                              kd_scale * gcx, kd_scale * gcy, keep, x0, y0, cx, cy, mean_x, mean_y, inv_sx, inv_sy,
                              u_max, w_max, ca, cb, r_za, r_zb, ts, kt, t2n, coef_x, coef_y, neg_lz, br_r, raw_max,
                              r_zc, ce_scale, ce_b, ce_l, label, label_ok, STANDARDIZE, GRAD_S, GRAD_T,
                              ZERO_EXCLUDED, ROUND_BF16, HAS_LABELS, EVICT_HINTS)
    else:
        num_pass3 = num_full * refine.to(tl.int32)
        x_next, y_next = _load_tile(x_row, y_row, offs0, num_pass3 * BLOCK, x0_raw, y0_raw, EVICT_HINTS, True)
        for blk in range(0, num_pass3):
            x = to_acc(x_next, ACC64)
            y = to_acc(y_next, ACC64)
            x_next, y_next = _load_tile(x_row, y_row, (blk + 1) * BLOCK + offs0, num_pass3 * BLOCK, x0_raw,
                                        y0_raw, EVICT_HINTS, True)
            br_r = _bregman_tile(x, y, None, x0, y0, cx, cy, mean_x, mean_y, inv_sx, inv_sy, u_max, w_max, ca, cb,
                                 r_za, r_zb, neg_lz, br_r, STANDARDIZE)
        if has_tail & refine:
            offs = num_full * BLOCK + offs0
            x, y = _load_tile(x_row, y_row, offs, v_load, x0_raw, y0_raw, EVICT_HINTS, True)
            br_r = _bregman_tile(to_acc(x, ACC64), to_acc(y, ACC64), offs < V, x0, y0, cx, cy, mean_x, mean_y,
                                 inv_sx, inv_sy, u_max, w_max, ca, cb, r_za, r_zb, neg_lz, br_r, STANDARDIZE)
    kl = tl.where(refine, tl.sum(br_r, axis=0), kl)
    _store_row_results(rows_ptr, ce_ptr, kd_ptr, row, keep, ce, ts * ts * kl, ce_w, kd_w, HAS_LABELS)


# ------------------------------------------------------------------------------------------------
# In-place row scaling of a saved gradient: grad[r] *= scale[r].
#
# Each program owns one BLOCK-wide tile of one row and loads the row's scale first; a scale of
# exactly 1.0 (the common scalar ``loss.backward()``) returns without touching the gradient.
# Memory per element: 0 bytes when the scale is 1, else read + write of the gradient (2 * 4 bytes
# in float32; low-precision gradients are recomputed instead, see ops.py).
# ------------------------------------------------------------------------------------------------
@triton.jit
def scale_rows_kernel(g_ptr, s_ptr, V, stride_g, stride_s, BLOCK: tl.constexpr, ACC64: tl.constexpr):
    """``grad[row, tile] *= scale[row]``, skipped on the device when the scale is exactly 1."""
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    s = to_acc(tl.load(s_ptr + row * stride_s), ACC64)
    if s != 1.0:
        offs = tile * BLOCK + tl.arange(0, BLOCK)
        m = offs < V
        ptrs = g_ptr + row * stride_g + offs
        g = to_acc(tl.load(ptrs, mask=m, other=0.0), ACC64)
        tl.store(ptrs, (g * s).to(g_ptr.dtype.element_ty), mask=m)
