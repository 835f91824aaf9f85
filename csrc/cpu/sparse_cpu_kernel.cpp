// CPU kernel of logitstd::sparse_kd_forward: the objective of a dense student row against a teacher
// stored as k (id, value) entries, loss and student gradient, one row at a time. Compiled once per CPU
// instruction set like kd_cpu_kernel.cpp (setup.py), picked at run time by sparse_cpu.cpp.
//
// Math (docs/design.md section 9; the teacher's side in logitstd/sparse_math.h), per row in the
// accumulation type T:
//   statistics  of the student row x (row_stats.h), as the dense kernel;
//   exp pass    e_k = e^(a_k - max a) over all V classes, kept in a scratch row, Z = sum e;
//   teacher     b_j at the k entries, their log-sum-exp, the tail's log-mass (sparse_math.h);
//   support     the student at the entries: a_j - max a, e_j, dev_j, read from x and the scratch row;
//   tail sums   (supports with the student's tail) Z_T = sum over the classes outside the support of
//               e, and E_T = sum e dev there, from the scratch row with the support's entries zeroed:
//               exact sums, no cancellation of Z - Z_S;
//   loss        the Bregman form over the support (plus the tail class): non-negative terms;
//   gradient    g_k = c e_k outside the support (c = 1/Z, 0 when renormalizing, 1/Z - p_T/Z_T with a
//               tail), g_j at the support from its own formula; the chain rule through the
//               standardization from the sums G = c Z_T + sum_S g, S = c E_T + sum_S g dev
//               (row_math.h, term_coefficients); the dense pass writes c e_k's, then the support's
//               elements are overwritten with their own values.
// Memory traffic per element of x: sizeof(x) read, sizeof(x) written for the gradient; the teacher
// costs 8 + sizeof(T) (+1) bytes per entry, no dense teacher row exists. One exp per element (two
// with labels: the CE's), the later passes hit the caches.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#define LOGITSTD_ROW_MATH_AT_VEC
#include "logitstd/row_math.h"
#include "logitstd/sparse_math.h"
#include "logitstd/sparse_problem.h"
#include "kd_cpu_passes.h"
#include "row_stats.h"
#include "vec_rows.h"

#include <algorithm>
#include <cmath>
#include <memory>

#ifndef CPU_CAPABILITY
#error "compile this file with CPU_CAPABILITY defined (setup.py does)"
#endif

namespace logitstd {
namespace cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

template <class T>
struct SparseScratch {
  std::unique_ptr<T[]> x, e, ez;               // V: converted x, e^(a - max a), the CE's e^sz
  std::unique_ptr<T[]> b, sa, ej, dev, g;      // k: per entry
};

// e_k = e^(a_k - max a) into e_out; returns Z = sum e.
template <class T>
T student_exp_pass(const T* x, int64_t n, const ExpPlan<T>& plan, T* e_out) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec x_max(plan.x_max), xa(plan.xa), xc(plan.x_scale), zero(T(0));
  T total = T(0);
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    Vec z = zero;
    int64_t i = b0;
    for (; i + W <= b1; i += W) {
      const Vec e = exp_arg(Vec::loadu(x + i), x_max, xa, xc).exp();
      e.store(e_out + i);
      z = z + e;
    }
    if (i < b1) {
      const int64_t c = b1 - i;
      const Vec e = Vec::set(zero, exp_arg(Vec::loadu(x + i, c), x_max, xa, xc).exp(), c);
      e.store(e_out + i, c);
      z = z + e;
    }
    total += lane_sum(z);
  }
  return total;
}

// (sum e, sum e dev) over the row's scratch exponentials (the support's entries zeroed by the caller);
// e = 0 contributes 0 to the second whatever dev is.
template <class T>
std::pair<T, T> tail_sums(const T* x, const T* e, int64_t n, const RowStats<T>& st, bool with_dev) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec zero(T(0));
  T z_total = T(0), d_total = T(0);
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    Vec z = zero, d = zero;
    auto body = [&](int64_t i, int64_t count) {
      const bool part = count < W;
      const Vec ev = part ? Vec::loadu(e + i, count) : Vec::loadu(e + i);
      z = z + ev;
      if (with_dev) {
        const Vec dv = centered(part ? Vec::loadu(x + i, count) : Vec::loadu(x + i), st);
        d = d + Vec::blendv(zero, ev * dv, ev > zero);
      }
    };
    int64_t i = b0;
    for (; i + W <= b1; i += W) body(i, W);
    if (i < b1) body(i, b1 - i);
    z_total += lane_sum(z);
    d_total += lane_sum(d);
  }
  return {z_total, d_total};
}

