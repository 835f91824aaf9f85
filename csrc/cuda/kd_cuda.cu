// CUDA kernels of logitstd::fused_kd_forward and logitstd::scale_rows_.
//
// Fused forward (kd_fused_kernel): one thread-block cluster of C CTAs per row (C = 1 for short
// rows); CTA q of the cluster owns the chunk [q * chunk, (q + 1) * chunk) of the row. Each CTA
//   1. copies its chunk of x and y into shared memory (16-byte cp.async when the rows are 16-byte
//      aligned), so each input element is read from device memory exactly once;
//   2. computes the moments of x and y: per thread a Chan merge of per-pack moments, then a warp
//      shuffle tree, the CTA's warps in order, and the cluster's CTAs in rank order, read through
//      distributed shared memory (every CTA of the cluster ends with the same bits);
//   3. computes e^sa, e^sb and the RowSums from shared memory, reduced the same way;
//   4. writes the loss (CTA 0) and the requested gradients (16-byte stores), again from shared
//      memory, recomputing the two exponentials (cheaper than keeping them on chip). Rows of at
//      most kTermsMaxCols classes take one more pass first: the chain rule from the per-element
//      terms (as the CPU kernel does), which keeps degenerate rows (V = 2) as accurate as eager.
// Math per element (docs/design.md section 1; formulas in logitstd/row_math.h, shared with the CPU
// kernel): sa = (x - max x) * xa in log2 units, e^sa = 2^sa (ex2.approx), sums in the accumulation
// type A (float; double, with exp, when an input is float64).
// Memory traffic per element: reads sizeof(x) + sizeof(y) bytes, writes sizeof(x) (student
// gradient) and/or sizeof(y) (teacher gradient): 6 bytes for bf16 with the student gradient, the
// floor of docs/design.md section 4. Rows too long for shared memory even with 16 CTAs (bf16 V > ~900k)
// are streamed: the same passes then read the chunk from global memory three times.
//
// Row scaling (scale_rows_kernel): grad[r] *= scale[r]; a row whose scale is exactly 1 is skipped
// without touching its data (the common loss.backward() on a scalar loss). Traffic: 0 bytes for
// skipped rows, else reads and writes sizeof(grad) per element: 16-byte accesses (one pack of
// kScaleVecBytes / sizeof(grad) elements per thread and step) when the gradient is 16-byte aligned
// and V a multiple of the pack, so every row is; element by element otherwise.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "launch_config.h"
#include "logitstd/checks.h"
#include "logitstd/kd_problem.h"
#include "logitstd/op_front.h"
#include "logitstd/row_math.h"

namespace cg = cooperative_groups;

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

// ----------------------------------------------------------------------------------------------
// Reductions of one value per thread to one value per row.
template <class A>
struct MomentsPair {
  Moments<A> x, y;
};

template <class A>
__device__ __forceinline__ MomentsPair<A> combine(const MomentsPair<A>& a, const MomentsPair<A>& b) {
  return MomentsPair<A>{merge_moments(a.x, b.x), merge_moments(a.y, b.y)};
}

__device__ __forceinline__ float combine(float a, float b) { return a + b; }
__device__ __forceinline__ double combine(double a, double b) { return a + b; }
__device__ __forceinline__ float shfl_down(float v, int off) { return __shfl_down_sync(0xffffffffu, v, off); }
__device__ __forceinline__ double shfl_down(double v, int off) { return __shfl_down_sync(0xffffffffu, v, off); }

template <class A>
__device__ __forceinline__ RowSums<A> combine(const RowSums<A>& a, const RowSums<A>& b) {
  return add_sums(a, b);
}

template <class A>
__device__ __forceinline__ CeSums<A> combine(const CeSums<A>& a, const CeSums<A>& b) {
  return add_ce_sums(a, b);
}

template <class A>
__device__ __forceinline__ CeSums<A> shfl_down(const CeSums<A>& c, int off) {
  return CeSums<A>{__shfl_down_sync(0xffffffffu, c.zc, off), __shfl_down_sync(0xffffffffu, c.zsum, off),
                   __shfl_down_sync(0xffffffffu, c.excl, off)};
}

template <class A>
__device__ __forceinline__ TermSums<A> combine(const TermSums<A>& a, const TermSums<A>& b) {
  return add_term_sums(a, b);
}

constexpr unsigned kFullMask = 0xffffffffu;

template <class A>
__device__ __forceinline__ Moments<A> shfl_down(const Moments<A>& m, int off) {
  return Moments<A>{__shfl_down_sync(kFullMask, m.n, off), __shfl_down_sync(kFullMask, m.mean, off),
                    __shfl_down_sync(kFullMask, m.m2, off), __shfl_down_sync(kFullMask, m.max, off),
                    __shfl_down_sync(kFullMask, m.min, off)};
}

template <class A>
__device__ __forceinline__ MomentsPair<A> shfl_down(const MomentsPair<A>& m, int off) {
  return MomentsPair<A>{shfl_down(m.x, off), shfl_down(m.y, off)};
}

template <class A>
__device__ __forceinline__ TermSums<A> shfl_down(const TermSums<A>& s, int off) {
  return TermSums<A>{__shfl_down_sync(kFullMask, s.gx, off), __shfl_down_sync(kFullMask, s.sx, off),
                     __shfl_down_sync(kFullMask, s.gy, off), __shfl_down_sync(kFullMask, s.sy, off)};
}

