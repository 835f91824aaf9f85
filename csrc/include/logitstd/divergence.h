// The divergence family of the fused loss (docs/design.md section 8), shared by the CPU kernel (on
// scalars and at::vec::Vectorized lanes) and the CUDA kernel.
//
// With q = e^sa / Za (student) and p = e^sb / Zb (teacher), delta = sb - sa in exponent units and
// l = ln p - ln q = unit delta + lz, lz = log(Za / Zb), every divergence D(p, q) has the gradients
//   dD/da_k = q_k (g_k - E_q g),   dD/db_k = p_k (h_k - E_p h)
// for a per-element pair (g, h). A kernel evaluates them as the per-element *terms*
//   student_div_term = q (g - E_q g),   teacher_div_term = p (h - E_p h)
// and then the chain rule through the standardization (row_math.h, term_coefficients):
//   forward_kl  KL(p || q):  g = -p / q                   term q - p;           h = l,      term p (l - KL)
//   reverse_kl  KL(q || p):  g = -l,                      term q (-l - RKL);    h = -q / p, term p - q
//   jeffreys    the sum of both
//   jsd(beta)   m = beta p + (1 - beta) q:  g = (1 - beta) ln(q / m),  h = beta ln(p / m)
//   tvd         1/2 sum |p - q|:  g = 1/2 sign(q - p),  h = 1/2 sign(p - q)   (subgradient 0 at p = q)
// The two KLs' losses come from the partition sums (row_math.h, and ReverseSums below), refined by
// the Bregman form where they cancel; the pointwise divergences (jsd, tvd) take one more pass over
// the row for their loss and E_q g, E_p h (pointwise_terms), each element's loss non-negative
// (no cancellation at high temperature): jsd's as m (beta psi(ln(p/m)) + (1 - beta) psi(ln(q/m))),
// psi(t) = t e^t - e^t + 1, and tvd's as 1/2 q |expm1(l)|.
// A class with p = 0 or q = 0 contributes the limit of its terms (0 where it is 0), never NaN.
#pragma once

#include <cstdint>

#include "row_math.h"

