"""The Triton kernel of the sparse-teacher loss: a dense student row against a teacher stored as k
(id, value) entries, loss and student gradient, one program per row (docs/design.md section 9; the
C++ kernel is csrc/cpu/sparse_cpu_kernel.cpp, the eager code ``reference.sparse_row_divergence``).

Math per row, in the accumulation dtype (float64 when an input is float64, else float32):

- teacher (``teacher_row``, one [KBLOCK] tile): ``b_j = (r_j - mu) / (sigma + eps) / tau_t`` at the
  valid entries (``r = T_gen v`` for log-probabilities), mu and sigma the stored full-row statistics
  or those of the valid ``r`` (in units of ``c r``, ``c = 1 / max(1, max |r|)``); ``lse_b``; the
  tail's ``L' = max(L, lse_b)`` and ``log p_T = log(-expm1(lse_b - L'))``;
- student, streamed in BLOCK tiles: max and min of x, then the moments of ``c x`` (Chan's merge of
  the tiles), then ``Z = sum e``, ``e = exp(a - max a)``, ``E = sum e u`` (u the standardized row) and
  the CE's sums; the k support entries of x are gathered;
- loss: ``sum_S p (log p - log q~)`` (q~ = q renormalized over S for "renormalize") plus the tail
  class ``p_T log(p_T / q_T)``, ``q_T = Z_T / Z`` with ``Z_T = Z - sum_S e``, or, where that cancels
  (``Z_T < Z / 16``), summed over the classes outside S in one more pass (``tail_sum``);
- gradient: ``dD/da = coef e`` outside the support (coef = 0, 1/Z, or 1/Z - p_T/Z_T), its own value
  ``g_j`` on it; the chain rule through the standardization with ``G = sum dD/da`` and
  ``S = sum dD/da u``; a dense pass stores the outside form for every class, then (after a barrier)
  the k support classes are overwritten with their values.

Memory traffic per element of x: the row is read four times (extremes, moments, exponentials,
gradient; the later reads hit L2 for rows in flight), the gradient written once; the teacher costs
8 + sizeof(value) (+1 with an entry mask) bytes per stored entry. No dense teacher row exists.
"""

import triton
import triton.language as tl

from .row_math import expm1, keep_row, magnitude_scale, row_label, scalar, store_grad, store_row_results, to_acc

# Below this fraction of Z, the tail's Z_T = Z - Z_S keeps less than the accumulation's precision
# minus 4 bits (relative error u Z / Z_T): the outside classes are then summed exactly (tail_sum).
TAIL_CANCELLATION = tl.constexpr(0.0625)


@triton.jit
def _all(flag, offs):
    """A scalar int1 ``flag`` broadcast to the shape of ``offs`` (the interpreter's masks must be tensors)."""
    return (offs * 0 + flag.to(tl.int32)) != 0


@triton.jit
def teacher_row(ids_ptr, v_ptr, em_ptr, mean_ptr, std_ptr, ln_ptr, row, k, V, keep, scale, tau_t, eps, correction,
                KBLOCK: tl.constexpr, HAS_EMASK: tl.constexpr, HAS_STATS: tl.constexpr, HAS_LN: tl.constexpr,
                STANDARDIZE: tl.constexpr, TAIL: tl.constexpr, ACC64: tl.constexpr):
    """``(ids, valid, b, count, log_norm, log_p_tail)`` of the row's teacher (see the module's docstring)."""
    offs = tl.arange(0, KBLOCK)
    inside = (offs < k) & _all(keep, offs)
    base = row.to(tl.int64) * k
    v = to_acc(tl.load(v_ptr + base + offs, mask=inside, other=float("-inf")), ACC64)
    valid = inside & (v != float("-inf"))  # NaN stays in: it makes its row NaN
    if HAS_EMASK:
        valid = valid & (tl.load(em_ptr + base + offs, mask=inside, other=0) != 0)
    ids = tl.where(valid, tl.load(ids_ptr + base + offs, mask=inside, other=0), 0)
    count = tl.sum(valid.to(tl.int32), axis=0)
    r = tl.where(valid, v * scale, 0.0)
    if STANDARDIZE:
        if HAS_STATS:
            c = scalar(1.0, ACC64)
            mu = to_acc(tl.load(mean_ptr + row), ACC64) * scale
            sigma = to_acc(tl.load(std_ptr + row), ACC64) * scale
        else:
            c = 1.0 / tl.maximum(tl.max(tl.abs(r), axis=0), 1.0)
            mu = tl.sum(r * c, axis=0) / tl.maximum(count, 1).to(r.dtype)
            d = tl.where(valid, r * c - mu, 0.0)
            dof = count.to(r.dtype) - correction
            sigma = tl.where(dof > 0, tl.sqrt(tl.sum(d * d, axis=0) / tl.maximum(dof, 1.0)), 0.0)
        b = (r * c - mu) / ((sigma + eps * c) * tau_t)
    else:
        b = r / tau_t
    b = tl.where(valid, b, float("-inf"))
    top = tl.where(count > 0, tl.max(b, axis=0), 0.0)
    lse_b = tl.where(count > 0, top + tl.log(tl.sum(tl.where(valid, tl.exp(b - top), 0.0), axis=0)), float("-inf"))
    log_norm = lse_b
    log_p_tail = lse_b * 0.0 + float("-inf")
    if TAIL:
        stored = scalar(0.0, ACC64)
        if HAS_LN:
            stored = to_acc(tl.load(ln_ptr + row), ACC64)
        whole = count == V
        log_norm = tl.where(whole, lse_b, tl.maximum(stored, lse_b))
        gap = tl.where(count > 0, lse_b - log_norm, float("-inf"))
        log_p_tail = tl.where(whole, float("-inf"), tl.log(-expm1(gap)))
    return ids, valid, b, count, log_norm, log_p_tail