template <class A>
__device__ __forceinline__ RowSums<A> shfl_down(const RowSums<A>& s, int off) {
  return RowSums<A>{__shfl_down_sync(kFullMask, s.za, off),  __shfl_down_sync(kFullMask, s.zb, off),
                    __shfl_down_sync(kFullMask, s.t, off),   __shfl_down_sync(kFullMask, s.tabs, off),
                    __shfl_down_sync(kFullMask, s.saa, off),
                    __shfl_down_sync(kFullMask, s.sab, off), __shfl_down_sync(kFullMask, s.sbb, off),
                    __shfl_down_sync(kFullMask, s.sbd, off)};
}

// A warp shuffle tree (lane 0), the CTA's warps in order (thread 0), then, for a cluster, the CTAs'
// results in rank order through distributed shared memory. All threads of all CTAs of the cluster
// return the same bits. `cta_slot` must not be reused: other CTAs read it after this returns
// until they reach their next cluster barrier.
template <class R>
__device__ R row_reduce(R v, R* warp_buf, R* cta_slot, R* row_buf, int cluster) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const R other = shfl_down(v, off);
    if (lane < off) v = combine(v, other);
  }
  if (lane == 0) warp_buf[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    R r = warp_buf[0];
    const int warps = static_cast<int>(blockDim.x >> 5);
    for (int w = 1; w < warps; ++w) r = combine(r, warp_buf[w]);
    *cta_slot = r;
  }
  if (cluster == 1) {
    __syncthreads();
    return *cta_slot;
  }
#if defined(_CG_HAS_CLUSTER_GROUP)
  cg::cluster_group cl = cg::this_cluster();
  cl.sync();  // release/acquire at cluster scope: every CTA's slot is written and visible
  if (threadIdx.x == 0) {
    R r = *cl.map_shared_rank(cta_slot, 0);
    for (int q = 1; q < cluster; ++q) r = combine(r, *cl.map_shared_rank(cta_slot, q));
    *row_buf = r;
  }
  __syncthreads();
  return *row_buf;
#else
  __trap();  // the host launches clusters only on compute capability >= 9.0
  return v;
#endif
}

// The two halves of a cluster barrier (PTX ISA 8.0, sm_90), executed by every thread.
__device__ __forceinline__ void cluster_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}

// Moments of one pack of c v - shift (c: the row's magnitude scale, row_math.h): two passes over
// P registers, then merged into the thread's moments.
template <class A, int P>
__device__ __forceinline__ Moments<A> pack_moments(const A (&v)[P], A shift, A scale, bool need_m2) {
  A sum = A(0);
  A mx = v[0] * scale;
  A mn = mx;
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const A c = v[i] * scale;
    sum += c - shift;
    mx = nan_max(mx, c);
    mn = nan_min(mn, c);
  }
  const A mean = sum / static_cast<A>(P);
  A m2 = A(0);
  if (need_m2) {
#pragma unroll
    for (int i = 0; i < P; ++i) {
      const A d = (v[i] * scale - shift) - mean;
      m2 = m_fma(d, d, m2);
    }
  }
  return Moments<A>{static_cast<A>(P), mean, m2, mx, mn};
}

// ----------------------------------------------------------------------------------------------
struct KdCudaArgs {
  const void* x;
  const void* y;
  int64_t x_stride;
  int64_t y_stride;
  const bool* mask;
  const void* grad_scale;  // (1,) or (rows,) in the accumulation type, on the device
  int64_t grad_scale_stride;  // 0 for one factor, else 1
  bool zero_excluded;      // forward: excluded rows get loss 0 and zero gradients; else untouched
  void* loss;    // nullptr: not written (gradient recomputation)
  void* grad_x;  // nullptr when not requested
  void* grad_y;
  int64_t cols;
  int64_t chunk;           // elements per CTA (a multiple of the pack size)
  int64_t y_smem_offset;   // byte offset of the teacher chunk in dynamic shared memory
  int cluster;             // CTAs per row
  bool resident;           // chunks staged in shared memory (else read from global memory)
  bool from_terms;         // short rows: the chain rule from per-element terms (one more pass)
  bool standardize;
  const int64_t* labels;   // the objective's labels (nullptr: pure KD)
  int64_t ignore_index;
  double label_smoothing;
  double ce_weight;
  double kd_weight;
  void* ce_rows;           // the objective's parts per row (nullptr: not written)
  void* kd_rows;
  int64_t correction;
  double tau_s;
  double tau_t;
  double eps;
};

// float64 math needs more registers than kMinCtasPerSm leaves (and is not the fast path).
template <class S, class T>
constexpr int kMinCtas = std::is_same_v<acc_t<S, T>, double> ? 1 : kMinCtasPerSm;

