// CPU kernel of logitstd::fused_kd_forward: loss and gradients of a range of rows, one row at a
// time, vectorized with at::vec::Vectorized (exp included).
//
// Compiled once per CPU instruction set (setup.py: DEFAULT, and AVX2 / AVX512 on x86-64), each
// time with CPU_CAPABILITY defined, the way ATen builds its own kernels; kd_cpu.cpp picks one at run
// time from at::get_cpu_capability() (which honours ATEN_CPU_CAPABILITY).
//
// Math (docs/design.md section 1, formulas in logitstd/row_math.h), per row, all in the accumulation
// type T (float, or double when an input is float64):
//   pass 1  moments of x and y: per block of kBlock elements the mean and M2 around the block mean
//           (two passes over the block, which is in L1), merged across blocks with Chan's formula;
//   pass 2  e^sa, e^sb and the sums of the KL; e^sa, e^sb are kept in a per-thread scratch row
//           when a gradient is requested;
//   pass 3  the per-element gradient terms g (q - p, p (log p - log q - KL)), written over the
//           stored exponentials, and the standardization sums G = sum g, S = sum g dev;
//   pass 4  the gradients from g: the chain rule through the mean and the std evaluated from the
//           same rounded g (row_math.h, term_coefficients); no exp is recomputed.
// Memory traffic per element: reads sizeof(x) + sizeof(y) bytes from memory (8 for float32) and
// writes sizeof(x) / sizeof(y) for each requested gradient (4 + 4); the later passes over a row hit
// the caches (a row's working set is 2 to 6 rows of V * sizeof(T) bytes: inputs, exponentials,
// converted copies of low-precision inputs). The time goes to the two exponentials per element.
// Low-precision inputs are converted to T into scratch rows first. Each row is computed by one
// thread in a fixed order, so results do not depend on the number of threads.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#define LOGITSTD_ROW_MATH_AT_VEC
#include "logitstd/kd_problem.h"
#include "logitstd/row_math.h"

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

// Elements per partial sum: each vector lane adds kBlock / lanes values (256 for AVX2 float)
// before the block total is added to the row total, which keeps float32 sums accurate to a few
// ulps without Kahan summation; a block of x and y (16 KB in float) stays in L1 for the M2 pass.
constexpr int64_t kBlock = 2048;

template <class T>
T lane_sum(const Vectorized<T>& v) {
  alignas(64) T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T s = lanes[0];
  for (int i = 1; i < Vectorized<T>::size(); ++i) s += lanes[i];
  return s;
}

template <class T>
T lane_max(const Vectorized<T>& v) {
  alignas(64) T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T m = lanes[0];
  for (int i = 1; i < Vectorized<T>::size(); ++i) m = nan_max(m, lanes[i]);
  return m;
}

