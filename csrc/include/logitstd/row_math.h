// Row math of the fused logit-standardized KD loss, shared by the CPU kernel (host code, on scalars
// and on at::vec::Vectorized lanes) and the CUDA kernel (device code). DESIGN.md section 1 has the
// derivation; this header is the single implementation of every formula the kernels use.
//
// Per row of V logits (student x, teacher y) a kernel does:
//   1. statistics: Moments (count, mean, M2, max) of x - shift and y - shift, where shift is the
//      row's first element (a constant row is then exactly 0, and the mean of a row such as
//      1000 + 0.01 * randn is computed from small numbers). Partial moments of blocks of the row
//      are combined with Chan's pairwise merge; finalize_moments() gives sigma and s = sigma + eps.
//   2. make_exp_plan(): the exponent of element k is sa_k = (x_k - max x) * xa = (a_k - max a) / unit
//      ("units" of log: 1 for exp, ln 2 for exp2). The kernel accumulates RowSums:
//        za = sum e^sa, zb = sum e^sb, t = sum e^sb * delta, saa = sum e^sa sa, sab = sum e^sb sa,
//        sbb = sum e^sb sb, sbd = sum e^sb delta sb, with delta = sb - sa (kl_delta()).
//   3. finalize_row(): loss = tau_s^2 * KL and the coefficients of the gradient formulas (the CUDA
//      kernel on long rows); the CPU kernel, and the CUDA kernel on short rows, evaluate the same
//      chain rule from per-element terms instead (student_term ... term_coefficients below)
//        dL/dx_k = alpha_a e^sa_k - alpha_b e^sb_k - beta (x_k - shift_x) + beta_m       (grad_student_elem)
//        dL/dy_k = gamma e^sb_k (unit delta_k - kl_cross) - beta (y_k - shift_y) + beta_m  (grad_teacher_elem)
//      which are DESIGN.md's  dL/dx = (g_u - u S s / ((V - c) sigma)) / s  with g_u = tau_s (q - p),
//      and the same chain rule for the teacher with g_w = tau_s^2 p (log p - log q - KL) / tau_t,
//      multiplied by grad_scale.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LOGITSTD_HD __host__ __device__ __forceinline__
#else
#define LOGITSTD_HD inline
#endif

namespace logitstd {

// ---------------------------------------------------------------------------------------------
// Scalar math on float and double, the same spelling in host and device code.
LOGITSTD_HD float m_sqrt(float v) { return sqrtf(v); }
LOGITSTD_HD double m_sqrt(double v) { return sqrt(v); }
LOGITSTD_HD float m_log(float v) { return logf(v); }
LOGITSTD_HD double m_log(double v) { return log(v); }
LOGITSTD_HD float m_fma(float a, float b, float c) { return fmaf(a, b, c); }
LOGITSTD_HD double m_fma(double a, double b, double c) { return fma(a, b, c); }
#if defined(__CUDA_ARCH__)
LOGITSTD_HD bool m_isfinite(float v) { return isfinite(v); }
LOGITSTD_HD bool m_isfinite(double v) { return isfinite(v); }
#else
LOGITSTD_HD bool m_isfinite(float v) { return std::isfinite(v); }
LOGITSTD_HD bool m_isfinite(double v) { return std::isfinite(v); }
#endif

// The most negative finite value: kl_delta() clamps -inf to it so that 0 * delta stays 0.
template <class T> struct Lowest;
template <> struct Lowest<float> { LOGITSTD_HD static float value() { return -FLT_MAX; } };
template <> struct Lowest<double> { LOGITSTD_HD static double value() { return -DBL_MAX; } };

// max that propagates NaN (fmaxf would drop it): a NaN logit must make its row NaN.
LOGITSTD_HD float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }
LOGITSTD_HD double nan_max(double a, double b) { return (a != a || a > b) ? a : b; }

// v, or Lowest for v = -inf (NaN stays NaN). Used on delta = sb - sa: where the teacher
// probability is exactly 0 (b = -inf without standardization) the term e^sb * delta must be 0,
// as in F.kl_div, not 0 * -inf = NaN.
LOGITSTD_HD float floor_lowest(float v) { return v < -FLT_MAX ? -FLT_MAX : v; }
LOGITSTD_HD double floor_lowest(double v) { return v < -DBL_MAX ? -DBL_MAX : v; }

#if defined(LOGITSTD_ROW_MATH_AT_VEC)
// The same operations on at::vec::Vectorized lanes (CPU kernel; include <ATen/cpu/vec/vec.h> first).
template <class T>
inline at::vec::Vectorized<T> m_fma(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b,
                                    const at::vec::Vectorized<T>& c) {
  return at::vec::fmadd(a, b, c);
}
template <class T>
inline at::vec::Vectorized<T> floor_lowest(const at::vec::Vectorized<T>& v) {
  return at::vec::maximum(v, at::vec::Vectorized<T>(Lowest<T>::value()));  // NaN-propagating max
}
#endif