template <class S, class T, int P, bool kVec>
__global__ void __launch_bounds__(kThreads, kMinCtas<S, T>) kd_fused_kernel(const KdCudaArgs args) {
  using A = acc_t<S, T>;
  using E = ExpUnits<A>;
  __shared__ MomentsPair<A> s_warp_m[kWarps];
  __shared__ MomentsPair<A> s_cta_m;
  __shared__ MomentsPair<A> s_row_m;
  __shared__ RowSums<A> s_warp_s[kWarps];
  __shared__ RowSums<A> s_cta_s;
  __shared__ RowSums<A> s_row_s;
  __shared__ TermSums<A> s_warp_t[kWarps];
  __shared__ TermSums<A> s_cta_t;
  __shared__ TermSums<A> s_row_t;
  __shared__ CeSums<A> s_warp_c[kWarps];
  __shared__ CeSums<A> s_cta_c;
  __shared__ CeSums<A> s_row_c;
  __shared__ A s_warp_b[kWarps];
  __shared__ A s_cta_b;
  __shared__ A s_row_b;
  extern __shared__ __align__(16) unsigned char s_chunk[];

  const int cluster = args.cluster;
  const int rank = static_cast<int>(blockIdx.x % static_cast<unsigned>(cluster));
  const int64_t row = blockIdx.x / static_cast<unsigned>(cluster);
  const int64_t cols = args.cols;
  const int64_t start = rank * args.chunk;
  const int64_t rest = cols - start;
  const int64_t len = rest <= 0 ? 0 : (rest < args.chunk ? rest : args.chunk);
  const int n_packs = static_cast<int>(len / P);  // exact: with kVec, cols and chunk are multiples of P

  const S* xg = static_cast<const S*>(args.x) + row * args.x_stride;
  const T* yg = static_cast<const T*>(args.y) + row * args.y_stride;
  S* gx = args.grad_x != nullptr ? static_cast<S*>(args.grad_x) + row * cols + start : nullptr;
  T* gy = args.grad_y != nullptr ? static_cast<T*>(args.grad_y) + row * cols + start : nullptr;
  A* loss = static_cast<A*>(args.loss);

  const bool has_labels = args.labels != nullptr;
  const int64_t label = has_labels ? args.labels[row] : 0;
  // A label outside [0, V) (not ignore_index) gives a NaN row: no host synchronization checks them.
  const bool label_ok = !has_labels || (label >= 0 && label < cols);
  if ((args.mask != nullptr && !args.mask[row]) || (has_labels && label == args.ignore_index)) {
    // the same branch in every CTA of the cluster
    if (!args.zero_excluded) return;
    if (rank == 0 && threadIdx.x == 0) {
      if (args.ce_rows != nullptr) static_cast<A*>(args.ce_rows)[row] = A(0);
      if (args.kd_rows != nullptr) static_cast<A*>(args.kd_rows)[row] = A(0);
    }
    A zeros[P];
#pragma unroll
    for (int i = 0; i < P; ++i) zeros[i] = A(0);
    for (int j = threadIdx.x; j < n_packs; j += blockDim.x) {
      const int64_t e = static_cast<int64_t>(j) * P;
      if (gx != nullptr) store_pack<S, P, kVec>(gx + e, zeros);
      if (gy != nullptr) store_pack<T, P, kVec>(gy + e, zeros);
    }
    if (rank == 0 && threadIdx.x == 0 && loss != nullptr) loss[row] = A(0);
    return;
  }

  // 1. The CTA's chunk of the row pair.
  S* xs = reinterpret_cast<S*>(s_chunk);
  T* ys = reinterpret_cast<T*>(s_chunk + args.y_smem_offset);
  if (args.resident) {
    stage_chunk<S, P, kVec>(xg + start, xs, n_packs);
    stage_chunk<T, P, kVec>(yg + start, ys, n_packs);
    cp_async_wait_all();
  }
  const S* xc = args.resident ? xs : xg + start;
  const T* yc = args.resident ? ys : yg + start;

  // 2. Moments of x - x[0] and y - y[0]; a row whose magnitude is outside MagnitudeRange (rare)
  // is computed again as c x (row_math.h, magnitude_scale). The decision is the same in every CTA.
  const A x0 = Conv<S>::template load<A>(xg[0]);
  const A y0 = Conv<T>::template load<A>(yg[0]);
  auto moments = [&](A cx, A cy) {
    MomentsPair<A> m{empty_moments<A>(), empty_moments<A>()};
    for (int j = threadIdx.x; j < n_packs; j += blockDim.x) {
      const int64_t e = static_cast<int64_t>(j) * P;
      A xv[P], yv[P];
      load_pack<S, P, kVec>(xc + e, xv);
      load_pack<T, P, kVec>(yc + e, yv);
      m.x = merge_moments(m.x, pack_moments<A, P>(xv, x0 * cx, cx, args.standardize));
      m.y = merge_moments(m.y, pack_moments<A, P>(yv, y0 * cy, cy, args.standardize));
    }
    return row_reduce(m, s_warp_m, &s_cta_m, &s_row_m, cluster);
  };
  MomentsPair<A> m = moments(A(1), A(1));
  const A scale_x = magnitude_scale(m.x.max, m.x.min);
  const A scale_y = magnitude_scale(m.y.max, m.y.min);
  if (scale_x != A(1) || scale_y != A(1)) {
#if defined(_CG_HAS_CLUSTER_GROUP)
    if (cluster > 1) cg::this_cluster().sync();  // other CTAs may still read s_cta_m
#endif
    m = moments(scale_x, scale_y);
  }

  const A dof = static_cast<A>(cols - args.correction);
  const A eps = static_cast<A>(args.eps);
  const A tau_s = static_cast<A>(args.tau_s);
  const A tau_t = static_cast<A>(args.tau_t);
  const RowStats<A> sx = finalize_moments(m.x, scale_x, x0 * scale_x, dof, eps, args.standardize);
  const RowStats<A> sy = finalize_moments(m.y, scale_y, y0 * scale_y, dof, eps, args.standardize);
  const ExpPlan<A> plan = make_exp_plan(sx, sy, tau_s, tau_t, E::kInvUnit);

  // 3. Exponentials and the row sums.
  const bool want_gx = gx != nullptr;
  const bool want_gy = gy != nullptr;
  RowSums<A> part = zero_sums<A>();
  for (int j = threadIdx.x; j < n_packs; j += blockDim.x) {
    const int64_t e = static_cast<int64_t>(j) * P;
    A xv[P], yv[P];
    load_pack<S, P, kVec>(xc + e, xv);
    load_pack<T, P, kVec>(yc + e, yv);
#pragma unroll
    for (int i = 0; i < P; ++i) {
      const A sa = exp_arg(xv[i], plan.x_max, plan.xa, plan.x_scale);
      const A sb = exp_arg(yv[i], plan.y_max, plan.ya, plan.y_scale);
      const A ea = E::exp(sa);
      const A eb = E::exp(sb);
      const A eb_delta = eb * kl_delta(sa, sb);
      part.za += ea;
      part.zb += eb;
      part.t += eb_delta;
      part.tabs += m_abs(eb_delta);
      if (want_gx) {
        part.saa = m_fma(ea, sa, part.saa);
        part.sab = m_fma(eb, sa, part.sab);
      }
      if (want_gy) {
        part.sbb = m_fma(eb, sb, part.sbb);
        part.sbd = m_fma(eb_delta, sb, part.sbd);
      }
    }
  }
  const RowSums<A> sums = row_reduce(part, s_warp_s, &s_cta_s, &s_row_s, cluster);
  // 3a. The objective's CE sums over the raw student row, sz = (x - max x) / unit (row_math.h).
  const A z_scale = E::kInvUnit / plan.x_scale;
  CeSums<A> ce_sums{A(1), A(0), A(0)};
  const int64_t label_local = has_labels ? label - start : -1;  // the label's index in this CTA's chunk
  if (has_labels) {
    CeSums<A> cpart{A(0), A(0), A(0)};
    for (int j = threadIdx.x; j < n_packs; j += blockDim.x) {
      const int64_t e = static_cast<int64_t>(j) * P;
      A xv[P];
      load_pack<S, P, kVec>(xc + e, xv);
#pragma unroll
      for (int i = 0; i < P; ++i) {
        const A sz = exp_arg(xv[i], plan.x_max, z_scale, plan.x_scale);
        const A ez = E::exp(sz);
        cpart.zc += ez;
        if (e + i != label_local) cpart.excl += ez;
        cpart.zsum += sz;
      }
    }
    ce_sums = row_reduce(cpart, s_warp_c, &s_cta_c, &s_row_c, cluster);
  }
  const A ce_weight = static_cast<A>(args.ce_weight);
  const A kd_weight = static_cast<A>(args.kd_weight);
  const A smoothing = static_cast<A>(args.label_smoothing);
  if (loss != nullptr) {
    A row_value = row_loss(sums, tau_s, E::kUnit);
    if (kl_needs_refinement(sums, E::kUnit)) {  // 3b. rare: the loss from the Bregman form
      const A rza = A(1) / sums.za, rzb = A(1) / sums.zb, unit = E::kUnit;
      const A neg_lz = -m_log(sums.za / sums.zb);
      A bpart = A(0);
      for (int j = threadIdx.x; j < n_packs; j += blockDim.x) {
        const int64_t e = static_cast<int64_t>(j) * P;
        A xv[P], yv[P];
        load_pack<S, P, kVec>(xc + e, xv);
        load_pack<T, P, kVec>(yc + e, yv);
#pragma unroll
        for (int i = 0; i < P; ++i) {
          const A sa = exp_arg(xv[i], plan.x_max, plan.xa, plan.x_scale);
          const A sb = exp_arg(yv[i], plan.y_max, plan.ya, plan.y_scale);
          bpart += bregman_term(E::exp(sa), E::exp(sb), bregman_arg(kl_delta(sa, sb), unit, neg_lz), rza, rzb);
        }
      }
      row_value = refined_row_loss(row_reduce(bpart, s_warp_b, &s_cta_b, &s_row_b, cluster), tau_s);
    }
    A ce = A(0);
    if (has_labels) {
      const A x_label = label_ok ? Conv<S>::template load<A>(xg[label]) : A(NAN);
      const A sz_label = exp_arg(x_label, plan.x_max, z_scale, plan.x_scale);
      ce = row_ce(ce_sums, sz_label, E::exp(sz_label), smoothing, static_cast<A>(cols), E::kUnit);
    }
    if (rank == 0 && threadIdx.x == 0) {
      loss[row] = row_objective(ce, row_value, ce_weight, kd_weight, has_labels);
      if (args.ce_rows != nullptr) static_cast<A*>(args.ce_rows)[row] = ce;
      if (args.kd_rows != nullptr) static_cast<A*>(args.kd_rows)[row] = row_value;
    }
  }
  const A grad_scale = static_cast<const A*>(args.grad_scale)[row * args.grad_scale_stride];
  const A kd_scale = grad_scale * kd_weight;
  // The CE part of the student gradient: ce_a e^sz + ce_b, and ce_l at the label (NaN: bad label).
  const A ce_a = has_labels ? grad_scale * ce_weight / ce_sums.zc : A(0);
  const A ce_b = has_labels ? -grad_scale * ce_weight * smoothing / static_cast<A>(cols) : A(0);
  // at the label: ce_l replaces ce_a e^sz + ce_b (row_math.h, ce_label_grad); NaN for a bad label
  const A ce_l = label_ok ? grad_scale * ce_weight * ce_label_grad(ce_sums, smoothing, static_cast<A>(cols)) : A(NAN);

  if ((want_gx || want_gy) && args.from_terms) {
    // 4a. Short rows: the per-element terms g and their sums G, S (row_math.h, term_coefficients),
    // so that the two terms of the chain rule cancel consistently (V = 2: gradient O(eps)).
    const A rza = A(1) / sums.za, rzb = A(1) / sums.zb, neg_rzb = -rzb;
    const A unit = E::kUnit, neg_kl_cross = -kl_cross_term(sums, E::kUnit);
    TermSums<A> tpart{A(0), A(0), A(0), A(0)};
    for (int j = threadIdx.x; j < n_packs; j += blockDim.x) {
      const int64_t e = static_cast<int64_t>(j) * P;
      A xv[P], yv[P];
      load_pack<S, P, kVec>(xc + e, xv);
      load_pack<T, P, kVec>(yc + e, yv);
#pragma unroll
      for (int i = 0; i < P; ++i) {
        const A sa = exp_arg(xv[i], plan.x_max, plan.xa, plan.x_scale);
        const A sb = exp_arg(yv[i], plan.y_max, plan.ya, plan.y_scale);
        const A ea = E::exp(sa);
        const A eb = E::exp(sb);
        if (want_gx && args.standardize) {
          const A g = student_term(ea, eb, rza, neg_rzb);
          tpart.gx += g;
          tpart.sx = m_fma(g, centered(xv[i], sx), tpart.sx);
        }
        if (want_gy && args.standardize) {
          const A g = teacher_term(eb, kl_delta(sa, sb), rzb, unit, neg_kl_cross);
          tpart.gy += g;
          tpart.sy = m_fma(g, centered(yv[i], sy), tpart.sy);
        }
      }
    }
    const TermSums<A> ts = row_reduce(tpart, s_warp_t, &s_cta_t, &s_row_t, cluster);
    if (cluster > 1) cluster_arrive();  // other CTAs may still read s_cta_t: wait before exiting
    const A classes = static_cast<A>(cols);
    const TermCoef<A> cx =
        term_coefficients(ts.gx, ts.sx, classes, sx, dof, kd_scale * tau_s, args.standardize, eps);
    const TermCoef<A> cy =
        term_coefficients(ts.gy, ts.sy, classes, sy, dof, kd_scale * tau_s * tau_s / tau_t, args.standardize, eps);
    // 4b. Gradients from the same terms (recomputed: the same inputs and code give the same bits).
    for (int j = threadIdx.x; j < n_packs; j += blockDim.x) {
      const int64_t e = static_cast<int64_t>(j) * P;
      A xv[P], yv[P], ox[P], oy[P];
      load_pack<S, P, kVec>(xc + e, xv);
      load_pack<T, P, kVec>(yc + e, yv);
#pragma unroll
      for (int i = 0; i < P; ++i) {
        const A sa = exp_arg(xv[i], plan.x_max, plan.xa, plan.x_scale);
        const A sb = exp_arg(yv[i], plan.y_max, plan.ya, plan.y_scale);
        const A ea = E::exp(sa);
        const A eb = E::exp(sb);
        if (want_gx) {
          const A dev = args.standardize ? centered(xv[i], sx) : A(0);
          ox[i] = grad_from_term(student_term(ea, eb, rza, neg_rzb), dev, cx.a, -cx.b, -cx.a_mean);
          if (has_labels) {
            ox[i] += (!label_ok || e + i == label_local)
                         ? ce_l
                         : m_fma(ce_a, E::exp(exp_arg(xv[i], plan.x_max, z_scale, plan.x_scale)), ce_b);
          }
        }
        if (want_gy) {
          const A dev = args.standardize ? centered(yv[i], sy) : A(0);
          oy[i] = grad_from_term(teacher_term(eb, kl_delta(sa, sb), rzb, unit, neg_kl_cross), dev, cy.a, -cy.b,
                                 -cy.a_mean);
        }
      }
      if (want_gx) store_pack<S, P, kVec>(gx + e, ox);
      if (want_gy) store_pack<T, P, kVec>(gy + e, oy);
    }
    if (cluster > 1) cluster_wait();
    return;
  }

  // Other CTAs may still read s_cta_s: arrive now, wait before exiting (overlaps the gradient pass).
  if (cluster > 1) cluster_arrive();
  const RowResult<A> res = finalize_row(sums, sx, sy, dof, tau_s, tau_t, args.standardize, E::kUnit, kd_scale);

  // 4. Gradients.
  if (want_gx || want_gy) {
    const A alpha_a = res.gx.alpha_a, neg_alpha_b = -res.gx.alpha_b;
    const A neg_beta_x = -res.gx.beta, beta_m_x = res.gx.beta_m;
    const A gamma = res.gy.gamma, unit = res.gy.unit, neg_kl_cross = -res.gy.kl_cross;
    const A neg_beta_y = -res.gy.beta, beta_m_y = res.gy.beta_m;
    for (int j = threadIdx.x; j < n_packs; j += blockDim.x) {
      const int64_t e = static_cast<int64_t>(j) * P;
      A xv[P], yv[P], ox[P], oy[P];
      load_pack<S, P, kVec>(xc + e, xv);
      load_pack<T, P, kVec>(yc + e, yv);
#pragma unroll
      for (int i = 0; i < P; ++i) {
        const A sa = exp_arg(xv[i], plan.x_max, plan.xa, plan.x_scale);
        const A sb = exp_arg(yv[i], plan.y_max, plan.ya, plan.y_scale);
        const A ea = E::exp(sa);
        const A eb = E::exp(sb);
        if (want_gx) {
          const A xk = args.standardize ? xv[i] * sx.scale - sx.shift : A(0);
          ox[i] = grad_student_elem(ea, eb, xk, alpha_a, neg_alpha_b, neg_beta_x, beta_m_x);
          if (has_labels) {
            ox[i] += (!label_ok || e + i == label_local)
                         ? ce_l
                         : m_fma(ce_a, E::exp(exp_arg(xv[i], plan.x_max, z_scale, plan.x_scale)), ce_b);
          }
        }
        if (want_gy) {
          const A yk = args.standardize ? yv[i] * sy.scale - sy.shift : A(0);
          oy[i] = grad_teacher_elem(eb, kl_delta(sa, sb), yk, gamma, unit, neg_kl_cross, neg_beta_y, beta_m_y);
        }
      }
      if (want_gx) store_pack<S, P, kVec>(gx + e, ox);
      if (want_gy) store_pack<T, P, kVec>(gy + e, oy);
    }
  }
  if (cluster > 1) cluster_wait();
}

