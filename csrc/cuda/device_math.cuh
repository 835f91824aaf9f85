// Device helpers of the CUDA kernel (kd_kernel.cuh): element conversions to and from the
// accumulation type, the exponential in log2 units, packs of P elements, and the staging of a chunk
// into shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace logitstd {
namespace cuda {

// ----------------------------------------------------------------------------------------------
// Element types: conversion to and from the accumulation type.
template <class S>
struct Conv;

template <>
struct Conv<float> {
  template <class A>
  __device__ __forceinline__ static A load(float v) { return static_cast<A>(v); }
  template <class A>
  __device__ __forceinline__ static float store(A v) { return static_cast<float>(v); }
};

template <>
struct Conv<double> {
  template <class A>
  __device__ __forceinline__ static A load(double v) { return static_cast<A>(v); }
  template <class A>
  __device__ __forceinline__ static double store(A v) { return static_cast<double>(v); }
};

template <>
struct Conv<__half> {
  template <class A>
  __device__ __forceinline__ static A load(__half v) { return static_cast<A>(__half2float(v)); }
  template <class A>
  __device__ __forceinline__ static __half store(A v) { return __float2half_rn(static_cast<float>(v)); }
};

template <>
struct Conv<__nv_bfloat16> {
  template <class A>
  __device__ __forceinline__ static A load(__nv_bfloat16 v) { return static_cast<A>(__bfloat162float(v)); }
  template <class A>
  __device__ __forceinline__ static __nv_bfloat16 store(A v) { return __float2bfloat16_rn(static_cast<float>(v)); }
};

template <class S, class T>
using acc_t = std::conditional_t<std::is_same_v<S, double> || std::is_same_v<T, double>, double, float>;

// Exponentials: float uses 2^s (one MUFU.EX2) with exponents in log2 units; double uses exp.
template <class A>
struct ExpUnits;

template <>
struct ExpUnits<float> {
  static constexpr float kUnit = 0.693147180559945309f;     // ln 2: 2^s = e^(kUnit * s)
  static constexpr float kInvUnit = 1.442695040888963407f;  // log2 e
  __device__ __forceinline__ static float exp(float s) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(s));
    return r;
  }
};

template <>
struct ExpUnits<double> {
  static constexpr double kUnit = 1.0;
  static constexpr double kInvUnit = 1.0;
  __device__ __forceinline__ static double exp(double s) { return ::exp(s); }
};

// ----------------------------------------------------------------------------------------------
// Packs of P consecutive elements: one or more 16-byte words when kVec, else element by element.
template <class S, int P, bool kVec, class A>
__device__ __forceinline__ void load_pack(const S* src, A (&out)[P]) {
  if constexpr (kVec) {
    static_assert((P * sizeof(S)) % 16 == 0, "a vector pack is a whole number of 16-byte words");
    constexpr int kWords = static_cast<int>(P * sizeof(S) / 16);
    uint4 words[kWords];
#pragma unroll
    for (int k = 0; k < kWords; ++k) words[k] = reinterpret_cast<const uint4*>(src)[k];
    const S* e = reinterpret_cast<const S*>(words);
#pragma unroll
    for (int i = 0; i < P; ++i) out[i] = Conv<S>::template load<A>(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < P; ++i) out[i] = Conv<S>::template load<A>(src[i]);
  }
}

template <class S, int P, bool kVec, class A>
__device__ __forceinline__ void store_pack(S* dst, const A (&v)[P]) {
  if constexpr (kVec) {
    constexpr int kWords = static_cast<int>(P * sizeof(S) / 16);
    uint4 words[kWords];
    S* e = reinterpret_cast<S*>(words);
#pragma unroll
    for (int i = 0; i < P; ++i) e[i] = Conv<S>::store(v[i]);
#pragma unroll
    for (int k = 0; k < kWords; ++k) __stcs(reinterpret_cast<uint4*>(dst) + k, words[k]);
  } else {
#pragma unroll
    for (int i = 0; i < P; ++i) dst[i] = Conv<S>::store(v[i]);
  }
}

__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
#else
  *reinterpret_cast<uint4*>(smem_dst) = *reinterpret_cast<const uint4*>(gmem_src);
#endif
}

__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// Copy this thread's packs of a chunk into shared memory. Each thread later reads only the packs
// it copied itself, so waiting for its own copies is enough (no CTA barrier).
template <class S, int P, bool kVec>
__device__ __forceinline__ void stage_chunk(const S* src, S* dst, int n_packs) {
  for (int j = threadIdx.x; j < n_packs; j += blockDim.x) {
    const int64_t e = static_cast<int64_t>(j) * P;
    if constexpr (kVec) {
      constexpr int kWords = static_cast<int>(P * sizeof(S) / 16);
#pragma unroll
      for (int k = 0; k < kWords; ++k) {
        cp_async_16(reinterpret_cast<uint4*>(dst + e) + k, reinterpret_cast<const uint4*>(src + e) + k);
      }
    } else {
#pragma unroll
      for (int i = 0; i < P; ++i) dst[e + i] = src[e + i];
    }
  }
}

}  // namespace cuda
}  // namespace logitstd
