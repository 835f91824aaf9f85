"""Triton kernels of the fused (logit-standardized) KD loss and of the in-place row scaling.

One program handles one row pair (student row ``x``, teacher row ``y``, V classes each). The math is
DESIGN.md section 1; in the notation used here (all sums over the V classes of the row)::

    xs      = x - x[0]                       # shift by the first element: exact for rows like
                                             # 1000 + 0.01 * randn, and exactly 0 for constant rows
    mu      = mean(xs)   sigma = sqrt(sum((xs - mu)^2) / (V - c))   s = sigma + eps
    u       = (xs - mu) / s                  # the standardized student (u = x without standardize)
    da      = (u - max(u)) * log2(e) / tau_s # a - max(a) in base 2, <= 0 exactly (rounding is
                                             # monotone, and max(u) = (max(xs) - mu) / s)
    ea      = 2^da   Za = sum(ea)            # q = ea / Za       (teacher: w, db, eb, Zb, p likewise)
    T       = sum(eb * (db - da))            # (a class with eb == 0 counts 0, as in kl_div)
    KL      = ln2 * (T / Zb + log2(Za / Zb)) # = sum p (log p - log q)
    loss    = tau_s^2 * KL
    g_u     = tau_s * (q - p)                                    S_u = sum(g_u * u)
    dL/dx   = g_u / s - u * S_u / ((V - c) * sigma)              (second term 0 when sigma == 0)
    g_w     = tau_s^2 / tau_t * p * ln2 * (db - da - T / Zb)     S_w = sum(g_w * w)
    dL/dy   = g_w / s_y - w * S_w / ((V - c) * sigma_y)

Without standardization ``u = x``, ``s = 1`` and the second gradient terms vanish. Gradients are
written multiplied by ``grad_scale``.

Tiles are 2-d, ``[BLOCK // VEC, VEC]``: each thread owns runs of VEC contiguous classes (one 16-byte
access of the wider input when the rows are aligned to it), the same layout for a bf16 student and a
float32 teacher, and the sums over axis 1 stay inside a thread. Row strides arrive in units of VEC
(``runs_x = stride_x / VEC``, ``v_runs = V / VEC`` for the gradient rows), which tells the compiler
that every row starts VEC-aligned; the launcher lowers VEC (down to 1: consecutive threads, scalar
coalesced accesses) when the strides or V do not allow it. Lanes past V are loaded as ``x[0]``: a
neutral value for the shifted sums (it adds 0) and for the max; they are excluded where it matters
(M2, the exponentials).

Masked-out rows load nothing (every load's limit is 0 for them), store loss 0 and gradient 0, and
every result is selected with ``tl.where`` so that the garbage computed for them never reaches
memory.

Accumulation is float32 (float64 when ``ACC64``: an input is float64). Exponentials use ``exp2``
with the ``log2(e)`` factor folded into the temperature scale, logarithms use ``log2``.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _to_acc(x, ACC64: tl.constexpr):
    """``x`` converted to the accumulation dtype (float64 if ``ACC64`` else float32)."""
    if ACC64:
        r = x.to(tl.float64)
    else:
        r = x.to(tl.float32)
    return r


@triton.jit
def _scalar(v, ACC64: tl.constexpr):
    """A float kernel argument in the accumulation dtype, as a scalar tensor.

    Compiled, ``v`` is a float64 argument; interpreted, it is a Python float (combined with a tensor
    it takes the tensor's dtype, so float64 keeps every bit there too).
    """
    return tl.sum(_to_acc(_to_acc(tl.zeros([1], dtype=tl.float32), ACC64) + v, ACC64), axis=0)


@triton.jit
def _sqrt(x, ACC64: tl.constexpr):
    """IEEE-rounded square root (``tl.sqrt`` is approximate in float32, exact in float64)."""
    if ACC64:
        r = tl.sqrt(x)
    else:
        r = tl.sqrt_rn(x)
    return r


@triton.jit
def _keep_row(keep_ptr, row, HAS_MASK: tl.constexpr):
    """The row's mask flag as an int1 scalar (always true without a mask)."""
    if HAS_MASK:
        keep = tl.load(keep_ptr + row) != 0
    else:
        keep = row >= 0
    return keep


@triton.jit
def _total(t):
    """Sum of a [R, VEC] tile: inside each thread along VEC, then across threads."""
    return tl.sum(tl.sum(t, axis=1), axis=0)


@triton.jit
def _max2(a, b):
    """Maxima of two [R] vectors in one cross-warp reduction."""
    return tl.split(tl.max(tl.join(a, b), axis=0))


@triton.jit
def _store_grad(g_ptr, offs, valid, g, scale, keep):
    """Store ``scale * g`` (0 for a masked-out row) in the gradient's dtype where ``valid`` (None: all)."""
    out = tl.where(keep, g * scale, 0.0)
    tl.store(g_ptr + offs, out.to(g_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _tile(BLOCK: tl.constexpr, VEC: tl.constexpr):
    """Offsets 0..BLOCK-1 as a [BLOCK // VEC, VEC] tile of VEC-contiguous runs."""
    return tl.arange(0, BLOCK // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]


# ------------------------------------------------------------------------------------------------
# Register path: V <= BLOCK, the whole row pair lives in registers.
#
# Math: the module docstring; the statistics are two-pass (mean, then M2 of the deviations) over the
# registers. The two maxima share one cross-warp reduction (order-free); every sum is its own
# tl.sum, a pairwise tree on the GPU and under the interpreter alike (a joined multi-value sum
# would save barrier rounds on the GPU but sums sequentially under the interpreter).
# Memory per element: reads x and y once, writes each requested gradient once; in bf16 with the
# student gradient that is 6 bytes per element, the floor of the fused op.
# ------------------------------------------------------------------------------------------------
@triton.jit
def kd_register_kernel(
    x_ptr, y_ptr, keep_ptr, scale_ptr, rows_ptr, gx_ptr, gy_ptr,
    V, v_runs, runs_x, runs_y,
    tau_s: tl.float64, tau_t: tl.float64, eps: tl.float64, dof: tl.float64, v_float: tl.float64,
    BLOCK: tl.constexpr, VEC: tl.constexpr, STANDARDIZE: tl.constexpr, GRAD_S: tl.constexpr,
    GRAD_T: tl.constexpr, HAS_MASK: tl.constexpr, ACC64: tl.constexpr,
):
    """Loss (and gradients) of one row with V <= BLOCK: one read of x and y, one write per gradient."""
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    keep = _keep_row(keep_ptr, row, HAS_MASK)
    # row offsets in runs of VEC classes times VEC: the compiler sees VEC-aligned rows (vector access)
    x_row = x_ptr + row64 * runs_x * VEC
    y_row = y_ptr + row64 * runs_y * VEC
    ts = _scalar(tau_s, ACC64)
    tt = _scalar(tau_t, ACC64)

    offs = _tile(BLOCK, VEC)
    valid = offs < V
    ld = offs < V * keep.to(tl.int32)  # (a product keeps V's divisibility: vectorized masked loads)
    x0_raw = tl.load(x_row, mask=keep, other=0.0)
    y0_raw = tl.load(y_row, mask=keep, other=0.0)
    x = _to_acc(tl.load(x_row + offs, mask=ld, other=x0_raw), ACC64)
    y = _to_acc(tl.load(y_row + offs, mask=ld, other=y0_raw), ACC64)

    if STANDARDIZE:
        dof_a = _scalar(dof, ACC64)
        eps_a = _scalar(eps, ACC64)
        v_f = _scalar(v_float, ACC64)
        xs = x - _to_acc(x0_raw, ACC64)
        ys = y - _to_acc(y0_raw, ACC64)
        sx = _total(xs)
        sy = _total(ys)
        mx, my = _max2(tl.max(xs, axis=1), tl.max(ys, axis=1))
        mean_x = sx / v_f
        mean_y = sy / v_f
        dx = tl.where(valid, xs - mean_x, 0.0)
        dy = tl.where(valid, ys - mean_y, 0.0)
        m2x = _total(dx * dx)
        m2y = _total(dy * dy)
        sigma_x = _sqrt(m2x / dof_a, ACC64)
        sigma_y = _sqrt(m2y / dof_a, ACC64)
        inv_sx = 1.0 / (sigma_x + eps_a)
        inv_sy = 1.0 / (sigma_y + eps_a)
        u = dx * inv_sx
        w = dy * inv_sy
        u_max = (mx - mean_x) * inv_sx
        w_max = (my - mean_y) * inv_sy
    else:
        u = x
        w = y
        u_max, w_max = _max2(tl.max(x, axis=1), tl.max(y, axis=1))

    da = (u - u_max) * (LOG2E / ts)
    db = (w - w_max) * (LOG2E / tt)
    ea = tl.where(valid, tl.exp2(da), 0.0)
    eb = tl.where(valid, tl.exp2(db), 0.0)
    eh = eb * (tl.where(eb > 0.0, db, 0.0) - da)
    za = _total(ea)
    zb = _total(eb)
    t2 = _total(eh)
    r_za = 1.0 / za
    r_zb = 1.0 / zb
    loss = ts * ts * (LN2 * (t2 * r_zb + tl.log2(za * r_zb)))
    tl.store(rows_ptr + row, tl.where(keep, loss, 0.0))

    if GRAD_S or GRAD_T:
        scale = _to_acc(tl.load(scale_ptr), ACC64)
        out_offs = row64 * v_runs * VEC + offs
        p = eb * r_zb
        gu = ts * (ea * r_za - p)
        gw = (ts * ts / tt * LN2) * p * (db - da - t2 * r_zb)
        if GRAD_S:
            if STANDARDIZE:
                s_u = _total(gu * u)
                gu = gu * inv_sx - u * tl.where(sigma_x > 0.0, s_u / (dof_a * sigma_x), 0.0)
            _store_grad(gx_ptr, out_offs, valid, gu, scale, keep)
        if GRAD_T:
            if STANDARDIZE:
                s_w = _total(gw * w)
                gw = gw * inv_sy - w * tl.where(sigma_y > 0.0, s_w / (dof_a * sigma_y), 0.0)
            _store_grad(gy_ptr, out_offs, valid, gw, scale, keep)


# ------------------------------------------------------------------------------------------------
# Blocked path: any V, three passes over BLOCK-wide tiles.
#
# Pass 1 (forward): per-lane Welford (mean, M2) and max over the tiles, merged across lanes at the
#   end (mean first, then M2 plus the spread of the lane means around it).
# Pass 2 (backward, so that the tiles pass 1 read last are re-read first, while still in L2):
#   Z_a, Z_b, T and the sums the gradients need (sum ea*u, eb*u, eb*w, eb*h*w), accumulated per run.
# Pass 3 (forward): recompute q and p, write the gradients. Skipped when no gradient is requested.
# The V // BLOCK full tiles are loaded under a mask that is uniform over each tile (only the row's
# mask flag), so the loads are 16-byte vectors whatever V is, and need no per-class selects; the
# partial last tile, if any, is handled apart with per-class masks. Pass 2's accumulators hold one
# value per run of VEC classes (sums over a run stay inside a thread), so no loop has a barrier: the
# warps of a program stream independently. Every loop loads the next tile before working on the
# current one (two tiles in flight per thread; plain loads get no software pipelining).
# Memory per element: passes 1 and 2 read x and y, pass 3 reads them again and writes each requested
#   gradient. In bf16 with the student gradient: 14 bytes per element issued, 6 of them the floor; the
#   8 bytes of re-reads come from L2 when the rows in flight fit in it (V up to ~32k on H100), partly
#   otherwise. Without a gradient: 8 bytes per element.
# ------------------------------------------------------------------------------------------------
@triton.jit
def _load_tile(x_row, y_row, offs, lim, x0_raw, y0_raw):
    """Raw (input dtype) x and y at ``offs`` where ``offs < lim``; other lanes get x[0] / y[0]."""
    x = tl.load(x_row + offs, mask=offs < lim, other=x0_raw)
    y = tl.load(y_row + offs, mask=offs < lim, other=y0_raw)
    return x, y


@triton.jit
def _welford_tile(xs, ys, m, r, mean_x, m2_x, max_x, mean_y, m2_y, max_y, MASKED: tl.constexpr):
    """Pass 1 on one tile of shifted values: each lane's Welford update with weight r = 1 / count.

    Lanes past V (MASKED tiles only, ``m`` false there; ``m`` is None for full tiles) hold xs = 0,
    neutral for the max, and skip the update.
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
    return mean_x, m2_x, tl.maximum(max_x, xs), mean_y, m2_y, tl.maximum(max_y, ys)


@triton.jit
def _lane_merge(n_l, mean_l, m2_l):
    """(mean, M2) of a row from per-lane Welford summaries: mean = sum(n mean) / sum(n), then
    M2 = sum(M2_l + n_l (mean_l - mean)^2); two passes over the lanes, both pairwise sums."""
    mean = _total(n_l * mean_l) / _total(n_l)
    d = mean_l - mean
    return mean, _total(m2_l + n_l * d * d)


@triton.jit
def _row_stats(x_row, y_row, x0_raw, y0_raw, V, v_load, v_full, offs0, BLOCK: tl.constexpr,
               STANDARDIZE: tl.constexpr, ACC64: tl.constexpr):
    """Pass 1: (mean, M2, max) of x - x0 and of y - y0 (unstandardized: mean = M2 = 0, max of x, y).

    Without standardization the shift is 0 and only the maxima are kept (lanes past V hold x[0],
    neutral for the max).
    """
    num_full = V // BLOCK
    if STANDARDIZE:
        x0 = _to_acc(x0_raw, ACC64)
        y0 = _to_acc(y0_raw, ACC64)
    else:
        x0 = _scalar(0.0, ACC64)
        y0 = x0
    zero = _to_acc(tl.zeros(offs0.shape, dtype=tl.float32), ACC64)
    mean_x = zero
    m2_x = zero
    mean_y = zero
    m2_y = zero
    max_x = zero + float("-inf")
    max_y = max_x
    one = _scalar(1.0, ACC64)
    x_next, y_next = _load_tile(x_row, y_row, offs0, v_full, x0_raw, y0_raw)
    for blk in range(0, num_full):
        xs = _to_acc(x_next, ACC64) - x0
        ys = _to_acc(y_next, ACC64) - y0
        # prefetch the next full tile (none after the last: masked, no traffic) before this one's math
        x_next, y_next = _load_tile(x_row, y_row, (blk + 1) * BLOCK + offs0, v_full, x0_raw, y0_raw)
        if STANDARDIZE:
            mean_x, m2_x, max_x, mean_y, m2_y, max_y = _welford_tile(
                xs, ys, None, 1.0 / (one + blk), mean_x, m2_x, max_x, mean_y, m2_y, max_y, False)
        else:
            max_x = tl.maximum(max_x, xs)
            max_y = tl.maximum(max_y, ys)
    if num_full * BLOCK < V:
        offs = num_full * BLOCK + offs0
        x, y = _load_tile(x_row, y_row, offs, v_load, x0_raw, y0_raw)
        xs = _to_acc(x, ACC64) - x0
        ys = _to_acc(y, ACC64) - y0
        if STANDARDIZE:
            mean_x, m2_x, max_x, mean_y, m2_y, max_y = _welford_tile(
                xs, ys, offs < V, 1.0 / (one + num_full), mean_x, m2_x, max_x, mean_y, m2_y, max_y, True)
        else:
            max_x = tl.maximum(max_x, xs)
            max_y = tl.maximum(max_y, ys)
    max_x, max_y = _max2(tl.max(max_x, axis=1), tl.max(max_y, axis=1))
    if STANDARDIZE:
        # every lane saw the full tiles, and the partial last tile where it lies inside the row
        n_l = _to_acc(num_full + (offs0 + num_full * BLOCK < V).to(tl.int32), ACC64)
        mean_x, m2_x = _lane_merge(n_l, mean_x, m2_x)
        mean_y, m2_y = _lane_merge(n_l, mean_y, m2_y)
    else:
        mean_x = tl.sum(tl.sum(zero, axis=1), axis=0)
        m2_x = mean_x
        mean_y = mean_x
        m2_y = mean_x
    return mean_x, m2_x, max_x, mean_y, m2_y, max_y


@triton.jit
def _sums_tile(x, y, m, x0, y0, mean_x, mean_y, inv_sx, inv_sy, u_max, w_max, ca, cb,
               za_r, zb_r, t2_r, sau_r, sbu_r, sbw_r, tbw_r,
               STANDARDIZE: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, MASKED: tl.constexpr):
    """Pass 2 on one tile: add its partition sums (and the gradient sums) to the per-run accumulators.

    ``m`` (lanes inside the row) is used by MASKED tiles only; full tiles pass None.
    """
    if STANDARDIZE:
        u = ((x - x0) - mean_x) * inv_sx
        w = ((y - y0) - mean_y) * inv_sy
    else:
        u = x
        w = y
    da = (u - u_max) * ca
    db = (w - w_max) * cb
    ea = tl.exp2(da)
    eb = tl.exp2(db)
    if MASKED:
        ea = tl.where(m, ea, 0.0)
        eb = tl.where(m, eb, 0.0)
    eh = eb * (tl.where(eb > 0.0, db, 0.0) - da)
    za_r += tl.sum(ea, axis=1)
    zb_r += tl.sum(eb, axis=1)
    t2_r += tl.sum(eh, axis=1)
    if STANDARDIZE:
        if GRAD_S:
            sau_r += tl.sum(ea * u, axis=1)
            sbu_r += tl.sum(eb * u, axis=1)
        if GRAD_T:
            sbw_r += tl.sum(eb * w, axis=1)
            tbw_r += tl.sum(eh * w, axis=1)
    return za_r, zb_r, t2_r, sau_r, sbu_r, sbw_r, tbw_r


@triton.jit
def _grad_tile(x, y, m, out_offs, gx_ptr, gy_ptr, scale, keep, x0, y0, mean_x, mean_y, inv_sx, inv_sy,
               u_max, w_max, ca, cb, r_za, r_zb, ts, kt, t2n, coef_x, coef_y,
               STANDARDIZE: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr):
    """Pass 3 on one tile: write ``scale * dL/dx`` and/or ``scale * dL/dy`` (t2n = T / Z_b).

    ``m`` masks the stores of the partial tile; full tiles pass None (unmasked vector stores).
    """
    if STANDARDIZE:
        u = ((x - x0) - mean_x) * inv_sx
        w = ((y - y0) - mean_y) * inv_sy
    else:
        u = x
        w = y
    da = (u - u_max) * ca
    db = (w - w_max) * cb
    p = tl.exp2(db) * r_zb
    if GRAD_S:
        g = ts * (tl.exp2(da) * r_za - p)
        if STANDARDIZE:
            g = g * inv_sx - u * coef_x
        _store_grad(gx_ptr, out_offs, m, g, scale, keep)
    if GRAD_T:
        g = kt * p * (db - da - t2n)
        if STANDARDIZE:
            g = g * inv_sy - w * coef_y
        _store_grad(gy_ptr, out_offs, m, g, scale, keep)


@triton.jit
def kd_blocked_kernel(
    x_ptr, y_ptr, keep_ptr, scale_ptr, rows_ptr, gx_ptr, gy_ptr,
    V, v_runs, runs_x, runs_y,
    tau_s: tl.float64, tau_t: tl.float64, eps: tl.float64, dof: tl.float64, v_float: tl.float64,
    BLOCK: tl.constexpr, VEC: tl.constexpr, STANDARDIZE: tl.constexpr, GRAD_S: tl.constexpr,
    GRAD_T: tl.constexpr, HAS_MASK: tl.constexpr, ACC64: tl.constexpr,
):
    """Loss (and gradients) of one row of any length: three passes over BLOCK-wide tiles."""
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    keep = _keep_row(keep_ptr, row, HAS_MASK)
    # row offsets in runs of VEC classes times VEC: the compiler sees VEC-aligned rows (vector access)
    x_row = x_ptr + row64 * runs_x * VEC
    y_row = y_ptr + row64 * runs_y * VEC
    ts = _scalar(tau_s, ACC64)
    tt = _scalar(tau_t, ACC64)
    ca = LOG2E / ts
    cb = LOG2E / tt
    offs0 = _tile(BLOCK, VEC)
    num_full = V // BLOCK
    has_tail = num_full * BLOCK < V
    keep_i = keep.to(tl.int32)
    # load limits, 0 for a masked-out row: V for the partial tile; for the full tiles a multiple of
    # BLOCK, so that their mask is uniform over each 16-byte vector (vectorized loads)
    v_load = V * keep_i
    v_full = num_full * BLOCK * keep_i
    x0_raw = tl.load(x_row, mask=keep, other=0.0)
    y0_raw = tl.load(y_row, mask=keep, other=0.0)

    # Pass 1: statistics and maxima.
    mean_x, m2_x, max_x, mean_y, m2_y, max_y = _row_stats(x_row, y_row, x0_raw, y0_raw, V, v_load, v_full,
                                                          offs0, BLOCK, STANDARDIZE, ACC64)
    if STANDARDIZE:
        dof_a = _scalar(dof, ACC64)
        eps_a = _scalar(eps, ACC64)
        x0 = _to_acc(x0_raw, ACC64)
        y0 = _to_acc(y0_raw, ACC64)
        sigma_x = _sqrt(m2_x / dof_a, ACC64)
        sigma_y = _sqrt(m2_y / dof_a, ACC64)
        inv_sx = 1.0 / (sigma_x + eps_a)
        inv_sy = 1.0 / (sigma_y + eps_a)
    else:
        x0 = mean_x
        y0 = mean_x
        sigma_x = mean_x
        sigma_y = mean_x
        inv_sx = mean_x + 1.0
        inv_sy = inv_sx
    u_max = (max_x - mean_x) * inv_sx
    w_max = (max_y - mean_y) * inv_sy

    # Pass 2, last tile first: the partial tile, then the full tiles backwards.
    zero = _to_acc(tl.zeros([BLOCK // VEC], dtype=tl.float32), ACC64)
    za_r = zero
    zb_r = zero
    t2_r = zero
    sau_r = zero
    sbu_r = zero
    sbw_r = zero
    tbw_r = zero
    if has_tail:
        offs = num_full * BLOCK + offs0
        x, y = _load_tile(x_row, y_row, offs, v_load, x0_raw, y0_raw)
        za_r, zb_r, t2_r, sau_r, sbu_r, sbw_r, tbw_r = _sums_tile(
            _to_acc(x, ACC64), _to_acc(y, ACC64), offs < V, x0, y0, mean_x, mean_y, inv_sx, inv_sy, u_max,
            w_max, ca, cb, za_r, zb_r, t2_r, sau_r, sbu_r, sbw_r, tbw_r, STANDARDIZE, GRAD_S, GRAD_T, True)
    x_next, y_next = _load_tile(x_row, y_row, tl.maximum(num_full - 1, 0) * BLOCK + offs0, v_full,
                                x0_raw, y0_raw)
    for i in range(0, num_full):
        x = _to_acc(x_next, ACC64)
        y = _to_acc(y_next, ACC64)
        # prefetch the tile before this one; after tile 0 there is none (limit 0: no traffic)
        prev = tl.maximum(num_full - 2 - i, 0) * BLOCK + offs0
        x_next, y_next = _load_tile(x_row, y_row, prev, v_full * (i + 1 < num_full).to(tl.int32),
                                    x0_raw, y0_raw)
        za_r, zb_r, t2_r, sau_r, sbu_r, sbw_r, tbw_r = _sums_tile(
            x, y, None, x0, y0, mean_x, mean_y, inv_sx, inv_sy, u_max, w_max, ca, cb,
            za_r, zb_r, t2_r, sau_r, sbu_r, sbw_r, tbw_r, STANDARDIZE, GRAD_S, GRAD_T, False)
    za = tl.sum(za_r, axis=0)
    zb = tl.sum(zb_r, axis=0)
    t2 = tl.sum(t2_r, axis=0)
    r_za = 1.0 / za
    r_zb = 1.0 / zb
    loss = ts * ts * (LN2 * (t2 * r_zb + tl.log2(za * r_zb)))
    tl.store(rows_ptr + row, tl.where(keep, loss, 0.0))

    # Pass 3: the gradients, full tiles forward, then the partial tile.
    if GRAD_S or GRAD_T:
        scale = _to_acc(tl.load(scale_ptr), ACC64)
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
        x_next, y_next = _load_tile(x_row, y_row, offs0, v_full, x0_raw, y0_raw)
        for blk in range(0, num_full):
            offs = blk * BLOCK + offs0
            x = _to_acc(x_next, ACC64)
            y = _to_acc(y_next, ACC64)
            x_next, y_next = _load_tile(x_row, y_row, offs + BLOCK, v_full, x0_raw, y0_raw)
            _grad_tile(x, y, None, out_row + offs, gx_ptr, gy_ptr, scale, keep, x0, y0, mean_x, mean_y,
                       inv_sx, inv_sy, u_max, w_max, ca, cb, r_za, r_zb, ts, kt, t2n, coef_x, coef_y,
                       STANDARDIZE, GRAD_S, GRAD_T)
        if has_tail:
            offs = num_full * BLOCK + offs0
            x, y = _load_tile(x_row, y_row, offs, v_load, x0_raw, y0_raw)
            _grad_tile(_to_acc(x, ACC64), _to_acc(y, ACC64), offs < V, out_row + offs, gx_ptr, gy_ptr, scale,
                       keep, x0, y0, mean_x, mean_y, inv_sx, inv_sy, u_max, w_max, ca, cb, r_za, r_zb, ts,
                       kt, t2n, coef_x, coef_y, STANDARDIZE, GRAD_S, GRAD_T)


# ------------------------------------------------------------------------------------------------
# In-place row scaling of a saved gradient: grad[r] *= scale[r].
#
# Each program owns one BLOCK-wide tile of one row and loads the row's scale first; a scale of
# exactly 1.0 (the common scalar ``loss.backward()``) returns without touching the gradient.
# Memory per element: 0 bytes when the scale is 1, else read + write of the gradient (2 * 2 bytes
# in bf16).
# ------------------------------------------------------------------------------------------------
@triton.jit
def scale_rows_kernel(g_ptr, s_ptr, V, stride_g, stride_s, BLOCK: tl.constexpr, ACC64: tl.constexpr):
    """``grad[row, tile] *= scale[row]``, skipped on the device when the scale is exactly 1."""
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    s = _to_acc(tl.load(s_ptr + row * stride_s), ACC64)
    if s != 1.0:
        offs = tile * BLOCK + tl.arange(0, BLOCK)
        m = offs < V
        ptrs = g_ptr + row * stride_g + offs
        g = _to_acc(tl.load(ptrs, mask=m, other=0.0), ACC64)
        tl.store(ptrs, (g * s).to(g_ptr.dtype.element_ty), mask=m)