@triton.jit
def student_moments(x_ptr, V, keep, BLOCK: tl.constexpr, STANDARDIZE: tl.constexpr, ACC64: tl.constexpr):
    """``(max x, c, mean, M2)``: the row's max and its moments in units of ``c x`` (c its magnitude
    scale; c 1, mean 0, M2 0 without standardization), tile by tile with Chan's merge."""
    offs = tl.arange(0, BLOCK)
    mx = scalar(float("-inf"), ACC64)
    mn = scalar(float("inf"), ACC64)
    for start in range(0, V, BLOCK):
        m = (start + offs < V) & _all(keep, offs)
        x = to_acc(tl.load(x_ptr + start + offs, mask=m, other=0.0), ACC64)
        mx = tl.maximum(mx, tl.max(tl.where(m, x, float("-inf")), axis=0))
        mn = tl.minimum(mn, tl.min(tl.where(m, x, float("inf")), axis=0))
    c = scalar(1.0, ACC64)
    mean = scalar(0.0, ACC64)
    m2 = scalar(0.0, ACC64)
    if STANDARDIZE:
        c = magnitude_scale(mx, mn, ACC64)
        for start in range(0, V, BLOCK):
            m = (start + offs < V) & _all(keep, offs)
            x = to_acc(tl.load(x_ptr + start + offs, mask=m, other=0.0), ACC64) * c
            n_a = to_acc(start + offs * 0, ACC64).max(axis=0)  # counts in the accumulation dtype (exact)
            n_b = to_acc(tl.minimum(V - start, BLOCK) + offs * 0, ACC64).max(axis=0)
            mean_b = tl.sum(tl.where(m, x, 0.0), axis=0) / n_b
            d = tl.where(m, x - mean_b, 0.0)
            delta = mean_b - mean
            mean = mean + delta * (n_b / (n_a + n_b))
            m2 = m2 + tl.sum(d * d, axis=0) + delta * delta * (n_a * n_b / (n_a + n_b))
    return mx, c, mean, m2


@triton.jit
def student_sums(x_ptr, V, keep, mx, c, mean, s_c, inv, BLOCK: tl.constexpr, STANDARDIZE: tl.constexpr,
                 HAS_LABELS: tl.constexpr, ACC64: tl.constexpr):
    """``(Z, E, zc, xsum)``: ``sum e``, ``sum e u`` (e = exp(a - max a)), and the CE's ``sum exp(x - max x)``
    and ``sum x``."""
    offs = tl.arange(0, BLOCK)
    a_max = (mx * c - mean) * inv
    z = scalar(0.0, ACC64)
    big_e = scalar(0.0, ACC64)
    zc = scalar(0.0, ACC64)
    xsum = scalar(0.0, ACC64)
    for start in range(0, V, BLOCK):
        m = (start + offs < V) & _all(keep, offs)
        x = to_acc(tl.load(x_ptr + start + offs, mask=m, other=0.0), ACC64)
        e = tl.where(m, tl.exp((x * c - mean) * inv - a_max), 0.0)
        z += tl.sum(e, axis=0)
        if STANDARDIZE:
            big_e += tl.sum(e * ((x * c - mean) / s_c), axis=0)
        if HAS_LABELS:
            zc += tl.sum(tl.where(m, tl.exp(x - mx), 0.0), axis=0)
            xsum += tl.sum(tl.where(m, x, 0.0), axis=0)
    return z, big_e, zc, xsum