// ------------------------------------------------------------------------------------------
// Conversions between the input dtypes and the accumulation type.
template <class S>
void widen_to_float(const S* src, float* dst, int64_t n) {
  using VS = Vectorized<S>;
  using VF = Vectorized<float>;
  int64_t i = 0;
  for (; i + VS::size() <= n; i += VS::size()) {
    auto halves = at::vec::convert_to_float<S>(VS::loadu(src + i));
    std::get<0>(halves).store(dst + i);
    std::get<1>(halves).store(dst + i + VF::size());
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <class S, class T>
void to_acc(const S* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float> && (std::is_same_v<S, c10::BFloat16> || std::is_same_v<S, c10::Half>)) {
    widen_to_float(src, dst, n);
  } else {
    at::vec::convert(src, dst, n);
  }
}

// The row in the accumulation type: the input itself when it already has it, else a converted copy.
template <class T>
const T* acc_row(Dtype dtype, const void* base, int64_t offset, T* scratch, int64_t n) {
  switch (dtype) {
    case Dtype::kFloat32:
      if constexpr (std::is_same_v<T, float>) return static_cast<const float*>(base) + offset;
      to_acc(static_cast<const float*>(base) + offset, scratch, n);
      return scratch;
    case Dtype::kFloat64:
      if constexpr (std::is_same_v<T, double>) return static_cast<const double*>(base) + offset;
      to_acc(static_cast<const double*>(base) + offset, scratch, n);
      return scratch;
    case Dtype::kFloat16:
      to_acc(static_cast<const c10::Half*>(base) + offset, scratch, n);
      return scratch;
    case Dtype::kBFloat16:
      to_acc(static_cast<const c10::BFloat16*>(base) + offset, scratch, n);
      return scratch;
  }
  return scratch;
}

template <class T>
bool is_acc_dtype(Dtype dtype) {
  return std::is_same_v<T, float> ? dtype == Dtype::kFloat32 : dtype == Dtype::kFloat64;
}

// Write a gradient row computed in T to the output in its dtype (round to nearest even).
template <class T>
void store_row(const T* src, Dtype dtype, void* base, int64_t offset, int64_t n) {
  switch (dtype) {
    case Dtype::kFloat32:
      at::vec::convert(src, static_cast<float*>(base) + offset, n);
      break;
    case Dtype::kFloat64:
      at::vec::convert(src, static_cast<double*>(base) + offset, n);
      break;
    case Dtype::kFloat16:
      at::vec::convert(src, static_cast<c10::Half*>(base) + offset, n);
      break;
    case Dtype::kBFloat16:
      at::vec::convert(src, static_cast<c10::BFloat16*>(base) + offset, n);
      break;
  }
}

void zero_row(Dtype dtype, void* base, int64_t offset, int64_t n) {
  const int64_t bytes = (dtype == Dtype::kFloat64 ? 8 : dtype == Dtype::kFloat32 ? 4 : 2);
  std::memset(static_cast<char*>(base) + offset * bytes, 0, static_cast<size_t>(n * bytes));
}

// ------------------------------------------------------------------------------------------
// Pass 1: moments of c v - shift (Chan merge of per-block two-pass moments), max and min of c v.
// c is the row's magnitude scale (row_math.h, magnitude_scale): 1 on the first try; a row whose
// magnitude falls outside MagnitudeRange is computed again with its power-of-two scale.
// Four independent accumulators per sum (combined in a fixed order) hide the add latency.
template <class T>
Moments<T> row_moments(const T* v, int64_t n, T shift, T scale, bool need_m2) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec vshift(shift);
  const Vec vscale(scale);
  const Vec zero(T(0));
  const Vec neg_inf(-static_cast<T>(INFINITY));
  const Vec pos_inf(static_cast<T>(INFINITY));
  Moments<T> total = empty_moments<T>();
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const T* p = v + b0;
    const int64_t len = std::min(kBlock, n - b0);
    Vec s0 = zero, s1 = zero, s2 = zero, s3 = zero;
    Vec m0 = neg_inf, m1 = neg_inf, m2 = neg_inf, m3 = neg_inf;
    Vec l0 = pos_inf, l1 = pos_inf;
    int64_t i = 0;
    for (; i + 4 * W <= len; i += 4 * W) {
      const Vec d0 = Vec::loadu(p + i) * vscale, d1 = Vec::loadu(p + i + W) * vscale;
      const Vec d2 = Vec::loadu(p + i + 2 * W) * vscale, d3 = Vec::loadu(p + i + 3 * W) * vscale;
      m0 = at::vec::maximum(m0, d0);
      m1 = at::vec::maximum(m1, d1);
      m2 = at::vec::maximum(m2, d2);
      m3 = at::vec::maximum(m3, d3);
      l0 = at::vec::minimum(l0, at::vec::minimum(d0, d1));
      l1 = at::vec::minimum(l1, at::vec::minimum(d2, d3));
      s0 = s0 + (d0 - vshift);
      s1 = s1 + (d1 - vshift);
      s2 = s2 + (d2 - vshift);
      s3 = s3 + (d3 - vshift);
    }
    for (; i + W <= len; i += W) {
      const Vec d = Vec::loadu(p + i) * vscale;
      m0 = at::vec::maximum(m0, d);
      l0 = at::vec::minimum(l0, d);
      s0 = s0 + (d - vshift);
    }
    if (i < len) {
      const int64_t c = len - i;
      const Vec d = Vec::loadu(p + i, c) * vscale;
      m0 = at::vec::maximum(m0, Vec::set(neg_inf, d, c));
      l0 = at::vec::minimum(l0, Vec::set(pos_inf, d, c));
      s0 = s0 + Vec::set(zero, d - vshift, c);
    }
    const T mean = lane_sum((s0 + s1) + (s2 + s3)) / static_cast<T>(len);
    const T max = lane_max(at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3)));
    const T min = -lane_max(-at::vec::minimum(l0, l1));
    T m2sum = T(0);
    if (need_m2) {
      const Vec vcenter(mean);
      Vec q0 = zero, q1 = zero, q2 = zero, q3 = zero;
      i = 0;
      for (; i + 4 * W <= len; i += 4 * W) {
        const Vec d0 = (Vec::loadu(p + i) * vscale - vshift) - vcenter;
        const Vec d1 = (Vec::loadu(p + i + W) * vscale - vshift) - vcenter;
        const Vec d2 = (Vec::loadu(p + i + 2 * W) * vscale - vshift) - vcenter;
        const Vec d3 = (Vec::loadu(p + i + 3 * W) * vscale - vshift) - vcenter;
        q0 = at::vec::fmadd(d0, d0, q0);
        q1 = at::vec::fmadd(d1, d1, q1);
        q2 = at::vec::fmadd(d2, d2, q2);
        q3 = at::vec::fmadd(d3, d3, q3);
      }
      for (; i + W <= len; i += W) {
        const Vec d = (Vec::loadu(p + i) * vscale - vshift) - vcenter;
        q0 = at::vec::fmadd(d, d, q0);
      }
      if (i < len) {
        const int64_t c = len - i;
        const Vec d = Vec::set(zero, (Vec::loadu(p + i, c) * vscale - vshift) - vcenter, c);
        q0 = at::vec::fmadd(d, d, q0);
      }
      m2sum = lane_sum((q0 + q1) + (q2 + q3));
    }
    total = merge_moments(total, Moments<T>{static_cast<T>(len), mean, m2sum, max, min});
  }
  return total;
}

