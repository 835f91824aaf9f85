// Row math of the fused logit-standardized KD loss, shared by the CPU kernel (host code, on scalars
// and on at::vec::Vectorized lanes) and the CUDA kernel (device code). docs/design.md section 1 has the
// derivation; this header (with scalar_math.h, the scalar functions, and moments.h, the statistics,
// which it includes) is the single implementation of every formula the kernels use.
//
// Per row of V logits (student x, teacher y) the CPU kernel does (the CUDA kernel's passes build on
// these functions in phase_math.h, phase_grads.h and phase_row.h):
//   1. statistics: Moments (count, mean, M2, max) of x - shift and y - shift, where shift is the
//      row's first element (a constant row is then exactly 0, and the mean of a row such as
//      1000 + 0.01 * randn is computed from small numbers). Partial moments of blocks of the row
//      are combined with Chan's pairwise merge; finalize_moments() gives sigma and s = sigma + eps.
//   2. make_exp_plan(): the exponent of element k is sa_k = (x_k - max x) * xa = (a_k - max a) / unit
//      ("units" of log: 1 for exp, ln 2 for exp2). The kernel accumulates RowSums:
//        za = sum e^sa, zb = sum e^sb, t = sum e^sb * delta, tabs = sum |e^sb * delta|, with
//        delta = sb - sa (kl_delta()); the loss is tau_s^2 * KL = tau_s^2 (unit t / zb + log(za / zb)).
//   3. the chain rule from per-element terms (student_term ... term_coefficients below):
//        dL/dv_k = A ((g_k - G / V) - dev_k S / ((V - c) sigma s))
//      which is docs/design.md's  dL/dx = (g_u - u S s / ((V - c) sigma)) / s  with g_u = tau_s (q - p),
//      and the same chain rule for the teacher with g_w = tau_s^2 p (log p - log q - KL) / tau_t,
//      multiplied by grad_scale.
#pragma once

#include "scalar_math.h"
#include "moments.h"

