// Device helpers of the CUDA kernel (kd_kernel.cuh): element conversions to and from the
// accumulation type, packs of P consecutive elements read from shared memory with shared-state-space
// loads (ld.shared, LDS), gradients stored to global memory (16-byte streaming stores for aligned
// packs), and the staging of a chunk of a row into shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace logitstd {
namespace cuda {

// The accumulation type: float, or double when an input is float64.
template <class S, class T>
using acc_t = std::conditional_t<std::is_same_v<S, double> || std::is_same_v<T, double>, double, float>;

// ----------------------------------------------------------------------------------------------
// One element to and from the accumulation type (stores round to nearest even, once from float;
// a double result is rounded to float first for a 16-bit output).
// float and double: plain conversions; the 16-bit types below go through float.
template <class S>
struct Conv {
  template <class A>
  __device__ __forceinline__ static A load(S v) { return static_cast<A>(v); }
  template <class A>
  __device__ __forceinline__ static S store(A v) { return static_cast<S>(v); }
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

// The raw bits of one element (ld.shared / st.shared move them).
template <int kBytes>
struct RawOf;
template <>
struct RawOf<2> { using type = unsigned short; };
template <>
struct RawOf<4> { using type = unsigned int; };
template <>
struct RawOf<8> { using type = unsigned long long; };
template <class S>
using raw_t = typename RawOf<static_cast<int>(sizeof(S))>::type;

// ----------------------------------------------------------------------------------------------
// Shared memory through its state space: 32-bit shared addresses, LDS / STS instructions. volatile
// keeps them in program order with the staging copies (cp.async and st.shared below).
__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ uint4 lds16(uint32_t a) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a));
  return v;
}
__device__ __forceinline__ void lds(uint32_t a, unsigned short& v) { asm volatile("ld.shared.u16 %0, [%1];" : "=h"(v) : "r"(a)); }
__device__ __forceinline__ void lds(uint32_t a, unsigned int& v) { asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(a)); }
__device__ __forceinline__ void lds(uint32_t a, unsigned long long& v) {
  asm volatile("ld.shared.u64 %0, [%1];" : "=l"(v) : "r"(a));
}
__device__ __forceinline__ void sts(uint32_t a, unsigned short v) { asm volatile("st.shared.u16 [%0], %1;" ::"r"(a), "h"(v)); }
__device__ __forceinline__ void sts(uint32_t a, unsigned int v) { asm volatile("st.shared.u32 [%0], %1;" ::"r"(a), "r"(v)); }
__device__ __forceinline__ void sts(uint32_t a, unsigned long long v) {
  asm volatile("st.shared.u64 [%0], %1;" ::"r"(a), "l"(v));
}
__device__ __forceinline__ void sts16(uint32_t a, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(a), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
}

// The 16 / sizeof(S) elements of one 16-byte word. bf16 widens with a shift or a mask (one
// instruction per element).
template <class S, class A>
__device__ __forceinline__ void unpack16(const uint4& w, A* out) {
  const unsigned int u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if constexpr (std::is_same_v<S, __nv_bfloat16>) {
      out[2 * k] = static_cast<A>(__uint_as_float(u[k] << 16));
      out[2 * k + 1] = static_cast<A>(__uint_as_float(u[k] & 0xffff0000u));
    } else if constexpr (std::is_same_v<S, __half>) {
      out[2 * k] = static_cast<A>(__half2float(__ushort_as_half(static_cast<unsigned short>(u[k] & 0xffffu))));
      out[2 * k + 1] = static_cast<A>(__half2float(__ushort_as_half(static_cast<unsigned short>(u[k] >> 16))));
    } else if constexpr (std::is_same_v<S, float>) {
      out[k] = static_cast<A>(__uint_as_float(u[k]));
    } else if (k % 2 == 0) {
      out[k / 2] = static_cast<A>(__hiloint2double(static_cast<int>(u[k + 1]), static_cast<int>(u[k])));
    }
  }
}

// P elements of S at shared address a, in A: 16-byte words when P * sizeof(S) is a multiple of 16
// (a 16-byte aligned pack), else element by element.
template <class S, int P, class A>
__device__ __forceinline__ void load_shared_pack(uint32_t a, A (&out)[P]) {
  constexpr int kBytes = static_cast<int>(P * sizeof(S));
  if constexpr (kBytes % 16 == 0) {
#pragma unroll
    for (int k = 0; k < kBytes / 16; ++k) unpack16<S>(lds16(a + 16 * k), out + k * (16 / static_cast<int>(sizeof(S))));
  } else {
#pragma unroll
    for (int i = 0; i < P; ++i) {
      raw_t<S> r;
      lds(a + i * static_cast<uint32_t>(sizeof(S)), r);
      S e;
      memcpy(&e, &r, sizeof(S));
      out[i] = Conv<S>::template load<A>(e);
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Global memory: P elements (kVec: 16-byte words, the pack 16-byte aligned) to and from A.
template <class S, int P, bool kVec, class A>
__device__ __forceinline__ void load_global_pack(const S* src, A (&out)[P]) {
  if constexpr (kVec) {
#pragma unroll
    for (int k = 0; k < static_cast<int>(P * sizeof(S) / 16); ++k) {
      unpack16<S>(reinterpret_cast<const uint4*>(src)[k], out + k * (16 / static_cast<int>(sizeof(S))));
    }
  } else {
#pragma unroll
    for (int i = 0; i < P; ++i) out[i] = Conv<S>::template load<A>(src[i]);
  }
}

// kVec: 16-byte streaming stores (__stcs: the kernel never reads the gradient back).
template <class S, int P, bool kVec, class A>
__device__ __forceinline__ void store_global_pack(S* dst, const A (&v)[P]) {
  if constexpr (kVec) {
    static_assert((P * sizeof(S)) % 16 == 0, "a vector pack is a whole number of 16-byte words");
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

// ----------------------------------------------------------------------------------------------
// Staging: this thread's packs j = threadIdx.x, + blockDim.x, ... of n_packs from global memory
// into shared memory at `dst`. Each thread later reads only the packs it copied itself, so waiting
// for its own copies is enough (no CTA barrier). kAsync (the resident chunk, staged once): 16-byte
// cp.async; else (a streamed window, which overwrites the thread's previous window) synchronous
// copies, ordered after the thread's preceding reads of that memory (program order). kVec false:
// element by element.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
#else
  sts16(dst, *reinterpret_cast<const uint4*>(src));
#endif
}

__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

template <class S, int P, bool kVec, bool kAsync>
__device__ __forceinline__ void stage_packs(const S* src, uint32_t dst, int n_packs) {
  constexpr uint32_t kPackBytes = static_cast<uint32_t>(P * sizeof(S));
  for (int j = threadIdx.x; j < n_packs; j += blockDim.x) {
    const S* s = src + static_cast<int64_t>(j) * P;
    const uint32_t d = dst + static_cast<uint32_t>(j) * kPackBytes;
    if constexpr (kVec) {
#pragma unroll
      for (uint32_t k = 0; k < kPackBytes / 16; ++k) {
        if constexpr (kAsync) {
          cp_async_16(d + 16 * k, reinterpret_cast<const uint4*>(s) + k);
        } else {
          sts16(d + 16 * k, reinterpret_cast<const uint4*>(s)[k]);
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < P; ++i) sts(d + i * static_cast<uint32_t>(sizeof(S)), reinterpret_cast<const raw_t<S>*>(s)[i]);
    }
  }
  if constexpr (kAsync && kVec) cp_async_wait_all();
}

}  // namespace cuda
}  // namespace logitstd
