// The CUDA kernel (csrc/cuda/kd_kernel.cuh) on the host, through the same headers: the same per-pack
// bodies (phase_math.h, phase_grads.h) and per-row decisions (phase_row.h), in the kernel's order.
// A row is split into C chunks of packs of P elements; thread t of a chunk owns its packs t, t + T,
// ... of each staged window; per-thread values are reduced by a warp shuffle tree, the CTA's warps in
// order, then the cluster's CTAs in rank order. Exponentials: exp2 (the kernel's ex2.approx) in
// float, exp in double. Only the device-specific parts differ: loads, stores, shared memory.
// tests/kernels/test_cpp_kernel.py compiles it and compares its results with the float64 reference.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "logitstd/phase_row.h"

using namespace logitstd;

namespace {

struct Launch {
  int64_t cols, chunk, window;
  int clusters, threads, pack;
};

// The kernel's plan (csrc/cuda/kd_cuda.cu, plan_launch): chunks of whole packs, 32..256 threads;
// window_packs > 0: a streamed row, staged window_packs packs at a time.
Launch make_launch(int64_t cols, int clusters, int pack, int64_t window_packs) {
  Launch l{cols, 0, 0, clusters, 0, pack};
  const int64_t packs = (cols + pack - 1) / pack, chunk_packs = (packs + clusters - 1) / clusters;
  l.chunk = chunk_packs * pack;
  l.window = window_packs > 0 ? std::min(l.chunk, window_packs * pack) : l.chunk;
  l.threads = static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, (chunk_packs + 31) / 32 * 32)));
  return l;
}

// f(e) for the packs thread t of CTA q owns, in its order; e: the pack's first element in the row.
template <class F>
void thread_packs(const Launch& l, int q, int t, F&& f) {
  const int64_t start = q * l.chunk, len = std::max<int64_t>(0, std::min(l.chunk, l.cols - start));
  for (int64_t w0 = 0; w0 < len; w0 += l.window) {
    const int64_t packs = std::min(l.window, len - w0) / l.pack;
    for (int64_t j = t; j < packs; j += l.threads) f(start + w0 + j * l.pack);
  }
}

// The row's value of the per-thread values value(q, t), in the kernel's reduction order.
template <class R, class Value, class Combine>
R reduce_row(const Launch& l, Value value, Combine combine) {
  R row{};
  for (int q = 0; q < l.clusters; ++q) {
    std::vector<R> v;
    for (int t = 0; t < l.threads; ++t) v.push_back(value(q, t));
    R cta{};
    for (int w = 0; w < l.threads / 32; ++w) {
      for (int off = 16; off > 0; off >>= 1) {
        for (int lane = 0; lane < off; ++lane) v[32 * w + lane] = combine(v[32 * w + lane], v[32 * w + lane + off]);
      }
      cta = w == 0 ? v[0] : combine(cta, v[32 * w]);
    }
    row = q == 0 ? cta : combine(row, cta);
  }
  return row;
}

template <class A>
struct Settings {
  int standardize, gx, gy;
  int64_t correction;
  double eps, tau_s, tau_t, grad_scale, ce_weight, kd_weight, smoothing, beta;
};

