// The fused kernel of logitstd::fused_kd_forward and the row-scaling kernel of logitstd::scale_rows_
// (host launch code in kd_cuda.cu).
//
// Fused forward (kd_fused_kernel): one thread-block cluster of C CTAs per row (C = 1 for short
// rows); CTA q of the cluster owns the chunk [q * chunk, (q + 1) * chunk) of the row and copies it
// into shared memory (16-byte cp.async when the rows are 16-byte aligned), so each input element is
// read from device memory once. Then the passes of kd_phases.cuh over shared memory, each ending in
// a row reduction (warps, the CTA, the cluster's CTAs in rank order: every CTA gets the same bits):
//   statistics (again for the rare rows that need an exact max |v| or a magnitude scale), sums,
//   jsd / tvd: the pointwise pass, KLs that cancel: the Bregman pass (those rows only), short rows
//   (V <= kTermsMaxCols) with a gradient: the terms pass, and the gradients (16-byte stores).
// Math per element (docs/design.md sections 1, 6 and 8; logitstd/phase_math.h, on row_math.h and
// divergence.h, shared with the CPU kernel): e0 = c x - max(c x) (one FMA), the exponent e0 K + B
// (one FMA), 2^s by ex2.approx (float; exp in double), sums in the accumulation type A; the
// gradient a few FMAs of per-row coefficients. The divergence is a template parameter; whether the
// row is standardized, a runtime switch around whole passes (each pass compiled for both).
// Memory traffic per element: reads sizeof(x) + sizeof(y) bytes, writes sizeof(x) (student
// gradient) and/or sizeof(y) (teacher gradient): 6 bytes for bf16 with the student gradient, the
// floor of docs/design.md section 4. Rows too long for the shared memory of 16 CTAs (bf16 V >
// ~900k) are streamed: every pass stages its window of the chunk again (reads it from device memory).
//
// Row scaling (scale_rows_kernel): grad[r] *= scale[r]; a row whose scale is exactly 1 is skipped
// without touching its data (the common loss.backward() on a scalar loss). Traffic: 0 bytes for
// skipped rows, else reads and writes sizeof(grad) per element: 16-byte accesses (one pack of
// kScaleVecBytes / sizeof(grad) elements per thread and step) when the gradient is 16-byte aligned
// and V a multiple of the pack, so every row is; element by element otherwise.
#pragma once

#include <cstdint>
#include <type_traits>

#include "device_math.cuh"
#include "kd_phases.cuh"
#include "launch_config.h"
#include "logitstd/phase_row.h"
#include "reductions.cuh"