@triton.jit
def tail_sum(x_row, V, keep, ids, valid, c, mean, inv, a_max, BLOCK: tl.constexpr, ACC64: tl.constexpr):
    """``Z_T``, the sum of ``e = exp(a - max a)`` over the classes outside the support, exactly: each
    tile's classes compared with the k ids (BLOCK x KBLOCK compares, BLOCK here the launch's
    ``TAIL_BLOCK``; only for rows where ``Z - Z_S`` cancels)."""
    offs = tl.arange(0, BLOCK)
    z_tail = scalar(0.0, ACC64)
    for start in range(0, V, BLOCK):
        m = (start + offs < V) & _all(keep, offs)
        x = to_acc(tl.load(x_row + start + offs, mask=m, other=0.0), ACC64)
        hits = ((start + offs)[:, None] == ids[None, :]) & valid[None, :]
        outside = m & (tl.sum(hits.to(tl.int32), axis=1) == 0)
        z_tail += tl.sum(tl.where(outside, tl.exp((x * c - mean) * inv - a_max), 0.0), axis=0)
    return z_tail


@triton.jit
def support_terms(log_p, a_j, valid, a_max, z, z_tail, log_p_tail, count, SUPPORT: tl.constexpr):
    """``(D, g, coef)``: the divergence, ``dD/da`` at the support's entries and the outside classes'
    ``dD/da = coef e`` coefficient (SUPPORT: 0 renormalize, 1 renormalize_teacher, 2 tail, with the
    outside classes' ``Z_T``)."""
    p = tl.where(valid, tl.exp(log_p), 0.0)
    on = valid & (log_p != float("-inf"))
    log_z = tl.log(z)
    if SUPPORT == 0:
        top = tl.where(count > 0, tl.max(tl.where(valid, a_j, float("-inf")), axis=0), 0.0)
        lse_a = top + tl.log(tl.sum(tl.where(valid, tl.exp(a_j - top), 0.0), axis=0))
        log_q = a_j - lse_a
        coef = z * 0.0
    else:
        log_q = a_j - a_max - log_z
        coef = tl.where(count > 0, 1.0 / z, 0.0)
    d = tl.sum(tl.where(on, p * (log_p - log_q), 0.0), axis=0)
    g = tl.where(valid, tl.exp(log_q) - p, 0.0)
    if SUPPORT == 2:
        p_tail = tl.exp(log_p_tail)
        d += tl.where(p_tail > 0, p_tail * (log_p_tail - (tl.log(z_tail) - log_z)), 0.0)
        coef = tl.where(p_tail > 0, 1.0 / z - p_tail / z_tail, 1.0 / z)
    return d, g, coef


@triton.jit
def _ce_grad(x, idx, mx, zc, label, v_f, smoothing, HAS_LABELS: tl.constexpr):
    """The CE's ``d/dx = softmax(x) - t`` (t: the smoothed one-hot target); 0 without labels."""
    if HAS_LABELS:
        r = tl.exp(x - mx) / zc - smoothing / v_f - tl.where(idx == label, 1.0 - smoothing, 0.0)
    else:
        r = x * 0.0
    return r


@triton.jit
def sparse_grads(x_row, g_row, ids, valid, x_j, g, coef, e, z, big_e, zc, mx, c, mean, sigma, s_c, inv, V, label,
                 keep, outer, ce_scale, smoothing, correction, BLOCK: tl.constexpr, STANDARDIZE: tl.constexpr,
                 HAS_LABELS: tl.constexpr, ZERO_EXCLUDED: tl.constexpr, ROUND_BF16: tl.constexpr,
                 ACC64: tl.constexpr):
    """The student gradient: ``outer (dD/da - G / V - u K)`` (``outer = f kd_w tau_s c / s``; K the
    standardization's coefficient ``S s / ((V - correction) sigma)``) plus ``f ce_w`` times the CE's."""
    corr = tl.where(valid, g - coef * e, 0.0)
    v_f = V * 1.0
    big_g = coef * 0.0
    k2 = coef * 0.0
    u_j = x_j * 0.0
    if STANDARDIZE:
        u_j = (x_j * c - mean) / s_c
        big_g = coef * z + tl.sum(corr, axis=0)
        big_s = coef * big_e + tl.sum(corr * u_j, axis=0)
        k2 = tl.where(sigma > 0, big_s * s_c / ((v_f - correction) * tl.where(sigma > 0, sigma, 1.0)), 0.0)
    a_max = (mx * c - mean) * inv
    offs = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        m = start + offs < V
        x = to_acc(tl.load(x_row + start + offs, mask=m & _all(keep, offs), other=0.0), ACC64)
        u = (x * c - mean) / s_c
        val = outer * (coef * tl.exp((x * c - mean) * inv - a_max) - big_g / v_f - u * k2)
        val += ce_scale * _ce_grad(x, start + offs, mx, zc, label, v_f, smoothing, HAS_LABELS)
        store_grad(g_row + start, offs, m, val, keep, ZERO_EXCLUDED, ROUND_BF16, False)
    tl.debug_barrier()  # the support's classes are stored over the dense pass's values
    val_j = outer * (g - big_g / v_f - u_j * k2) + ce_scale * _ce_grad(x_j, ids, mx, zc, label, v_f, smoothing,
                                                                         HAS_LABELS)
    store_grad(g_row, ids, valid, val_j, keep, ZERO_EXCLUDED, ROUND_BF16, False)