// ---------------------------------------------------------------------------------------------
// Statistics: Chan's parallel merge of (count, mean, M2) plus the max.
template <class T>
struct Moments {
  T n;     // number of elements (exact up to 2^24 in float; only used as a merge weight)
  T mean;  // mean of (v - shift)
  T m2;    // sum of squared deviations from mean
  T max;   // max of v (not shifted)
};

// The identity of merge_moments: no elements, max = -inf.
template <class T>
LOGITSTD_HD Moments<T> empty_moments() {
  return Moments<T>{T(0), T(0), T(0), -static_cast<T>(INFINITY)};
}

// Chan, Golub & LeVeque: merge two partial moments. Exact for a constant row (both means 0).
template <class T>
LOGITSTD_HD Moments<T> merge_moments(const Moments<T>& a, const Moments<T>& b) {
  if (b.n == T(0)) return Moments<T>{a.n, a.mean, a.m2, nan_max(a.max, b.max)};
  if (a.n == T(0)) return Moments<T>{b.n, b.mean, b.m2, nan_max(a.max, b.max)};
  const T n = a.n + b.n;
  const T wb = b.n / n;
  const T delta = b.mean - a.mean;
  Moments<T> r;
  r.n = n;
  r.mean = m_fma(delta, wb, a.mean);
  r.m2 = a.m2 + b.m2 + delta * delta * a.n * wb;
  r.max = nan_max(a.max, b.max);
  return r;
}

// What the rest of the row math needs from the statistics of one input row.
template <class T>
struct RowStats {
  T shift;  // the row's first element: the data are v - shift
  T mean;   // mean of (v - shift)
  T sigma;  // sqrt(M2 / (V - correction)); 0 when not standardizing
  T s;      // sigma + eps; 1 when not standardizing
  T max;    // max of v
};

template <class T>
LOGITSTD_HD RowStats<T> finalize_moments(const Moments<T>& m, T shift, T dof, T eps, bool standardize) {
  RowStats<T> r;
  r.shift = shift;
  r.mean = m.mean;
  r.max = m.max;
  if (standardize) {
    r.sigma = m_sqrt(m.m2 / dof);
    r.s = r.sigma + eps;
  } else {
    r.sigma = T(0);
    r.s = T(1);
  }
  return r;
}

// A row is computed by the fast path when every logit is finite; the kernels use this to choose
// an exponential that is exact on NaN/Inf for the (rare) rows that need one.
template <class T>
LOGITSTD_HD bool row_is_finite(const Moments<T>& m) {
  return m_isfinite(m.mean) && m_isfinite(m.max);
}

// ---------------------------------------------------------------------------------------------
// Exponent arguments: sa = (x - max x) * xa, sb = (y - max y) * ya, in units of `unit`
// (e^(unit * sa) = e^(a - max a)).
template <class T>
struct ExpPlan {
  T x_max, xa, y_max, ya;
};

// a = (x - mean) / (s_x tau_s) and max a = (max x - mean) / (s_x tau_s) (standardization is
// monotone), so a - max a = (x - max x) / (s_x tau_s): the difference of two nearby logits is
// exact, so rows such as 1000 + 0.01 * randn lose nothing (x * xa - max x * xa would, without a
// fused multiply-add). s = 0 (a constant row with eps = 0) gives xa = inf and 0 * inf = NaN
// exponents, as in the reference; a constant row with eps > 0 gives exponents of exactly 0.
template <class T>
LOGITSTD_HD ExpPlan<T> make_exp_plan(const RowStats<T>& x, const RowStats<T>& y, T tau_s, T tau_t, T inv_unit) {
  ExpPlan<T> p;
  p.x_max = x.max;
  p.xa = inv_unit / (x.s * tau_s);
  p.y_max = y.max;
  p.ya = inv_unit / (y.s * tau_t);
  return p;
}

template <class V>
LOGITSTD_HD V exp_arg(V v, V v_max, V scale) { return (v - v_max) * scale; }

// delta = sb - sa with -inf clamped (see floor_lowest); its weighted sum gives the KL.
template <class V>
LOGITSTD_HD V kl_delta(V sa, V sb) { return floor_lowest(sb - sa); }

// Sums over the row (or a block of it; blocks add) that the exp pass accumulates.
template <class T>
struct RowSums {
  T za, zb, t, saa, sab, sbb, sbd;
};

template <class T>
LOGITSTD_HD RowSums<T> zero_sums() { return RowSums<T>{T(0), T(0), T(0), T(0), T(0), T(0), T(0)}; }

