"""Triton kernels of the fused (logit-standardized) KD loss and of the in-place row scaling.

One program handles one row pair (student row ``x``, teacher row ``y``, V classes each). The math is
DESIGN.md section 1; in the notation used here (all sums over the V classes of the row)::

    xs      = x - x[0]                       # shift by the first element: exact for rows like
                                             # 1000 + 0.01 * randn, and exactly 0 for constant rows
    mu      = mean(xs)   sigma = sqrt(sum((xs - mu)^2) / (V - c))   s = sigma + eps
    u       = (xs - mu) / s                  # the standardized student (u = x without standardize)
    da      = (u - max(u)) * log2(e) / tau_s # a - max(a) in base 2, <= 0 exactly (rounding is monotone)
    ea      = 2^da   Za = sum(ea)            # q = ea / Za       (teacher: w, db, eb, Zb, p likewise)
    T       = sum(eb * (db - da))            # (a term with eb == 0 counts 0, as in kl_div)
    KL      = ln2 * (T / Zb + log2(Za / Zb)) # = sum p (log p - log q)
    loss    = tau_s^2 * KL
    g_u     = tau_s * (q - p)                                    S_u = sum(g_u * u)
    dL/dx   = g_u / s - u * S_u / ((V - c) * sigma)              (second term 0 when sigma == 0)
    g_w     = tau_s^2 / tau_t * p * ln2 * (db - da - T / Zb)     S_w = sum(g_w * w)
    dL/dy   = g_w / s_y - w * S_w / ((V - c) * sigma_y)

Without standardization ``u = x``, ``s = 1`` and the second gradient terms vanish. Gradients are
written multiplied by ``grad_scale``. Masked-out rows load nothing (all loads are masked with the
row's flag), store loss 0 and gradient 0, and every result is selected with ``tl.where`` so that
garbage (NaN/Inf) computed for them never reaches memory.

Accumulation is float32 (float64 when ``ACC64``: an input is float64). Exponentials use ``exp2`` with
the ``log2(e)`` factor folded into the temperature scale, logarithms use ``log2``.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


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
    """A scalar kernel argument (float64 when compiled, a Python float when interpreted) in the
    accumulation dtype."""
    if ACC64:
        r = (tl.zeros([1], dtype=tl.float64) + v).to(tl.float64)
    else:
        r = (tl.zeros([1], dtype=tl.float32) + v).to(tl.float32)
    return tl.sum(r, axis=0)


@triton.jit
def _keep_row(keep_ptr, row, HAS_MASK: tl.constexpr):
    """The row's mask flag as an int1 scalar (always true without a mask)."""
    if HAS_MASK:
        keep = tl.load(keep_ptr + row) != 0
    else:
        keep = row >= 0
    return keep