template <class T>
void store_parts(const SparseProblem& p, int64_t r, T ce, T kd) {
  if (p.ce_rows != nullptr) static_cast<T*>(p.ce_rows)[r] = ce;
  if (p.kd_rows != nullptr) static_cast<T*>(p.kd_rows)[r] = kd;
}

// The row's support: what the loss and the gradient read of it.
template <class T>
struct SupportRow {
  TeacherRow<T> t;
  T z, log_z, z_tail, e_tail, log_q_tail, c_all;
};

// The student at the entries (sa: a_j - max a, ej: e_j, dev: centered x_j) and the tail sums.
template <class T>
SupportRow<T> support_row(const SparseProblem& p, int64_t r, const T* x, const RowStats<T>& st,
                          const ExpPlan<T>& plan, T z_all, SparseScratch<T>& s, bool with_dev) {
  const int64_t k = p.k, n = p.cols;
  const int64_t* ids = p.ids + r * k;
  const bool* emask = p.entry_mask == nullptr ? nullptr : p.entry_mask + r * k;
  const T* v = static_cast<const T*>(p.values) + r * k;
  const bool has_stats = p.row_std != nullptr;
  const T mu = has_stats ? static_cast<const T*>(p.row_mean)[r] : T(0);
  const T sd = has_stats ? static_cast<const T*>(p.row_std)[r] : T(0);
  const T norm = p.log_normalizer != nullptr ? static_cast<const T*>(p.log_normalizer)[r] : T(0);
  SupportRow<T> out;
  out.t = teacher_row(v, emask, k, has_stats, mu, sd, norm, p, s.b.get());
  T z_s = T(0);
  for (int64_t j = 0; j < k; ++j) {
    if (!entry_valid(v[j], emask, j)) continue;
    const T xj = x[ids[j]];
    s.sa[j] = exp_arg(xj, plan.x_max, plan.xa, plan.x_scale);
    s.ej[j] = s.e[ids[j]];
    s.dev[j] = p.standardize ? centered(xj, st) : T(0);
    z_s += s.ej[j];
  }
  out.z = z_all;
  out.z_tail = T(0);
  out.e_tail = T(0);
  if (p.support != Support::kRenormalize && out.t.count < n) {  // the exact sums outside the support
    for (int64_t j = 0; j < k; ++j) {
      if (entry_valid(v[j], emask, j)) s.e[ids[j]] = T(0);
    }
    const auto sums = tail_sums(x, s.e.get(), n, st, with_dev);
    for (int64_t j = 0; j < k; ++j) {
      if (entry_valid(v[j], emask, j)) s.e[ids[j]] = s.ej[j];
    }
    out.z_tail = sums.first;
    out.e_tail = sums.second;
    out.z = z_s + out.z_tail;  // the partition into support and tail, summed exactly
  }
  out.log_z = m_log(out.z);
  out.log_q_tail = m_log(out.z_tail) - out.log_z;
  return out;
}

