// Vector helpers of the CPU kernel (compiled once per instruction set, like kd_cpu_kernel.cpp, which
// includes this file inside its CPU_CAPABILITY namespace): lane reductions and the conversions
// between the input dtypes and the accumulation type.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>
#include <type_traits>

#include "logitstd/kd_problem.h"

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

inline void zero_row(Dtype dtype, void* base, int64_t offset, int64_t n) {
  const int64_t bytes = (dtype == Dtype::kFloat64 ? 8 : dtype == Dtype::kFloat32 ? 4 : 2);
  std::memset(static_cast<char*>(base) + offset * bytes, 0, static_cast<size_t>(n * bytes));
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace logitstd