template <class A, Divergence D, bool kStd, int P>
void emulate_row(const Launch& l, const A* x, const A* y, const Settings<A>& s, const int64_t* label, A* loss, A* gx,
                 A* gy) {
  const bool labels = label != nullptr;
  const bool label_ok = !labels || (*label >= 0 && *label < l.cols);
  const RowSettings<A> o{A(l.cols), A(l.cols - s.correction), A(s.eps), A(s.tau_s), A(s.tau_t), A(s.smoothing),
                         A(s.ce_weight), A(s.kd_weight), A(s.grad_scale), labels, label_ok};
  auto packs = [&](int64_t e, A (&xp)[P], A (&yp)[P]) {
    for (int i = 0; i < P; ++i) xp[i] = x[e + i], yp[i] = y[e + i];
  };
  auto stats = [&](StatsPass pass, A cx, A cy) {
    return reduce_row<RowMoments<A>>(l, [&](int q, int t) {
      int64_t n = 0;
      thread_packs(l, q, t, [&](int64_t) { n += P; });
      const int64_t first = q * l.chunk + int64_t(t) * P;
      ShiftedSums<A> sx = start_shifted(n > 0 ? x[first] * cx : A(0)), sy = start_shifted(n > 0 ? y[first] * cy : A(0));
      thread_packs(l, q, t, [&](int64_t e) {
        A xp[P], yp[P];
        packs(e, xp, yp);
        if (pass == StatsPass::kSums) stats_pack<true, false>(sx, sy, xp, yp, cx, cy);
        if (pass == StatsPass::kExact) stats_pack<false, false>(sx, sy, xp, yp, cx, cy);
        if (pass == StatsPass::kScaled) stats_pack<true, true>(sx, sy, xp, yp, cx, cy);
      });
      RowMoments<A> m;
      thread_moments(sx, A(n), x[0] * cx, pass != StatsPass::kExact, m.x, m.lo_x, m.hi_x);
      thread_moments(sy, A(n), y[0] * cy, pass != StatsPass::kExact, m.y, m.lo_y, m.hi_y);
      return m;
    }, CombineMoments{});
  };
  // one pass over the row's packs with a per-thread accumulator of type R
  auto pass = [&](auto zero, auto body) {
    using R = decltype(zero);
    return reduce_row<R>(l, [&](int q, int t) {
      R acc = zero;
      thread_packs(l, q, t, [&](int64_t e) {
        A xp[P], yp[P];
        packs(e, xp, yp);
        body(acc, xp, yp, e - q * l.chunk, q);
      });
      return acc;
    }, CombineSums{});
  };
  const RowPlan<A> plan = row_plan<kStd>(stats, x[0], y[0], o.dof, o.eps, o.tau_s, o.tau_t, o.classes);
  const int64_t label_at = labels ? *label : 0;
  const PhaseSums<A> sums = pass(zero_phase_sums<A>(), [&](PhaseSums<A>& a, A (&xp)[P], A (&yp)[P], int64_t e, int q) {
    sums_pack<D, kStd>(a, xp, yp, plan, s.gx != 0, s.gy != 0, labels, label_at - q * l.chunk - e);
  });
  DivRow<A> c = make_div_row(D, A(s.beta), sums, ExpUnits<A>::kUnit);
  PointwiseSums<A> pw{A(0), A(0), A(0), A(0), A(0)};
  const A divergence = row_divergence<D>(
      sums, c, pw,
      [&] {
        return pass(PointwiseSums<A>{A(0), A(0), A(0), A(0), A(0)},
                    [&](PointwiseSums<A>& a, A (&xp)[P], A (&yp)[P], int64_t, int) { pointwise_pack<D>(a, xp, yp, plan, c); });
      },
      [&] {
        return pass(BregmanSums<A>{A(0), A(0)},
                    [&](BregmanSums<A>& a, A (&xp)[P], A (&yp)[P], int64_t, int) { refine_pack<D>(a, xp, yp, plan, c); });
      });
  *loss = row_loss_of(divergence, sums, plan, label_ok && labels ? x[label_at] : A(0), o).objective;
  if (!s.gx && !s.gy) return;
  const bool terms = kStd && l.cols <= 4096;  // kTermsMaxCols of csrc/cuda/launch_config.h
  TermSums<A> ts{A(0), A(0), A(0), A(0)};
  if (terms) {
    ts = pass(ts, [&](TermSums<A>& a, A (&xp)[P], A (&yp)[P], int64_t, int) {
      terms_pack<D>(a, xp, yp, plan, c, s.gx != 0, s.gy != 0);
    });
  }
  const GradRow<A> g = grad_row<kStd>(sums, pw, c, plan, o, terms, ts);
  for (int q = 0; q < l.clusters; ++q) {
    for (int t = 0; t < l.threads; ++t) {
      thread_packs(l, q, t, [&](int64_t e) {
        A xp[P], yp[P], ox[P], oy[P];
        packs(e, xp, yp);
        if (terms) {
          grads_pack<D, kStd, true>(ox, oy, xp, yp, plan, c, g, s.gx != 0, s.gy != 0, labels, label_at - e);
        } else {
          grads_pack<D, kStd, false>(ox, oy, xp, yp, plan, c, g, s.gx != 0, s.gy != 0, labels, label_at - e);
        }
        for (int i = 0; i < P; ++i) {
          if (s.gx) gx[e + i] = ox[i];
          if (s.gy) gy[e + i] = oy[i];
        }
      });
    }
  }
}

