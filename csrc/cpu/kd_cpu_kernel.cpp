// CPU kernel of logitstd::fused_kd_forward: loss and gradients of a range of rows, one row at a
// time, vectorized with at::vec::Vectorized (exp included).
//
// Compiled once per CPU instruction set (setup.py: DEFAULT, and AVX2 / AVX512 on x86-64), each
// time with CPU_CAPABILITY defined, the way ATen builds its own kernels; kd_cpu.cpp picks one at run
// time from at::get_cpu_capability() (which honours ATEN_CPU_CAPABILITY).
//
// Math (docs/design.md sections 1 and 8, formulas in logitstd/row_math.h and divergence.h), per
// row, all in the accumulation type T (float, or double when an input is float64); the passes are
// in kd_cpu_passes.h:
//   statistics  moments of x and y: per block of kBlock elements the mean and M2 around the block
//               mean (two passes over the block, which is in L1), merged across blocks (Chan);
//   exp pass    e^sa, e^sb and the partition sums (and the KLs' sums); the exponentials are kept in
//               per-thread scratch rows when a gradient or a pointwise divergence needs them;
//   loss        the KLs from the sums (the Bregman form where they cancel); jsd and tvd from their
//               own pass over the stored exponentials; the CE from its own exp pass;
//   terms       the per-element gradient terms g (forward KL: q - p, p (log p - log q - KL); any
//               divergence: divergence.h), written over the stored exponentials, and the
//               standardization sums G = sum g, S = sum g dev;
//   gradients   from g: the chain rule through the mean and the std evaluated from the same rounded
//               g (row_math.h, term_coefficients); no exp is recomputed.
// Memory traffic per element: reads sizeof(x) + sizeof(y) bytes from memory (8 for float32) and
// writes sizeof(x) / sizeof(y) for each requested gradient (4 + 4); the later passes over a row hit
// the caches (a row's working set is 2 to 6 rows of V * sizeof(T) bytes: inputs, exponentials,
// converted copies of low-precision inputs). The time goes to the exponentials (two per element;
// jsd and tvd add an expm1 and a log1p, or an expm1, per element and pass).
// Low-precision inputs are converted to T into scratch rows first. Each row is computed by one
// thread in a fixed order, so results do not depend on the number of threads.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#define LOGITSTD_ROW_MATH_AT_VEC
#include "logitstd/kd_problem.h"
#include "logitstd/row_math.h"
#include "logitstd/divergence.h"
#include "dkd_row.h"
#include "kd_cpu_passes.h"
#include "vec_rows.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>

#ifndef CPU_CAPABILITY
#error "compile this file with CPU_CAPABILITY defined (setup.py does)"
#endif