// grad[r, k] = grad[r, k] * scale[r] in F (float, or double for a double factor), rounded once to G.
// kVec: packs of P = kScaleVecBytes / sizeof(G) elements, one 16-byte load and one streaming store
// (__stcs: this kernel never reads the row again) per pack; the host checks that every row start is
// 16-byte aligned and that P divides cols. Otherwise P = 1: one scalar access per element.
template <class G, class F, bool kVec>
__global__ void scale_rows_kernel(G* grad, const F* scale, int64_t rows, int64_t cols, bool one_factor) {
  constexpr int P = kVec ? static_cast<int>(kScaleVecBytes / sizeof(G)) : 1;
  const int64_t packs = cols / P;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const F factor = scale[one_factor ? 0 : r];
    if (factor == F(1)) continue;
    G* g = grad + r * cols;
    for (int64_t j = threadIdx.x; j < packs; j += blockDim.x) {
      F v[P];
      load_pack<G, P, kVec>(g + j * P, v);
#pragma unroll
      for (int i = 0; i < P; ++i) v[i] *= factor;
      store_pack<G, P, kVec>(g + j * P, v);
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Host side: launch planning.
struct DeviceInfo {
  int major = 0;
  int max_smem_optin = 0;  // bytes of shared memory one CTA may use (opt-in)
};

DeviceInfo device_info(int device) {
  static std::mutex mutex;
  static std::map<int, DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  DeviceInfo info;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cache.emplace(device, info);
  return info;
}

struct LaunchPlan {
  int cluster = 1;
  int64_t chunk = 0;  // elements per CTA
  int64_t y_offset = 0;
  bool resident = false;
  size_t smem = 0;  // dynamic shared memory bytes
  int threads = kThreads;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Raise the kernel's dynamic shared memory limit to the opt-in maximum and allow 16-CTA clusters,
// once per kernel and device; returns the dynamic shared memory a CTA may use. The limit is only
// raised, never lowered, so concurrent launches with different shared memory sizes cannot race.
template <class Kernel>
int64_t prepare_kernel(Kernel kernel, int device, const DeviceInfo& info) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int64_t> prepared;
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), device);
  std::lock_guard<std::mutex> lock(mutex);
  auto it = prepared.find(key);
  if (it != prepared.end()) return it->second;
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  const int64_t max_dynamic =
      static_cast<int64_t>(info.max_smem_optin) - static_cast<int64_t>(attributes.sharedSizeBytes);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(max_dynamic)));
  if (info.major >= 9) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  }
  prepared.emplace(key, max_dynamic);
  return max_dynamic;
}

