// Statistics of a row: Chan's merge of partial moments, the magnitude scale of rows of extreme
// magnitude, and the finalized statistics (docs/design.md sections 1 and 6a). Part of row_math.h,
// which includes it.
#pragma once

#include "scalar_math.h"

namespace logitstd {

// ---------------------------------------------------------------------------------------------
// Statistics: Chan's parallel merge of (count, mean, M2) plus the max.
// The moments are those of c * v - shift, where c is the row's magnitude scale (1 for every row
// whose largest magnitude lies in MagnitudeRange, see magnitude_scale) and shift = c * v[0].
template <class T>
struct Moments {
  T n;     // number of elements (exact up to 2^24 in float; only used as a merge weight)
  T mean;  // mean of (c v - shift)
  T m2;    // sum of squared deviations from mean
  T max;   // max of c v (not shifted)
  T min;   // min of c v
};

// The identity of merge_moments: no elements, max = -inf, min = +inf.
template <class T>
LOGITSTD_HD Moments<T> empty_moments() {
  return Moments<T>{T(0), T(0), T(0), -static_cast<T>(INFINITY), static_cast<T>(INFINITY)};
}

// Chan, Golub & LeVeque: merge two partial moments. Exact for a constant row (both means 0).
template <class T>
LOGITSTD_HD Moments<T> merge_moments(const Moments<T>& a, const Moments<T>& b) {
  if (b.n == T(0)) return Moments<T>{a.n, a.mean, a.m2, nan_max(a.max, b.max), nan_min(a.min, b.min)};
  if (a.n == T(0)) return Moments<T>{b.n, b.mean, b.m2, nan_max(a.max, b.max), nan_min(a.min, b.min)};
  const T n = a.n + b.n;
  const T wb = b.n / n;
  const T delta = b.mean - a.mean;
  Moments<T> r;
  r.n = n;
  r.mean = m_fma(delta, wb, a.mean);
  r.m2 = a.m2 + b.m2 + delta * delta * a.n * wb;
  r.max = nan_max(a.max, b.max);
  r.min = nan_min(a.min, b.min);
  return r;
}

// Magnitudes R = max |v| of a row whose moments are computed unscaled. Inside [lo, hi] the squared
// deviations can neither overflow (V (2R)^2 < 2^128 for V < 2^31 needs R < 2^47) nor lose bits to
// underflow (a nonzero spread of R-sized floats is at least R 2^-23, whose square over V - c stays
// a normal number for R >= 2^-20). Outside, the row is standardized as c v with c = 2^-ilogb(R):
// exact (c is a power of two), and the z-score is scale-free (eps is scaled by c too).
template <class T> struct MagnitudeRange;
template <> struct MagnitudeRange<float> {
  LOGITSTD_HD static float lo() { return 0x1p-20f; }
  LOGITSTD_HD static float hi() { return 0x1p40f; }
  static constexpr int kMaxExp = 126;  // c stays a normal number
};
template <> struct MagnitudeRange<double> {
  LOGITSTD_HD static double lo() { return 0x1p-400; }
  LOGITSTD_HD static double hi() { return 0x1p400; }
  static constexpr int kMaxExp = 1022;
};

// The magnitude scale c of a row from the max and min of the unscaled row: 1 when max |v| lies in
// MagnitudeRange (nearly every row: then nothing is recomputed), or is 0 (a zero row) or not finite
// (a NaN/Inf row keeps its NaN/Inf); otherwise 2^-ilogb(max |v|). Rows without standardization use
// it too: their exponents (x - max x) / tau are then formed from c x, so x - max x cannot overflow.
template <class T>
LOGITSTD_HD T magnitude_scale(T max, T min) {
  const T r = m_abs(max) > m_abs(min) ? m_abs(max) : m_abs(min);
  if (!(r > T(0)) || !m_isfinite(r) || (r >= MagnitudeRange<T>::lo() && r <= MagnitudeRange<T>::hi())) return T(1);
  int e = m_ilogb(r);
  e = e > MagnitudeRange<T>::kMaxExp ? MagnitudeRange<T>::kMaxExp : e;
  e = e < -MagnitudeRange<T>::kMaxExp ? -MagnitudeRange<T>::kMaxExp : e;
  return m_ldexp(T(1), -e);
}

// The magnitude scale from bounds lo <= max |v| <= hi (the CUDA kernel's statistics give bounds,
// not the min): magnitude_scale of the bounds where they agree, else 0, where the bounds leave it
// open and the exact max |v| must decide: their scales differ, or hi overflowed while lo is finite.
// (Any power of two c with c v in range gives the same bits: the scale only keeps the squares in
// range.)
template <class T>
LOGITSTD_HD T magnitude_scale_within(T lo, T hi) {
  const T a = magnitude_scale(lo, lo);
  const T b = magnitude_scale(hi, hi);
  return (a == b && (m_isfinite(hi) || !m_isfinite(lo))) ? a : T(0);
}

// What the rest of the row math needs from the statistics of one input row (scaled units).
template <class T>
struct RowStats {
  T scale;  // c, the magnitude scale (a power of two; 1 for almost every row)
  T shift;  // c * (the row's first element): the data are c v - shift
  T mean;   // mean of (c v - shift)
  T sigma;  // sqrt(M2 / (V - correction)) of c v; 0 when not standardizing
  T s;      // sigma + c eps; c when not standardizing
  T max;    // max of c v
};

// m: the moments of c v - shift (shift = c v[0]); eps is the caller's (unscaled) eps.
template <class T>
LOGITSTD_HD RowStats<T> finalize_moments(const Moments<T>& m, T scale, T shift, T dof, T eps, bool standardize) {
  RowStats<T> r;
  r.scale = scale;
  r.shift = shift;
  r.mean = m.mean;
  r.max = m.max;
  if (standardize) {
    r.sigma = m_sqrt(m.m2 / dof);
    r.s = r.sigma + eps * scale;
  } else {  // a = x / tau = (c x) / (c tau): the exponents are differences of the small numbers c x
    r.sigma = T(0);
    r.s = scale;
  }
  return r;
}

// c v - shift - mean: the centered (scaled) logit; exact up to the final rounding (c v is exact).
template <class V, class T>
LOGITSTD_HD V centered(V v, const RowStats<T>& st) {
  return (v * V(st.scale) - V(st.shift)) - V(st.mean);
}

// A row is computed by the fast path when every logit is finite; the kernels use this to choose
// an exponential that is exact on NaN/Inf for the (rare) rows that need one.
template <class T>
LOGITSTD_HD bool row_is_finite(const Moments<T>& m) {
  return m_isfinite(m.mean) && m_isfinite(m.max);
}

template <class T>
LOGITSTD_HD bool row_is_finite(const RowStats<T>& st) {
  return m_isfinite(st.mean) && m_isfinite(st.max);
}

}  // namespace logitstd