@triton.jit
def _chan_combine(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s pairwise merge of two (count, mean, M2) summaries; empty parts are neutral."""
    n = n_a + n_b
    frac = tl.where(n > 0, n_b / tl.where(n > 0, n, 1.0), 0.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * frac
    m2 = m2_a + m2_b + delta * delta * n_a * frac
    return n, mean, m2


@triton.jit
def _store_grad(g_ptr, offs, valid, g, scale, keep):
    """Store ``scale * g`` (0 for a masked-out row) in the gradient's dtype."""
    out = tl.where(keep, g * scale, 0.0)
    tl.store(g_ptr + offs, out.to(g_ptr.dtype.element_ty), mask=valid)


# ------------------------------------------------------------------------------------------------
# Register path: the whole row pair lives in registers, one read of each input.
#
# Math: the module docstring, with the sums as block reductions (two-pass mean/M2 in registers).
# Memory per element: reads x, y once (2 * input bytes), writes dL/dx and/or dL/dy once; in bf16
# with the student gradient that is 6 bytes per element, the floor of the fused op.
# ------------------------------------------------------------------------------------------------
@triton.jit
def _standardize_in_registers(x, first_ptr, valid, keep, v_f, dof, eps, STANDARDIZE: tl.constexpr,
                              ACC64: tl.constexpr):
    """(u, max(u), 1/s, sigma) of a row held in registers (u = x, s = 1, sigma = 0 unstandardized)."""
    if STANDARDIZE:
        x0 = _to_acc(tl.load(first_ptr, mask=keep, other=0.0), ACC64)
        xs = tl.where(valid, x - x0, 0.0)
        mean = tl.sum(xs, axis=0) / v_f
        d = tl.where(valid, xs - mean, 0.0)
        sigma = tl.sqrt_rn(tl.sum(d * d, axis=0) / dof)
        inv_s = 1.0 / (sigma + eps)
        u = d * inv_s
    else:
        u = x
        sigma = v_f * 0.0
        inv_s = sigma + 1.0
    u_max = tl.max(tl.where(valid, u, float("-inf")), axis=0)
    return u, u_max, inv_s, sigma


@triton.jit
def kd_register_kernel(
    x_ptr, y_ptr, keep_ptr, scale_ptr, rows_ptr, gx_ptr, gy_ptr,
    V, stride_x, stride_y,
    tau_s: tl.float64, tau_t: tl.float64, eps: tl.float64, dof: tl.float64, v_float: tl.float64,
    BLOCK: tl.constexpr, STANDARDIZE: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr,
    HAS_MASK: tl.constexpr, ACC64: tl.constexpr,
):
    """Loss (and gradients) of one row with V <= BLOCK: one read of x and y, one write per gradient."""
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    keep = _keep_row(keep_ptr, row, HAS_MASK)
    x_row = x_ptr + row64 * stride_x
    y_row = y_ptr + row64 * stride_y
    ts = _scalar(tau_s, ACC64)
    tt = _scalar(tau_t, ACC64)
    eps_a = _scalar(eps, ACC64)
    dof_a = _scalar(dof, ACC64)
    v_f = _scalar(v_float, ACC64)

    cols = tl.arange(0, BLOCK)
    valid = cols < V
    ld = cols < tl.where(keep, V, 0)
    x = _to_acc(tl.load(x_row + cols, mask=ld, other=0.0), ACC64)
    y = _to_acc(tl.load(y_row + cols, mask=ld, other=0.0), ACC64)
    u, u_max, inv_sx, sigma_x = _standardize_in_registers(x, x_row, valid, keep, v_f, dof_a, eps_a,
                                                          STANDARDIZE, ACC64)
    w, w_max, inv_sy, sigma_y = _standardize_in_registers(y, y_row, valid, keep, v_f, dof_a, eps_a,
                                                          STANDARDIZE, ACC64)

    da = (u - u_max) * (LOG2E / ts)
    db = (w - w_max) * (LOG2E / tt)
    ea = tl.where(valid, tl.exp2(da), 0.0)
    eb = tl.where(valid, tl.exp2(db), 0.0)
    za = tl.sum(ea, axis=0)
    zb = tl.sum(eb, axis=0)
    h = tl.where(valid, tl.where(eb > 0.0, db, 0.0) - da, 0.0)
    t2 = tl.sum(eb * h, axis=0)
    r_za = 1.0 / za
    r_zb = 1.0 / zb
    loss = ts * ts * (LN2 * (t2 * r_zb + tl.log2(za * r_zb)))
    tl.store(rows_ptr + row, tl.where(keep, loss, 0.0))

    if GRAD_S or GRAD_T:
        scale = _to_acc(tl.load(scale_ptr), ACC64)
        out_offs = row64 * V + cols
        p = eb * r_zb
        if GRAD_S:
            g = ts * (ea * r_za - p)
            if STANDARDIZE:
                s_u = tl.sum(g * u, axis=0)
                coef = tl.where(sigma_x > 0.0, s_u / (dof_a * sigma_x), 0.0)
                g = g * inv_sx - u * coef
            _store_grad(gx_ptr, out_offs, valid, g, scale, keep)
        if GRAD_T:
            g = (ts * ts / tt * LN2) * p * (db - da - t2 * r_zb)
            if STANDARDIZE:
                s_w = tl.sum(g * w, axis=0)
                coef = tl.where(sigma_y > 0.0, s_w / (dof_a * sigma_y), 0.0)
                g = g * inv_sy - w * coef
            _store_grad(gy_ptr, out_offs, valid, g, scale, keep)


# ------------------------------------------------------------------------------------------------
# Blocked path: rows longer than one block, three passes over BLOCK-wide tiles.
#
# Pass 1 (forward): per-lane Welford (count, mean, M2) and max of the shifted rows, merged across
#   lanes with Chan's formula (tl.reduce). Pass 2 (backward, so that the tiles pass 1 read last are
#   re-read first while still in L2): Z_a, Z_b, T and the sums the gradients need, kept as per-lane
#   vectors and reduced once. Pass 3 (forward): recompute q and p, write the gradients.
# Memory per element: pass 1 and 2 read x and y (2 * 2 * input bytes), pass 3 reads x and y again
#   and writes each requested gradient once. In bf16 with the student gradient: 14 bytes per element
#   issued, of which 6 are the floor; the 8 bytes of re-reads are served by L2 when the rows in
#   flight fit in it (about V <= 32k on H100) and partly otherwise (the backward pass 2 helps).
#   Without a gradient, pass 3 is skipped (8 bytes per element).
# ------------------------------------------------------------------------------------------------
@triton.jit
def _row_stats_blocked(row_ptr, V, v_load, cols, x0, BLOCK: tl.constexpr, STANDARDIZE: tl.constexpr,
                       ACC64: tl.constexpr):
    """(mean, M2, max) of ``row - x0`` by a forward sweep (mean = M2 = 0 without standardize)."""
    num_blocks = tl.cdiv(V, BLOCK)
    mx = _to_acc(tl.full([BLOCK], float("-inf"), tl.float32), ACC64)
    mean_v = _to_acc(tl.zeros([BLOCK], dtype=tl.float32), ACC64)
    m2_v = _to_acc(tl.zeros([BLOCK], dtype=tl.float32), ACC64)
    one = _scalar(1.0, ACC64)
    for blk in range(0, num_blocks):
        offs = blk * BLOCK + cols
        m = offs < V
        xs = _to_acc(tl.load(row_ptr + offs, mask=offs < v_load, other=0.0), ACC64) - x0
        mx = tl.where(m, tl.maximum(mx, xs), mx)
        if STANDARDIZE:
            r = 1.0 / (one + blk)  # every lane still in the row has seen blk + 1 elements
            delta = xs - mean_v
            new_mean = mean_v + delta * r
            m2_v = tl.where(m, m2_v + delta * (xs - new_mean), m2_v)
            mean_v = tl.where(m, new_mean, mean_v)
    if STANDARDIZE:
        tail = V - (num_blocks - 1) * BLOCK
        count_v = _to_acc(tl.where(cols < tail, num_blocks, num_blocks - 1), ACC64)
        _, mean, m2 = tl.reduce((count_v, mean_v, m2_v), 0, _chan_combine)
    else:
        mean = _scalar(0.0, ACC64)
        m2 = mean
    return mean, m2, tl.max(mx, axis=0)


@triton.jit
def kd_blocked_kernel(
    x_ptr, y_ptr, keep_ptr, scale_ptr, rows_ptr, gx_ptr, gy_ptr,
    V, stride_x, stride_y,
    tau_s: tl.float64, tau_t: tl.float64, eps: tl.float64, dof: tl.float64, v_float: tl.float64,
    BLOCK: tl.constexpr, STANDARDIZE: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr,
    HAS_MASK: tl.constexpr, ACC64: tl.constexpr,
):
    """Loss (and gradients) of one row of any length: three passes over BLOCK-wide tiles."""
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    keep = _keep_row(keep_ptr, row, HAS_MASK)
    x_row = x_ptr + row64 * stride_x
    y_row = y_ptr + row64 * stride_y
    ts = _scalar(tau_s, ACC64)
    tt = _scalar(tau_t, ACC64)
    eps_a = _scalar(eps, ACC64)
    dof_a = _scalar(dof, ACC64)
    ca = LOG2E / ts
    cb = LOG2E / tt
    cols = tl.arange(0, BLOCK)
    num_blocks = tl.cdiv(V, BLOCK)
    v_load = tl.where(keep, V, 0)  # loads are masked with offs < v_load: nothing for a masked row

    # Pass 1: statistics and maxima.
    if STANDARDIZE:
        x0 = _to_acc(tl.load(x_row, mask=keep, other=0.0), ACC64)
        y0 = _to_acc(tl.load(y_row, mask=keep, other=0.0), ACC64)
    else:
        x0 = _scalar(0.0, ACC64)
        y0 = x0
    mean_x, m2_x, max_x = _row_stats_blocked(x_row, V, v_load, cols, x0, BLOCK, STANDARDIZE, ACC64)
    mean_y, m2_y, max_y = _row_stats_blocked(y_row, V, v_load, cols, y0, BLOCK, STANDARDIZE, ACC64)
    if STANDARDIZE:
        sigma_x = tl.sqrt_rn(m2_x / dof_a)
        sigma_y = tl.sqrt_rn(m2_y / dof_a)
        inv_sx = 1.0 / (sigma_x + eps_a)
        inv_sy = 1.0 / (sigma_y + eps_a)
    else:
        sigma_x = mean_x
        sigma_y = mean_x
        inv_sx = mean_x + 1.0
        inv_sy = inv_sx
    u_max = (max_x - mean_x) * inv_sx
    w_max = (max_y - mean_y) * inv_sy

    # Pass 2 (last tile first): the partition functions and the gradient sums.
    zero = _to_acc(tl.zeros([BLOCK], dtype=tl.float32), ACC64)
    za_v = zero
    zb_v = zero
    t2_v = zero
    sau_v = zero
    sbu_v = zero
    sbw_v = zero
    tbw_v = zero
    for i in range(0, num_blocks):
        offs = (num_blocks - 1 - i) * BLOCK + cols
        m = offs < V
        ld = offs < v_load
        u = ((_to_acc(tl.load(x_row + offs, mask=ld, other=0.0), ACC64) - x0) - mean_x) * inv_sx
        w = ((_to_acc(tl.load(y_row + offs, mask=ld, other=0.0), ACC64) - y0) - mean_y) * inv_sy
        da = (u - u_max) * ca
        db = (w - w_max) * cb
        ea = tl.where(m, tl.exp2(da), 0.0)
        eb = tl.where(m, tl.exp2(db), 0.0)
        h = tl.where(m, tl.where(eb > 0.0, db, 0.0) - da, 0.0)
        za_v += ea
        zb_v += eb
        t2_v += eb * h
        if STANDARDIZE:
            if GRAD_S:
                sau_v += ea * u
                sbu_v += eb * u
            if GRAD_T:
                sbw_v += eb * w
                tbw_v += (eb * h) * w
    za = tl.sum(za_v, axis=0)
    zb = tl.sum(zb_v, axis=0)
    t2 = tl.sum(t2_v, axis=0)
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
                s_u = ts * (tl.sum(sau_v, axis=0) * r_za - tl.sum(sbu_v, axis=0) * r_zb)
                coef_x = tl.where(sigma_x > 0.0, s_u / (dof_a * sigma_x), 0.0)
            if GRAD_T:
                s_w = kt * r_zb * (tl.sum(tbw_v, axis=0) - t2 * r_zb * tl.sum(sbw_v, axis=0))
                coef_y = tl.where(sigma_y > 0.0, s_w / (dof_a * sigma_y), 0.0)
        out_row = row64 * V
        for blk in range(0, num_blocks):
            offs = blk * BLOCK + cols
            m = offs < V
            ld = offs < v_load
            u = ((_to_acc(tl.load(x_row + offs, mask=ld, other=0.0), ACC64) - x0) - mean_x) * inv_sx
            w = ((_to_acc(tl.load(y_row + offs, mask=ld, other=0.0), ACC64) - y0) - mean_y) * inv_sy
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