// Whether clusters of `cluster` CTAs with `smem` bytes of dynamic shared memory can be scheduled
// (cached per kernel, device and configuration; the answer does not change during a process).
template <class Kernel>
bool cluster_schedulable(Kernel kernel, int device, int cluster, size_t smem, int threads) {
  if (cluster == 1) return true;
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int, size_t, int>, bool> cache;
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), device, cluster, smem, threads);
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(cluster));
  config.blockDim = dim3(static_cast<unsigned>(threads));
  config.dynamicSmemBytes = smem;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = static_cast<unsigned>(cluster);
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  int clusters = 0;
  const bool ok = cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) == cudaSuccess && clusters > 0;
  if (!ok) (void)cudaGetLastError();  // a refused configuration is an answer, not an error
  cache.emplace(key, ok);
  return ok;
}

template <class S, class T, class Kernel>
LaunchPlan plan_launch(Kernel kernel, int device, int64_t cols, int pack) {
  const DeviceInfo info = device_info(device);
  const int64_t max_dynamic = prepare_kernel(kernel, device, info);
  const int max_cluster = info.major >= 9 ? kMaxCluster : 1;
  const int64_t packs = ceil_div(cols, pack);

  auto make = [&](int cluster, bool resident) {
    LaunchPlan plan;
    plan.cluster = cluster;
    const int64_t chunk_packs = ceil_div(packs, cluster);
    plan.chunk = chunk_packs * pack;
    plan.resident = resident;
    plan.y_offset = round_up(plan.chunk * static_cast<int64_t>(sizeof(S)), 16);
    plan.smem = resident ? static_cast<size_t>(plan.y_offset + round_up(plan.chunk * static_cast<int64_t>(sizeof(T)), 16))
                         : 0;
    plan.threads = static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, round_up(chunk_packs, 32))));
    return plan;
  };
  // The smallest cluster whose chunk fits the per-CTA target (several CTAs per SM), then the
  // smallest whose chunk fits the opt-in shared memory (one CTA per SM), else stream the rows.
  for (const int64_t limit : {static_cast<int64_t>(kTargetCtaBytes), max_dynamic}) {
    for (int cluster = 1; cluster <= max_cluster; cluster *= 2) {
      const LaunchPlan plan = make(cluster, true);
      if (static_cast<int64_t>(plan.smem) <= limit &&
          cluster_schedulable(kernel, device, cluster, plan.smem, plan.threads)) {
        return plan;
      }
    }
  }
  for (int cluster = max_cluster; cluster > 1; cluster /= 2) {
    const LaunchPlan plan = make(cluster, false);
    if (cluster_schedulable(kernel, device, cluster, 0, plan.threads)) return plan;
  }
  return make(1, false);
}