// D of the row (docs/design.md section 9) from the Bregman terms; writes each valid entry's g_j (the
// gradient of D with respect to a_j) into s.g when kGrad, and the row's c_all.
template <class T, bool kGrad>
T support_divergence(const SparseProblem& p, int64_t r, SupportRow<T>& sr, SparseScratch<T>& s) {
  const int64_t k = p.k;
  const bool* emask = p.entry_mask == nullptr ? nullptr : p.entry_mask + r * k;
  const T* v = static_cast<const T*>(p.values) + r * k;
  sr.c_all = T(0);
  if (sr.t.count == 0 && p.support != Support::kTail) return T(0);  // no teacher distribution: no KD term
  T top = neg_inf<T>(), zs = T(0), log_zs = T(0);
  if (p.support == Support::kRenormalize) {  // the student renormalized over the support
    for (int64_t j = 0; j < k; ++j) {
      if (entry_valid(v[j], emask, j)) top = nan_max(top, s.sa[j]);
    }
    for (int64_t j = 0; j < k; ++j) {
      if (entry_valid(v[j], emask, j)) zs += sp_exp(s.sa[j] - top);
    }
    log_zs = top + m_log(zs);
  }
  T d = T(0);
  for (int64_t j = 0; j < k; ++j) {
    if (!entry_valid(v[j], emask, j)) continue;
    const T log_p = s.b[j] - sr.t.log_norm;
    const T log_q = s.sa[j] - (p.support == Support::kRenormalize ? log_zs : sr.log_z);
    d += bregman_log_term(log_p, log_q);
    if constexpr (kGrad) s.g[j] = sp_exp(log_q) - sp_exp(log_p);
  }
  if (p.support == Support::kRenormalize) return d;
  sr.c_all = T(1) / sr.z;
  if (p.support == Support::kRenormalizeTeacher || sr.t.log_p_tail == neg_inf<T>()) return d + sr.z_tail / sr.z;
  if (sr.z_tail > T(0)) sr.c_all = T(1) / sr.z - sp_exp(sr.t.log_p_tail) / sr.z_tail;
  return d + bregman_log_term(sr.t.log_p_tail, sr.log_q_tail);
}

template <class T>
T sparse_row_ce(const SparseProblem& p, const T* x, const ExpPlan<T>& plan, const CeSums<T>& ce_sums, int64_t label,
                bool label_ok) {
  const T sz_label = label_ok ? (x[label] * plan.x_scale - plan.x_max) / plan.x_scale : T(NAN);
  return row_ce(ce_sums, sz_label, std::exp(sz_label), static_cast<T>(p.label_smoothing), static_cast<T>(p.cols),
                T(1));
}

// The student's gradient row: c e_k - the chain rule's terms everywhere (+ the CE), then the support's
// elements and the label's from their own formulas.
template <class T>
void sparse_gradient(const SparseProblem& p, int64_t r, const T* x, const RowStats<T>& st, const SupportRow<T>& sr,
                     const CeSums<T>& ce_sums, int64_t label, bool label_ok, SparseScratch<T>& s) {
  const int64_t n = p.cols, k = p.k;
  const int64_t* ids = p.ids + r * k;
  const bool* emask = p.entry_mask == nullptr ? nullptr : p.entry_mask + r * k;
  const T* v = static_cast<const T*>(p.values) + r * k;
  const T grad_scale = static_cast<const T*>(p.grad_scale)[r * p.grad_scale_stride];
  T big_g = sr.c_all * sr.z_tail, big_s = sr.c_all * sr.e_tail;
  for (int64_t j = 0; j < k; ++j) {
    if (!entry_valid(v[j], emask, j)) continue;
    big_g += s.g[j];
    big_s += s.g[j] * s.dev[j];
  }
  const T kd_scale = grad_scale * static_cast<T>(p.kd_weight) * static_cast<T>(p.tau_s);
  const TermCoef<T> c = term_coefficients(big_g, big_s, static_cast<T>(n), st, static_cast<T>(n - p.correction),
                                          kd_scale, p.standardize, static_cast<T>(p.eps));
  const bool has_labels = p.labels != nullptr;
  const T ce_weight = static_cast<T>(p.ce_weight), smoothing = static_cast<T>(p.label_smoothing);
  CeGrad<T> ce;
  if (has_labels) {
    ce.ez = s.ez.get();
    ce.a = grad_scale * ce_weight / ce_sums.zc;
    ce.b = -grad_scale * ce_weight * smoothing / static_cast<T>(n);
  }
  T* terms = s.e.get();
  for (int64_t i = 0; i < n; ++i) terms[i] *= sr.c_all;  // (c = 0: a zero row, e = 0 stays 0)
  const bool direct = is_acc_dtype<T>(p.x_dtype);
  T* out = direct ? static_cast<T*>(p.grad_x) + r * n : terms;
  auto element = [&](int64_t i, T term) {  // one element from its KD term and its CE term
    const T dev = p.standardize ? centered(x[i], st) : T(0);
    T value = grad_from_term(term, dev, c.a, -c.b, -c.a_mean);
    if (has_labels) value += i == label ? grad_scale * ce_weight * ce_label_grad(ce_sums, smoothing, T(n))
                                        : m_fma(ce.a, ce.ez[i], ce.b);
    return value;
  };
  T label_term = label_ok && has_labels ? terms[label] : T(0);
  for (int64_t j = 0; j < k; ++j) {
    if (entry_valid(v[j], emask, j) && ids[j] == label) label_term = s.g[j];
  }
  grad_pass(x, terms, n, p.standardize, st, c, ce, out);
  for (int64_t j = 0; j < k; ++j) {
    if (entry_valid(v[j], emask, j)) out[ids[j]] = element(ids[j], s.g[j]);
  }
  if (has_labels) {  // (a NaN row for a label out of range)
    if (label_ok) out[label] = element(label, label_term);
    else std::fill(out, out + n, T(NAN));
  }
  if (!direct) store_row(out, p.x_dtype, p.grad_x, r * n, n);
}

