"""The row math of the Triton kernels, shared by the register and the blocked path.

Exponentials use ``exp2`` with ``log2(e)`` folded into the exponents' coefficients, logarithms
``log2``; accumulation is float32 (float64 when ``ACC64``: an input is float64). The formulas mirror
``csrc/include/logitstd/row_math.h`` and ``divergence.h`` (docs/design.md sections 1 and 8).

Constants (``tl.constexpr``) are written on the right of tensor arithmetic: Triton's interpreter
before 3.9 keeps ``constexpr * tensor`` a constexpr, which a comparison then rejects.
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
# The cancellation ratio above which a KL is taken from the Bregman form (row_math.h, kKlRefineRatio).
KL_REFINE_RATIO = tl.constexpr(4.0)
# The divergences' codes (config.DIVERGENCE_CODES).
FORWARD_KL = tl.constexpr(0)
REVERSE_KL = tl.constexpr(1)
JSD = tl.constexpr(2)
JEFFREYS = tl.constexpr(3)
TVD = tl.constexpr(4)
DKD = tl.constexpr(5)  # decoupled KD: the forward KL over the non-target classes plus the target's term
# Decoupled KD's non-target sums below this (exponents relative to the row's max, the target's lead
# over the rest above 60 bits) are summed again relative to the largest non-target class: their
# exponentials lose bits in float32 subnormals (below 2^-126) and vanish further down.
DKD_RESUM_BELOW = tl.constexpr(2.0 ** -60)


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
def sqrt_rn(x, ACC64: tl.constexpr):
    """IEEE-rounded square root (``tl.sqrt`` is approximate in float32, exact in float64)."""
    if ACC64:
        r = tl.sqrt(x)
    else:
        r = tl.sqrt_rn(x)
    return r


@triton.jit
def magnitude_scale(mx, mn, ACC64: tl.constexpr):
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
def log1p(r):
    """log(1 + r) to a few ulps without a log1p primitive: log(u) r / (u - 1), u = 1 + r."""
    u = 1.0 + r
    return tl.where(u == 1.0, r, tl.log2(u) * LN2 * r / (u - 1.0))


@triton.jit
def expm1(x):
    """e^x - 1 to a few ulps without an expm1 primitive (Kahan): (u - 1) x / log(u), u = e^x."""
    u = tl.exp2(x * LOG2E)
    big = u == float("inf")
    fixed = tl.where(big, 1.0, u)  # (u - 1) x / log(u) is NaN at u = inf
    q = (fixed - 1.0) * x / (tl.log2(tl.where(fixed == 1.0, 2.0, fixed)) * LN2)
    return tl.where(big, u, tl.where(fixed == 1.0, x, tl.where(fixed - 1.0 == -1.0, -1.0, q)))


@triton.jit
def phi_series(t):
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
def psi_series(t):
    """t e^t - e^t + 1 from its Taylor series, sum_{n>=2} (n - 1) t^n / n!, for |t| <= 1/2."""
    r = t * (15.0 / 20922789888000.0) + (14.0 / 1307674368000.0)
    r = r * t + (13.0 / 87178291200.0)
    r = r * t + (12.0 / 6227020800.0)
    r = r * t + (11.0 / 479001600.0)
    r = r * t + (10.0 / 39916800.0)
    r = r * t + (9.0 / 3628800.0)
    r = r * t + (8.0 / 362880.0)
    r = r * t + (7.0 / 40320.0)
    r = r * t + (6.0 / 5040.0)
    r = r * t + (5.0 / 720.0)
    r = r * t + (4.0 / 120.0)
    r = r * t + (3.0 / 24.0)
    r = r * t + (2.0 / 6.0)
    r = r * t + 0.5
    return r * t * t


@triton.jit
def bregman_terms(e_p, e_q, t, r_zp, r_zq):
    """p_k phi(t_k) (row_math.h, bregman_term): the series where |t| <= 1/2, else q_k - p_k (1 + t_k)
    (no overflow of e^t where p is tiny); q_k where p = 0. p = e_p r_zp, q = e_q r_zq; the reverse KL
    passes the student's side as p and the teacher's as q, and -t."""
    p = e_p * r_zp
    term = tl.where(tl.abs(t) <= 0.5, p * phi_series(t), e_q * r_zq - (p * t + p))
    return tl.where(e_p > 0.0, term, e_q * r_zq)


@triton.jit
def needs_refinement(kl, tabs_over_z, lz):
    """Whether a KL from the partition sums cancels (row_math.h, kl_needs_refinement): finite, and
    ``KL_REFINE_RATIO * KL < E|delta| + |log(Za/Zb)|``."""
    finite = (kl == kl) & (tl.abs(kl) < float("inf")) & (tabs_over_z < float("inf"))
    return finite & (kl * KL_REFINE_RATIO < tabs_over_z + tl.abs(lz))


@triton.jit
def row_ce(zc, zsum, excl, sz_label, smoothing, v_f):
    """CE = (1 - s) nll + s (log Zc - ln2 zsum / V), nll = log1p(E / 2^sz_label) (row_math.h, row_ce;
    sz in log2 units; E the sum over the classes other than the label)."""
    log_z = tl.log2(zc) * LN2
    ez_label = tl.exp2(sz_label)
    nll = tl.where(ez_label > 1e-30, log1p(excl / ez_label), log_z - sz_label * LN2)
    return (1.0 - smoothing) * nll + smoothing * (log_z - zsum * LN2 / v_f)


@triton.jit
def keep_row(keep_ptr, row, HAS_MASK: tl.constexpr):
    """The row's mask flag as an int1 scalar (always true without a mask)."""
    if HAS_MASK:
        keep = tl.load(keep_ptr + row) != 0
    else:
        keep = row >= 0
    return keep


