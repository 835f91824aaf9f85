// Decoupled KD (DKD) on one row of the CPU kernel: the target class g's part. The row's exp pass
// leaves g out of its sums (exp_pass's `exclude`), so Z_a', Z_b', t' are the non-target classes'
// own sums (no cancellation where p_g or q_g is near 1), and the forward KL's passes over the stored
// exponentials with g's zeroed compute NCKD = KL(p^ || q^) and its terms. This file adds:
//   TCKD = KL([p_g, 1 - p_g] || [q_g, 1 - q_g])   (the two-bin Bregman form, no cancellation),
//   D = alpha TCKD + beta NCKD,
// the coefficients of the per-element terms (k != g; docs/design.md section 8):
//   student  q^_k (alpha (p_g - q_g) + beta) - beta p^_k  = ea (alpha (p_g - q_g) + beta) / Z_a' - eb beta / Z_b'
//   teacher  beta p^_k (l^_k - NCKD) - alpha Delta p_g p_k,  Delta = ln(p_g / q_g) - ln((1 - p_g) / (1 - q_g))
// and g's own terms: student alpha (q_g - p_g), teacher alpha Delta p_g (1 - p_g).
#pragma once

#include <cstdint>

#include "logitstd/divergence.h"
#include "logitstd/row_math.h"
#include "kd_cpu_passes.h"

namespace logitstd {
namespace cpu {
namespace CPU_CAPABILITY {

template <class T>
struct DkdTarget {
  T q_g, p_g;     // the target class's probabilities
  T rest_p;       // 1 - p_g, from Z_b' / Z_b
  T tckd, delta;  // TCKD and Delta (natural units)
};

// ea_g, eb_g: the target's exponentials; za, zb: the non-target sums Z_a', Z_b'; sa_g, sb_g: the
// target's exponent arguments (natural units).
template <class T>
DkdTarget<T> dkd_target(T ea_g, T eb_g, T za, T zb, T sa_g, T sb_g) {
  const T za_all = za + ea_g, zb_all = zb + eb_g;
  DkdTarget<T> d;
  d.q_g = ea_g / za_all;
  d.p_g = eb_g / zb_all;
  d.rest_p = zb / zb_all;
  const T l_g = kl_delta(sa_g, sb_g) + m_log(za_all / zb_all);  // ln p_g - ln q_g
  const T l_rest = m_log((zb * za_all) / (zb_all * za));         // ln(1 - p_g) - ln(1 - q_g)
  d.delta = l_g - l_rest;
  d.tckd = bregman_term(d.q_g, d.p_g, T(0) - l_g, T(1), T(1)) +
           bregman_term(za / za_all, d.rest_p, T(0) - l_rest, T(1), T(1));
  return d;
}

// The student's (rza, rzb) of student_term and the teacher's TeacherTermCoef for k != g.
template <class T>
void dkd_term_coefficients(const DkdTarget<T>& d, T alpha, T beta, T za, T zb, T kl_cross, T& rza, T& rzb,
                           TeacherTermCoef<T>& teacher) {
  rza = (alpha * (d.p_g - d.q_g) + beta) / za;
  rzb = beta / zb;
  teacher = TeacherTermCoef<T>{T(1), beta / zb, T(0) - beta * kl_cross / zb - alpha * d.delta * d.p_g * d.rest_p / zb};
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace logitstd