namespace logitstd {

// kDkd: decoupled KD (the forward KL's passes over the non-target classes, plus its target-class
// term; the CPU kernel's kd_cpu_kernel.cpp, dkd_* functions).
enum class Divergence : int32_t { kForwardKl = 0, kReverseKl = 1, kJsd = 2, kJeffreys = 3, kTvd = 4, kDkd = 5 };

LOGITSTD_HD constexpr bool has_forward(Divergence d) { return d == Divergence::kForwardKl || d == Divergence::kJeffreys; }
LOGITSTD_HD constexpr bool has_reverse(Divergence d) { return d == Divergence::kReverseKl || d == Divergence::kJeffreys; }
LOGITSTD_HD constexpr bool is_pointwise(Divergence d) { return d == Divergence::kJsd || d == Divergence::kTvd; }

LOGITSTD_HD float m_expm1(float v) { return expm1f(v); }
LOGITSTD_HD double m_expm1(double v) { return expm1(v); }
LOGITSTD_HD float m_exp(float v) { return expf(v); }
LOGITSTD_HD double m_exp(double v) { return exp(v); }
template <class T>
LOGITSTD_HD T m_select(bool c, T a, T b) { return c ? a : b; }
template <class T>
LOGITSTD_HD bool m_positive(T v) { return v > T(0); }
template <class T>
LOGITSTD_HD bool m_small(T v) { return m_abs(v) <= T(0.5); }
template <class T>
LOGITSTD_HD T m_sign(T v) { return v > T(0) ? T(1) : (v < T(0) ? T(-1) : T(0)); }

#if defined(LOGITSTD_ROW_MATH_AT_VEC)
template <class T>
inline at::vec::Vectorized<T> m_expm1(const at::vec::Vectorized<T>& v) { return v.expm1(); }
template <class T>
inline at::vec::Vectorized<T> m_log1p(const at::vec::Vectorized<T>& v) { return v.log1p(); }
template <class T>
inline at::vec::Vectorized<T> m_exp(const at::vec::Vectorized<T>& v) { return v.exp(); }
template <class T>
inline at::vec::Vectorized<T> m_abs(const at::vec::Vectorized<T>& v) { return v.abs(); }
// c ? a : b with c a lane mask (all bits set where true), as at::vec's comparisons return.
template <class T>
inline at::vec::Vectorized<T> m_select(const at::vec::Vectorized<T>& c, const at::vec::Vectorized<T>& a,
                                       const at::vec::Vectorized<T>& b) {
  return at::vec::Vectorized<T>::blendv(b, a, c);
}
template <class T>
inline at::vec::Vectorized<T> m_positive(const at::vec::Vectorized<T>& v) { return v > at::vec::Vectorized<T>(T(0)); }
template <class T>
inline at::vec::Vectorized<T> m_small(const at::vec::Vectorized<T>& v) {
  return v.abs() <= at::vec::Vectorized<T>(T(0.5));
}
template <class T>
inline at::vec::Vectorized<T> m_sign(const at::vec::Vectorized<T>& v) {
  using Vec = at::vec::Vectorized<T>;
  const Vec zero(T(0));
  return Vec::blendv(Vec::blendv(zero, Vec(T(-1)), v < zero), Vec(T(1)), v > zero);
}
#endif

// The reverse KL's sums over the exp pass (blocks of a row add): r = sum e^sa (sa - sb), and
// rabs = sum e^sa |sb - sa|, the size of the terms it cancels (as tabs for the forward KL).
template <class T>
struct ReverseSums {
  T r, rabs;
};

// What a row's divergence terms need besides the per-element values.
template <class T>
struct DivRow {
  Divergence div;
  T beta;
  T rza, rzb;    // 1 / Za, 1 / Zb
  T lz;          // log(Za / Zb) (natural units)
  T unit;        // natural log units per exponent unit (1 for exp, ln 2 for exp2)
  T kl_f, kl_r;  // forward and reverse KL (natural units) of the row; 0 where unused
  T eq, ep;      // pointwise divergences: E_q g and E_p h
};

// The reverse KL from the sums: E_q[ln q - ln p] = unit r / Za - lz (lz = log(Za / Zb)).
template <class T>
LOGITSTD_HD T reverse_kl(const RowSums<T>& sums, const ReverseSums<T>& rev, T unit) {
  return unit * rev.r / sums.za - m_log(sums.za / sums.zb);
}

// Whether the reverse KL cancels (as kl_needs_refinement for the forward KL).
template <class T>
LOGITSTD_HD bool reverse_needs_refinement(const RowSums<T>& sums, const ReverseSums<T>& rev, T unit) {
  const T lz = m_log(sums.za / sums.zb);
  const T kl = reverse_kl(sums, rev, unit);
  if (!m_isfinite(kl) || !m_isfinite(rev.rabs)) return false;
  return !(kl * T(kKlRefineRatio) >= unit * rev.rabs / sums.za + m_abs(lz));
}

// psi(t) = t e^t - e^t + 1 from its Taylor series, sum_{n>=2} (n - 1) t^n / n!, for |t| <= 1/2.
template <class V>
LOGITSTD_HD V psi_series(V t) {
  V r = V(15.0 / 20922789888000.0);
  r = m_fma(r, t, V(14.0 / 1307674368000.0));
  r = m_fma(r, t, V(13.0 / 87178291200.0));
  r = m_fma(r, t, V(12.0 / 6227020800.0));
  r = m_fma(r, t, V(11.0 / 479001600.0));
  r = m_fma(r, t, V(10.0 / 39916800.0));
  r = m_fma(r, t, V(9.0 / 3628800.0));
  r = m_fma(r, t, V(8.0 / 362880.0));
  r = m_fma(r, t, V(7.0 / 40320.0));
  r = m_fma(r, t, V(6.0 / 5040.0));
  r = m_fma(r, t, V(5.0 / 720.0));
  r = m_fma(r, t, V(4.0 / 120.0));
  r = m_fma(r, t, V(3.0 / 24.0));
  r = m_fma(r, t, V(2.0 / 6.0));
  r = m_fma(r, t, V(0.5));
  return r * t * t;
}

// m KL-term of one side of the JSD: m psi(L), L = ln(v / m), v = m e^L (the side's probability):
// the series where |L| <= 1/2, else m - v + v L; v = 0: its limit m.
template <class V, class M>
LOGITSTD_HD V jsd_side(V v, V m, V L, M v_positive) {
  const V direct = m_fma(v, L, m - v);
  return m_select(v_positive, m_select(m_small(L), m * psi_series(L), direct), m);
}

// The pointwise divergences' per-element values from q, p and l = ln p - ln q:
// loss (non-negative), g and h.
template <class V>
struct PointwiseTerms {
  V loss, g, h;
};

template <class V>
LOGITSTD_HD PointwiseTerms<V> pointwise_terms(Divergence div, V q, V p, V l, V beta) {
  const auto p_pos = m_positive(p);
  const auto q_pos = m_positive(q);
  if (div == Divergence::kTvd) {  // p - q = q expm1(l) without cancellation; q = 0 (or NaN): p - q
    const V diff = m_select(q_pos, q * m_expm1(l), p - q);
    const V half = V(0.5);
    return PointwiseTerms<V>{half * m_abs(diff), V(0) - half * m_sign(diff), half * m_sign(diff)};
  }
  // m = beta p + (1 - beta) q. The larger side's log-ratio from expm1 of -|l| (no overflow, whatever
  // l): l <= 0: L_q = ln(q / m) = -log1p(beta expm1(l)), L_p = l + L_q; l > 0: L_p = ln(p / m) =
  // -log1p((1 - beta) expm1(-l)), L_q = L_p - l.
  const V one_minus = V(1) - beta;
  const auto teacher_larger = m_positive(l);
  const V larger = V(0) - m_log1p(m_select(teacher_larger, one_minus, beta) * m_expm1(V(0) - m_abs(l)));
  const V lq = m_select(teacher_larger, larger - l, larger);
  const V lp = m_select(teacher_larger, larger, l + larger);
  const V m = m_fma(beta, p, one_minus * q);
  const V loss = m_fma(beta, jsd_side(p, m, lp, p_pos), one_minus * jsd_side(q, m, lq, q_pos));
  return PointwiseTerms<V>{loss, m_select(q_pos, one_minus * lq, V(0)), m_select(p_pos, beta * lp, V(0))};
}

// The student's per-element term q (g - E_q g) of any divergence; ea, eb the exponentials, delta =
// sb - sa (kl_delta), lv = ln p - ln q, pw the pointwise values (jsd, tvd only).
template <class V>
LOGITSTD_HD V student_div_term(const DivRow<V>& c, V ea, V eb, V lv, V g_pointwise) {
  const V q = ea * c.rza;
  V term = V(0);
  if (has_forward(c.div)) term = q - eb * c.rzb;
  if (has_reverse(c.div)) term = term + m_select(m_positive(ea), q * (V(0) - lv - c.kl_r), V(0));
  if (is_pointwise(c.div)) term = q * (g_pointwise - c.eq);
  return term;
}

// The teacher's per-element term p (h - E_p h) of any divergence (as student_div_term).
template <class V>
LOGITSTD_HD V teacher_div_term(const DivRow<V>& c, V ea, V eb, V lv, V h_pointwise) {
  const V p = eb * c.rzb;
  V term = V(0);
  if (has_forward(c.div)) term = m_select(m_positive(eb), p * (lv - c.kl_f), V(0));
  if (has_reverse(c.div)) term = term + (p - ea * c.rza);
  if (is_pointwise(c.div)) term = p * (h_pointwise - c.ep);
  return term;
}

}  // namespace logitstd