template <class S, class T, int P, bool kVec>
void launch_fused(const KdProblem& p, cudaStream_t stream) {
  auto kernel = kd_fused_kernel<S, T, P, kVec>;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const LaunchPlan plan = plan_launch<S, T>(kernel, device, p.cols, P);
  TORCH_CHECK(p.rows <= (int64_t{1} << 31) / plan.cluster - 1, "logitstd::fused_kd_forward (CUDA): ", p.rows,
              " rows x ", plan.cluster, " CTAs per row exceed the grid limit");
  KdCudaArgs args;
  args.x = p.x;
  args.y = p.y;
  args.x_stride = p.x_stride;
  args.y_stride = p.y_stride;
  args.mask = p.mask;
  args.labels = p.labels;
  args.ignore_index = p.ignore_index;
  args.label_smoothing = p.label_smoothing;
  args.ce_weight = p.ce_weight;
  args.kd_weight = p.kd_weight;
  args.ce_rows = p.ce_rows;
  args.kd_rows = p.kd_rows;
  args.grad_scale = p.grad_scale;
  args.grad_scale_stride = p.grad_scale_stride;
  args.zero_excluded = p.zero_excluded;
  args.loss = p.loss;
  args.grad_x = p.grad_x;
  args.grad_y = p.grad_y;
  args.cols = p.cols;
  args.chunk = plan.chunk;
  args.y_smem_offset = plan.y_offset;
  args.cluster = plan.cluster;
  args.resident = plan.resident;
  args.from_terms = p.cols <= kTermsMaxCols;
  args.standardize = p.standardize;
  args.correction = p.correction;
  args.tau_s = p.tau_s;
  args.tau_t = p.tau_t;
  args.eps = p.eps;

  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(p.rows * plan.cluster));
  config.blockDim = dim3(static_cast<unsigned>(plan.threads));
  config.dynamicSmemBytes = plan.smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = static_cast<unsigned>(plan.cluster);
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = plan.cluster > 1 ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args));
}

inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// 16-byte packs when every row of both inputs and of the outputs starts 16-byte aligned and V is
// a multiple of the pack; element-wise loads otherwise.
template <class S, class T>
void launch_for_types(const KdProblem& p, cudaStream_t stream) {
  constexpr int kPack = static_cast<int>(16 / std::min(sizeof(S), sizeof(T)));
  const bool vec = aligned16(p.x) && aligned16(p.y) && (p.x_stride * static_cast<int64_t>(sizeof(S))) % 16 == 0 &&
                   (p.y_stride * static_cast<int64_t>(sizeof(T))) % 16 == 0 && p.cols % kPack == 0 &&
                   aligned16(p.grad_x) && aligned16(p.grad_y);
  if (vec) {
    launch_fused<S, T, kPack, true>(p, stream);
  } else {
    launch_fused<S, T, 1, false>(p, stream);
  }
}

// Dtype pairs with a kernel of their own; other pairs are computed in the accumulation dtype.
bool native_pair(at::ScalarType s, at::ScalarType t) {
  const auto low = [](at::ScalarType d) { return d == at::kHalf || d == at::kBFloat16; };
  return s == t || (low(s) && t == at::kFloat) || (s == at::kFloat && low(t));
}

void launch(const KdProblem& p, at::ScalarType s, at::ScalarType t, cudaStream_t stream) {
  using bf16 = __nv_bfloat16;
  if (s == t) {
    switch (s) {
      case at::kFloat: return launch_for_types<float, float>(p, stream);
      case at::kDouble: return launch_for_types<double, double>(p, stream);
      case at::kHalf: return launch_for_types<__half, __half>(p, stream);
      case at::kBFloat16: return launch_for_types<bf16, bf16>(p, stream);
      default: break;
    }
  } else if (t == at::kFloat) {
    if (s == at::kHalf) return launch_for_types<__half, float>(p, stream);
    if (s == at::kBFloat16) return launch_for_types<bf16, float>(p, stream);
  } else if (s == at::kFloat) {
    if (t == at::kHalf) return launch_for_types<float, __half>(p, stream);
    if (t == at::kBFloat16) return launch_for_types<float, bf16>(p, stream);
  }
  TORCH_CHECK(false, "logitstd::fused_kd_forward (CUDA): no kernel for student ", s, " and teacher ", t);
}

// ----------------------------------------------------------------------------------------------
// The ops.
ForwardOutputs fused_kd_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                     const std::optional<at::Tensor>& mask, const at::Tensor& grad_scale, double tau_s,
                                     double tau_t, bool standardize, int64_t correction, double eps, bool grad_student,
                                     bool grad_teacher, const std::optional<at::Tensor>& labels, int64_t ignore_index,
                                     double label_smoothing, double ce_weight, double kd_weight,
                                    const std::string& divergence, double beta, double dkd_alpha,
                                    double dkd_beta, const std::optional<at::Tensor>& temperature_rows,
                                    bool grad_temperature) {
  constexpr const char* op = "logitstd::fused_kd_forward";
  const FusedArgs a{student, teacher, mask, grad_scale, tau_s, tau_t, standardize, correction, eps, labels,
                    ignore_index, label_smoothing, ce_weight, kd_weight, divergence, beta, dkd_alpha, dkd_beta,
                    temperature_rows, grad_temperature};
  const at::ScalarType acc = check_forward_args(op, a, c10::DeviceType::CUDA);
  TORCH_CHECK_VALUE(divergence_code(op, divergence, beta) == 0, op, " (CUDA): the CUDA kernel computes forward_kl "
                    "only; use backend=\"triton\" for ", divergence);
  TORCH_CHECK_VALUE(!temperature_rows.has_value(), op, " (CUDA): no per-row temperature in the CUDA kernel; use "
                    "backend=\"cpu\" or \"torch\"");
  TORCH_CHECK_VALUE(student.size(1) <= INT32_MAX, op, " (CUDA): student has ", student.size(1),
                    " classes, more than the kernel's limit of 2^31 - 1");
  const c10::cuda::CUDAGuard guard(student.device());
  if (!native_pair(student.scalar_type(), teacher.scalar_type())) {
    // no kernel for this dtype pair: both in the accumulation dtype, the gradients rounded back once
    auto out = fused_kd_forward_cuda(student.to(acc), teacher.to(acc), mask, grad_scale, tau_s, tau_t, standardize,
                                     correction, eps, grad_student, grad_teacher, labels, ignore_index,
                                     label_smoothing, ce_weight, kd_weight, divergence, beta, dkd_alpha, dkd_beta,
                                     temperature_rows, grad_temperature);
    return {std::get<0>(out), grad_student ? std::get<1>(out).to(student.scalar_type()) : student.new_empty({0}),
            grad_teacher ? std::get<2>(out).to(teacher.scalar_type()) : teacher.new_empty({0}), std::get<3>(out),
            std::get<4>(out), std::get<5>(out)};
  }
  return fused_forward_front(a, acc, grad_student, grad_teacher, [&](const KdProblem& p) {
    launch(p, student.scalar_type(), teacher.scalar_type(), c10::cuda::getCurrentCUDAStream());
  });
}

