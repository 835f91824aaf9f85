// Scalar math of the row formulas, the same spelling in host and device code (float, double, and
// at::vec::Vectorized lanes in the CPU kernel when LOGITSTD_ROW_MATH_AT_VEC is defined). Part of
// row_math.h, which includes it.
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

// Scalar math on float and double, the same spelling in host and device code.
LOGITSTD_HD float m_sqrt(float v) { return sqrtf(v); }
LOGITSTD_HD double m_sqrt(double v) { return sqrt(v); }
LOGITSTD_HD float m_log(float v) { return logf(v); }
LOGITSTD_HD double m_log(double v) { return log(v); }
LOGITSTD_HD float m_log1p(float v) { return log1pf(v); }
LOGITSTD_HD double m_log1p(double v) { return log1p(v); }
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

// max and min that propagate NaN (fmaxf would drop it): a NaN logit must make its row NaN. On the
// device (sm_80+) float's are one FMNMX.NAN instruction (PTX max.NaN / min.NaN).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
LOGITSTD_HD float nan_max(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
LOGITSTD_HD float nan_min(float a, float b) {
  float r;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
#else
LOGITSTD_HD float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }
LOGITSTD_HD float nan_min(float a, float b) { return (a != a || a < b) ? a : b; }
#endif
LOGITSTD_HD double nan_max(double a, double b) { return (a != a || a > b) ? a : b; }
LOGITSTD_HD double nan_min(double a, double b) { return (a != a || a < b) ? a : b; }

// v clamped to the finite range, NaN to the bound (fmax / fmin drop NaN; one FMNMX on the device):
// a difference of exponents where both are -inf (NaN) or one is (+-inf) becomes finite, so that
// multiplied by an exponential of 0 it contributes 0.
LOGITSTD_HD float finite_floor(float v) { return fmaxf(v, -FLT_MAX); }
LOGITSTD_HD double finite_floor(double v) { return fmax(v, -DBL_MAX); }
LOGITSTD_HD float finite_ceil(float v) { return fminf(v, FLT_MAX); }
LOGITSTD_HD double finite_ceil(double v) { return fmin(v, DBL_MAX); }
LOGITSTD_HD float m_abs(float v) { return fabsf(v); }
LOGITSTD_HD double m_abs(double v) { return fabs(v); }
#if defined(__CUDA_ARCH__)
LOGITSTD_HD float m_ldexp(float v, int e) { return ldexpf(v, e); }
LOGITSTD_HD double m_ldexp(double v, int e) { return ldexp(v, e); }
LOGITSTD_HD int m_ilogb(float v) { return ilogbf(v); }
LOGITSTD_HD int m_ilogb(double v) { return ilogb(v); }
#else
LOGITSTD_HD float m_ldexp(float v, int e) { return std::ldexp(v, e); }
LOGITSTD_HD double m_ldexp(double v, int e) { return std::ldexp(v, e); }
LOGITSTD_HD int m_ilogb(float v) { return std::ilogb(v); }
LOGITSTD_HD int m_ilogb(double v) { return std::ilogb(v); }
#endif

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

}  // namespace logitstd
