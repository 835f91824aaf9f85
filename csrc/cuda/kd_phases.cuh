// The passes of the CUDA kernel over a CTA's chunk of a row (kd_kernel.cuh has the kernel). Each
// pass is one loop over the packs this thread owns (ChunkView::for_each_pack) around the per-element
// math of logitstd/phase_math.h, followed by one row reduction (reductions.cuh):
//   stats_pass      shifted sums (statistics), or the exact max and min;
//   sums_pass       the partition sums, the divergence's sums, the standardization's and the CE's;
//   pointwise_pass  jsd and tvd: their loss and E_q g, E_p h;
//   refine_pass     the Bregman form of a KL (only for the rows that need it);
//   terms_pass      short rows: the chain rule's sums G, S from the per-element terms;
//   grads_pass      the gradients: a few FMAs of per-row coefficients, stored as packs.
#pragma once

#include <cstdint>

#include "device_math.cuh"
#include "logitstd/phase_grads.h"
#include "reductions.cuh"

namespace logitstd {
namespace cuda {

// A CTA's chunk [start, start + len) of a row pair. The packs j = threadIdx.x, + blockDim.x, ... of
// each window of `window` elements are this thread's: it stages them into shared memory (xs, ys)
// and is the only one to read them. A resident chunk (window >= len) is staged once by the kernel;
// a streamed one (rows too long for the cluster's shared memory) window by window in every pass.
template <class S, class T, int P, bool kVec>
struct ChunkView {
  const S* xg;
  const T* yg;
  uint32_t xs, ys;
  int64_t len, window;

  __device__ __forceinline__ bool resident() const { return window >= len; }

  template <bool kAsync>
  __device__ __forceinline__ void stage(int64_t w0, int packs) const {
    stage_packs<S, P, kVec, kAsync>(xg + w0, xs, packs);
    stage_packs<T, P, kVec, kAsync>(yg + w0, ys, packs);
  }

  // f(x, y, e) for every pack this thread owns: x, y its P elements in A, e its offset in the chunk.
  // kUnroll 2: two packs per iteration (the hot loops: half the loop's own instructions per element).
  template <class A, int kUnroll = 1, class F>
  __device__ __forceinline__ void for_each_pack(F&& f) const {
    constexpr uint32_t kBytesX = static_cast<uint32_t>(P * sizeof(S)), kBytesY = static_cast<uint32_t>(P * sizeof(T));
    auto pack = [&](int64_t w0, int j) {
      A x[P], y[P];
      load_shared_pack<S, P>(xs + static_cast<uint32_t>(j) * kBytesX, x);
      load_shared_pack<T, P>(ys + static_cast<uint32_t>(j) * kBytesY, y);
      f(x, y, w0 + static_cast<int64_t>(j) * P);
    };
    for (int64_t w0 = 0; w0 < len; w0 += window) {
      const int packs = static_cast<int>((len - w0 < window ? len - w0 : window) / P);
      if (!resident()) stage<false>(w0, packs);
      const int step = static_cast<int>(blockDim.x);
      int j = static_cast<int>(threadIdx.x);
      if constexpr (kUnroll == 2) {
        for (; j + step < packs; j += 2 * step) {
          pack(w0, j);
          pack(w0, j + step);
        }
        if (j < packs) pack(w0, j);  // (at most one left)
      } else {
        for (; j < packs; j += step) pack(w0, j);
      }
    }
  }