// The statistics of one input row: unscaled moments, then, for the rare row whose magnitude is
// outside MagnitudeRange, the moments of c v (row_math.h, magnitude_scale).
template <class T>
RowStats<T> row_stats(const T* v, int64_t n, T dof, T eps, bool standardize) {
  const Moments<T> m = row_moments(v, n, v[0], T(1), standardize);
  const T scale = magnitude_scale(m.max, m.min);
  if (scale == T(1)) return finalize_moments(m, T(1), v[0], dof, eps, standardize);
  const T shift = v[0] * scale;
  if (!standardize) {  // only the max is used: c max is exact
    return finalize_moments(Moments<T>{m.n, T(0), T(0), m.max * scale, m.min * scale}, scale, shift, dof, eps, false);
  }
  return finalize_moments(row_moments(v, n, shift, scale, true), scale, shift, dof, eps, standardize);
}

// ------------------------------------------------------------------------------------------
// Pass 2: exponentials and RowSums. Sleef's exp (within 1 ulp; IEEE behaviour on NaN/Inf). ATen's
// exp_u20 (up to 20 ulps) is faster, but its error, amplified where the chain rule through the
// standardization cancels (small V, a gradient close to the direction of the centered logits),
// made 1.4% of random V = 3 rows exceed twice eager's gradient error (measured: up to 16x).
template <class T, bool kExact>
inline Vectorized<T> vexp(const Vectorized<T>& v) {
  return v.exp();
}