namespace logitstd {
namespace cuda {

struct KdCudaArgs {
  const void* x;
  const void* y;
  int64_t x_stride;
  int64_t y_stride;
  const bool* mask;
  const void* grad_scale;     // (1,) or (rows,) in the accumulation type, on the device
  int64_t grad_scale_stride;  // 0 for one factor, else 1
  bool zero_excluded;         // forward: excluded rows get loss 0 and zero gradients; else untouched
  void* loss;                 // nullptr: not written (gradient recomputation)
  void* grad_x;               // nullptr when not requested
  void* grad_y;
  int64_t cols;
  int64_t chunk;          // elements per CTA (a multiple of the pack size)
  int64_t window;         // elements staged at a time (>= chunk: the chunk stays resident)
  int64_t y_smem_offset;  // byte offset of the teacher's window in dynamic shared memory
  int cluster;            // CTAs per row
  bool from_terms;        // short rows: the chain rule from per-element terms (one more pass)
  bool standardize;
  const int64_t* labels;  // the objective's labels (nullptr: pure KD)
  int64_t ignore_index;
  double label_smoothing;
  double ce_weight;
  double kd_weight;
  void* ce_rows;  // the objective's parts per row (nullptr: not written)
  void* kd_rows;
  int64_t correction;
  double tau_s;
  double tau_t;
  double eps;
  double beta;  // the generalized JSD's beta
};

// CTAs per SM the register allocation must allow: kMinCtasPerSm for the KLs, kMinCtasPerSmHeavy for
// the divergences with more math per element (jsd, tvd, Jeffreys), 1 for float64 math (launch_config.h).
template <class S, class T, Divergence D>
constexpr int kMinCtas = std::is_same_v<acc_t<S, T>, double> ? 1
                         : (D == Divergence::kForwardKl || D == Divergence::kReverseKl) ? kMinCtasPerSm
                                                                                        : kMinCtasPerSmHeavy;

// This CTA's part of a row.
struct RowSlice {
  int64_t row, start, len;
  int rank;
  bool has_labels, label_ok;  // a label outside [0, V) (not ignore_index) gives a NaN row
  int64_t label;
};

__device__ __forceinline__ RowSlice row_slice(const KdCudaArgs& args) {
  RowSlice r;
  const unsigned cluster = static_cast<unsigned>(args.cluster);
  r.rank = static_cast<int>(blockIdx.x % cluster);
  r.row = blockIdx.x / cluster;
  r.start = r.rank * args.chunk;
  const int64_t rest = args.cols - r.start;
  r.len = rest <= 0 ? 0 : (rest < args.chunk ? rest : args.chunk);
  r.has_labels = args.labels != nullptr;
  r.label = r.has_labels ? args.labels[r.row] : 0;
  r.label_ok = !r.has_labels || (r.label >= 0 && r.label < args.cols);
  return r;
}

// Loss 0 and zero gradients of an excluded row (the forward), in every CTA of its cluster.
template <class S, class T, int P, bool kVec, class A>
__device__ void zero_row(const KdCudaArgs& args, const RowSlice& r) {
  if (r.rank == 0 && threadIdx.x == 0) {
    if (args.loss != nullptr) static_cast<A*>(args.loss)[r.row] = A(0);
    if (args.ce_rows != nullptr) static_cast<A*>(args.ce_rows)[r.row] = A(0);
    if (args.kd_rows != nullptr) static_cast<A*>(args.kd_rows)[r.row] = A(0);
  }
  A zeros[P];
#pragma unroll
  for (int i = 0; i < P; ++i) zeros[i] = A(0);
  const int64_t base = r.row * args.cols + r.start;
  for (int64_t e = static_cast<int64_t>(threadIdx.x) * P; e < r.len; e += static_cast<int64_t>(blockDim.x) * P) {
    if (args.grad_x != nullptr) store_global_pack<S, P, kVec>(static_cast<S*>(args.grad_x) + base + e, zeros);
    if (args.grad_y != nullptr) store_global_pack<T, P, kVec>(static_cast<T*>(args.grad_y) + base + e, zeros);
  }
}

// The launch's settings of a row (phase_row.h).
template <class A>
__device__ __forceinline__ RowSettings<A> row_settings(const KdCudaArgs& args, const RowSlice& r) {
  return RowSettings<A>{static_cast<A>(args.cols), static_cast<A>(args.cols - args.correction),
                        static_cast<A>(args.eps), static_cast<A>(args.tau_s), static_cast<A>(args.tau_t),
                        static_cast<A>(args.label_smoothing), static_cast<A>(args.ce_weight),
                        static_cast<A>(args.kd_weight),
                        static_cast<const A*>(args.grad_scale)[r.row * args.grad_scale_stride], r.has_labels,
                        r.label_ok};
}

// The rest of a row after its sums: the divergence (its own passes where needed), the loss (CTA 0),
// the gradient coefficients (the terms pass first for short rows) and the gradient pass.
template <Divergence D, bool kStd, class S, class T, int P, bool kVec, class A>
__device__ __noinline__ void finish_row(const KdCudaArgs& args, const RowSlice& r, const ChunkView<S, T, P, kVec>& v,
                                        const PassCtx<A>& ctx, const RowPlan<A>& plan, const PassWants& w,
                                        const PhaseSums<A>& sums) {
  const RowSettings<A> o = row_settings<A>(args, r);
  DivRow<A> c = make_div_row(D, static_cast<A>(args.beta), sums, ExpUnits<A>::kUnit);
  PointwiseSums<A> pw{A(0), A(0), A(0), A(0), A(0)};
  const A divergence = row_divergence<D>(
      sums, c, pw, [&] { return pointwise_pass<D>(v, plan, c, ctx); }, [&] { return refine_pass<D>(v, plan, c, ctx); });
  if (args.loss != nullptr && r.rank == 0 && threadIdx.x == 0) {
    const S* xrow = static_cast<const S*>(args.x) + r.row * args.x_stride;
    const RowLoss<A> l = row_loss_of(divergence, sums, plan, r.label_ok ? Conv<S>::template load<A>(xrow[r.label]) : A(0), o);
    static_cast<A*>(args.loss)[r.row] = l.objective;
    if (args.ce_rows != nullptr) static_cast<A*>(args.ce_rows)[r.row] = l.ce;
    if (args.kd_rows != nullptr) static_cast<A*>(args.kd_rows)[r.row] = l.kd;
  }
  if (w.gx || w.gy) {
    const bool terms = kStd && args.from_terms;  // short rows: the chain rule from per-element terms
    const TermSums<A> ts = terms ? terms_pass<D>(v, plan, c, w, ctx) : TermSums<A>{A(0), A(0), A(0), A(0)};
    const GradRow<A> g = grad_row<kStd>(sums, pw, c, plan, o, terms, ts);
    // Other CTAs may still read this CTA's slots: arrive now, wait before exiting (overlaps the pass).
    if (ctx.cluster > 1) cluster_arrive();
    const int64_t out = r.row * args.cols + r.start;
    row_grads<D, kStd>(v, plan, c, g, w, terms, w.gx ? static_cast<S*>(args.grad_x) + out : nullptr,
                       w.gy ? static_cast<T*>(args.grad_y) + out : nullptr);
  } else if (ctx.cluster > 1) {
    cluster_arrive();
  }
  if (ctx.cluster > 1) cluster_wait();
}

// The passes of one row after its chunk is staged (kStd: standardized): statistics, sums, the rest.
template <Divergence D, bool kStd, class S, class T, int P, bool kVec, class A>
__device__ __noinline__ void fused_row(const KdCudaArgs& args, const RowSlice& r, const ChunkView<S, T, P, kVec>& v,
                                       const PassCtx<A>& ctx) {
  const A x0 = Conv<S>::template load<A>(static_cast<const S*>(args.x)[r.row * args.x_stride]);
  const A y0 = Conv<T>::template load<A>(static_cast<const T*>(args.y)[r.row * args.y_stride]);
  const RowSettings<A> o = row_settings<A>(args, r);
  const RowPlan<A> plan = row_plan<kStd>(
      [&](StatsPass pass, A cx, A cy) {
        if (pass == StatsPass::kSums) return stats_pass<true, false>(v, cx, cy, x0 * cx, y0 * cy, ctx, kSlotStats);
        if (pass == StatsPass::kExact) return stats_pass<false, false>(v, cx, cy, x0 * cx, y0 * cy, ctx, kSlotExact);
        return stats_pass<true, true>(v, cx, cy, x0 * cx, y0 * cy, ctx, kSlotScaled);
      },
      x0, y0, o.dof, o.eps, o.tau_s, o.tau_t, o.classes);
  const PassWants w{args.grad_x != nullptr, args.grad_y != nullptr, r.has_labels, r.label - r.start};
  finish_row<D, kStd>(args, r, v, ctx, plan, w, row_sums<D, kStd>(v, plan, w, ctx));
}

template <class S, class T, int P, bool kVec, Divergence D>
__global__ void __launch_bounds__(kThreads, kMinCtas<S, T, D>) kd_fused_kernel(const KdCudaArgs args) {
  using A = acc_t<S, T>;
  __shared__ SharedStorage<A> sh;
  extern __shared__ __align__(16) unsigned char s_chunk[];
  const RowSlice r = row_slice(args);
  if ((args.mask != nullptr && !args.mask[r.row]) || (r.has_labels && r.label == args.ignore_index)) {
    if (args.zero_excluded) zero_row<S, T, P, kVec, A>(args, r);  // (the same branch in every CTA of the cluster)
    return;
  }
  const ChunkView<S, T, P, kVec> v{static_cast<const S*>(args.x) + r.row * args.x_stride + r.start,
                                   static_cast<const T*>(args.y) + r.row * args.y_stride + r.start,
                                   shared_address(s_chunk), shared_address(s_chunk + args.y_smem_offset), r.len,
                                   args.window};
  if (v.resident()) v.template stage<true>(0, static_cast<int>(r.len / P));
  const PassCtx<A> ctx{sh, args.cluster};
  if (args.standardize) {
    fused_row<D, true>(args, r, v, ctx);
  } else {
    fused_row<D, false>(args, r, v, ctx);
  }
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
      load_global_pack<G, P, kVec>(g + j * P, v);
#pragma unroll
      for (int i = 0; i < P; ++i) v[i] *= factor;
      store_global_pack<G, P, kVec>(g + j * P, v);
    }
  }
}

}  // namespace cuda
}  // namespace logitstd
