// Decoupled KD's target-class part of a row (Zhao et al. 2022; docs/design.md section 8), in host
// and device code: the kernels leave the target class g out of their exp pass's sums, so Z_a', Z_b'
// are the non-target classes' own sums and the forward KL's sums and Bregman terms over them give
// NCKD = KL(p^ || q^); this file adds, from Z_a', Z_b' and the target's exponents s_g (exponent
// units, on the sums' scale, any size: a target far above the rest has s_g > 0):
//   log q_g and log(1 - q_g) = log Z_a' - log Z_a from log1p of the smaller share's ratio (share_logs:
//   no cancellation where p_g is near 1, no overflow where the target dominates),
//   TCKD = KL([p_g, 1 - p_g] || [q_g, 1 - q_g])   (the two-bin Bregman form),
// and the coefficients of the per-element terms (k != g):
//   student  q^_k (alpha (p_g - q_g) + beta) - beta p^_k  = ea rza - eb rzb,
//            rza = (alpha (p_g - q_g) + beta) / Z_a',  rzb = beta / Z_b'
//   teacher  beta p^_k (l^_k - NCKD) - alpha Delta p_g p_k = eb (rzb (l^_k - NCKD) - shift),
//            shift = alpha Delta p_g (1 - p_g) / Z_b',  Delta = ln(p_g / q_g) - ln((1 - p_g) / (1 - q_g))
// and g's own terms: student tgt_s = alpha (q_g - p_g), teacher tgt_t = alpha Delta p_g (1 - p_g)
// (Delta p_g is 0 where p_g = 0, its limit).
#pragma once

#include "divergence.h"

namespace logitstd {

// Non-target sums below this (relative to the row's max: the target leads the rest by more than 60
// bits) are summed again relative to the largest non-target class: their exponentials lose bits in
// float subnormals (below 2^-126) and vanish further down.
constexpr double kDkdResumBelow = 0x1p-60;

template <class A>
struct DkdTarget {
  A q_g, p_g;     // the target class's probabilities
  A rest_p;       // 1 - p_g
  A tckd, delta;  // TCKD and Delta (natural units)
};

// (log of the target's share e^(unit s) / (z + e^(unit s)), log of the rest's z / (z + e^(unit s)))
// for a sum z > 0 of exponentials of exponents <= 0 and an exponent s of any size: log1p of the
// smaller share's ratio to the larger (no large logarithm cancels, no overflow where s is large).
template <class A>
struct ShareLogs {
  A target, rest;
};

template <class A>
LOGITSTD_HD ShareLogs<A> share_logs(A z, A s, A unit) {
  const A su = s * unit, lz = m_log(z);
  if (su > lz) {  // the target's share is the larger
    const A t = m_log1p(m_exp(lz - su));
    return ShareLogs<A>{A(0) - t, lz - su - t};
  }
  const A t = m_log1p(m_exp(su - lz));
  return ShareLogs<A>{su - lz - t, A(0) - t};
}

// za, zb: the non-target sums Z_a', Z_b'; sa_g, sb_g: the target's exponents (exponent units; NaN
// for a label outside the row: a NaN row).
template <class A>
LOGITSTD_HD DkdTarget<A> dkd_target(A za, A zb, A sa_g, A sb_g, A unit) {
  const ShareLogs<A> q = share_logs(za, sa_g, unit), p = share_logs(zb, sb_g, unit);
  DkdTarget<A> d;
  d.q_g = m_exp(q.target);
  d.p_g = m_exp(p.target);
  d.rest_p = m_exp(p.rest);
  const A l_g = p.target - q.target, l_rest = p.rest - q.rest;
  d.delta = l_g - l_rest;
  d.tckd = bregman_term(d.q_g, d.p_g, A(0) - l_g, A(1), A(1)) +
           bregman_term(m_exp(q.rest), d.rest_p, A(0) - l_rest, A(1), A(1));
  return d;
}

// The per-element terms' coefficients (the header's rza, rzb, shift, tgt_s, tgt_t).
template <class A>
struct DkdCoef {
  A rza, rzb, shift, tgt_s, tgt_t;
};

template <class A>
LOGITSTD_HD DkdCoef<A> dkd_coefficients(const DkdTarget<A>& d, A alpha, A beta, A za, A zb) {
  const A tgt_t = alpha * (d.p_g > A(0) ? d.delta * d.p_g : A(0)) * d.rest_p;
  return DkdCoef<A>{(alpha * (d.p_g - d.q_g) + beta) / za, beta / zb, tgt_t / zb, alpha * (d.q_g - d.p_g), tgt_t};
}

// The teacher's term of a non-target element k (0 where eb = 0); lv = l^_k = ln p^_k - ln q^_k.
template <class A>
LOGITSTD_HD A dkd_teacher_term(A eb, A lv, A nckd, const DkdCoef<A>& c) {
  return eb > A(0) ? eb * m_fma(c.rzb, lv - nckd, -c.shift) : A(0);
}

}  // namespace logitstd