namespace logitstd {
namespace cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// ------------------------------------------------------------------------------------------
// Per-thread scratch rows, allocated once per range of rows.
template <class T>
struct Scratch {
  std::unique_ptr<T[]> x, y, ea, eb, ez, g, h;  // g, h: a pointwise divergence's per-element g and h
};

template <class T>
void store_parts(const KdProblem& p, int64_t r, T ce, T kd) {
  if (p.ce_rows != nullptr) static_cast<T*>(p.ce_rows)[r] = ce;
  if (p.kd_rows != nullptr) static_cast<T*>(p.kd_rows)[r] = kd;
}

// A row excluded by the mask or by its label: loss and parts 0, gradients 0 (the forward), or not
// touched (the recomputation of other rows' gradients). Returns whether the row is excluded.
template <class T, bool kGx, bool kGy>
bool skip_excluded(const KdProblem& p, int64_t r) {
  const bool has_labels = p.labels != nullptr;
  if (!((p.mask != nullptr && !p.mask[r]) || (has_labels && p.labels[r] == p.ignore_index))) return false;
  if (!p.zero_excluded) return true;  // recomputation: excluded rows keep their gradient
  if (p.loss != nullptr) static_cast<T*>(p.loss)[r] = T(0);
  store_parts(p, r, T(0), T(0));
  if (kGx && p.grad_x != nullptr) zero_row(p.x_dtype, p.grad_x, r * p.cols, p.cols);
  if (kGy && p.grad_y != nullptr) zero_row(p.y_dtype, p.grad_y, r * p.cols, p.cols);
  if (p.tau_grad != nullptr) static_cast<T*>(p.tau_grad)[r] = T(0);
  return true;
}

// What a row's loss and gradient passes share.
template <class T>
struct RowState {
  const T* x;
  const T* y;
  int64_t n;
  RowStats<T> sx, sy;
  ExpPlan<T> plan;
  RowSums<T> sums;
  ReverseSums<T> rev;
  DivRow<T> div;
  bool stored;  // the exponentials are in the scratch rows
  PointwiseMode pointwise = PointwiseMode::kStable;  // how the gradient pass finds jsd/tvd's g and h
  int64_t target = -1;  // decoupled KD: the label (its exponentials zeroed in the scratch rows)
  DkdTarget<T> dkd{};
  T dkd_alpha = T(0), dkd_beta = T(0);
  T tau_s = T(1), tau_t = T(1);  // the row's temperatures (a learnable one: p.tau_rows)
};

// The row's statistics, exponentials (stored when `store`: a gradient or a pointwise divergence
// reads them again) and partition sums; the divergence's row constants but E_q g and E_p h.
template <class T>
RowState<T> row_state(const KdProblem& p, int64_t r, Scratch<T>& s, bool store, int64_t target) {
  const int64_t n = p.cols;
  RowState<T> st;
  st.n = n;
  st.x = acc_row<T>(p.x_dtype, p.x, r * p.x_stride, s.x.get(), n);
  st.y = acc_row<T>(p.y_dtype, p.y, r * p.y_stride, s.y.get(), n);
  const T dof = static_cast<T>(n - p.correction);
  const T eps = static_cast<T>(p.eps);
  st.sx = row_stats(st.x, n, dof, eps, p.standardize);
  st.sy = row_stats(st.y, n, dof, eps, p.standardize);
  st.tau_s = p.tau_rows != nullptr ? static_cast<const T*>(p.tau_rows)[r * p.tau_stride] : static_cast<T>(p.tau_s);
  st.tau_t = p.tau_rows != nullptr ? st.tau_s : static_cast<T>(p.tau_t);
  st.plan = make_exp_plan(st.sx, st.sy, st.tau_s, st.tau_t, T(1));
  const Divergence div = static_cast<Divergence>(p.divergence);
  // Without standardization a row of extreme magnitude can have |b - a| near the float range, and
  // sums of e^b (b - a) would overflow: its exponentials are taken e^-(log V + 1) smaller (the same
  // ratios), on the exact path, and stored so that no later pass recomputes them unshifted.
  const T e_shift = (!p.standardize && (st.sx.scale != T(1) || st.sy.scale != T(1))) ? m_log(T(n)) + T(1) : T(0);
  const bool fast = row_is_finite(st.sx) && row_is_finite(st.sy) && e_shift == T(0);
  // (the reverse KL's refinement reads them too; decoupled KD reads its target's)
  st.stored = store || has_reverse(div) || e_shift != T(0) || div == Divergence::kDkd;
  st.target = div == Divergence::kDkd ? target : -1;
  st.dkd_alpha = static_cast<T>(p.dkd_alpha);
  st.dkd_beta = static_cast<T>(p.dkd_beta);
  if (st.stored && !s.ea) {
    s.ea.reset(new T[n]);
    s.eb.reset(new T[n]);
  }
  T* ea = st.stored ? s.ea.get() : nullptr;
  T* eb = st.stored ? s.eb.get() : nullptr;
  st.rev = ReverseSums<T>{T(0), T(0)};
  if (has_reverse(div)) {
    st.sums = fast ? exp_pass<T, false, true, true>(st.x, st.y, n, st.plan, e_shift, ea, eb, &st.rev)
                   : exp_pass<T, true, true, true>(st.x, st.y, n, st.plan, e_shift, ea, eb, &st.rev);
  } else if (st.stored) {
    st.sums = fast ? exp_pass<T, false, true, false>(st.x, st.y, n, st.plan, e_shift, ea, eb, nullptr, st.target)
                   : exp_pass<T, true, true, false>(st.x, st.y, n, st.plan, e_shift, ea, eb, nullptr, st.target);
  } else {
    st.sums = fast ? exp_pass<T, false, false, false>(st.x, st.y, n, st.plan, e_shift, ea, eb, nullptr)
                   : exp_pass<T, true, false, false>(st.x, st.y, n, st.plan, e_shift, ea, eb, nullptr);
  }
  st.div = DivRow<T>{div, static_cast<T>(p.beta), T(1) / st.sums.za, T(1) / st.sums.zb,
                     m_log(st.sums.za / st.sums.zb), T(1), T(0), T(0), T(0), T(0)};
  if (has_forward(div) || div == Divergence::kDkd) st.div.kl_f = kl_cross_term(st.sums, T(1)) + st.div.lz;
  if (has_reverse(div)) st.div.kl_r = reverse_kl(st.sums, st.rev, T(1));
  if (st.target >= 0) {  // the target's part; its exponentials then leave the scratch rows
    const int64_t g = st.target;
    const T sa_g = exp_arg(st.x[g], st.plan.x_max, st.plan.xa, st.plan.x_scale);
    const T sb_g = exp_arg(st.y[g], st.plan.y_max, st.plan.ya, st.plan.y_scale);
    st.dkd = dkd_target(s.ea[g], s.eb[g], st.sums.za, st.sums.zb, sa_g, sb_g);
    s.ea[g] = T(0);
    s.eb[g] = T(0);
  }
  return st;
}

// The row's divergence (natural units): the KLs from their sums, refined by the Bregman form where
// they cancel (from the stored exponentials, or recomputed); jsd and tvd from their pointwise pass,
// which also gives E_q g and E_p h (st.div.eq, st.div.ep), needed by the gradients as well.
template <class T>
T row_divergence(RowState<T>& st, Scratch<T>& s, bool need_loss) {
  const T* ea = st.stored ? s.ea.get() : nullptr;
  const T* eb = st.stored ? s.eb.get() : nullptr;
  if (is_pointwise(st.div.div)) {
    PointwiseSums<T> pw;
    if (s.g && s.h) {
      pw = direct_pointwise_pass<T, true, true>(st.x, st.y, st.n, st.plan, st.div, ea, eb, s.g.get(), s.h.get());
    } else if (s.g) {
      pw = direct_pointwise_pass<T, true, false>(st.x, st.y, st.n, st.plan, st.div, ea, eb, s.g.get(), nullptr);
    } else if (s.h) {
      pw = direct_pointwise_pass<T, false, true>(st.x, st.y, st.n, st.plan, st.div, ea, eb, nullptr, s.h.get());
    } else {
      pw = direct_pointwise_pass<T, false, false>(st.x, st.y, st.n, st.plan, st.div, ea, eb, nullptr, nullptr);
    }
    st.pointwise = PointwiseMode::kDirect;
    if (pointwise_needs_refinement(pw)) {  // rare: the stable forms (pointwise_passes.h)
      pw = pointwise_pass(st.x, st.y, st.n, st.plan, st.div, ea, eb);
      st.pointwise = PointwiseMode::kStable;
    }
    st.div.eq = pw.eq;
    st.div.ep = pw.ep;
    return pw.loss;
  }
  if (!need_loss) return T(0);
  T value = T(0);
  if (st.div.div == Divergence::kDkd) {  // alpha TCKD + beta NCKD, NCKD refined like a forward KL
    if (st.target < 0) return T(NAN);     // (a label out of range)
    const T nckd = kl_needs_refinement(st.sums, T(1))
                       ? bregman_pass<T, true>(st.x, st.y, st.n, st.plan, st.sums, ea, eb)
                       : st.div.kl_f;
    return st.dkd_alpha * st.dkd.tckd + st.dkd_beta * nckd;
  }
  if (has_forward(st.div.div)) {
    if (!kl_needs_refinement(st.sums, T(1))) {
      value += st.div.kl_f;
    } else if (st.stored) {
      value += bregman_pass<T, true>(st.x, st.y, st.n, st.plan, st.sums, ea, eb);
    } else {
      value += bregman_pass<T, false>(st.x, st.y, st.n, st.plan, st.sums, nullptr, nullptr);
    }
  }
  if (has_reverse(st.div.div)) {
    value += reverse_needs_refinement(st.sums, st.rev, T(1))
                 ? bregman_pass<T, true, true>(st.x, st.y, st.n, st.plan, st.sums, ea, eb)
                 : st.div.kl_r;
  }
  return value;
}

// The row's CE (the objective with labels); sz_label at the label (NaN for a label out of range).
template <class T>
T row_ce_of(const KdProblem& p, const RowState<T>& st, const CeSums<T>& ce_sums, int64_t label, bool label_ok) {
  const T sz_label = label_ok ? (st.x[label] * st.plan.x_scale - st.plan.x_max) / st.plan.x_scale : T(NAN);
  return row_ce(ce_sums, sz_label, std::exp(sz_label), static_cast<T>(p.label_smoothing), static_cast<T>(st.n),
                T(1));
}

// The student's gradient row from the stored terms g (and the CE's e^sz), written to grad_x.
template <class T>
void student_gradient(const KdProblem& p, int64_t r, const RowState<T>& st, const TermSums<T>& ts,
                      const CeSums<T>& ce_sums, int64_t label, bool label_ok, Scratch<T>& s, T grad_scale) {
  const int64_t n = st.n;
  const bool has_labels = p.labels != nullptr;
  const T classes = static_cast<T>(n), ce_weight = static_cast<T>(p.ce_weight);
  const T smoothing = static_cast<T>(p.label_smoothing);
  const T kd_scale = grad_scale * static_cast<T>(p.kd_weight);
  const TermCoef<T> c = term_coefficients(ts.gx, ts.sx, classes, st.sx, static_cast<T>(n - p.correction),
                                          kd_scale * st.tau_s, p.standardize, static_cast<T>(p.eps));
  CeGrad<T> ce;
  if (has_labels) {
    ce.ez = s.ez.get();
    ce.a = grad_scale * ce_weight / ce_sums.zc;
    ce.b = -grad_scale * ce_weight * smoothing / classes;
  }
  const bool direct = is_acc_dtype<T>(p.x_dtype);
  T* out = direct ? static_cast<T*>(p.grad_x) + r * n : s.ea.get();
  // The label's element from its own formula (row_math.h, ce_label_grad): its KD part first,
  // before grad_pass overwrites the terms it is computed from.
  T label_grad = T(NAN);
  if (has_labels && label_ok) {
    const T dev = p.standardize ? centered(st.x[label], st.sx) : T(0);
    label_grad = grad_from_term(s.ea[label], dev, c.a, -c.b, -c.a_mean) +
                 grad_scale * ce_weight * ce_label_grad(ce_sums, smoothing, classes);
  }
  grad_pass(st.x, s.ea.get(), n, p.standardize, st.sx, c, ce, out);
  if (has_labels) {  // (a NaN row for a label out of range)
    if (label_ok) {
      out[label] = label_grad;
    } else {
      std::fill(out, out + n, T(NAN));
    }
  }
  if (!direct) store_row(out, p.x_dtype, p.grad_x, r * n, n);
}

// The teacher's gradient row from the stored terms, written to grad_y.
template <class T>
void teacher_gradient(const KdProblem& p, int64_t r, const RowState<T>& st, const TermSums<T>& ts, Scratch<T>& s,
                      T grad_scale) {
  const int64_t n = st.n;
  const T scale = grad_scale * static_cast<T>(p.kd_weight) * st.tau_s * st.tau_s / st.tau_t;
  const TermCoef<T> c = term_coefficients(ts.gy, ts.sy, static_cast<T>(n), st.sy, static_cast<T>(n - p.correction),
                                          scale, p.standardize, static_cast<T>(p.eps));
  const bool direct = is_acc_dtype<T>(p.y_dtype);
  T* out = direct ? static_cast<T*>(p.grad_y) + r * n : s.eb.get();
  grad_pass(st.y, s.eb.get(), n, p.standardize, st.sy, c, CeGrad<T>{}, out);
  if (!direct) store_row(out, p.y_dtype, p.grad_y, r * n, n);
}

// The per-element terms of the row's divergence, written over the scratch rows, and their sums.
template <class T, bool kGx, bool kGy>
TermSums<T> row_terms(const KdProblem& p, const RowState<T>& st, Scratch<T>& s) {
  const Divergence div = st.div.div;
  const bool sums = p.standardize || p.tau_grad != nullptr;  // G and S: the chain rule's, or d/d tau's
  if (div != Divergence::kForwardKl && div != Divergence::kDkd) {
    return div_term_pass<T, kGx, kGy>(st.x, st.y, st.n, sums, st.plan, st.sx, st.sy, st.div, s.ea.get(),
                                      s.eb.get(), st.pointwise, s.g.get(), s.h.get());
  }
  const T kl_cross = kl_cross_term(st.sums, T(1));
  T rza = st.div.rza, rzb = st.div.rzb;
  TeacherTermCoef<T> teacher{st.div.rzb, T(1), T(0) - kl_cross};
  if (div == Divergence::kDkd) {
    if (st.target < 0) return TermSums<T>{T(NAN), T(NAN), T(NAN), T(NAN)};  // (a label out of range)
    dkd_term_coefficients(st.dkd, st.dkd_alpha, st.dkd_beta, st.sums.za, st.sums.zb, kl_cross, rza, rzb, teacher);
  }
  TermSums<T> ts = term_pass<T, kGx, kGy>(st.x, st.y, st.n, sums, st.plan, st.sx, st.sy, rza, rzb, teacher,
                                          s.ea.get(), s.eb.get());
  if (st.target >= 0) {  // decoupled KD's target class: its own terms (its exponentials were zeroed)
    const int64_t g = st.target;
    const T term_x = st.dkd_alpha * (st.dkd.q_g - st.dkd.p_g);
    const T term_y = st.dkd_alpha * st.dkd.delta * st.dkd.p_g * st.dkd.rest_p;
    if (kGx) s.ea[g] = term_x;
    if (kGy) s.eb[g] = term_y;
    if (sums) {
      ts.gx += kGx ? term_x : T(0);
      ts.sx += kGx ? term_x * centered(st.x[g], st.sx) : T(0);
      ts.gy += kGy ? term_y : T(0);
      ts.sy += kGy ? term_y * centered(st.y[g], st.sy) : T(0);
    }
  }
  return ts;
}

template <class T, bool kGx, bool kGy>
void run_row(const KdProblem& p, int64_t r, Scratch<T>& s) {
  if (skip_excluded<T, kGx, kGy>(p, r)) return;
  constexpr bool kGrad = kGx || kGy;
  const bool has_labels = p.labels != nullptr;
  const int64_t label = has_labels ? p.labels[r] : 0;
  // The op layer rejects labels outside [0, V) on CPU; a direct kernel call gets a NaN row, not a
  // read out of bounds.
  const bool label_ok = !has_labels || (label >= 0 && label < p.cols);
  const Divergence div = static_cast<Divergence>(p.divergence);
  RowState<T> st = row_state(p, r, s, kGrad || is_pointwise(div), has_labels && label_ok ? label : -1);
  CeSums<T> ce_sums{T(1), T(0), T(0)};
  if (has_labels) {
    ce_sums = kGx ? ce_pass<T, true>(st.x, st.n, st.plan, label, s.ez.get())
                  : ce_pass<T, false>(st.x, st.n, st.plan, label, nullptr);
  }
  const T divergence = row_divergence(st, s, p.loss != nullptr);
  if (p.loss != nullptr) {
    const T kd = refined_row_loss(divergence, st.tau_s);  // tau_s^2 D
    const T ce = has_labels ? row_ce_of(p, st, ce_sums, label, label_ok) : T(0);
    static_cast<T*>(p.loss)[r] =
        row_objective(ce, kd, static_cast<T>(p.ce_weight), static_cast<T>(p.kd_weight), has_labels);
    store_parts(p, r, ce, kd);
  }
  if constexpr (kGrad) {
    const TermSums<T> ts = row_terms<T, kGx, kGy>(p, st, s);
    const T grad_scale = static_cast<const T*>(p.grad_scale)[r * p.grad_scale_stride];
    if (kGx && p.grad_x != nullptr) student_gradient(p, r, st, ts, ce_sums, label, label_ok, s, grad_scale);
    if (kGy && p.grad_y != nullptr) teacher_gradient(p, r, st, ts, s, grad_scale);
    if (p.tau_grad != nullptr) {  // d(tau^2 D)/d tau = 2 tau D - S_x / s_x - S_y / s_y (docs/design.md section 9)
      const T dkd = T(2) * st.tau_s * divergence - ts.sx / st.sx.s - ts.sy / st.sy.s;
      static_cast<T*>(p.tau_grad)[r] = grad_scale * static_cast<T>(p.kd_weight) * dkd;
    }
  }
}

template <class T, bool kGx, bool kGy>
void run_rows(const KdProblem& p, int64_t begin, int64_t end) {
  const int64_t n = p.cols;
  Scratch<T> s;
  if (!is_acc_dtype<T>(p.x_dtype)) s.x.reset(new T[n]);
  if (!is_acc_dtype<T>(p.y_dtype)) s.y.reset(new T[n]);
  const Divergence div = static_cast<Divergence>(p.divergence);
  if (kGx || kGy || is_pointwise(div) || has_reverse(div)) {
    s.ea.reset(new T[n]);
    s.eb.reset(new T[n]);
  }
  if (kGx && p.labels != nullptr) s.ez.reset(new T[n]);
  if (kGx && is_pointwise(div)) s.g.reset(new T[n]);
  if (kGy && is_pointwise(div)) s.h.reset(new T[n]);
  for (int64_t r = begin; r < end; ++r) run_row<T, kGx, kGy>(p, r, s);
}

template <class T>
void dispatch_grads(const KdProblem& p, int64_t begin, int64_t end) {
  const bool tau = p.tau_grad != nullptr;  // d/d tau needs both rows' terms
  const bool gx = p.grad_x != nullptr || tau;
  const bool gy = p.grad_y != nullptr || tau;
  if (gx && gy) {
    run_rows<T, true, true>(p, begin, end);
  } else if (gx) {
    run_rows<T, true, false>(p, begin, end);
  } else if (gy) {
    run_rows<T, false, true>(p, begin, end);
  } else {
    run_rows<T, false, false>(p, begin, end);
  }
}

// Entry point of this instruction set's build: rows [begin, end) of the problem.
void kd_rows(const KdProblem& p, int64_t begin, int64_t end) {
  if (p.acc_double) {
    dispatch_grads<double>(p, begin, end);
  } else {
    dispatch_grads<float>(p, begin, end);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace logitstd
