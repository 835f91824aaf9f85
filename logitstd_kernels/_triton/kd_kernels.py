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
access of the wider input), the same layout for a bf16 student and a float32 teacher, and the sums
over axis 1 stay inside a thread. Lanes past V are loaded as ``x[0]``: a neutral value for the
shifted sums (it adds 0) and for the max; they are excluded where it matters (M2, the exponentials).

Masked-out rows load nothing (every load is masked with ``offs < v_load``, ``v_load = 0`` for them),
store loss 0 and gradient 0, and every result is selected with ``tl.where`` so that the garbage
computed for them never reaches memory.

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
    return tl.sum(_to_acc(tl.zeros([1], dtype=tl.float32), ACC64) + v, axis=0)


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
def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s pairwise merge of two (count, mean, M2) summaries; empty parts are neutral."""
    n = n_a + n_b
    frac = tl.where(n > 0, n_b / tl.where(n > 0, n, 1.0), 0.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac


@triton.jit
def _chan2(n_a, mx_a, m2x_a, my_a, m2y_a, n_b, mx_b, m2x_b, my_b, m2y_b):
    """``_chan`` of the student and the teacher summaries at once (their counts are equal)."""
    n, mx, m2x = _chan(n_a, mx_a, m2x_a, n_b, mx_b, m2x_b)
    _, my, m2y = _chan(n_a, my_a, m2y_a, n_b, my_b, m2y_b)
    return n, mx, m2x, my, m2y


@triton.jit
def _store_grad(g_ptr, offs, valid, g, scale, keep):
    """Store ``scale * g`` (0 for a masked-out row) in the gradient's dtype."""
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
    V, stride_x, stride_y,
    tau_s: tl.float64, tau_t: tl.float64, eps: tl.float64, dof: tl.float64, v_float: tl.float64,
    BLOCK: tl.constexpr, VEC: tl.constexpr, STANDARDIZE: tl.constexpr, GRAD_S: tl.constexpr,
    GRAD_T: tl.constexpr, HAS_MASK: tl.constexpr, ACC64: tl.constexpr,
):
    """Loss (and gradients) of one row with V <= BLOCK: one read of x and y, one write per gradient."""
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    keep = _keep_row(keep_ptr, row, HAS_MASK)
    x_row = x_ptr + row64 * stride_x
    y_row = y_ptr + row64 * stride_y
    ts = _scalar(tau_s, ACC64)
    tt = _scalar(tau_t, ACC64)

    offs = _tile(BLOCK, VEC)
    valid = offs < V
    ld = offs < tl.where(keep, V, 0)
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
        out_offs = row64 * V + offs
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
# Pass 1 (forward): per tile and run of VEC classes, the run's (count, mean, M2) and max, merged into
#   per-run accumulators with Chan's formula; the per-run summaries are merged at the end (mean first,
#   then M2 plus the spread of the run means around it).
# Pass 2 (backward, so that the tiles pass 1 read last are re-read first, while still in L2):
#   Z_a, Z_b, T and the sums the gradients need (sum ea*u, eb*u, eb*w, eb*h*w), accumulated per run.
# Pass 3 (forward): recompute q and p, write the gradients. Skipped when no gradient is requested.
# With the per-run accumulators (BLOCK / VEC values each, a few registers per thread) there is no
# barrier inside a loop: the warps of a program stream independently.
# Memory per element: passes 1 and 2 read x and y, pass 3 reads them again and writes each requested
#   gradient. In bf16 with the student gradient: 14 bytes per element issued, 6 of them the floor; the
#   8 bytes of re-reads come from L2 when the rows in flight fit in it (V up to ~32k on H100), partly
#   otherwise. Without a gradient: 8 bytes per element.
# ------------------------------------------------------------------------------------------------
@triton.jit
def _row_stats(x_row, y_row, x0_raw, y0_raw, V, v_load, offs0, run_start, BLOCK: tl.constexpr,
               VEC: tl.constexpr, STANDARDIZE: tl.constexpr, ACC64: tl.constexpr):
    """Pass 1: (mean, M2, max) of x - x0 and of y - y0 (unstandardized: mean = M2 = 0, max of x, y)."""
    num_blocks = tl.cdiv(V, BLOCK)
    x0 = _to_acc(x0_raw, ACC64)
    y0 = _to_acc(y0_raw, ACC64)
    zero = _to_acc(tl.zeros([BLOCK // VEC], dtype=tl.float32), ACC64)
    n_r = zero
    mean_x = zero
    m2_x = zero
    mean_y = zero
    m2_y = zero
    max_x = zero + float("-inf")
    max_y = max_x
    for blk in range(0, num_blocks):
        offs = blk * BLOCK + offs0
        ld = offs < v_load
        x = _to_acc(tl.load(x_row + offs, mask=ld, other=x0_raw), ACC64)
        y = _to_acc(tl.load(y_row + offs, mask=ld, other=y0_raw), ACC64)
        if STANDARDIZE:
            xs = x - x0
            ys = y - y0
            m = offs < V
            cnt = _to_acc(tl.minimum(tl.maximum(V - (blk * BLOCK + run_start), 0), VEC), ACC64)
            bsx = tl.sum(xs, axis=1)
            bsy = tl.sum(ys, axis=1)
            inv_cnt = 1.0 / tl.maximum(cnt, 1.0)
            bmean_x = bsx * inv_cnt
            bmean_y = bsy * inv_cnt
            dx = tl.where(m, xs - bmean_x[:, None], 0.0)
            dy = tl.where(m, ys - bmean_y[:, None], 0.0)
            n_r, mean_x, m2_x, mean_y, m2_y = _chan2(n_r, mean_x, m2_x, mean_y, m2_y, cnt, bmean_x,
                                                     tl.sum(dx * dx, axis=1), bmean_y, tl.sum(dy * dy, axis=1))
            max_x = tl.maximum(max_x, tl.max(xs, axis=1))
            max_y = tl.maximum(max_y, tl.max(ys, axis=1))
        else:
            max_x = tl.maximum(max_x, tl.max(x, axis=1))
            max_y = tl.maximum(max_y, tl.max(y, axis=1))
    max_x, max_y = _max2(max_x, max_y)
    if STANDARDIZE:
        # Merge the per-run summaries: mean = sum(n_r mean_r) / V, M2 = sum(M2_r + n_r (mean_r - mean)^2).
        v_f = tl.sum(n_r, axis=0)
        gx = tl.sum(n_r * mean_x, axis=0) / v_f
        gy = tl.sum(n_r * mean_y, axis=0) / v_f
        dx = mean_x - gx
        dy = mean_y - gy
        m2_x = tl.sum(m2_x + n_r * dx * dx, axis=0)
        m2_y = tl.sum(m2_y + n_r * dy * dy, axis=0)
        mean_x = gx
        mean_y = gy
    else:
        mean_x = tl.sum(zero, axis=0)
        m2_x = mean_x
        mean_y = mean_x
        m2_y = mean_x
    return mean_x, m2_x, max_x, mean_y, m2_y, max_y


@triton.jit
def kd_blocked_kernel(
    x_ptr, y_ptr, keep_ptr, scale_ptr, rows_ptr, gx_ptr, gy_ptr,
    V, stride_x, stride_y,
    tau_s: tl.float64, tau_t: tl.float64, eps: tl.float64, dof: tl.float64, v_float: tl.float64,
    BLOCK: tl.constexpr, VEC: tl.constexpr, STANDARDIZE: tl.constexpr, GRAD_S: tl.constexpr,
    GRAD_T: tl.constexpr, HAS_MASK: tl.constexpr, ACC64: tl.constexpr,
):
    """Loss (and gradients) of one row of any length: three passes over BLOCK-wide tiles."""
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    keep = _keep_row(keep_ptr, row, HAS_MASK)
    x_row = x_ptr + row64 * stride_x
    y_row = y_ptr + row64 * stride_y
    ts = _scalar(tau_s, ACC64)
    tt = _scalar(tau_t, ACC64)
    ca = LOG2E / ts
    cb = LOG2E / tt
    offs0 = _tile(BLOCK, VEC)
    run_start = tl.arange(0, BLOCK // VEC) * VEC
    num_blocks = tl.cdiv(V, BLOCK)
    v_load = tl.where(keep, V, 0)
    x0_raw = tl.load(x_row, mask=keep, other=0.0)
    y0_raw = tl.load(y_row, mask=keep, other=0.0)

    # Pass 1: statistics and maxima.
    mean_x, m2_x, max_x, mean_y, m2_y, max_y = _row_stats(x_row, y_row, x0_raw, y0_raw, V, v_load, offs0,
                                                          run_start, BLOCK, VEC, STANDARDIZE, ACC64)
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

    # Pass 2 (last tile first): the partition functions and the gradient sums.
    zero = _to_acc(tl.zeros([BLOCK // VEC], dtype=tl.float32), ACC64)
    za_r = zero
    zb_r = zero
    t2_r = zero
    sau_r = zero
    sbu_r = zero
    sbw_r = zero
    tbw_r = zero
    for i in range(0, num_blocks):
        offs = (num_blocks - 1 - i) * BLOCK + offs0
        ld = offs < v_load
        m = offs < V
        x = _to_acc(tl.load(x_row + offs, mask=ld, other=x0_raw), ACC64)
        y = _to_acc(tl.load(y_row + offs, mask=ld, other=y0_raw), ACC64)
        if STANDARDIZE:
            u = ((x - x0) - mean_x) * inv_sx
            w = ((y - y0) - mean_y) * inv_sy
        else:
            u = x
            w = y
        da = (u - u_max) * ca
        db = (w - w_max) * cb
        ea = tl.where(m, tl.exp2(da), 0.0)
        eb = tl.where(m, tl.exp2(db), 0.0)
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
    za = tl.sum(za_r, axis=0)
    zb = tl.sum(zb_r, axis=0)
    t2 = tl.sum(t2_r, axis=0)
    r_za = 1.0 / za
    r_zb = 1.0 / zb
    loss = ts * ts * (LN2 * (t2 * r_zb + tl.log2(za * r_zb)))
    tl.store(rows_ptr + row, tl.where(keep, loss, 0.0))

    # Pass 3: the gradients.
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
        out_row = row64 * V
        for blk in range(0, num_blocks):
            offs = blk * BLOCK + offs0
            ld = offs < v_load
            m = offs < V
            x = _to_acc(tl.load(x_row + offs, mask=ld, other=x0_raw), ACC64)
            y = _to_acc(tl.load(y_row + offs, mask=ld, other=y0_raw), ACC64)
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
                _store_grad(gx_ptr, out_row + offs, m, g, scale, keep)
            if GRAD_T:
                g = kt * p * (db - da - t2 * r_zb)
                if STANDARDIZE:
                    g = g * inv_sy - w * coef_y
                _store_grad(gy_ptr, out_row + offs, m, g, scale, keep)


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
