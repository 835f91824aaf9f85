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
"""

import triton
import triton.language as tl

from .row_math import FORWARD_KL, JEFFREYS, JSD, REVERSE_KL, TVD, expm1, log1p, psi_series


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
        diff = tl.where(q > 0.0, q * expm1(l), p)  # p - q without cancellation
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
