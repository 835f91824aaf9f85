// The passes of the CPU kernel over one row after its statistics (row_stats.h), compiled once per
// instruction set like kd_cpu_kernel.cpp, which includes this file: exponentials and the partition sums,
// the pointwise divergences' pass, the per-element gradient terms, the gradients, the Bregman
// refinement and the CE. Each pass is vectorized with at::vec::Vectorized and sums in blocks of
// kBlock elements (vec_rows.h).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <utility>

#include "logitstd/kd_problem.h"
#include "logitstd/row_math.h"
#include "logitstd/divergence.h"
#include "pointwise_passes.h"
#include "row_stats.h"
#include "vec_rows.h"

namespace logitstd {
namespace cpu {
namespace CPU_CAPABILITY {

// ------------------------------------------------------------------------------------------
// Pass 2: exponentials and RowSums. Sleef's exp (within 1 ulp; IEEE behaviour on NaN/Inf). ATen's
// exp_u20 (up to 20 ulps) is faster, but its error, amplified where the chain rule through the
// standardization cancels (small V, a gradient close to the direction of the centered logits),
// made 1.4% of random V = 3 rows exceed twice eager's gradient error (measured: up to 16x).
template <class T, bool kExact>
inline Vectorized<T> vexp(const Vectorized<T>& v) {
  return v.exp();
}

// v with lane `lane` set to 0.
template <class T>
Vectorized<T> without_lane(const Vectorized<T>& v, int64_t lane) {
  T lanes[Vectorized<T>::size()];
  v.store(lanes);
  lanes[lane] = T(0);
  return Vectorized<T>::loadu(lanes);
}

// kStore: the exponentials are kept for the later passes (a gradient is requested, or a pointwise
// divergence's pass reads them). kReverse: the reverse KL's sums are accumulated too (``rev``).
// kExact (rows with non-finite logits, or of extreme magnitude without standardization): a class
// whose exponential is 0 contributes 0 to a sum of e^s delta, whatever delta is (-inf - -inf is NaN:
// a class -inf in both rows counts 0), and both exponentials are e^-e_shift smaller (the same
// ratios; see row_state's e_shift).
// exclude (>= 0: decoupled KD's target class): that class's exponentials are stored but left out of
// the sums.
template <class T, bool kExact, bool kStore, bool kReverse>
RowSums<T> exp_pass(const T* x, const T* y, int64_t n, const ExpPlan<T>& plan, T e_shift, T* ea_out, T* eb_out,
                    ReverseSums<T>* rev, int64_t exclude = -1) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec x_max(plan.x_max), xa(plan.xa), xc(plan.x_scale), y_max(plan.y_max), ya(plan.ya), yc(plan.y_scale);
  const Vec zero(T(0)), shift(e_shift);
  RowSums<T> total = zero_sums<T>();
  ReverseSums<T> rtotal{T(0), T(0)};
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    Vec za = zero, zb = zero, t = zero, tabs = zero, r = zero, rabs = zero;
    auto body = [&](int64_t i, int64_t count) {
      const bool tail = count < W;
      const Vec xv = tail ? Vec::loadu(x + i, count) : Vec::loadu(x + i);
      const Vec yv = tail ? Vec::loadu(y + i, count) : Vec::loadu(y + i);
      const Vec sa = exp_arg(xv, x_max, xa, xc);
      const Vec sb = exp_arg(yv, y_max, ya, yc);
      Vec ea = vexp<T, kExact>(kExact ? sa - shift : sa);
      Vec eb = vexp<T, kExact>(kExact ? sb - shift : sb);
      if (tail) {  // lanes past the row end contribute nothing
        ea = Vec::set(zero, ea, count);
        eb = Vec::set(zero, eb, count);
      }
      if constexpr (kStore) {
        if (tail) {
          ea.store(ea_out + i, count);
          eb.store(eb_out + i, count);
        } else {
          ea.store(ea_out + i);
          eb.store(eb_out + i);
        }
      }
      if (exclude >= i && exclude < i + count) {  // (once per row)
        ea = without_lane(ea, exclude - i);
        eb = without_lane(eb, exclude - i);
      }
      // On rows of finite logits delta is finite: the guards are only needed on the exact path.
      const Vec delta = kExact ? kl_delta(sa, sb) : sb - sa;
      Vec eh = eb * delta;
      if constexpr (kExact) eh = Vec::blendv(zero, eh, eb > zero);
      za = za + ea;
      zb = zb + eb;
      t = t + eh;
      tabs = tabs + eh.abs();
      if constexpr (kReverse) {
        Vec er = ea * delta;
        if constexpr (kExact) er = Vec::blendv(zero, er, ea > zero);
        r = r - er;
        rabs = rabs + er.abs();
      }
    };
    int64_t i = b0;
    for (; i + W <= b1; i += W) body(i, W);
    if (i < b1) body(i, b1 - i);
    total = add_sums(total, RowSums<T>{lane_sum(za), lane_sum(zb), lane_sum(t), lane_sum(tabs)});
    rtotal.r += lane_sum(r);
    rtotal.rabs += lane_sum(rabs);
  }
  if (rev != nullptr) *rev = rtotal;
  return total;
}

// ------------------------------------------------------------------------------------------
// The per-element gradient terms of any divergence (divergence.h, student_div_term and
// teacher_div_term), written over the stored exponentials, and the standardization sums G, S (as
// term_pass, the forward KL's specialization).
template <class T>
DivRow<Vectorized<T>> broadcast(const DivRow<T>& c) {
  using Vec = Vectorized<T>;
  return DivRow<Vec>{c.div, Vec(c.beta), Vec(c.rza), Vec(c.rzb), Vec(c.lz), Vec(c.unit), Vec(c.kl_f), Vec(c.kl_r),
                     Vec(c.eq), Vec(c.ep)};
}

//
// Pointwise divergences (PointwiseMode): kStable recomputes g and h in the stable form (rows whose
// divergence cancels); kDirect reads jsd's g and h from the direct pass's rows (g_in, h_in) and
// takes tvd's signs from p - q.
template <class T, bool kGx, bool kGy>
TermSums<T> div_term_pass(const T* x, const T* y, int64_t n, bool standardize, const ExpPlan<T>& plan,
                          const RowStats<T>& stx, const RowStats<T>& sty, const DivRow<T>& row, T* ea_to_gx,
                          T* eb_to_gy, PointwiseMode mode = PointwiseMode::kStable, const T* g_in = nullptr,
                          const T* h_in = nullptr) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const DivRow<Vec> c = broadcast(row);
  const Vec zero(T(0));
  const bool pointwise = is_pointwise(row.div);
  const bool needs_l = !pointwise || mode == PointwiseMode::kStable;
  TermSums<T> total{T(0), T(0), T(0), T(0)};
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    Vec gxs = zero, sxs = zero, gys = zero, sys = zero;
    auto body = [&](int64_t i, int64_t count) {
      const bool tail = count < W;
      const Vec ea = tail ? Vec::loadu(ea_to_gx + i, count) : Vec::loadu(ea_to_gx + i);
      const Vec eb = tail ? Vec::loadu(eb_to_gy + i, count) : Vec::loadu(eb_to_gy + i);
      const Vec xv = tail ? Vec::loadu(x + i, count) : Vec::loadu(x + i);
      const Vec yv = tail ? Vec::loadu(y + i, count) : Vec::loadu(y + i);
      const Vec l = needs_l ? log_ratio(xv, yv, plan, row) : zero;  // ln p - ln q
      PointwiseTerms<Vec> pt{zero, zero, zero};
      if (pointwise && mode == PointwiseMode::kStable) {
        pt = pointwise_terms(row.div, ea * c.rza, eb * c.rzb, l, c.beta);
      } else if (pointwise && row.div == Divergence::kTvd) {
        pt.h = tvd_half_sign(eb * c.rzb - ea * c.rza);
        pt.g = zero - pt.h;
      } else if (pointwise) {
        if (kGx) pt.g = tail ? Vec::loadu(g_in + i, count) : Vec::loadu(g_in + i);
        if (kGy) pt.h = tail ? Vec::loadu(h_in + i, count) : Vec::loadu(h_in + i);
      }
      Vec gx, gy;
      if constexpr (kGx) {
        gx = Vec::set(zero, student_div_term(c, ea, eb, l, pt.g), count);
        if (standardize) {
          gxs = gxs + gx;
          sxs = at::vec::fmadd(gx, Vec::set(zero, centered(xv, stx), count), sxs);
        }
      }
      if constexpr (kGy) {
        gy = Vec::set(zero, teacher_div_term(c, ea, eb, l, pt.h), count);
        if (standardize) {
          gys = gys + gy;
          sys = at::vec::fmadd(gy, Vec::set(zero, centered(yv, sty), count), sys);
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
// Pass 3: the per-element terms (row_math.h, student_term / teacher_term), written over the stored
// exponentials, and their sums G = sum g, S = sum g dev (dev: the centered logit).
// The teacher's term as eb scale (delta unit + offset): the forward KL's (1 / Z_b, 1, -kl_cross),
// or decoupled KD's (dkd_row.h).
template <class T>
struct TeacherTermCoef {
  T scale, unit, offset;
};

template <class T, bool kGx, bool kGy>
TermSums<T> term_pass(const T* x, const T* y, int64_t n, bool standardize, const ExpPlan<T>& plan,
                      const RowStats<T>& stx, const RowStats<T>& sty, T rza, T rzb, const TeacherTermCoef<T>& tc,
                      T* ea_to_gx, T* eb_to_gy) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec x_max(plan.x_max), xa(plan.xa), xc(plan.x_scale), y_max(plan.y_max), ya(plan.ya), yc(plan.y_scale);
  const Vec vrza(rza), neg_rzb(-rzb), vrzb(tc.scale), unit(tc.unit), neg_kl_cross(tc.offset);
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
        gy = Vec::blendv(teacher_term(eb, delta, vrzb, unit, neg_kl_cross), zero, eb == zero);  // p = 0: 0
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
// kReverse: the reverse KL's, sum_k q_k phi(-t_k), the same with the roles of p and q swapped.
template <class T, bool kStored, bool kReverse = false>
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
      Vec t = bregman_arg(kl_delta(sa, sb), unit, neg_lz);
      if constexpr (kReverse) {  // q phi(ln p - ln q): the roles of p and q swapped
        t = zero - t;
        std::swap(ea, eb);
      }
      const Vec& rz_p = kReverse ? rza : rzb;
      const Vec& rz_q = kReverse ? rzb : rza;
      const Vec p = eb * rz_p;
      const Vec series = p * bregman_phi_series(t);
      const Vec direct = at::vec::fmsub(ea, rz_q, at::vec::fmadd(p, t, p));
      Vec term = Vec::blendv(direct, series, t.abs() <= half);
      term = Vec::blendv(ea * rz_q, term, eb > zero);  // p_k = 0 contributes q_k (row_math.h, bregman_term)
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

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace logitstd