template <class T>
LOGITSTD_HD RowSums<T> add_sums(const RowSums<T>& a, const RowSums<T>& b) {
  return RowSums<T>{a.za + b.za, a.zb + b.zb, a.t + b.t, a.saa + b.saa,
                    a.sab + b.sab, a.sbb + b.sbb, a.sbd + b.sbd};
}

// ---------------------------------------------------------------------------------------------
// Loss and gradient coefficients of one row.
template <class T>
struct GradStudentCoef {
  T alpha_a, alpha_b, beta, beta_m;
};

template <class T>
struct GradTeacherCoef {
  T gamma, unit, kl_cross, beta, beta_m;
};

template <class T>
struct RowResult {
  T loss;  // tau_s^2 * KL(p || q)
  GradStudentCoef<T> gx;
  GradTeacherCoef<T> gy;
};

// The coefficient of the standardization term: S s / ((V - c) sigma), 0 for a constant row
// (sigma = 0, eps > 0), where u = 0 exactly and the term is 0 instead of 0 * inf.
template <class T>
LOGITSTD_HD T std_coefficient(T S, const RowStats<T>& st, T dof) {
  return st.sigma > T(0) ? S * st.s / (dof * st.sigma) : T(0);
}

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

// The gradient coefficients from the exp pass's sums alone (the CUDA kernel: no extra pass).
template <class T>
LOGITSTD_HD RowResult<T> finalize_row(const RowSums<T>& sums, const RowStats<T>& sx, const RowStats<T>& sy,
                                      T dof, T tau_s, T tau_t, bool standardize, T unit, T grad_scale) {
  RowResult<T> r;
  const T inv_za = T(1) / sums.za;
  const T inv_zb = T(1) / sums.zb;
  const T kl_cross = kl_cross_term(sums, unit);
  const T tau2 = tau_s * tau_s;
  r.loss = row_loss(sums, tau_s, unit);

  // Student: S = sum g_u u = tau_s^2 (E_q[a] - E_p[a]) (g_u sums to 0, so any shift of a cancels).
  const T sx_s = sx.s;
  r.gx.alpha_a = grad_scale * tau_s * inv_za / sx_s;
  r.gx.alpha_b = grad_scale * tau_s * inv_zb / sx_s;
  if (standardize) {
    const T S = tau2 * unit * (sums.saa * inv_za - sums.sab * inv_zb);
    r.gx.beta = grad_scale * std_coefficient(S, sx, dof) / (sx_s * sx_s);
    r.gx.beta_m = r.gx.beta * sx.mean;
  } else {  // no standardization term (the kernels pass xk = 0: a -inf logit must not give 0 * inf)
    r.gx.beta = T(0);
    r.gx.beta_m = T(0);
  }

  // Teacher: g_w = tau_s^2 p (delta - KL_cross) / tau_t, S = tau_s^2 Cov_p(delta, b).
  const T sy_s = sy.s;
  r.gy.gamma = grad_scale * tau2 * inv_zb / (tau_t * sy_s);
  r.gy.unit = unit;
  r.gy.kl_cross = kl_cross;
  if (standardize) {
    const T S = tau2 * unit * (unit * sums.sbd * inv_zb - kl_cross * sums.sbb * inv_zb);
    r.gy.beta = grad_scale * std_coefficient(S, sy, dof) / (sy_s * sy_s);
    r.gy.beta_m = r.gy.beta * sy.mean;
  } else {
    r.gy.beta = T(0);
    r.gy.beta_m = T(0);
  }
  return r;
}

// Per-element gradients; V is a scalar (float, double) or a vector type with m_fma overloads.
// xk = x - shift_x when standardizing, else 0; ea = e^sa, eb = e^sb (all in the accumulation type).
template <class V>
LOGITSTD_HD V grad_student_elem(V ea, V eb, V xk, V alpha_a, V neg_alpha_b, V neg_beta, V beta_m) {
  return m_fma(alpha_a, ea, m_fma(neg_alpha_b, eb, m_fma(neg_beta, xk, beta_m)));
}

template <class V>
LOGITSTD_HD V grad_teacher_elem(V eb, V delta, V yk, V gamma, V unit, V neg_kl_cross, V neg_beta, V beta_m) {
  return m_fma(gamma * eb, m_fma(delta, unit, neg_kl_cross), m_fma(neg_beta, yk, beta_m));
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
// finalize_row; evaluated from the same rounded g_k, the two terms stay consistent where they
// cancel (V = 2, where the exact gradient is O(eps)).
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

template <class T>
LOGITSTD_HD TermCoef<T> term_coefficients(T G, T S, T num_classes, const RowStats<T>& st, T dof, T scale,
                                          bool standardize) {
  TermCoef<T> c;
  c.a = scale / st.s;
  if (standardize) {
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

}  // namespace logitstd
