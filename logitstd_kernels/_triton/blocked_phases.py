"""Phases 2 to 5 of the blocked path (blocked_kernel.py has the kernel and the phases' math):
the sums, the pointwise divergences' pass, the Bregman refinement and the gradients, each a loop
over a row's tiles with its per-tile function."""

import triton
import triton.language as tl

from .divergence import pointwise_terms, student_term, teacher_term
from .row_math import FORWARD_KL, JEFFREYS, JSD, LN2, REVERSE_KL, TVD, bregman_terms, store_grad, tile_offsets, to_acc


@triton.jit
def load_tile(x_row, y_row, offs, lim, x0_raw, y0_raw, EVICT_HINTS: tl.constexpr, LAST_USE: tl.constexpr):
    """Raw (input dtype) x and y at ``offs`` where ``offs < lim``; other lanes get x[0] / y[0].

    ``EVICT_HINTS``: L2 eviction hints, ``evict_first`` for the row's last read (``LAST_USE``),
    else ``evict_last`` (the row is read again).
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
def _load_full_one(row, tile, tiles, BLOCK: tl.constexpr, VEC: tl.constexpr, EVICT_HINTS: tl.constexpr,
                   LAST_USE: tl.constexpr):
    """One input's full tile ``tile`` of a row whose first ``tiles`` full tiles are loaded (the mask
    uniform over the tile). bf16 runs load as pairs in int32 and widen with a shift and a mask (one
    instruction per element, where a conversion takes two), interleaved back into the tile's order."""
    if EVICT_HINTS:
        policy: tl.constexpr = "evict_first" if LAST_USE else "evict_last"
    else:
        policy: tl.constexpr = ""
    if (row.dtype.element_ty == tl.bfloat16) and (VEC >= 2):
        pairs = tile * (BLOCK // 2) + tl.arange(0, BLOCK // VEC)[:, None] * (VEC // 2) + tl.arange(0, VEC // 2)[None, :]
        v = tl.load(row.to(tl.pointer_type(tl.int32)) + pairs, mask=pairs < tiles * (BLOCK // 2), eviction_policy=policy)
        out = tl.interleave((v << 16).to(tl.float32, bitcast=True), (v & -65536).to(tl.float32, bitcast=True))
    else:
        offs = tile * BLOCK + tile_offsets(BLOCK, VEC)
        out = tl.load(row + offs, mask=offs < tiles * BLOCK, eviction_policy=policy)
    return out


@triton.jit
def load_full(x_row, y_row, tile, tiles, BLOCK: tl.constexpr, VEC: tl.constexpr, ACC64: tl.constexpr,
              EVICT_HINTS: tl.constexpr, LAST_USE: tl.constexpr):
    """``load_tile`` of full tile number ``tile``, in the accumulation dtype, where the row's first
    ``tiles`` full tiles have data (0 for a masked-out row; the prefetch past the last tile loads
    nothing): the mask is uniform over the tile, and the lanes it masks are never used, so there is no
    other value (no register moves for it)."""
    x = to_acc(_load_full_one(x_row, tile, tiles, BLOCK, VEC, EVICT_HINTS, LAST_USE), ACC64)
    y = to_acc(_load_full_one(y_row, tile, tiles, BLOCK, VEC, EVICT_HINTS, LAST_USE), ACC64)
    return x, y


@triton.jit
def _exps(x, y, cx, cy, x0c, y0c, ka, ba, kb, bb):
    """(e0x, e0y, da, db, ea, eb) of a tile: e0 = c x - c x[0] (exact for rows like 1000 + noise),
    the exponents ``da = e0 Ka + Ba`` (log2 units, <= 0) and their exponentials."""
    e0x = x * cx - x0c
    e0y = y * cy - y0c
    da = e0x * ka + ba
    db = e0y * kb + bb
    return e0x, e0y, da, db, tl.exp2(da), tl.exp2(db)


@triton.jit
def _guarded(e, d, STD: tl.constexpr):
    """e d, 0 where e = 0: an unstandardized -inf logit makes d infinite or NaN (standardized, the
    whole row is NaN anyway, as in the reference)."""
    if STD:
        r = e * d
    else:
        r = tl.where(e > 0.0, e * d, 0.0)
    return r


@triton.jit
def _sums_tile(x, y, m, offs, label, label_tile, tile, cx, cy, x0c, y0c, ka, ba, kb, bb, kz, bz,
               za, zb, tf, tfa, tr, tra, sea, seb, ser, teb, teh, tea, zo, lt, ltx, zs,
               STD: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, HAS_LABELS: tl.constexpr,
               SMOOTH: tl.constexpr, DIV: tl.constexpr):
    """Phase 2 on one tile: its partition sums, the KLs' sums (sum e^b delta and |.|, sum e^a delta
    and |.|, delta = db - da), the standardization's sums (sum e^a e0x, e^b e0x, e^a delta e0x for
    the student; e^b e0y, e^b delta e0y, e^a e0y for the teacher) and the CE's sums."""
    e0x, e0y, da, db, ea, eb = _exps(x, y, cx, cy, x0c, y0c, ka, ba, kb, bb)
    if m is not None:
        ea = tl.where(m, ea, 0.0)
        eb = tl.where(m, eb, 0.0)
    za += tl.sum(ea, axis=1)
    zb += tl.sum(eb, axis=1)
    delta = db - da
    if (DIV == FORWARD_KL) or (DIV == JEFFREYS):
        eh = _guarded(eb, delta, STD)
        tf += tl.sum(eh, axis=1)
        tfa += tl.sum(tl.abs(eh), axis=1)
        if STD and GRAD_S:
            seb += tl.sum(eb * e0x, axis=1)
        if STD and GRAD_T:
            teh += tl.sum(eh * e0y, axis=1)
    if (DIV == REVERSE_KL) or (DIV == JEFFREYS):
        er = _guarded(ea, delta, STD)
        tr += tl.sum(er, axis=1)
        tra += tl.sum(tl.abs(er), axis=1)
        if STD and GRAD_S:
            ser += tl.sum(er * e0x, axis=1)
        if STD and GRAD_T:
            tea += tl.sum(ea * e0y, axis=1)
    if STD and GRAD_S:
        sea += tl.sum(ea * e0x, axis=1)
    if STD and GRAD_T:
        teb += tl.sum(eb * e0y, axis=1)
    if HAS_LABELS:  # sz = (x - max x) log2(e); the label's tile apart (E = sum over the other classes)
        sz = e0x * kz + bz
        ez = tl.exp2(sz)
        if m is not None:
            ez = tl.where(m, ez, 0.0)
            sz = tl.where(m, sz, 0.0)
        if tile == label_tile:
            lt += tl.sum(ez, axis=1)
            ltx += tl.sum(tl.where(offs == label, 0.0, ez), axis=1)
        else:
            zo += tl.sum(ez, axis=1)
        if SMOOTH:
            zs += tl.sum(sz, axis=1)
    return za, zb, tf, tfa, tr, tra, sea, seb, ser, teb, teh, tea, zo, lt, ltx, zs


@triton.jit
def sums_phase(x_row, y_row, x0_raw, y0_raw, V, v_load, num_full, has_tail, offs0, label, cx, cy, x0c, y0c,
                ka, ba, kb, bb, kz, bz, BLOCK: tl.constexpr, VEC: tl.constexpr, ACC64: tl.constexpr, STD: tl.constexpr,
                GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, HAS_LABELS: tl.constexpr, SMOOTH: tl.constexpr,
                DIV: tl.constexpr, EVICT_HINTS: tl.constexpr, LAST_USE: tl.constexpr):
    """Phase 2 over the row, last tile first: the sums of ``_sums_tile``, each a scalar."""
    za = tl.sum(offs0 * 0.0, axis=1).to(x0c.dtype)
    zb, tf, tfa, tr, tra, sea, seb, ser, teb, teh, tea, zo, lt, ltx, zs = za, za, za, za, za, za, za, za, za, za, \
        za, za, za, za, za
    label_tile = label // BLOCK
    v_full = num_full * BLOCK
    if has_tail:
        offs = v_full + offs0
        x, y = load_tile(x_row, y_row, offs, v_load, x0_raw, y0_raw, EVICT_HINTS, LAST_USE)
        za, zb, tf, tfa, tr, tra, sea, seb, ser, teb, teh, tea, zo, lt, ltx, zs = _sums_tile(
            to_acc(x, ACC64), to_acc(y, ACC64), offs < V, offs, label, label_tile, num_full, cx, cy, x0c, y0c, ka,
            ba, kb, bb, kz, bz, za, zb, tf, tfa, tr, tra, sea, seb, ser, teb, teh, tea, zo, lt, ltx, zs, STD,
            GRAD_S, GRAD_T, HAS_LABELS, SMOOTH, DIV)
    x_next, y_next = load_full(x_row, y_row, tl.maximum(num_full - 1, 0), num_full, BLOCK, VEC, ACC64, EVICT_HINTS,
                               LAST_USE)
    for i in range(0, num_full):
        xt = to_acc(x_next, ACC64)
        yt = to_acc(y_next, ACC64)
        tile = num_full - 1 - i
        # prefetch the tile before this one; none before tile 0 (limit 0: no traffic)
        x_next, y_next = load_full(x_row, y_row, tl.maximum(tile - 1, 0), num_full * (i + 1 < num_full).to(tl.int32),
                                   BLOCK, VEC, ACC64, EVICT_HINTS, LAST_USE)
        za, zb, tf, tfa, tr, tra, sea, seb, ser, teb, teh, tea, zo, lt, ltx, zs = _sums_tile(
            xt, yt, None, tile * BLOCK + offs0, label, label_tile, tile, cx, cy, x0c, y0c, ka, ba, kb, bb, kz, bz, za,
            zb, tf, tfa, tr, tra, sea, seb, ser, teb, teh, tea, zo, lt, ltx, zs, STD, GRAD_S, GRAD_T, HAS_LABELS,
            SMOOTH, DIV)
    return (tl.sum(za, axis=0), tl.sum(zb, axis=0), tl.sum(tf, axis=0), tl.sum(tfa, axis=0), tl.sum(tr, axis=0),
            tl.sum(tra, axis=0), tl.sum(sea, axis=0), tl.sum(seb, axis=0), tl.sum(ser, axis=0), tl.sum(teb, axis=0),
            tl.sum(teh, axis=0), tl.sum(tea, axis=0), tl.sum(zo, axis=0), tl.sum(lt, axis=0), tl.sum(ltx, axis=0),
            tl.sum(zs, axis=0))


@triton.jit
def _pointwise_tile(x, y, m, cx, cy, x0c, y0c, ka, ba, kb, bb, r_za, r_zb, lz, beta, loss, eq, ep, eqx, epy,
                    STD: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, DIV: tl.constexpr):
    """Phase 3 on one tile (jsd, tvd): the per-element losses, q g, p h, and their sums with e0."""
    e0x, e0y, da, db, ea, eb = _exps(x, y, cx, cy, x0c, y0c, ka, ba, kb, bb)
    if m is not None:
        ea = tl.where(m, ea, 0.0)
        eb = tl.where(m, eb, 0.0)
    q = ea * r_za
    p = eb * r_zb
    terms, g, h = pointwise_terms(q, p, (db - da) * LN2 + lz, beta, DIV)
    loss += tl.sum(terms, axis=1)
    eq += tl.sum(q * g, axis=1)
    ep += tl.sum(p * h, axis=1)
    if STD and GRAD_S:
        eqx += tl.sum(q * g * e0x, axis=1)
    if STD and GRAD_T:
        epy += tl.sum(p * h * e0y, axis=1)
    return loss, eq, ep, eqx, epy


@triton.jit
def pointwise_phase(x_row, y_row, x0_raw, y0_raw, V, v_load, num_full, has_tail, offs0, cx, cy, x0c, y0c, ka, ba,
                     kb, bb, r_za, r_zb, lz, beta, BLOCK: tl.constexpr, VEC: tl.constexpr, ACC64: tl.constexpr, STD: tl.constexpr,
                     GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, DIV: tl.constexpr, EVICT_HINTS: tl.constexpr):
    """Phase 3 over the row (jsd, tvd): (the divergence, E_q g, E_p h, sum q g e0x, sum p h e0y)."""
    loss = tl.sum(offs0 * 0.0, axis=1).to(x0c.dtype)
    eq, ep, eqx, epy = loss, loss, loss, loss
    v_full = num_full * BLOCK
    x_next, y_next = load_full(x_row, y_row, 0, num_full, BLOCK, VEC, ACC64, EVICT_HINTS, False)
    for blk in range(0, num_full):
        xt = to_acc(x_next, ACC64)
        yt = to_acc(y_next, ACC64)
        x_next, y_next = load_full(x_row, y_row, blk + 1, num_full, BLOCK, VEC, ACC64, EVICT_HINTS, False)
        loss, eq, ep, eqx, epy = _pointwise_tile(xt, yt, None, cx, cy, x0c, y0c, ka, ba, kb, bb, r_za, r_zb, lz, beta,
                                                 loss, eq, ep, eqx, epy, STD, GRAD_S, GRAD_T, DIV)
    if has_tail:
        offs = v_full + offs0
        x, y = load_tile(x_row, y_row, offs, v_load, x0_raw, y0_raw, EVICT_HINTS, False)
        loss, eq, ep, eqx, epy = _pointwise_tile(to_acc(x, ACC64), to_acc(y, ACC64), offs < V, cx, cy, x0c, y0c, ka,
                                                 ba, kb, bb, r_za, r_zb, lz, beta, loss, eq, ep, eqx, epy, STD, GRAD_S,
                                                 GRAD_T, DIV)
    return tl.sum(loss, axis=0), tl.sum(eq, axis=0), tl.sum(ep, axis=0), tl.sum(eqx, axis=0), tl.sum(epy, axis=0)


@triton.jit
def _refine_tile(x, y, m, cx, cy, x0c, y0c, ka, ba, kb, bb, r_za, r_zb, lz, bf, br, FWD: tl.constexpr,
                 REV: tl.constexpr):
    """The Bregman terms of one tile: forward sum p phi(-l), reverse sum q phi(l) (bregman_terms)."""
    e0x, e0y, da, db, ea, eb = _exps(x, y, cx, cy, x0c, y0c, ka, ba, kb, bb)
    if m is not None:
        ea = tl.where(m, ea, 0.0)
        eb = tl.where(m, eb, 0.0)
    lv = (db - da) * LN2 + lz
    if FWD:
        bf += tl.sum(bregman_terms(eb, ea, -lv, r_zb, r_za), axis=1)
    if REV:
        br += tl.sum(bregman_terms(ea, eb, lv, r_za, r_zb), axis=1)
    return bf, br


@triton.jit
def refine_phase(x_row, y_row, x0_raw, y0_raw, V, v_load, num_full, has_tail, offs0, cx, cy, x0c, y0c, ka, ba, kb,
                  bb, r_za, r_zb, lz, BLOCK: tl.constexpr, VEC: tl.constexpr, ACC64: tl.constexpr, FWD: tl.constexpr, REV: tl.constexpr,
                  EVICT_HINTS: tl.constexpr):
    """The Bregman forms of the row's KLs (rows where the sums cancel only: the caller's branch)."""
    bf = tl.sum(offs0 * 0.0, axis=1).to(x0c.dtype)
    br = bf
    v_full = num_full * BLOCK
    x_next, y_next = load_full(x_row, y_row, 0, num_full, BLOCK, VEC, ACC64, EVICT_HINTS, True)
    for blk in range(0, num_full):
        xt = to_acc(x_next, ACC64)
        yt = to_acc(y_next, ACC64)
        x_next, y_next = load_full(x_row, y_row, blk + 1, num_full, BLOCK, VEC, ACC64, EVICT_HINTS, True)
        bf, br = _refine_tile(xt, yt, None, cx, cy, x0c, y0c, ka, ba, kb, bb, r_za, r_zb, lz, bf, br, FWD, REV)
    if has_tail:
        offs = v_full + offs0
        x, y = load_tile(x_row, y_row, offs, v_load, x0_raw, y0_raw, EVICT_HINTS, True)
        bf, br = _refine_tile(to_acc(x, ACC64), to_acc(y, ACC64), offs < V, cx, cy, x0c, y0c, ka, ba, kb, bb, r_za,
                              r_zb, lz, bf, br, FWD, REV)
    return tl.sum(bf, axis=0), tl.sum(br, axis=0)


@triton.jit
def _grads_tile(x, y, m, offs, out_offs, gx_ptr, gy_ptr, keep, cx, cy, x0c, y0c, ka, ba, kb, bb, r_za, r_zb, lz,
                beta, kl_f, kl_r, e_qg, e_ph, coef_s, coef_t, ce, label, label_ok, ZERO_EXCLUDED: tl.constexpr,
                ROUND_BF16: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, HAS_LABELS: tl.constexpr,
                DIV: tl.constexpr, STREAM: tl.constexpr):
    """Phase 4 on one tile: ``out = term A + e0 C + D`` per element (forward KL's student gradient:
    ``ea A / Za - eb A / Zb + e0 C + D``), plus the CE's ``ce_scale (e^sz / Zc - s / V)`` and its
    label element ``ce_l`` (a NaN row for a label outside [0, V)); ``m`` masks the partial tile."""
    a_s, c_s, d_s = coef_s
    a_t, c_t, d_t = coef_t
    e0x, e0y, da, db, ea, eb = _exps(x, y, cx, cy, x0c, y0c, ka, ba, kb, bb)
    if m is not None:
        ea = tl.where(m, ea, 0.0)
        eb = tl.where(m, eb, 0.0)
    l = (db - da) * LN2 + lz
    g = l * 0.0
    h = g
    if (DIV == JSD) or (DIV == TVD):
        terms, g, h = pointwise_terms(ea * r_za, eb * r_zb, l, beta, DIV)
    if GRAD_S:
        if DIV == FORWARD_KL:
            out = ea * (a_s * r_za) - eb * (a_s * r_zb) + (e0x * c_s + d_s)
        else:
            out = student_term(ea, eb, l, r_za, r_zb, kl_r, g, e_qg, DIV) * a_s + (e0x * c_s + d_s)
        if HAS_LABELS:
            kz, bz, r_zc, ce_scale, ce_b, ce_l = ce
            ez = tl.exp2(e0x * kz + bz)
            out += tl.where(offs == label, ce_l, ez * (ce_scale * r_zc) - ce_b)
            out = tl.where(label_ok, out, float("nan"))
        store_grad(gx_ptr, out_offs, m, out, keep, ZERO_EXCLUDED, ROUND_BF16, STREAM)
    if GRAD_T:
        # c_t = 0 without standardization: a -inf teacher logit (e0y = -inf) adds 0, not 0 * -inf
        e0_term = tl.where(c_t == 0.0, 0.0, e0y * c_t)
        out_t = teacher_term(ea, eb, l, r_za, r_zb, kl_f, h, e_ph, DIV) * a_t + (e0_term + d_t)
        store_grad(gy_ptr, out_offs, m, out_t, keep, ZERO_EXCLUDED, ROUND_BF16, STREAM)


@triton.jit
def grads_phase(x_row, y_row, x0_raw, y0_raw, V, v_load, num_pass, tail, out_row, offs0, gx_ptr, gy_ptr, keep,
                 cx, cy, x0c, y0c, ka, ba, kb, bb, r_za, r_zb, lz, beta, kl_f, kl_r, e_qg, e_ph, coef_s, coef_t, ce,
                 label, label_ok, BLOCK: tl.constexpr, VEC: tl.constexpr, ACC64: tl.constexpr, ZERO_EXCLUDED: tl.constexpr,
                 ROUND_BF16: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, HAS_LABELS: tl.constexpr,
                 DIV: tl.constexpr, EVICT_HINTS: tl.constexpr):
    """Phase 4 over the row: full tiles forward, then the partial tile (``num_pass`` full tiles:
    every tile of a masked-out row with ZERO_EXCLUDED, its loads empty: zeros stored)."""
    loaded = v_load // BLOCK  # the full tiles with data (none for a masked-out row)
    x_next, y_next = load_full(x_row, y_row, 0, loaded, BLOCK, VEC, ACC64, EVICT_HINTS, True)
    for blk in range(0, num_pass):
        offs = blk * BLOCK + offs0
        xt = to_acc(x_next, ACC64)
        yt = to_acc(y_next, ACC64)
        x_next, y_next = load_full(x_row, y_row, blk + 1, loaded, BLOCK, VEC, ACC64, EVICT_HINTS, True)
        _grads_tile(xt, yt, None, offs, out_row + offs, gx_ptr, gy_ptr, keep, cx, cy, x0c, y0c, ka, ba, kb, bb, r_za,
                    r_zb, lz, beta, kl_f, kl_r, e_qg, e_ph, coef_s, coef_t, ce, label, label_ok, ZERO_EXCLUDED,
                    ROUND_BF16, GRAD_S, GRAD_T, HAS_LABELS, DIV, EVICT_HINTS)
    if tail:
        offs = num_pass * BLOCK + offs0
        x, y = load_tile(x_row, y_row, offs, v_load, x0_raw, y0_raw, EVICT_HINTS, True)
        _grads_tile(to_acc(x, ACC64), to_acc(y, ACC64), offs < V, offs, out_row + offs, gx_ptr, gy_ptr, keep, cx, cy,
                    x0c, y0c, ka, ba, kb, bb, r_za, r_zb, lz, beta, kl_f, kl_r, e_qg, e_ph, coef_s, coef_t, ce, label,
                    label_ok, ZERO_EXCLUDED, ROUND_BF16, GRAD_S, GRAD_T, HAS_LABELS, DIV, EVICT_HINTS)