// Recompute the gradients of the rows where `active` is true, in place (the backward's one-rounding
// path for low-precision gradients). Rows not active are not touched and cost no memory traffic:
// the kernel returns before loading them (no host synchronization).
void fused_kd_regrad_cuda(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& active,
                          const at::Tensor& grad_scale, double tau_s, double tau_t, bool standardize,
                          int64_t correction, double eps, const at::Tensor& grad_x, const at::Tensor& grad_y,
                          const std::optional<at::Tensor>& labels, int64_t ignore_index, double label_smoothing,
                          double ce_weight, double kd_weight, const std::string& divergence, double beta,
                         double dkd_alpha, double dkd_beta, const std::optional<at::Tensor>& temperature_rows) {
  constexpr const char* op = "logitstd::fused_kd_regrad_";
  const std::optional<at::Tensor> rows(active);
  const FusedArgs a{student, teacher, rows, grad_scale, tau_s, tau_t, standardize, correction, eps, labels,
                    ignore_index, label_smoothing, ce_weight, kd_weight, divergence, beta, dkd_alpha, dkd_beta,
                    temperature_rows, false};
  const c10::cuda::CUDAGuard guard(student.device());
  fused_regrad_front(op, a, grad_x, grad_y, c10::DeviceType::CUDA, [&](const KdProblem& p, at::ScalarType acc) {
    if (native_pair(student.scalar_type(), teacher.scalar_type())) {
      launch(p, student.scalar_type(), teacher.scalar_type(), c10::cuda::getCurrentCUDAStream());
      return;
    }
    auto out = fused_kd_forward_cuda(student.to(acc), teacher.to(acc), active, grad_scale, tau_s, tau_t, standardize,
                                     correction, eps, grad_x.numel() > 0, grad_y.numel() > 0, labels, ignore_index,
                                     label_smoothing, ce_weight, kd_weight, divergence, beta, dkd_alpha, dkd_beta,
                                     temperature_rows, false);
    const at::Tensor picked = active.reshape({-1, 1});
    if (grad_x.numel() > 0) grad_x.copy_(at::where(picked, std::get<1>(out).to(grad_x.scalar_type()), grad_x));
    if (grad_y.numel() > 0) grad_y.copy_(at::where(picked, std::get<2>(out).to(grad_y.scalar_type()), grad_y));
  });
}

void scale_rows_cuda(const at::Tensor& grad, const at::Tensor& scale) {
  check_scale_rows(grad, scale);
  TORCH_CHECK_VALUE(grad.is_cuda(), "logitstd::scale_rows_ (CUDA): grad is on ", grad.device());
  const int64_t rows = grad.size(0);
  const int64_t cols = grad.size(1);
  if (rows == 0 || cols == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor factors = scale.reshape({-1}).contiguous();
  const bool one_factor = factors.numel() == 1;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(rows, kScaleMaxBlocks));
  auto run = [&](auto grad_type, auto factor_type) {
    using G = decltype(grad_type);
    using F = decltype(factor_type);
    G* g = static_cast<G*>(grad.data_ptr());
    const F* f = static_cast<const F*>(factors.data_ptr());
    // grad is contiguous: every row starts 16-byte aligned when the first does and V is a multiple
    // of the pack (V * sizeof(G) a multiple of 16)
    if (aligned16(g) && cols % static_cast<int64_t>(kScaleVecBytes / sizeof(G)) == 0) {
      scale_rows_kernel<G, F, true><<<blocks, kScaleThreads, 0, stream>>>(g, f, rows, cols, one_factor);
    } else {
      scale_rows_kernel<G, F, false><<<blocks, kScaleThreads, 0, stream>>>(g, f, rows, cols, one_factor);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  auto with_factor = [&](auto grad_type) {
    if (factors.scalar_type() == at::kDouble) {
      run(grad_type, double{});
    } else {
      run(grad_type, float{});
    }
  };
  switch (grad.scalar_type()) {
    case at::kFloat: return with_factor(float{});
    case at::kDouble: return with_factor(double{});
    case at::kHalf: return with_factor(__half{});
    case at::kBFloat16: return with_factor(__nv_bfloat16{});
    default: TORCH_CHECK_TYPE(false, "logitstd::scale_rows_ (CUDA): unsupported dtype ", grad.scalar_type());
  }
}

TORCH_LIBRARY_IMPL(logitstd, CUDA, m) {
  m.impl("fused_kd_forward", &fused_kd_forward_cuda);
  m.impl("fused_kd_regrad_", &fused_kd_regrad_cuda);
  m.impl("scale_rows_", &scale_rows_cuda);
}

}  // namespace cuda
}  // namespace logitstd