template <class A, Divergence D, int P>
void emulate_rows(const A* x, const A* y, int64_t rows, int64_t cols, int clusters, int64_t window_packs,
                  const Settings<A>& s, const int64_t* labels, A* loss, A* gx, A* gy) {
  const Launch l = make_launch(cols, clusters, P, window_packs);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t* label = labels != nullptr ? labels + r : nullptr;
    if (s.standardize) {
      emulate_row<A, D, true, P>(l, x + r * cols, y + r * cols, s, label, loss + r, gx + r * cols, gy + r * cols);
    } else {
      emulate_row<A, D, false, P>(l, x + r * cols, y + r * cols, s, label, loss + r, gx + r * cols, gy + r * cols);
    }
  }
}

template <class A, int P>
void emulate_divergence(int divergence, const A* x, const A* y, int64_t rows, int64_t cols, int clusters,
                        int64_t window_packs, const Settings<A>& s, const int64_t* labels, A* loss, A* gx, A* gy) {
  switch (static_cast<Divergence>(divergence)) {
    case Divergence::kForwardKl: return emulate_rows<A, Divergence::kForwardKl, P>(x, y, rows, cols, clusters, window_packs, s, labels, loss, gx, gy);
    case Divergence::kReverseKl: return emulate_rows<A, Divergence::kReverseKl, P>(x, y, rows, cols, clusters, window_packs, s, labels, loss, gx, gy);
    case Divergence::kJsd: return emulate_rows<A, Divergence::kJsd, P>(x, y, rows, cols, clusters, window_packs, s, labels, loss, gx, gy);
    case Divergence::kJeffreys: return emulate_rows<A, Divergence::kJeffreys, P>(x, y, rows, cols, clusters, window_packs, s, labels, loss, gx, gy);
    case Divergence::kTvd: return emulate_rows<A, Divergence::kTvd, P>(x, y, rows, cols, clusters, window_packs, s, labels, loss, gx, gy);
  }
}

template <class A>
void emulate(int divergence, int pack, const A* x, const A* y, int64_t rows, int64_t cols, int clusters,
             int64_t window_packs, const Settings<A>& s, const int64_t* labels, A* loss, A* gx, A* gy) {
  if (pack == 8) return emulate_divergence<A, 8>(divergence, x, y, rows, cols, clusters, window_packs, s, labels, loss, gx, gy);
  if (pack == 4) return emulate_divergence<A, 4>(divergence, x, y, rows, cols, clusters, window_packs, s, labels, loss, gx, gy);
  if (pack == 2) return emulate_divergence<A, 2>(divergence, x, y, rows, cols, clusters, window_packs, s, labels, loss, gx, gy);
  emulate_divergence<A, 1>(divergence, x, y, rows, cols, clusters, window_packs, s, labels, loss, gx, gy);
}

}  // namespace

// rows x cols row-major inputs; the settings as the kernel's arguments; labels: nullptr (pure KD).
extern "C" {
void emulate_f32(int divergence, int pack, const float* x, const float* y, int64_t rows, int64_t cols, int clusters,
                 int64_t window_packs, int standardize, int64_t correction, double eps, double tau_s, double tau_t,
                 double grad_scale, int want_gx, int want_gy, const int64_t* labels, double ce_weight, double kd_weight,
                 double smoothing, double beta, float* loss, float* gx, float* gy) {
  const Settings<float> s{standardize, want_gx, want_gy, correction, eps, tau_s, tau_t, grad_scale, ce_weight,
                          kd_weight, smoothing, beta};
  emulate<float>(divergence, pack, x, y, rows, cols, clusters, window_packs, s, labels, loss, gx, gy);
}

void emulate_f64(int divergence, int pack, const double* x, const double* y, int64_t rows, int64_t cols,
                 int clusters, int64_t window_packs, int standardize, int64_t correction, double eps, double tau_s,
                 double tau_t, double grad_scale, int want_gx, int want_gy, const int64_t* labels, double ce_weight,
                 double kd_weight, double smoothing, double beta, double* loss, double* gx, double* gy) {
  const Settings<double> s{standardize, want_gx, want_gy, correction, eps, tau_s, tau_t, grad_scale, ce_weight,
                           kd_weight, smoothing, beta};
  emulate<double>(divergence, pack, x, y, rows, cols, clusters, window_packs, s, labels, loss, gx, gy);
}
}