@triton.jit
def row_label(labels_ptr, row, V, ignore_index, keep, HAS_LABELS: tl.constexpr):
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
def store_row_results(rows_ptr, ce_ptr, kd_ptr, row, keep, ce, kd, ce_w, kd_w, HAS_LABELS: tl.constexpr):
    """The row's objective ce_w CE + kd_w KD (kd_w KD without labels) and its two parts."""
    if HAS_LABELS:
        obj = ce_w * ce + kd_w * kd
    else:
        obj = kd_w * kd
    tl.store(rows_ptr + row, tl.where(keep, obj, 0.0))
    tl.store(ce_ptr + row, tl.where(keep, ce, 0.0))
    tl.store(kd_ptr + row, tl.where(keep, kd, 0.0))


@triton.jit
def total(t):
    """Sum of a [R, VEC] tile: inside each thread along VEC, then across threads."""
    return tl.sum(tl.sum(t, axis=1), axis=0)


@triton.jit
def max2(a, b):
    """Maxima of two [R] vectors in one cross-warp reduction."""
    return tl.split(tl.max(tl.join(a, b), axis=0))


@triton.jit
def min2(a, b):
    """Minima of two [R] vectors in one cross-warp reduction."""
    return tl.split(tl.min(tl.join(a, b), axis=0))


@triton.jit
def round_bf16(g):
    """float32 -> bfloat16 with round-to-nearest-even done on the bits, then an exact conversion.

    The Triton interpreter converts float32 to bfloat16 by truncation and float64 to bfloat16
    wrongly; compiled kernels round correctly and do not use this.
    """
    g32 = g.to(tl.float32)
    bits = g32.to(tl.int32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return tl.where(g32 != g32, g32, rounded).to(tl.bfloat16)


@triton.jit
def store_grad(g_ptr, offs, valid, g, keep, ZERO_EXCLUDED: tl.constexpr, ROUND_BF16: tl.constexpr,
               STREAM: tl.constexpr):
    """Store ``g`` in the gradient's dtype where ``valid`` (None: all): 0 for a masked-out row with
    ``ZERO_EXCLUDED``, else nothing for it. ``STREAM``: streaming stores (``.cs``, evict first: the
    kernel never reads the gradient back)."""
    out = tl.where(keep, g, 0.0)
    if not ZERO_EXCLUDED:
        keep_tile = (tl.zeros(offs.shape, dtype=tl.int32) + keep.to(tl.int32)) != 0
        if valid is None:
            valid = keep_tile
        else:
            valid = valid & keep_tile
    ptrs = g_ptr + offs
    if ROUND_BF16 and g_ptr.dtype.element_ty == tl.bfloat16:
        out = round_bf16(out)
    else:
        out = out.to(g_ptr.dtype.element_ty)
    if STREAM:
        tl.store(ptrs, out, mask=valid, cache_modifier=".cs")
    else:
        tl.store(ptrs, out, mask=valid)


@triton.jit
def tile_offsets(BLOCK: tl.constexpr, VEC: tl.constexpr):
    """Offsets 0..BLOCK-1 as a [BLOCK // VEC, VEC] tile of VEC-contiguous runs."""
    return tl.arange(0, BLOCK // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]
