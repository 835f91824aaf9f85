// Reductions of the CUDA kernel (kd_kernel.cuh): one value per thread to one value per row, through
// warp shuffles, the CTA's warps in order and the cluster's CTAs in rank order (distributed shared
// memory), and the two halves of a cluster barrier.
#pragma once

#include <cooperative_groups.h>

#include "logitstd/row_math.h"

namespace cg = cooperative_groups;

namespace logitstd {
namespace cuda {

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

}  // namespace cuda
}  // namespace logitstd
