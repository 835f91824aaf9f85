"""The divergence family's per-element math in Triton (docs/design.md section 8; ``divergence.h``).

With q = e^sa / Za (student), p = e^sb / Zb (teacher), l = ln p - ln q, every divergence's gradients
are ``dD/da = q (g - E_q g)`` and ``dD/db = p (h - E_p h)``; the kernels evaluate the per-element
*terms* ``q (g - E_q g)`` and ``p (h - E_p h)`` and then the chain rule through the standardization:

- forward KL: term_s = q - p, term_t = p (l - KL);  reverse KL: term_s = q (-l - RKL), term_t = p - q;
  Jeffreys: the sums;
- jsd (0 < beta < 1), m = beta p + (1 - beta) q: g = (1 - beta) ln(q/m), h = beta ln(p/m), its loss
  per element non-negative: m (beta psi(ln(p/m)) + (1 - beta) psi(ln(q/m))), psi(t) = t e^t - e^t + 1;
- tvd: g = 1/2 sign(q - p), h = 1/2 sign(p - q) (0 at p = q), loss 1/2 q |expm1(l)|.

A class with p = 0 or q = 0 contributes the limit of its terms (0 where it is 0), never NaN.

Decoupled KD (``dkd_row.h``): the kernels leave the target class g out of the exp pass's sums, so
Za', Zb' are the non-target classes' own sums and NCKD is the forward KL's sums (and refinement) over
them; ``dkd_row`` adds TCKD in the two-bin Bregman form and the coefficients of the per-element terms
(k != g) ``ea rza - eb rzb`` (student) and ``eb (rzb (l' - NCKD) - shift)`` (teacher, l' = ln p^ - ln q^),
and of the target's own terms.
"""

import triton
import triton.language as tl

from .row_math import FORWARD_KL, JEFFREYS, JSD, LN2, LOG2E, REVERSE_KL, TVD, bregman_terms, expm1, log1p, psi_series


@triton.jit
def _jsd_side(v, m, lv):
    """m psi(ln(v/m)) for one side of the JSD, v = m e^lv: the series where |lv| <= 1/2, else
    m - v + v lv; v = 0: its limit m."""
    direct = v * lv + (m - v)
    return tl.where(v > 0.0, tl.where(tl.abs(lv) <= 0.5, m * psi_series(lv), direct), m)


@triton.jit
def pointwise_terms(q, p, l, beta, DIV: tl.constexpr):
    """(loss, g, h) per element of the pointwise divergences (jsd, tvd)."""
    if DIV == TVD:
        diff = tl.where(q > 0.0, q * expm1(l), p - q)  # p - q without cancellation (q = 0 or NaN: p - q)
        half = tl.where(diff > 0.0, 0.5, tl.where(diff < 0.0, -0.5, 0.0))
        loss = tl.abs(diff) * 0.5
        g = -half
        h = half
    else:
        # the larger side's ln(side / m) from expm1(-|l|) (no overflow, whatever l), the other's from it
        one_minus = 1.0 - beta
        larger = -log1p(expm1(-tl.abs(l)) * tl.where(l > 0.0, one_minus, beta))
        lq = tl.where(l > 0.0, larger - l, larger)  # ln(q / m)
        lp = tl.where(l > 0.0, larger, l + larger)  # ln(p / m)
        m = p * beta + q * one_minus
        loss = _jsd_side(p, m, lp) * beta + _jsd_side(q, m, lq) * one_minus
        g = tl.where(q > 0.0, lq * one_minus, 0.0)
        h = tl.where(p > 0.0, lp * beta, 0.0)
    return loss, g, h


@triton.jit
def student_term(ea, eb, l, r_za, r_zb, kl_r, g, e_qg, DIV: tl.constexpr):
    """q (g - E_q g) of one element (``g``, ``e_qg``: the pointwise divergences' values)."""
    q = ea * r_za
    if DIV == FORWARD_KL:
        term = q - eb * r_zb
    elif DIV == REVERSE_KL:
        term = tl.where(ea > 0.0, q * (-l - kl_r), 0.0)
    elif DIV == JEFFREYS:
        term = q - eb * r_zb + tl.where(ea > 0.0, q * (-l - kl_r), 0.0)
    else:
        term = q * (g - e_qg)
    return term