// kStore: a gradient is requested, so the exponentials are kept for the later passes.
template <class T, bool kExact, bool kStore>
RowSums<T> exp_pass(const T* x, const T* y, int64_t n, const ExpPlan<T>& plan, T* ea_out, T* eb_out) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec x_max(plan.x_max), xa(plan.xa), xc(plan.x_scale), y_max(plan.y_max), ya(plan.ya), yc(plan.y_scale);
  const Vec zero(T(0));
  RowSums<T> total = zero_sums<T>();
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    Vec za = zero, zb = zero, t = zero, tabs = zero;
    auto body = [&](int64_t i, int64_t count) {
      const bool tail = count < W;
      const Vec xv = tail ? Vec::loadu(x + i, count) : Vec::loadu(x + i);
      const Vec yv = tail ? Vec::loadu(y + i, count) : Vec::loadu(y + i);
      const Vec sa = exp_arg(xv, x_max, xa, xc);
      const Vec sb = exp_arg(yv, y_max, ya, yc);
      Vec ea = vexp<T, kExact>(sa);
      Vec eb = vexp<T, kExact>(sb);
      if (tail) {  // lanes past the row end contribute nothing
        ea = Vec::set(zero, ea, count);
        eb = Vec::set(zero, eb, count);
      }
      // On rows of finite logits delta is finite: the clamp of kl_delta is only needed on the
      // exact (non-finite) path.
      const Vec delta = kExact ? kl_delta(sa, sb) : sb - sa;
      za = za + ea;
      zb = zb + eb;
      t = at::vec::fmadd(eb, delta, t);
      tabs = at::vec::fmadd(eb, delta.abs(), tabs);
      if constexpr (kStore) {
        if (tail) {
          ea.store(ea_out + i, count);
          eb.store(eb_out + i, count);
        } else {
          ea.store(ea_out + i);
          eb.store(eb_out + i);
        }
      }
    };
    int64_t i = b0;
    for (; i + W <= b1; i += W) body(i, W);
    if (i < b1) body(i, b1 - i);
    total = add_sums(total, RowSums<T>{lane_sum(za), lane_sum(zb), lane_sum(t), lane_sum(tabs), T(0), T(0), T(0), T(0)});
  }
  return total;
}

// ------------------------------------------------------------------------------------------
// Pass 3: the per-element terms (row_math.h, student_term / teacher_term), written over the stored
// exponentials, and their sums G = sum g, S = sum g dev (dev: the centered logit).
template <class T, bool kGx, bool kGy>
TermSums<T> term_pass(const T* x, const T* y, int64_t n, bool standardize, const ExpPlan<T>& plan,
                      const RowStats<T>& stx, const RowStats<T>& sty, T rza, T rzb, T kl_cross, T* ea_to_gx,
                      T* eb_to_gy) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec x_max(plan.x_max), xa(plan.xa), xc(plan.x_scale), y_max(plan.y_max), ya(plan.ya), yc(plan.y_scale);
  const Vec vrza(rza), vrzb(rzb), neg_rzb(-rzb), unit(T(1)), neg_kl_cross(-kl_cross);
  const Vec zero(T(0));
  TermSums<T> total{T(0), T(0), T(0), T(0)};
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    Vec gxs = zero, sxs = zero, gys = zero, sys = zero;
    auto body = [&](int64_t i, int64_t count) {
      const bool tail = count < W;
      const Vec ea = tail ? Vec::loadu(ea_to_gx + i, count) : Vec::loadu(ea_to_gx + i);
      const Vec eb = tail ? Vec::loadu(eb_to_gy + i, count) : Vec::loadu(eb_to_gy + i);
      Vec gx, gy;
      const Vec xv = tail ? Vec::loadu(x + i, count) : Vec::loadu(x + i);
      if constexpr (kGx) {
        gx = student_term(ea, eb, vrza, neg_rzb);
        if (standardize) {
          const Vec dev = Vec::set(zero, centered(xv, stx), count);
          gxs = gxs + gx;
          sxs = at::vec::fmadd(gx, dev, sxs);
        }
      }
      if constexpr (kGy) {
        const Vec yv = tail ? Vec::loadu(y + i, count) : Vec::loadu(y + i);
        const Vec delta = kl_delta(exp_arg(xv, x_max, xa, xc), exp_arg(yv, y_max, ya, yc));
        gy = teacher_term(eb, delta, vrzb, unit, neg_kl_cross);
        if (standardize) {
          const Vec dev = Vec::set(zero, centered(yv, sty), count);
          gys = gys + gy;
          sys = at::vec::fmadd(gy, dev, sys);
        }
      }
      if constexpr (kGx) {
        if (tail) gx.store(ea_to_gx + i, count); else gx.store(ea_to_gx + i);
      }
      if constexpr (kGy) {
        if (tail) gy.store(eb_to_gy + i, count); else gy.store(eb_to_gy + i);
      }
    };
    int64_t i = b0;
    for (; i + W <= b1; i += W) body(i, W);
    if (i < b1) body(i, b1 - i);
    total.gx += lane_sum(gxs);
    total.sx += lane_sum(sxs);
    total.gy += lane_sum(gys);
    total.sy += lane_sum(sys);
  }
  return total;
}