  // The number of elements this thread owns.
  __device__ __forceinline__ int64_t thread_elements() const {
    int64_t n = 0;
    for (int64_t w0 = 0; w0 < len; w0 += window) {
      const int packs = static_cast<int>((len - w0 < window ? len - w0 : window) / P);
      if (static_cast<int>(threadIdx.x) < packs) n += (packs - 1 - static_cast<int>(threadIdx.x)) / blockDim.x + 1;
    }
    return n * P;
  }
};

// What every pass needs of the launch: the cluster size and the shared reduction buffers.
template <class A>
struct PassCtx {
  SharedStorage<A>& sh;
  int cluster;
};

// A switch of a pass's body: compiled out (kNo), in (kYes), or read at run time (kRuntime: the
// generic loops of the rarer launches, e.g. the teacher's gradient).
enum class Want : int { kNo, kYes, kRuntime };

template <Want W>
__device__ __forceinline__ bool wanted(bool runtime) {
  return W == Want::kYes || (W == Want::kRuntime && runtime);
}

// Packs per iteration of a sums or gradient loop: 2 for the lean launches (KL divergences, switches
// compiled in, no labels); 1 where two packs' values would not fit the registers (the CE's, jsd's and
// tvd's per-element values, the generic loops).
template <Divergence D>
constexpr int unroll(Want a, Want b, Want labels) {
  return a != Want::kRuntime && b != Want::kRuntime && labels == Want::kNo && !is_pointwise(D) ? 2 : 1;
}

// ----------------------------------------------------------------------------------------------
// Statistics (kSums: shifted sums of c v, kScaled: of the rescaled row; else the exact max and
// min) merged over the row; x0c, y0c: the moments' shift (c times the row's first element).
template <bool kSums, bool kScaled, class S, class T, int P, bool kVec, class A>
__device__ __noinline__ RowMoments<A> stats_pass(const ChunkView<S, T, P, kVec>& v, A cx, A cy, A x0c, A y0c,
                                                 const PassCtx<A>& ctx, int slot) {
  const int64_t n = v.thread_elements();
  const int64_t first = static_cast<int64_t>(threadIdx.x) * P;  // this thread's first element, if any
  ShiftedSums<A> sx = start_shifted(n > 0 ? Conv<S>::template load<A>(v.xg[first]) * cx : A(0));
  ShiftedSums<A> sy = start_shifted(n > 0 ? Conv<T>::template load<A>(v.yg[first]) * cy : A(0));
  v.template for_each_pack<A, 2>(
      [&](const A (&x)[P], const A (&y)[P], int64_t) { stats_pack<kSums, kScaled>(sx, sy, x, y, cx, cy); });
  RowMoments<A> m;
  thread_moments(sx, static_cast<A>(n), x0c, kSums, m.x, m.lo_x, m.hi_x);
  thread_moments(sy, static_cast<A>(n), y0c, kSums, m.y, m.lo_y, m.hi_y);
  return row_reduce(m, CombineMoments{}, ctx.sh, slot, ctx.cluster);
}

// The sums pass: gx, gy the requested gradients (the standardization's sums of each); labels: the
// CE's sums, label_local the label's offset in the chunk.
struct PassWants {
  bool gx, gy, labels;
  int64_t label_local;
};

template <Divergence D, bool kStd, Want kStudent, Want kTeacher, Want kLabels, class S, class T, int P, bool kVec,
          class A>
__device__ __noinline__ PhaseSums<A> sums_pass(const ChunkView<S, T, P, kVec>& v, const RowPlan<A>& plan,
                                               const PassWants& w, const PassCtx<A>& ctx) {
  PhaseSums<A> s = zero_phase_sums<A>();
  const bool student = wanted<kStudent>(w.gx), teacher = wanted<kTeacher>(w.gy), labels = wanted<kLabels>(w.labels);
  constexpr int kUnroll = unroll<D>(kStudent, kTeacher, kLabels);
  v.template for_each_pack<A, kUnroll>([&](const A (&x)[P], const A (&y)[P], int64_t e) {
    sums_pack<D, kStd>(s, x, y, plan, student, teacher, labels, w.label_local - e);
  });
  return row_reduce(s, CombineSums{}, ctx.sh, kSlotSums, ctx.cluster);
}

// jsd and tvd: the loss, E_q g, E_p h and the standardization's sums of their terms.
template <Divergence D, class S, class T, int P, bool kVec, class A>
__device__ __noinline__ PointwiseSums<A> pointwise_pass(const ChunkView<S, T, P, kVec>& v, const RowPlan<A>& plan,
                                                        const DivRow<A>& c, const PassCtx<A>& ctx) {
  PointwiseSums<A> s{A(0), A(0), A(0), A(0), A(0)};
  v.template for_each_pack<A>([&](const A (&x)[P], const A (&y)[P], int64_t) { pointwise_pack<D>(s, x, y, plan, c); });
  return row_reduce(s, CombineSums{}, ctx.sh, kSlotPointwise, ctx.cluster);
}

// The Bregman sums of the KLs, for the rows whose KL cancels.
template <Divergence D, class S, class T, int P, bool kVec, class A>
__device__ __noinline__ BregmanSums<A> refine_pass(const ChunkView<S, T, P, kVec>& v, const RowPlan<A>& plan,
                                                   const DivRow<A>& c, const PassCtx<A>& ctx) {
  BregmanSums<A> s{A(0), A(0)};
  v.template for_each_pack<A>([&](const A (&x)[P], const A (&y)[P], int64_t) { refine_pack<D>(s, x, y, plan, c); });
  return row_reduce(s, CombineSums{}, ctx.sh, kSlotRefine, ctx.cluster);
}

// Short rows (standardized): G and S of the per-element terms of both inputs.
template <Divergence D, class S, class T, int P, bool kVec, class A>
__device__ __noinline__ TermSums<A> terms_pass(const ChunkView<S, T, P, kVec>& v, const RowPlan<A>& plan,
                                               const DivRow<A>& c, const PassWants& w, const PassCtx<A>& ctx) {
  TermSums<A> s{A(0), A(0), A(0), A(0)};
  v.template for_each_pack<A>(
      [&](const A (&x)[P], const A (&y)[P], int64_t) { terms_pack<D>(s, x, y, plan, c, w.gx, w.gy); });
  return row_reduce(s, CombineSums{}, ctx.sh, kSlotTerms, ctx.cluster);
}

// ----------------------------------------------------------------------------------------------
// The gradients of the chunk into gx, gy (the chunk's gradient rows; nullptr: not requested).
template <Divergence D, bool kStd, bool kTerms, Want kGx, Want kGy, Want kLabels, class S, class T, int P, bool kVec,
          class A>
__device__ __noinline__ void grads_pass(const ChunkView<S, T, P, kVec>& v, const RowPlan<A>& plan, const DivRow<A>& c,
                                        const GradRow<A>& coefficients, const PassWants& w, S* gx, T* gy) {
  const bool want_x = wanted<kGx>(w.gx), want_y = wanted<kGy>(w.gy), labels = wanted<kLabels>(w.labels);
  const GradRow<A> g = coefficients;  // (in registers: not reloaded from the caller's stack in the loop)
  constexpr int kUnroll = unroll<D>(kGx, kGy, kLabels);
  v.template for_each_pack<A, kUnroll>([&](const A (&x)[P], const A (&y)[P], int64_t e) {
    A ox[P], oy[P];
    grads_pack<D, kStd, kTerms>(ox, oy, x, y, plan, c, g, want_x, want_y, labels, w.label_local - e);
    if (want_x) store_global_pack<S, P, kVec>(gx + e, ox);
    if (want_y) store_global_pack<T, P, kVec>(gy + e, oy);
  });
}

// The sums and the gradient passes of a row, with the switches compiled in for the common launches
// (16-byte packs, the student's gradient only, with or without labels), else read at run time.
template <Divergence D, bool kStd, class S, class T, int P, bool kVec, class A>
__device__ __forceinline__ PhaseSums<A> row_sums(const ChunkView<S, T, P, kVec>& v, const RowPlan<A>& plan,
                                                 const PassWants& w, const PassCtx<A>& ctx) {
  constexpr Want kYes = Want::kYes, kNo = Want::kNo, kAny = Want::kRuntime;
  if (kVec && w.gx && !w.gy) {
    return w.labels ? sums_pass<D, kStd, kYes, kNo, kYes>(v, plan, w, ctx) : sums_pass<D, kStd, kYes, kNo, kNo>(v, plan, w, ctx);
  }
  return sums_pass<D, kStd, kAny, kAny, kAny>(v, plan, w, ctx);
}

// terms: the terms form of the chain rule (short rows), else the sums form.
template <Divergence D, bool kStd, class S, class T, int P, bool kVec, class A>
__device__ __forceinline__ void row_grads(const ChunkView<S, T, P, kVec>& v, const RowPlan<A>& plan, const DivRow<A>& c,
                                          const GradRow<A>& g, const PassWants& w, bool terms, S* gx, T* gy) {
  constexpr Want kYes = Want::kYes, kNo = Want::kNo, kAny = Want::kRuntime;
  if (kStd && terms) {
    grads_pass<D, kStd, true, kAny, kAny, kAny>(v, plan, c, g, w, gx, gy);
  } else if (kVec && w.gx && !w.gy && !w.labels) {
    grads_pass<D, kStd, false, kYes, kNo, kNo>(v, plan, c, g, w, gx, gy);
  } else if (kVec && w.gx && !w.gy) {
    grads_pass<D, kStd, false, kYes, kNo, kYes>(v, plan, c, g, w, gx, gy);
  } else {
    grads_pass<D, kStd, false, kAny, kAny, kAny>(v, plan, c, g, w, gx, gy);
  }
}

}  // namespace cuda
}  // namespace logitstd
