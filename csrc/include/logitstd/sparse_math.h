// Row math of a sparse teacher (docs/design.md section 9): the teacher's KD logits at its k stored
// entries, its log-partition over them, the tail's log-mass, and the loss's Bregman terms in log
// form. Host and device code, like row_math.h (whose formulas it uses); _triton/sparse_math.py mirrors
// it formula by formula.
//
//   r_j = value_scale * v_j                          (value_scale: T_gen for log-probabilities, else 1)
//   b_j = (r_j - mu) / (sigma + eps) / tau_t         (mu, sigma: the stored full-row statistics times
//                                                     value_scale, or those of the valid r_j)
//   b_j = r_j / tau_t                                (no standardization)
//   lse_b = log sum_S e^b;  L' = max(L, lse_b) for the tail (L the stored log-normalizer, 0 where
//   derived; lse_b when S holds every class);  log p_T = log(-expm1(lse_b - L'))
#pragma once

#include "logitstd/row_math.h"
#include "logitstd/sparse_problem.h"

namespace logitstd {

LOGITSTD_HD float sp_exp(float v) { return expf(v); }
LOGITSTD_HD double sp_exp(double v) { return exp(v); }
LOGITSTD_HD float sp_expm1(float v) { return expm1f(v); }
LOGITSTD_HD double sp_expm1(double v) { return expm1(v); }

template <class T>
LOGITSTD_HD T neg_inf() { return static_cast<T>(-INFINITY); }

template <class T>
struct TeacherRow {
  int64_t count;  // valid entries
  T lse_b;        // log sum over the valid entries of e^b (-inf: none)
  T log_norm;     // what log p_j = b_j - log_norm subtracts: lse_b, or the tail's L'
  T log_p_tail;   // log of the tail class's mass (-inf: none)
};

// Whether entry j of a row is in the support: not masked out and not -inf (NaN is: its row is NaN).
template <class T>
LOGITSTD_HD bool entry_valid(T v, const bool* mask, int64_t j) {
  return (mask == nullptr || mask[j]) && !(v < Lowest<T>::value());
}

// mean and sigma (scaled units: of c r - shift) of the valid r_j = scale v_j, and their scale c
// (row_math.h, magnitude_scale), two passes; sigma = 0 where count - correction <= 0.
template <class T>
LOGITSTD_HD void entry_moments(const T* v, const bool* mask, int64_t k, T scale, int64_t correction, T* c_out,
                               T* shift_out, T* mean_out, T* sigma_out) {
  T mx = neg_inf<T>();
  T mn = -mx;
  T first = T(0);
  int64_t count = 0;
  for (int64_t j = 0; j < k; ++j) {
    if (!entry_valid(v[j], mask, j)) continue;
    const T r = v[j] * scale;
    if (count == 0) first = r;
    mx = nan_max(mx, r);
    mn = nan_min(mn, r);
    ++count;
  }
  const T c = count > 0 ? magnitude_scale(mx, mn) : T(1);
  const T shift = first * c;
  T sum = T(0);
  for (int64_t j = 0; j < k; ++j) {
    if (entry_valid(v[j], mask, j)) sum += v[j] * scale * c - shift;
  }
  const T mean = count > 0 ? sum / static_cast<T>(count) : T(0);
  T m2 = T(0);
  for (int64_t j = 0; j < k; ++j) {
    if (!entry_valid(v[j], mask, j)) continue;
    const T d = (v[j] * scale * c - shift) - mean;
    m2 = m_fma(d, d, m2);
  }
  const int64_t dof = count - correction;
  *c_out = c;
  *shift_out = shift;
  *mean_out = mean;
  *sigma_out = dof > 0 ? m_sqrt(m2 / static_cast<T>(dof)) : T(0);
}

// The teacher's b_j (natural log units) into b[0..k) (-inf for entries not in the support) and the
// row's TeacherRow. has_stats: mu_v, sd_v are the stored full-row statistics of v.
template <class T>
LOGITSTD_HD TeacherRow<T> teacher_row(const T* v, const bool* mask, int64_t k, bool has_stats, T mu_v, T sd_v,
                                      T log_norm_stored, const SparseProblem& p, T* b) {
  const T scale = static_cast<T>(p.value_scale), tau_t = static_cast<T>(p.tau_t), eps = static_cast<T>(p.eps);
  T c = T(1), shift = T(0), mean = T(0), sigma = T(0);
  if (p.standardize) {
    if (has_stats) {
      mean = mu_v * scale;
      sigma = sd_v * scale;
    } else {
      entry_moments(v, mask, k, scale, p.correction, &c, &shift, &mean, &sigma);
    }
  }
  const T inv = p.standardize ? T(1) / ((sigma + eps * c) * tau_t) : T(1) / tau_t;
  TeacherRow<T> t{0, T(0), T(0), neg_inf<T>()};
  T top = neg_inf<T>();
  for (int64_t j = 0; j < k; ++j) {
    if (!entry_valid(v[j], mask, j)) {
      b[j] = neg_inf<T>();
      continue;
    }
    const T r = v[j] * scale;
    b[j] = p.standardize ? ((r * c - shift) - mean) * inv : r * inv;
    top = nan_max(top, b[j]);
    ++t.count;
  }
  T z = T(0);
  for (int64_t j = 0; j < k; ++j) {
    if (entry_valid(v[j], mask, j)) z += sp_exp(b[j] - top);
  }
  t.lse_b = t.count > 0 ? top + m_log(z) : t.log_p_tail;
  t.log_norm = t.lse_b;
  if (p.support == Support::kTail) {
    const bool whole = t.count == p.cols;
    t.log_norm = whole ? t.lse_b : nan_max(log_norm_stored, t.lse_b);
    t.log_p_tail = whole ? t.log_p_tail : m_log(-sp_expm1(t.lse_b - t.log_norm));
  }
  return t;
}

// p phi(t), t = log q - log p (row_math.h, bregman_term), from the logs: the KL's terms without
// cancellation; q where p = 0 (the limit), +inf where q = 0 < p.
template <class T>
LOGITSTD_HD T bregman_log_term(T log_p, T log_q) {
  const T q = sp_exp(log_q);
  if (log_p == neg_inf<T>()) return q;  // p = 0
  const T p = sp_exp(log_p);
  const T t = log_q - log_p;
  if (m_abs(t) <= T(0.5)) return p * bregman_phi_series(t);
  return q - m_fma(p, t, p);
}

}  // namespace logitstd
