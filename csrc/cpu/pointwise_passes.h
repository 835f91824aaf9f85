// The pointwise divergences' passes of the CPU kernel (jsd, tvd; divergence.h) over the stored
// exponentials, compiled once per instruction set like kd_cpu_kernel.cpp (through kd_cpu_passes.h).
//
// direct_pointwise_pass, every row: the divergence from direct per-element forms, one division and one
// log per element for jsd (ln(larger side / m) = -log(w min(p,q)/max(p,q) + 1 - w)), none for tvd
// (|p - q|), with E_q g, E_p h and the size of the terms the loss is a sum of; jsd's g and h are
// stored for the gradient pass. Where the loss is a cancellation (terms > kPointwiseRefineRatio x
// loss: high temperatures, a student close to its teacher), the row takes pointwise_pass instead:
// the stable forms of divergence.h (expm1/log1p of l = ln p - ln q, non-negative per-element
// losses), which keep their relative accuracy however small the divergence.
// Traffic: reads the row's x, y and the two stored exponential rows from cache; writes g and/or h.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>

#include "logitstd/divergence.h"
#include "logitstd/kd_problem.h"
#include "logitstd/row_math.h"
#include "vec_rows.h"

namespace logitstd {
namespace cpu {
namespace CPU_CAPABILITY {

// The cancellation ratio above which a pointwise divergence's row is recomputed in the stable form.
constexpr int kPointwiseRefineRatio = 16;

enum class PointwiseMode { kStable, kDirect };

template <class T>
struct PointwiseSums {
  T loss, eq, ep, terms;  // terms: the size of the terms the direct loss is a sum of
};

template <class T>
Vectorized<T> tvd_half_sign(const Vectorized<T>& p_minus_q) {
  using Vec = Vectorized<T>;
  const Vec zero(T(0)), half(T(0.5));
  return Vec::blendv(Vec::blendv(zero, zero - half, p_minus_q < zero), half, p_minus_q > zero);
}

// ------------------------------------------------------------------------------------------
// The pointwise divergences' pass (jsd, tvd; divergence.h, pointwise_terms) over the stored
// exponentials: the row's divergence (natural units) and E_q g, E_p h.
template <class T>
Vectorized<T> log_ratio(const Vectorized<T>& xv, const Vectorized<T>& yv, const ExpPlan<T>& plan, const DivRow<T>& c) {
  using Vec = Vectorized<T>;
  const Vec sa = exp_arg(xv, Vec(plan.x_max), Vec(plan.xa), Vec(plan.x_scale));
  const Vec sb = exp_arg(yv, Vec(plan.y_max), Vec(plan.ya), Vec(plan.y_scale));
  return at::vec::fmadd(kl_delta(sa, sb), Vec(c.unit), Vec(c.lz));  // ln p - ln q
}

template <class T>
PointwiseSums<T> pointwise_pass(const T* x, const T* y, int64_t n, const ExpPlan<T>& plan, const DivRow<T>& c,
                                const T* ea_in, const T* eb_in) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec zero(T(0)), rza(c.rza), rzb(c.rzb), beta(c.beta);
  PointwiseSums<T> total{T(0), T(0), T(0)};
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    Vec loss = zero, eq = zero, ep = zero;
    auto body = [&](int64_t i, int64_t count) {
      const bool tail = count < W;
      const Vec q = (tail ? Vec::loadu(ea_in + i, count) : Vec::loadu(ea_in + i)) * rza;
      const Vec p = (tail ? Vec::loadu(eb_in + i, count) : Vec::loadu(eb_in + i)) * rzb;
      const Vec l = log_ratio(tail ? Vec::loadu(x + i, count) : Vec::loadu(x + i),
                              tail ? Vec::loadu(y + i, count) : Vec::loadu(y + i), plan, c);
      const PointwiseTerms<Vec> pt = pointwise_terms(c.div, q, p, l, beta);
      loss = loss + (tail ? Vec::set(zero, pt.loss, count) : pt.loss);
      eq = at::vec::fmadd(q, tail ? Vec::set(zero, pt.g, count) : pt.g, eq);
      ep = at::vec::fmadd(p, tail ? Vec::set(zero, pt.h, count) : pt.h, ep);
    };
    int64_t i = b0;
    for (; i + W <= b1; i += W) body(i, W);
    if (i < b1) body(i, b1 - i);
    total.loss += lane_sum(loss);
    total.eq += lane_sum(eq);
    total.ep += lane_sum(ep);
  }
  return total;
}

// Direct jsd terms of one vector: (loss, terms, g, h) with q, p the probabilities and l = ln p - ln q.
template <class T>
PointwiseTerms<Vectorized<T>> direct_jsd(const Vectorized<T>& q, const Vectorized<T>& p, const Vectorized<T>& l,
                                        const Vectorized<T>& beta, Vectorized<T>& terms) {
  using Vec = Vectorized<T>;
  const Vec zero(T(0)), one(T(1));
  const Vec one_minus = one - beta;
  const Vec teacher_larger = l > zero;
  const Vec w = Vec::blendv(beta, one_minus, teacher_larger);
  // ln(larger / m), m = beta p + (1 - beta) q: the ratio <= 1, so the log's argument is in [1 - w, 1]
  const Vec larger = zero - (at::vec::fmadd(w, at::vec::minimum(p, q) / at::vec::maximum(p, q), one - w)).log();
  const Vec lq = Vec::blendv(larger, larger - l, teacher_larger);
  const Vec lp = Vec::blendv(larger + l, larger, teacher_larger);
  const Vec q_pos = q > zero, p_pos = p > zero;
  const Vec side_q = Vec::blendv(zero, one_minus * q * lq, q_pos);
  const Vec side_p = Vec::blendv(zero, beta * p * lp, p_pos);
  terms = side_q.abs() + side_p.abs();
  return PointwiseTerms<Vec>{side_q + side_p, Vec::blendv(zero, one_minus * lq, q_pos),
                             Vec::blendv(zero, beta * lp, p_pos)};
}

template <class T, bool kG, bool kH>
PointwiseSums<T> direct_pointwise_pass(const T* x, const T* y, int64_t n, const ExpPlan<T>& plan, const DivRow<T>& c,
                                       const T* ea_in, const T* eb_in, T* g_out, T* h_out) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec zero(T(0)), rza(c.rza), rzb(c.rzb), beta(c.beta), half(T(0.5));
  const bool tvd = c.div == Divergence::kTvd;
  PointwiseSums<T> total{T(0), T(0), T(0), T(0)};
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    Vec loss = zero, eq = zero, ep = zero, terms = zero;
    auto body = [&](int64_t i, int64_t count) {
      const bool tail = count < W;
      const Vec q = (tail ? Vec::loadu(ea_in + i, count) : Vec::loadu(ea_in + i)) * rza;
      const Vec p = (tail ? Vec::loadu(eb_in + i, count) : Vec::loadu(eb_in + i)) * rzb;
      PointwiseTerms<Vec> pt{zero, zero, zero};
      Vec size;
      if (tvd) {
        const Vec diff = p - q;
        pt.loss = half * diff.abs();
        pt.h = tvd_half_sign(diff);
        pt.g = zero - pt.h;
        size = half * (p + q);
      } else {
        const Vec l = log_ratio(tail ? Vec::loadu(x + i, count) : Vec::loadu(x + i),
                                tail ? Vec::loadu(y + i, count) : Vec::loadu(y + i), plan, c);
        pt = direct_jsd(q, p, l, beta, size);
        if constexpr (kG) { if (tail) pt.g.store(g_out + i, count); else pt.g.store(g_out + i); }
        if constexpr (kH) { if (tail) pt.h.store(h_out + i, count); else pt.h.store(h_out + i); }
      }
      if (tail) {
        pt.loss = Vec::set(zero, pt.loss, count);
        size = Vec::set(zero, size, count);
        pt.g = Vec::set(zero, pt.g, count);
        pt.h = Vec::set(zero, pt.h, count);
      }
      loss = loss + pt.loss;
      terms = terms + size;
      eq = at::vec::fmadd(q, pt.g, eq);
      ep = at::vec::fmadd(p, pt.h, ep);
    };
    int64_t i = b0;
    for (; i + W <= b1; i += W) body(i, W);
    if (i < b1) body(i, b1 - i);
    total.loss += lane_sum(loss);
    total.eq += lane_sum(eq);
    total.ep += lane_sum(ep);
    total.terms += lane_sum(terms);
  }
  return total;
}

// Whether a direct pointwise loss is a cancellation to be recomputed in the stable form (a NaN or
// infinite row keeps its direct value).
template <class T>
bool pointwise_needs_refinement(const PointwiseSums<T>& s) {
  if (!std::isfinite(s.loss) || !std::isfinite(s.terms)) return false;
  return !(s.loss * T(kPointwiseRefineRatio) >= s.terms);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace logitstd
