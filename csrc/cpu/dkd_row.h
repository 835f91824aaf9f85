// Decoupled KD (DKD) on one row of the CPU kernel: the target class g's part. The row's exp pass
// leaves g out of its sums (exp_pass's `exclude`), so Z_a', Z_b', t' are the non-target classes'
// own sums (no cancellation where p_g or q_g is near 1), and the forward KL's passes over the stored
// exponentials with g's zeroed compute NCKD = KL(p^ || q^) and its terms. TCKD and the target's
// bins come from logitstd/dkd_math.h (dkd_target, shared with the CUDA kernel); this file adds the
// coefficients of the per-element terms (k != g; docs/design.md section 8):
//   student  q^_k (alpha (p_g - q_g) + beta) - beta p^_k  = ea (alpha (p_g - q_g) + beta) / Z_a' - eb beta / Z_b'
//   teacher  beta p^_k (l^_k - NCKD) - alpha Delta p_g p_k,  Delta = ln(p_g / q_g) - ln((1 - p_g) / (1 - q_g))
// and g's own terms: student alpha (q_g - p_g), teacher alpha Delta p_g (1 - p_g).
#pragma once

#include <cstdint>
#include <limits>

#include "logitstd/divergence.h"
#include "logitstd/dkd_math.h"
#include "logitstd/row_math.h"
#include "kd_cpu_passes.h"

namespace logitstd {
namespace cpu {
namespace CPU_CAPABILITY {

// A row whose target leads so far that its non-target sums underflow relative to the row's max
// (dkd_math.h, kDkdResumBelow): the plan's maxima become the largest non-target c v (the exponents'
// ratios are the same), for the exp pass to run again. Returns whether it did.
template <class T>
bool dkd_rebase(ExpPlan<T>& plan, const RowSums<T>& sums, const T* x, const T* y, int64_t n, int64_t g) {
  if (!(sums.za < T(kDkdResumBelow) || sums.zb < T(kDkdResumBelow))) return false;
  T top_x = -std::numeric_limits<T>::infinity(), top_y = top_x;
  for (int64_t k = 0; k < n; ++k) {
    if (k == g) continue;
    top_x = nan_max(top_x, x[k] * plan.x_scale);
    top_y = nan_max(top_y, y[k] * plan.y_scale);
  }
  plan.x_max = top_x;
  plan.y_max = top_y;
  return true;
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