template <class T, bool kGrad>
void sparse_row(const SparseProblem& p, int64_t r, SparseScratch<T>& s) {
  const int64_t n = p.cols;
  const bool has_labels = p.labels != nullptr;
  const bool excluded = (p.mask != nullptr && !p.mask[r]) || (has_labels && p.labels[r] == p.ignore_index);
  if (excluded) {
    if (!p.zero_excluded) return;
    if (p.loss != nullptr) static_cast<T*>(p.loss)[r] = T(0);
    store_parts(p, r, T(0), T(0));
    if constexpr (kGrad) zero_row(p.x_dtype, p.grad_x, r * n, n);
    return;
  }
  const int64_t label = has_labels ? p.labels[r] : 0;
  const bool label_ok = !has_labels || (label >= 0 && label < n);
  const T* x = acc_row<T>(p.x_dtype, p.x, r * p.x_stride, s.x.get(), n);
  const RowStats<T> st = row_stats(x, n, static_cast<T>(n - p.correction), static_cast<T>(p.eps), p.standardize);
  const T tau_s = static_cast<T>(p.tau_s);
  const ExpPlan<T> plan = make_exp_plan(st, st, tau_s, tau_s, T(1));
  const T z_all = student_exp_pass(x, n, plan, s.e.get());
  CeSums<T> ce_sums{T(1), T(0), T(0)};
  if (has_labels) {
    const int64_t at = label_ok ? label : -1;
    ce_sums = kGrad ? ce_pass<T, true>(x, n, plan, at, s.ez.get()) : ce_pass<T, false>(x, n, plan, at, nullptr);
  }
  SupportRow<T> sr = support_row(p, r, x, st, plan, z_all, s, kGrad && p.standardize);
  const T d = support_divergence<T, kGrad>(p, r, sr, s);
  if (p.loss != nullptr) {
    const T kd = tau_s * tau_s * d;
    const T ce = has_labels ? sparse_row_ce(p, x, plan, ce_sums, label, label_ok) : T(0);
    static_cast<T*>(p.loss)[r] = row_objective(ce, kd, static_cast<T>(p.ce_weight), static_cast<T>(p.kd_weight),
                                               has_labels);
    store_parts(p, r, ce, kd);
  }
  if constexpr (kGrad) sparse_gradient(p, r, x, st, sr, ce_sums, label, label_ok, s);
}

template <class T, bool kGrad>
void run_sparse_rows(const SparseProblem& p, int64_t begin, int64_t end) {
  SparseScratch<T> s;
  const int64_t n = p.cols, k = p.k;
  if (!is_acc_dtype<T>(p.x_dtype)) s.x.reset(new T[n]);
  s.e.reset(new T[n]);
  if (kGrad && p.labels != nullptr) s.ez.reset(new T[n]);
  for (auto* buffer : {&s.b, &s.sa, &s.ej, &s.dev, &s.g}) buffer->reset(new T[k]);
  for (int64_t r = begin; r < end; ++r) sparse_row<T, kGrad>(p, r, s);
}

// Entry point of this instruction set's build: rows [begin, end) of the problem.
void sparse_rows(const SparseProblem& p, int64_t begin, int64_t end) {
  const bool grad = p.grad_x != nullptr;
  if (p.acc_double) {
    grad ? run_sparse_rows<double, true>(p, begin, end) : run_sparse_rows<double, false>(p, begin, end);
  } else {
    grad ? run_sparse_rows<float, true>(p, begin, end) : run_sparse_rows<float, false>(p, begin, end);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace logitstd
