// Reductions of the CUDA kernel (kd_kernel.cuh): one value per thread (a struct of A fields) to one
// value per row, through a warp shuffle tree, the CTA's warps in order and the cluster's CTAs in
// rank order (distributed shared memory), so that every thread of every CTA of a row's cluster gets
// the same bits; and the two halves of a cluster barrier.
#pragma once

#include <cooperative_groups.h>

#include "launch_config.h"

namespace cg = cooperative_groups;

namespace logitstd {
namespace cuda {

// The reductions of a row, each with its own CTA slot: another CTA of the cluster may read a slot
// until it reaches its next cluster barrier, so no slot is reused within a row.
enum ReduceSlot : int { kSlotStats, kSlotExact, kSlotScaled, kSlotSums, kSlotPointwise, kSlotRefine, kSlotTerms, kSlots };

// The reduction buffers of one CTA, as rows of A (each reduced struct is a struct of A fields, at
// most kFields of them): the warps' partial results, the CTA's result per slot, the row's result.
template <class A>
struct SharedStorage {
  static constexpr int kFields = 16;
  A warp[kWarps][kFields];
  A cta[kSlots][kFields];
  A row[kFields];
};

constexpr unsigned kFullMask = 0xffffffffu;

// __shfl_down_sync of every field of a struct of A fields.
template <class A, class R>
__device__ __forceinline__ R shfl_down_fields(const R& v, int off) {
  static_assert(sizeof(R) % sizeof(A) == 0, "a reduced value is a struct of A fields");
  constexpr int kN = static_cast<int>(sizeof(R) / sizeof(A));
  union Fields {
    R value;
    A f[kN];
  };
  Fields u{v};
#pragma unroll
  for (int i = 0; i < kN; ++i) u.f[i] = __shfl_down_sync(kFullMask, u.f[i], off);
  return u.value;
}

// The row's value of v (every thread's), combined by `combine` (associative; applied in a fixed
// order). Every thread of the CTA takes part.
template <class A, class R, class Combine>
__device__ __noinline__ R row_reduce(R v, Combine combine, SharedStorage<A>& sh, int slot, int cluster) {
  static_assert(sizeof(R) <= SharedStorage<A>::kFields * sizeof(A), "SharedStorage::kFields is too small");
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const R other = shfl_down_fields<A>(v, off);
    if (lane < off) v = combine(v, other);
  }
  R* const warp_buf = reinterpret_cast<R*>(sh.warp[warp]);
  R* const cta_slot = reinterpret_cast<R*>(sh.cta[slot]);
  R* const row_buf = reinterpret_cast<R*>(sh.row);
  if (lane == 0) *warp_buf = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    R r = *reinterpret_cast<R*>(sh.warp[0]);
    const int warps = static_cast<int>(blockDim.x >> 5);
    for (int w = 1; w < warps; ++w) r = combine(r, *reinterpret_cast<R*>(sh.warp[w]));
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

// The two halves of a cluster barrier (PTX ISA 8.0, sm_90), executed by every thread: a CTA
// arrives after its last reduction and waits before it exits, so that its slots stay readable.
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
