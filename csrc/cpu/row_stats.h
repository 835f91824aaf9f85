// Pass 1 of the CPU kernel over one row (compiled once per instruction set, like kd_cpu_kernel.cpp,
// which includes it through kd_cpu_passes.h): the statistics of a row.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>

#include "logitstd/kd_problem.h"
#include "logitstd/row_math.h"
#include "vec_rows.h"

namespace logitstd {
namespace cpu {
namespace CPU_CAPABILITY {

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

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace logitstd