@triton.jit
def sparse_kd_kernel(x_ptr, x_stride, ids_ptr, v_ptr, em_ptr, mean_ptr, std_ptr, ln_ptr, keep_ptr, f_ptr, f_stride,
                     rows_ptr, ce_ptr, kd_ptr, g_ptr, labels_ptr, V, k, ignore_index, tau_s, tau_t, eps, correction,
                     smoothing, ce_w, kd_w, value_scale, BLOCK: tl.constexpr, KBLOCK: tl.constexpr,
                     TAIL_BLOCK: tl.constexpr,
                     STANDARDIZE: tl.constexpr, SUPPORT: tl.constexpr, HAS_MASK: tl.constexpr,
                     HAS_LABELS: tl.constexpr, HAS_EMASK: tl.constexpr, HAS_STATS: tl.constexpr, HAS_LN: tl.constexpr,
                     GRAD: tl.constexpr, ZERO_EXCLUDED: tl.constexpr, ROUND_BF16: tl.constexpr, ACC64: tl.constexpr):
    """One row: its objective ``ce_w CE + kd_w tau_s**2 D`` and parts, and the student gradient times
    the row's factor ``f`` (module docstring)."""
    row = tl.program_id(0)
    keep = keep_row(keep_ptr, row, HAS_MASK)
    keep, label, label_ok = row_label(labels_ptr, row, V, ignore_index, keep, HAS_LABELS)
    x_row = x_ptr + row.to(tl.int64) * x_stride
    ts = scalar(tau_s, ACC64)
    eps_a = scalar(eps, ACC64)
    ids, valid, b, count, log_norm, log_p_tail = teacher_row(
        ids_ptr, v_ptr, em_ptr, mean_ptr, std_ptr, ln_ptr, row, k, V, keep, scalar(value_scale, ACC64),
        scalar(tau_t, ACC64), eps_a, correction * 1.0, KBLOCK, HAS_EMASK, HAS_STATS, HAS_LN, STANDARDIZE,
        SUPPORT == 2, ACC64)
    mx, c, mean, m2 = student_moments(x_row, V, keep, BLOCK, STANDARDIZE, ACC64)
    sigma = m2 * 0.0
    s_c = sigma + 1.0
    if STANDARDIZE:
        sigma = tl.sqrt(m2 / (V - correction))
        s_c = sigma + eps_a * c
    inv = 1.0 / (s_c * ts)
    z, big_e, zc, xsum = student_sums(x_row, V, keep, mx, c, mean, s_c, inv, BLOCK, STANDARDIZE, HAS_LABELS, ACC64)
    x_j = to_acc(tl.load(x_row + ids, mask=valid, other=0.0), ACC64)
    a_max = (mx * c - mean) * inv
    a_j = (x_j * c - mean) * inv
    e = tl.where(valid, tl.exp(a_j - a_max), 0.0)
    z_tail = z - tl.sum(e, axis=0)
    if SUPPORT == 2:
        if z_tail < z * TAIL_CANCELLATION:  # Z - Z_S lost its digits: the outside classes summed
            z_tail = tail_sum(x_row, V, keep, ids, valid, c, mean, inv, a_max, TAIL_BLOCK, ACC64)
    d, g, coef = support_terms(b - log_norm, a_j, valid, a_max, z, z_tail, log_p_tail, count, SUPPORT)
    ce = d * 0.0
    if HAS_LABELS:
        x_label = to_acc(tl.load(x_row + label, mask=keep & label_ok, other=0.0), ACC64)
        lse_x = mx + tl.log(zc)
        ce = (1.0 - smoothing) * (lse_x - x_label) + smoothing * (lse_x - xsum / V)
        ce = tl.where(label_ok, ce, float("nan"))
    store_row_results(rows_ptr, ce_ptr, kd_ptr, row, keep, ce, d * ts * ts, ce_w, kd_w, HAS_LABELS)
    if GRAD:
        f = to_acc(tl.load(f_ptr + row * f_stride), ACC64)
        sparse_grads(x_row, g_ptr + row.to(tl.int64) * V, ids, valid, x_j, g, coef, e, z, big_e, zc, mx, c, mean,
                     sigma, s_c, inv, V, label, keep, f * kd_w * ts * c / s_c, f * ce_w, smoothing, correction,
                     BLOCK, STANDARDIZE, HAS_LABELS, ZERO_EXCLUDED, ROUND_BF16, ACC64)