namespace logitstd {

// ---------------------------------------------------------------------------------------------
// Exponent arguments: sa = (x - max x) * xa, sb = (y - max y) * ya, in units of `unit`
// (e^(unit * sa) = e^(a - max a)).
template <class T>
struct ExpPlan {
  T x_max, xa, x_scale, y_max, ya, y_scale;
};

// a = (x - mean) / (s_x tau_s) and max a = (max x - mean) / (s_x tau_s) (standardization is
// monotone), so a - max a = (x - max x) / (s_x tau_s): the difference of two nearby logits is
// exact, so rows such as 1000 + 0.01 * randn lose nothing (x * xa - max x * xa would, without a
// fused multiply-add). s = 0 (a constant row with eps = 0) gives xa = inf and 0 * inf = NaN
// exponents, as in the reference; a constant row with eps > 0 gives exponents of exactly 0.
// In scaled units (RowStats): sa = (c x - max(c x)) * xa, with c x exact.
template <class T>
LOGITSTD_HD ExpPlan<T> make_exp_plan(const RowStats<T>& x, const RowStats<T>& y, T tau_s, T tau_t, T inv_unit) {
  ExpPlan<T> p;
  p.x_max = x.max;
  p.xa = inv_unit / (x.s * tau_s);
  p.x_scale = x.scale;
  p.y_max = y.max;
  p.ya = inv_unit / (y.s * tau_t);
  p.y_scale = y.scale;
  return p;
}

// (c v - max(c v)) * scale; v - max may overflow to -inf only where the exponential is 0 anyway.
template <class V>
LOGITSTD_HD V exp_arg(V v, V v_max, V scale, V c) { return (v * c - v_max) * scale; }

// delta = sb - sa with -inf clamped (see floor_lowest); its weighted sum gives the KL.
template <class V>
LOGITSTD_HD V kl_delta(V sa, V sb) { return floor_lowest(sb - sa); }

// Sums over the row (or a block of it; blocks add) that the exp pass accumulates.
// tabs = sum e^sb |delta| measures the size of the terms whose cancellation the KL is
// (kl_needs_refinement).
template <class T>
struct RowSums {
  T za, zb, t, tabs;
};

template <class T>
LOGITSTD_HD RowSums<T> zero_sums() { return RowSums<T>{T(0), T(0), T(0), T(0)}; }

template <class T>
LOGITSTD_HD RowSums<T> add_sums(const RowSums<T>& a, const RowSums<T>& b) {
  return RowSums<T>{a.za + b.za, a.zb + b.zb, a.t + b.t, a.tabs + b.tabs};
}

// ---------------------------------------------------------------------------------------------
// The loss of one row.
// E_p[(b - max b) - (a - max a)] (natural log units): KL = kl_cross + log(Z_a / Z_b).
template <class T>
LOGITSTD_HD T kl_cross_term(const RowSums<T>& sums, T unit) {
  return unit * sums.t / sums.zb;
}

// tau_s^2 * KL(p || q) of the row. log(Z_a / Z_b) rather than log Z_a - log Z_b: both logs are
// about log V, and their difference would carry the rounding error of numbers that large.
template <class T>
LOGITSTD_HD T row_loss(const RowSums<T>& sums, T tau_s, T unit) {
  return tau_s * tau_s * (kl_cross_term(sums, unit) + m_log(sums.za / sums.zb));
}

// ---------------------------------------------------------------------------------------------
// The chain rule evaluated from the per-element terms themselves (the CPU kernel, which caches the
// exponentials, so one more pass over a row is cheap). With the per-element term computed once,
//   g_k = q_k - p_k                              (student_term)
//   g_k = p_k ((b_k - max b) - (a_k - max a) - kl_cross)    (teacher_term; p (log p - log q - KL))
// and the centered logits dev_k = v_k - mean, the sums G = sum g and S = sum g dev give
//   dL/dv_k = A ((g_k - G / V) - dev_k S / ((V - c) sigma s)),
// A = grad_scale tau_s / s_x (student) or grad_scale tau_s^2 / (tau_t s_y) (teacher): what autograd
// computes through the mean and the std. Analytically G = 0 and S is the sums form of
// phase_grads.h (chain_coefficients); evaluated from the same rounded g_k, the two terms stay
// consistent where they cancel (V = 2, where the exact gradient is O(eps)).
template <class V>
LOGITSTD_HD V student_term(V ea, V eb, V rza, V neg_rzb) {
  return m_fma(ea, rza, eb * neg_rzb);
}

template <class V>
LOGITSTD_HD V teacher_term(V eb, V delta, V rzb, V unit, V neg_kl_cross) {
  return (eb * rzb) * m_fma(delta, unit, neg_kl_cross);
}

// G and S of the student (gx, sx) and of the teacher (gy, sy); blocks of a row add.
template <class T>
struct TermSums {
  T gx, sx, gy, sy;
};

template <class T>
LOGITSTD_HD TermSums<T> add_term_sums(const TermSums<T>& a, const TermSums<T>& b) {
  return TermSums<T>{a.gx + b.gx, a.sx + b.sx, a.gy + b.gy, a.sy + b.sy};
}

// Per-element gradient: a g - b dev - a_mean, as a g + (-b dev + (-a_mean)).
template <class T>
struct TermCoef {
  T a, b, a_mean;
};

// dev is centered(v, st) (scaled units); the magnitude scale c enters through a.
//
// V = 2 is exact in closed form: the centered space is one-dimensional, so g - G/V is exactly
// dev S / M2 (M2 = (V - c) sigma^2) and the bracket (g - G/V) - dev S sigma / (M2 s) equals
// dev (S / M2) (s - sigma) / s = dev (S / M2) c eps / s. Evaluated that way no two terms cancel;
// evaluated as a difference the result (O(eps / s) of the terms) would carry their rounding.
template <class T>
LOGITSTD_HD TermCoef<T> term_coefficients(T G, T S, T num_classes, const RowStats<T>& st, T dof, T scale,
                                          bool standardize, T eps) {
  TermCoef<T> c;
  c.a = scale * st.scale / st.s;
  if (standardize) {
    if (num_classes == T(2) && st.sigma > T(0)) {
      c.b = -c.a * (S / (dof * st.sigma * st.sigma)) * (eps * st.scale / st.s);
      c.a_mean = T(0);
      c.a = T(0);
      return c;
    }
    c.a_mean = c.a * (G / num_classes);
    c.b = st.sigma > T(0) ? c.a * S / (dof * st.sigma * st.s) : T(0);  // 0 for a constant row
  } else {
    c.a_mean = T(0);
    c.b = T(0);
  }
  return c;
}

template <class V>
LOGITSTD_HD V grad_from_term(V g, V dev, V a, V neg_b, V neg_a_mean) {
  return m_fma(a, g, m_fma(neg_b, dev, neg_a_mean));
}

// ---------------------------------------------------------------------------------------------
// The loss without cancellation. KL = kl_cross + log(Z_a / Z_b) is computed from terms of size
// about E_p|delta| (delta = (b - max b) - (a - max a)); at high temperatures, or when the student is
// close to the teacher, KL is far smaller, and keeps only their rounding error (relative error
// about ratio * eps, ratio = (E_p|delta| + |log(Z_a/Z_b)|) / KL: the median ratio of random rows
// is ~3 at T = 2, ~6 at T = 4, ~11 at T = 8, ~140 at T = 100). Such rows are recomputed from the
// Bregman form, a sum of non-negative terms (Sigma p e^t = Sigma q = 1):
//     KL = sum_k p_k phi(t_k),  phi(t) = e^t - 1 - t,  t_k = -(delta_k unit + log(Z_a / Z_b)),
// phi from its Taylor series where |t| <= 1/2 and as q_k - p_k (1 + t_k) elsewhere (no overflow of
// e^t where p_k is tiny). An error in log(Z_a / Z_b) moves the sum only to second order.
constexpr int kKlRefineRatio = 4;  // the cancellation ratio above which a row is recomputed

template <class T>
LOGITSTD_HD bool kl_needs_refinement(const RowSums<T>& sums, T unit) {
  const T lz = m_log(sums.za / sums.zb);
  const T kl = kl_cross_term(sums, unit) + lz;
  if (!m_isfinite(kl) || !m_isfinite(sums.tabs)) return false;  // NaN/Inf rows keep the reference's
  return !(kl * T(kKlRefineRatio) >= unit * sums.tabs / sums.zb + m_abs(lz));
}

// Taylor coefficients 1/k!, k = 2..17, of phi: truncation below 2^-60 relative for |t| <= 1/2.
template <class V>
LOGITSTD_HD V bregman_phi_series(V t) {
  V r = V(1.0 / 355687428096000.0);
  r = m_fma(r, t, V(1.0 / 20922789888000.0));
  r = m_fma(r, t, V(1.0 / 1307674368000.0));
  r = m_fma(r, t, V(1.0 / 87178291200.0));
  r = m_fma(r, t, V(1.0 / 6227020800.0));
  r = m_fma(r, t, V(1.0 / 479001600.0));
  r = m_fma(r, t, V(1.0 / 39916800.0));
  r = m_fma(r, t, V(1.0 / 3628800.0));
  r = m_fma(r, t, V(1.0 / 362880.0));
  r = m_fma(r, t, V(1.0 / 40320.0));
  r = m_fma(r, t, V(1.0 / 5040.0));
  r = m_fma(r, t, V(1.0 / 720.0));
  r = m_fma(r, t, V(1.0 / 120.0));
  r = m_fma(r, t, V(1.0 / 24.0));
  r = m_fma(r, t, V(1.0 / 6.0));
  r = m_fma(r, t, V(0.5));
  return r * t * t;
}

// The argument t_k of phi for one element: -(delta unit + log(Z_a / Z_b)) (lz = log(Z_a / Z_b)).
template <class V>
LOGITSTD_HD V bregman_arg(V delta, V unit, V neg_lz) {
  return m_fma(-delta, unit, neg_lz);
}

// p_k phi(t_k) from p_k = eb / Z_b and q_k = ea / Z_a (scalar form; the CPU kernel has a vector one).
template <class T>
LOGITSTD_HD T bregman_term(T ea, T eb, T t, T rza, T rzb) {
  // p_k = 0 (a -inf teacher logit, underflow): p phi(t) -> q_k - p_k - p_k t_k = q_k, the limit (the
  // identity sum p e^t = sum q that makes the sum the KL needs every q_k)
  if (!(eb > T(0))) return ea * rza;
  const T p = eb * rzb;
  if (m_abs(t) <= T(0.5)) return p * bregman_phi_series(t);
  return m_fma(ea, rza, -m_fma(p, t, p));
}

// tau_s^2 KL from the Bregman sum.
template <class T>
LOGITSTD_HD T refined_row_loss(T bregman_sum, T tau_s) {
  return tau_s * tau_s * bregman_sum;
}

// ---------------------------------------------------------------------------------------------
// Hard-label cross-entropy of the raw student row (temperature 1, no standardization), fused with
// the KD term (docs/design.md, "the distillation objective"). With sz_k = (x_k - max x) / unit
// (exp_arg with scale inv_unit / c on the scaled row, exact since c is a power of two) and l the label,
//   Z_c = sum e^sz,  E = sum_{k != l} e^sz (accumulated apart: Z_c - e^sz_l would cancel when p_l ~ 1),
//   nll = lse - x_l = log(Z_c / e^sz_l) = log1p(E / e^sz_l),   lse - mean x = log Z_c - unit sum sz / V,
//   CE  = (1 - s) nll + s (lse - mean x)                                      (label smoothing s)
//   dCE/dx_k = e^sz_k / Z_c - s / V          (k != l)
//   dCE/dx_l = s - s / V - E / Z_c           (= e^sz_l / Z_c - s / V - (1 - s), without cancellation)
// A confidently right prediction (p_l = 1 - 1e-5) keeps every digit of its small loss and gradient.
template <class T>
struct CeSums {
  T zc;    // sum e^sz
  T zsum;  // sum sz (label smoothing's mean term)
  T excl;  // sum of e^sz over the classes other than the label
};

template <class T>
LOGITSTD_HD CeSums<T> add_ce_sums(const CeSums<T>& a, const CeSums<T>& b) {
  return CeSums<T>{a.zc + b.zc, a.zsum + b.zsum, a.excl + b.excl};
}

// The CE of a row; sz_label is sz at the label (<= 0), ez_label = e^sz_label, num_classes = V.
template <class T>
LOGITSTD_HD T row_ce(const CeSums<T>& c, T sz_label, T ez_label, T smoothing, T num_classes, T unit) {
  // log1p(E / e^sz_l) while e^sz_l is a normal number; far below the max, log Z_c - sz_l does not cancel.
  const T nll = ez_label > T(1e-30) ? m_log1p(c.excl / ez_label) : m_log(c.zc) - unit * sz_label;
  if (smoothing == T(0)) return nll;
  return m_fma(T(1) - smoothing, nll, smoothing * (m_log(c.zc) - unit * c.zsum / num_classes));
}

// The CE gradient at the label, per unit of ce_weight * grad_scale.
template <class T>
LOGITSTD_HD T ce_label_grad(const CeSums<T>& c, T smoothing, T num_classes) {
  return smoothing - smoothing / num_classes - c.excl / c.zc;
}

// The row's objective and its two parts: ce_weight * CE + kd_weight * tau_s^2 KL.
template <class T>
LOGITSTD_HD T row_objective(T ce, T kd, T ce_weight, T kd_weight, bool has_labels) {
  return has_labels ? m_fma(ce_weight, ce, kd_weight * kd) : kd_weight * kd;
}

}  // namespace logitstd