// ------------------------------------------------------------------------------------------
// CE pass (the distillation objective only): e^sz over the raw student row, sz = x - max x
// (row_math.h, CeSums), stored in ez_out when the student gradient is requested.
template <class T, bool kStore>
CeSums<T> ce_pass(const T* x, int64_t n, const ExpPlan<T>& plan, int64_t label, T* ez_out) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec x_max(plan.x_max), xc(plan.x_scale), inv_c(T(1) / plan.x_scale), zero(T(0));
  CeSums<T> total{T(0), T(0), T(0)};
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    Vec zc = zero, zsum = zero, excl = zero;
    auto body = [&](int64_t i, int64_t count) {
      const bool tail = count < W;
      const Vec sz = exp_arg(tail ? Vec::loadu(x + i, count) : Vec::loadu(x + i), x_max, inv_c, xc);
      Vec ez = sz.exp();
      if (tail) ez = Vec::set(zero, ez, count);
      zc = zc + ez;
      if (label >= i && label < i + count) {  // the label's lane stays out of E
        alignas(64) T lanes[Vec::size()];
        ez.store(lanes);
        lanes[label - i] = T(0);
        excl = excl + Vec::loadu(lanes);
      } else {
        excl = excl + ez;
      }
      zsum = zsum + (tail ? Vec::set(zero, sz, count) : sz);
      if constexpr (kStore) {
        if (tail) ez.store(ez_out + i, count); else ez.store(ez_out + i);
      }
    };
    int64_t i = b0;
    for (; i + W <= b1; i += W) body(i, W);
    if (i < b1) body(i, b1 - i);
    total = add_ce_sums(total, CeSums<T>{lane_sum(zc), lane_sum(zsum), lane_sum(excl)});
  }
  return total;
}

// The CE gradient's per-element part: ce_a e^sz + ce_b (ce_b = -ce_weight scale s / V); the label's
// -(1 - s) ce_weight scale is added to its element afterwards.
template <class T>
struct CeGrad {
  const T* ez = nullptr;  // nullptr: no CE term
  T a = T(0), b = T(0);
};

// ------------------------------------------------------------------------------------------
// Pass 4: gradients from the stored terms (plus the CE term). out may alias terms (read before written).
template <class T>
void grad_pass(const T* v, const T* terms, int64_t n, bool standardize, const RowStats<T>& st,
               const TermCoef<T>& c, const CeGrad<T>& ce, T* out) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec zero(T(0));
  const Vec a(c.a), neg_b(-c.b), neg_a_mean(-c.a_mean), ce_a(ce.a), ce_b(ce.b);
  auto body = [&](int64_t i, int64_t count) {
    const bool tail = count < W;
    const Vec g = tail ? Vec::loadu(terms + i, count) : Vec::loadu(terms + i);
    Vec dev = zero;  // without standardization there is no std term (and a -inf logit stays out)
    if (standardize) dev = centered(tail ? Vec::loadu(v + i, count) : Vec::loadu(v + i), st);
    Vec out_v = grad_from_term(g, dev, a, neg_b, neg_a_mean);
    if (ce.ez != nullptr) {
      out_v = out_v + at::vec::fmadd(ce_a, tail ? Vec::loadu(ce.ez + i, count) : Vec::loadu(ce.ez + i), ce_b);
    }
    if (tail) out_v.store(out + i, count); else out_v.store(out + i);
  };
  int64_t i = 0;
  for (; i + W <= n; i += W) body(i, W);
  if (i < n) body(i, n - i);
}