@triton.jit
def teacher_term(ea, eb, l, r_za, r_zb, kl_f, h, e_ph, DIV: tl.constexpr):
    """p (h - E_p h) of one element (``h``, ``e_ph``: the pointwise divergences' values)."""
    p = eb * r_zb
    if DIV == FORWARD_KL:
        term = tl.where(eb > 0.0, p * (l - kl_f), 0.0)
    elif DIV == REVERSE_KL:
        term = p - ea * r_za
    elif DIV == JEFFREYS:
        term = tl.where(eb > 0.0, p * (l - kl_f), 0.0) + (p - ea * r_za)
    else:
        term = p * (h - e_ph)
    return term


@triton.jit
def _share_logs(z, e):
    """(log2 of the target's share 2^e / (z + 2^e), log2 of the rest's z / (z + 2^e)) for a sum z of
    2^(exponents <= 0) and a target's exponent e of any size: log1p of the smaller share's ratio to
    the larger (no large logarithm cancels, no overflow of 2^e where the target dominates)."""
    lz = tl.log2(z)
    big = e > lz  # the target's share is the larger
    t_big = log1p(tl.exp2(lz - e)) * LOG2E
    t_small = log1p(tl.exp2(e - lz)) * LOG2E
    return tl.where(big, -t_big, e - lz - t_small), tl.where(big, lz - e - t_big, -t_small)


@triton.jit
def dkd_row(da_g, db_g, za, zb, nckd, alpha, beta):
    """(alpha TCKD + beta NCKD, coefficients) of decoupled KD (dkd_row.h, dkd_target) from the target's
    exponents da_g, db_g (log2 units, on the scale of the non-target sums za = Za', zb = Zb'; any
    size) and NCKD. The bins come from their logarithms (_share_logs: no cancellation where p_g is
    near 1, no overflow where the target dominates);
    TCKD = KL([p_g, 1 - p_g] || [q_g, 1 - q_g]) as two Bregman terms. The coefficients
    ``(rza, rzb, shift, tgt_s, tgt_t)``: rza = (alpha (p_g - q_g) + beta) / Za', rzb = beta / Zb',
    shift = alpha Delta p_g (1 - p_g) / Zb' (Delta = ln(p_g / q_g) - ln((1 - p_g) / (1 - q_g));
    Delta p_g is 0 where p_g = 0, its limit), and the target's terms tgt_s = alpha (q_g - p_g),
    tgt_t = alpha Delta p_g (1 - p_g)."""
    log_q, log_rest_q = _share_logs(za, da_g)  # log2 q_g, log2(1 - q_g)
    log_p, log_rest_p = _share_logs(zb, db_g)
    q_g = tl.exp2(log_q)
    p_g = tl.exp2(log_p)
    rest_p = tl.exp2(log_rest_p)
    l_g = (log_p - log_q) * LN2  # ln p_g - ln q_g
    l_rest = (log_rest_p - log_rest_q) * LN2  # ln(1 - p_g) - ln(1 - q_g)
    tckd = bregman_terms(p_g, q_g, -l_g, 1.0, 1.0) + bregman_terms(rest_p, tl.exp2(log_rest_q), -l_rest, 1.0, 1.0)
    tgt_t = alpha * tl.where(p_g > 0.0, (l_g - l_rest) * p_g, 0.0) * rest_p
    coefficients = ((alpha * (p_g - q_g) + beta) / za, beta / zb, tgt_t / zb, alpha * (q_g - p_g), tgt_t)
    return alpha * tckd + beta * nckd, coefficients


@triton.jit
def dkd_student_term(ea, eb, at_target, dkd):
    """Decoupled KD's student term: ``ea rza - eb rzb`` off the target, ``tgt_s`` at it (dkd_row)."""
    rza, rzb, shift, tgt_s, tgt_t = dkd
    return tl.where(at_target, tgt_s, ea * rza - eb * rzb)


@triton.jit
def dkd_teacher_term(eb, l, at_target, nckd, dkd):
    """Decoupled KD's teacher term: ``eb (rzb (l - NCKD) - shift)`` off the target (0 where eb = 0),
    ``tgt_t`` at it (dkd_row); ``l`` = ln p^ - ln q^ (the non-target sums' log ratio in it)."""
    rza, rzb, shift, tgt_s, tgt_t = dkd
    return tl.where(at_target, tgt_t, tl.where(eb > 0.0, eb * (rzb * (l - nckd) - shift), 0.0))
