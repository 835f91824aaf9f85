// The fused kernel of logitstd::fused_kd_forward and the row-scaling kernel of logitstd::scale_rows_
// (host launch code in kd_cuda.cu).
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
#pragma once

#include <cstdint>
#include <type_traits>

#include "device_math.cuh"
#include "launch_config.h"
#include "logitstd/row_math.h"
#include "reductions.cuh"

namespace logitstd {
namespace cuda {

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

// The reduction buffers of one CTA: per reduction kind the warps' partial results, the CTA's
// result (read by the other CTAs of the cluster) and the row's.
template <class A>
struct SharedStorage {
  MomentsPair<A> warp_m[kWarps], cta_m, row_m;
  RowSums<A> warp_s[kWarps], cta_s, row_s;
  TermSums<A> warp_t[kWarps], cta_t, row_t;
  CeSums<A> warp_c[kWarps], cta_c, row_c;
  A warp_b[kWarps], cta_b, row_b;
};

// float64 math needs more registers than kMinCtasPerSm leaves (and is not the fast path).
template <class S, class T>
constexpr int kMinCtas = std::is_same_v<acc_t<S, T>, double> ? 1 : kMinCtasPerSm;

template <class S, class T, int P, bool kVec>
__global__ void __launch_bounds__(kThreads, kMinCtas<S, T>) kd_fused_kernel(const KdCudaArgs args) {
  using A = acc_t<S, T>;
  using E = ExpUnits<A>;
  __shared__ SharedStorage<A> sh;
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
    return row_reduce(m, sh.warp_m, &sh.cta_m, &sh.row_m, cluster);
  };
  MomentsPair<A> m = moments(A(1), A(1));
  const A scale_x = magnitude_scale(m.x.max, m.x.min);
  const A scale_y = magnitude_scale(m.y.max, m.y.min);
  if (scale_x != A(1) || scale_y != A(1)) {
#if defined(_CG_HAS_CLUSTER_GROUP)
    if (cluster > 1) cg::this_cluster().sync();  // other CTAs may still read sh.cta_m
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
  const RowSums<A> sums = row_reduce(part, sh.warp_s, &sh.cta_s, &sh.row_s, cluster);
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
    ce_sums = row_reduce(cpart, sh.warp_c, &sh.cta_c, &sh.row_c, cluster);
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
      row_value = refined_row_loss(row_reduce(bpart, sh.warp_b, &sh.cta_b, &sh.row_b, cluster), tau_s);
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
    const TermSums<A> ts = row_reduce(tpart, sh.warp_t, &sh.cta_t, &sh.row_t, cluster);
    if (cluster > 1) cluster_arrive();  // other CTAs may still read sh.cta_t: wait before exiting
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

  // Other CTAs may still read sh.cta_s: arrive now, wait before exiting (overlaps the gradient pass).
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

}  // namespace cuda
}  // namespace logitstd