// ------------------------------------------------------------------------------------------
// Loss of a row whose KL = kl_cross + log(Z_a / Z_b) cancels (row_math.h, kl_needs_refinement):
// the Bregman sum sum_k p_k phi(t_k), from the stored exponentials (kStored) or recomputed ones.
// Only such rows (high temperatures, a student close to its teacher) take this pass.
template <class T, bool kStored>
T bregman_pass(const T* x, const T* y, int64_t n, const ExpPlan<T>& plan, const RowSums<T>& sums, const T* ea_in,
               const T* eb_in) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec x_max(plan.x_max), xa(plan.xa), xc(plan.x_scale), y_max(plan.y_max), ya(plan.ya), yc(plan.y_scale);
  const Vec zero(T(0)), half(T(0.5)), unit(T(1));
  const Vec rza(T(1) / sums.za), rzb(T(1) / sums.zb), neg_lz(-m_log(sums.za / sums.zb));
  T total = T(0);
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    Vec acc = zero;
    auto body = [&](int64_t i, int64_t count) {
      const bool tail = count < W;
      const Vec xv = tail ? Vec::loadu(x + i, count) : Vec::loadu(x + i);
      const Vec yv = tail ? Vec::loadu(y + i, count) : Vec::loadu(y + i);
      const Vec sa = exp_arg(xv, x_max, xa, xc);
      const Vec sb = exp_arg(yv, y_max, ya, yc);
      Vec ea, eb;
      if constexpr (kStored) {
        ea = tail ? Vec::loadu(ea_in + i, count) : Vec::loadu(ea_in + i);
        eb = tail ? Vec::loadu(eb_in + i, count) : Vec::loadu(eb_in + i);
      } else {
        ea = vexp<T, false>(sa);
        eb = vexp<T, false>(sb);
      }
      const Vec t = bregman_arg(kl_delta(sa, sb), unit, neg_lz);
      const Vec p = eb * rzb;
      const Vec series = p * bregman_phi_series(t);
      const Vec direct = at::vec::fmsub(ea, rza, at::vec::fmadd(p, t, p));
      Vec term = Vec::blendv(direct, series, t.abs() <= half);
      term = Vec::blendv(ea * rza, term, eb > zero);  // p_k = 0 contributes q_k (row_math.h, bregman_term)
      if (tail) term = Vec::set(zero, term, count);
      acc = acc + term;
    };
    int64_t i = b0;
    for (; i + W <= b1; i += W) body(i, W);
    if (i < b1) body(i, b1 - i);
    total += lane_sum(acc);
  }
  return total;
}

// ------------------------------------------------------------------------------------------
// Per-thread scratch rows, allocated once per range of rows.
template <class T>
struct Scratch {
  std::unique_ptr<T[]> x, y, ea, eb, ez;
};

template <class T>
void store_parts(const KdProblem& p, int64_t r, T ce, T kd) {
  if (p.ce_rows != nullptr) static_cast<T*>(p.ce_rows)[r] = ce;
  if (p.kd_rows != nullptr) static_cast<T*>(p.kd_rows)[r] = kd;
}

template <class T, bool kGx, bool kGy>
void run_row(const KdProblem& p, int64_t r, Scratch<T>& s) {
  const int64_t n = p.cols;
  T* loss = static_cast<T*>(p.loss);
  const bool has_labels = p.labels != nullptr;
  const int64_t label = has_labels ? p.labels[r] : 0;
  if ((p.mask != nullptr && !p.mask[r]) || (has_labels && label == p.ignore_index)) {
    if (!p.zero_excluded) return;  // recomputation: excluded rows keep their gradient
    if (loss != nullptr) loss[r] = T(0);
    store_parts(p, r, T(0), T(0));
    if constexpr (kGx) zero_row(p.x_dtype, p.grad_x, r * n, n);
    if constexpr (kGy) zero_row(p.y_dtype, p.grad_y, r * n, n);
    return;
  }
  // The op layer rejects labels outside [0, V) on CPU; a direct kernel call gets a NaN row, not a
  // read out of bounds.
  const bool label_ok = !has_labels || (label >= 0 && label < n);
  const T* x = acc_row<T>(p.x_dtype, p.x, r * p.x_stride, s.x.get(), n);
  const T* y = acc_row<T>(p.y_dtype, p.y, r * p.y_stride, s.y.get(), n);

  const T dof = static_cast<T>(n - p.correction);
  const T eps = static_cast<T>(p.eps);
  const T tau_s = static_cast<T>(p.tau_s);
  const T tau_t = static_cast<T>(p.tau_t);
  const RowStats<T> sx = row_stats(x, n, dof, eps, p.standardize);
  const RowStats<T> sy = row_stats(y, n, dof, eps, p.standardize);
  const ExpPlan<T> plan = make_exp_plan(sx, sy, tau_s, tau_t, T(1));

  constexpr bool kStore = kGx || kGy;
  const bool finite = row_is_finite(sx) && row_is_finite(sy);
  const RowSums<T> sums = finite ? exp_pass<T, false, kStore>(x, y, n, plan, s.ea.get(), s.eb.get())
                                 : exp_pass<T, true, kStore>(x, y, n, plan, s.ea.get(), s.eb.get());
  const T ce_weight = static_cast<T>(p.ce_weight);
  const T kd_weight = static_cast<T>(p.kd_weight);
  const T smoothing = static_cast<T>(p.label_smoothing);
  const T classes = static_cast<T>(n);
  CeSums<T> ce_sums{T(1), T(0), T(0)};
  if (has_labels) {
    ce_sums = kGx ? ce_pass<T, true>(x, n, plan, label, s.ez.get()) : ce_pass<T, false>(x, n, plan, label, nullptr);
  }
  if (loss != nullptr) {
    T kd = row_loss(sums, tau_s, T(1));
    if (kl_needs_refinement(sums, T(1))) {
      kd = refined_row_loss(kStore ? bregman_pass<T, true>(x, y, n, plan, sums, s.ea.get(), s.eb.get())
                                   : bregman_pass<T, false>(x, y, n, plan, sums, nullptr, nullptr),
                            tau_s);
    }
    T ce = T(0);
    if (has_labels) {
      const T sz_label = label_ok ? (x[label] * plan.x_scale - plan.x_max) / plan.x_scale : T(NAN);
      ce = row_ce(ce_sums, sz_label, std::exp(sz_label), smoothing, classes, T(1));
    }
    loss[r] = row_objective(ce, kd, ce_weight, kd_weight, has_labels);
    store_parts(p, r, ce, kd);
  }
  if constexpr (kStore) {
    const T kl_cross = kl_cross_term(sums, T(1));
    const TermSums<T> ts = term_pass<T, kGx, kGy>(x, y, n, p.standardize, plan, sx, sy, T(1) / sums.za,
                                                  T(1) / sums.zb, kl_cross, s.ea.get(), s.eb.get());
    const T grad_scale = static_cast<const T*>(p.grad_scale)[r * p.grad_scale_stride];
    const T kd_scale = grad_scale * kd_weight;
    if constexpr (kGx) {
      const TermCoef<T> c = term_coefficients(ts.gx, ts.sx, classes, sx, dof, kd_scale * tau_s, p.standardize, eps);
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
        const T dev = p.standardize ? centered(x[label], sx) : T(0);
        label_grad = grad_from_term(s.ea[label], dev, c.a, -c.b, -c.a_mean) +
                     grad_scale * ce_weight * ce_label_grad(ce_sums, smoothing, classes);
      }
      grad_pass(x, s.ea.get(), n, p.standardize, sx, c, ce, out);
      if (has_labels) {  // (a NaN row for a label out of range)
        if (label_ok) {
          out[label] = label_grad;
        } else {
          std::fill(out, out + n, T(NAN));
        }
      }
      if (!direct) store_row(out, p.x_dtype, p.grad_x, r * n, n);
    }
    if constexpr (kGy) {
      const TermCoef<T> c =
          term_coefficients(ts.gy, ts.sy, classes, sy, dof, kd_scale * tau_s * tau_s / tau_t, p.standardize, eps);
      const bool direct = is_acc_dtype<T>(p.y_dtype);
      T* out = direct ? static_cast<T*>(p.grad_y) + r * n : s.eb.get();
      grad_pass(y, s.eb.get(), n, p.standardize, sy, c, CeGrad<T>{}, out);
      if (!direct) store_row(out, p.y_dtype, p.grad_y, r * n, n);
    }
  }
}

template <class T, bool kGx, bool kGy>
void run_rows(const KdProblem& p, int64_t begin, int64_t end) {
  const int64_t n = p.cols;
  Scratch<T> s;
  if (!is_acc_dtype<T>(p.x_dtype)) s.x.reset(new T[n]);
  if (!is_acc_dtype<T>(p.y_dtype)) s.y.reset(new T[n]);
  if (kGx || kGy) {
    s.ea.reset(new T[n]);
    s.eb.reset(new T[n]);
  }
  if (kGx && p.labels != nullptr) s.ez.reset(new T[n]);
  for (int64_t r = begin; r < end; ++r) run_row<T, kGx, kGy>(p, r, s);
}

template <class T>
void dispatch_grads(const KdProblem& p, int64_t begin, int64_t end) {
  const bool gx = p.grad_x != nullptr;
  const bool gy = p.grad_y != nullptr;
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
