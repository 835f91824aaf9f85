// The per-row decisions of the CUDA kernel between its passes, in host and device code: which
// statistics passes a row takes and its plan, its divergence (with the pointwise or the Bregman
// pass where needed), its loss, and its gradient coefficients. The passes themselves are callables
// (the kernel's loops and reductions on the device; tests/kernels/cuda_emulation.cpp's on the host),
// so both run this code in the same order.
#pragma once

#include "phase_grads.h"

// Templates of host and device code that call the caller's device-only (or host-only) callables.
#if defined(__CUDACC__)
#define LOGITSTD_EXEC_CHECK_DISABLE _Pragma("nv_exec_check_disable")
#else
#define LOGITSTD_EXEC_CHECK_DISABLE
#endif

namespace logitstd {

// The statistics passes a row may take: shifted sums (standardized rows), the exact max and min
// (rows without standardization; standardized rows whose bounds leave the magnitude scale open),
// the shifted sums of c v (standardized rows of extreme magnitude).
enum class StatsPass : int { kSums, kExact, kScaled };

// The row's plan: stats(pass, cx, cy) runs one statistics pass over the row and returns its merged
// RowMoments (moments around c times the row's first element, x0 and y0 here).
LOGITSTD_EXEC_CHECK_DISABLE
template <bool kStd, class A, class Stats>
LOGITSTD_HD RowPlan<A> row_plan(Stats&& stats, A x0, A y0, A dof, A eps, A tau_s, A tau_t, A classes) {
  RowMoments<A> m = stats(kStd ? StatsPass::kSums : StatsPass::kExact, A(1), A(1));
  A cx = magnitude_scale(m.x.max, m.x.min), cy = magnitude_scale(m.y.max, m.y.min);
  if (kStd) {
    cx = magnitude_scale_within(m.lo_x, m.hi_x);
    cy = magnitude_scale_within(m.lo_y, m.hi_y);
    if (cx == A(0) || cy == A(0)) {  // rare: the exact max |v|
      const RowMoments<A> e = stats(StatsPass::kExact, A(1), A(1));
      cx = magnitude_scale(e.x.max, e.x.min);
      cy = magnitude_scale(e.y.max, e.y.min);
    }
    if (cx != A(1) || cy != A(1)) {  // rare: the moments of c v (their max: c max v, exactly)
      const RowMoments<A> s = stats(StatsPass::kScaled, cx, cy);
      m.x = Moments<A>{s.x.n, s.x.mean, s.x.m2, m.x.max, m.x.min};
      m.y = Moments<A>{s.y.n, s.y.mean, s.y.m2, m.y.max, m.y.min};
    }
  }
  m.x.max *= cx;
  m.y.max *= cy;
  const RowStats<A> sx = finalize_moments(m.x, cx, x0 * cx, dof, eps, kStd);
  const RowStats<A> sy = finalize_moments(m.y, cy, y0 * cy, dof, eps, kStd);
  return make_row_plan(sx, sy, tau_s, tau_t, kStd, classes, ExpUnits<A>::kInvUnit);
}

// The row's divergence (natural units): jsd and tvd from pointwise() (their pass; it also gives
// c.eq, c.ep and pw for the gradients); the KLs from the sums, refined by refine() (the Bregman
// pass: BregmanSums) for the rows where they cancel, c.kl_f / c.kl_r updated.
LOGITSTD_EXEC_CHECK_DISABLE
template <Divergence D, class A, class Pointwise, class Refine>
LOGITSTD_HD A row_divergence(const PhaseSums<A>& sums, DivRow<A>& c, PointwiseSums<A>& pw, Pointwise&& pointwise,
                             Refine&& refine) {
  if (is_pointwise(D)) {
    pw = pointwise();
    c.eq = pw.eq;
    c.ep = pw.ep;
    return pw.loss;
  }
  const bool rf = has_forward(D) && kl_needs_refinement(forward_sums(sums), c.unit);
  const bool rr = has_reverse(D) && reverse_needs_refinement(forward_sums(sums), reverse_sums(sums), c.unit);
  if (rf || rr) {  // rare: high temperatures, a student close to its teacher
    const BregmanSums<A> b = refine();
    if (rf) c.kl_f = b.f;
    if (rr) c.kl_r = b.r;
  }
  return c.kl_f + c.kl_r;  // (0 for the KL the divergence does not have)
}

// What the loss and the gradients of a row need from the launch.
template <class A>
struct RowSettings {
  A classes, dof, eps, tau_s, tau_t, smoothing, ce_weight, kd_weight, grad_scale;
  bool labels, label_ok;
};

// The row's objective, CE and KD parts (tau_s^2 D); x_label the student's logit at the label.
template <class A>
struct RowLoss {
  A objective, ce, kd;
};

template <class A>
LOGITSTD_HD RowLoss<A> row_loss_of(A divergence, const PhaseSums<A>& sums, const RowPlan<A>& plan, A x_label,
                                   const RowSettings<A>& o) {
  using E = ExpUnits<A>;
  RowLoss<A> r{A(0), A(0), refined_row_loss(divergence, o.tau_s)};
  if (o.labels) {
    const A sz = m_fma(o.label_ok ? x_label : A(NAN), plan.ex.c, -plan.ex.max) * plan.kz;
    r.ce = row_ce(ce_sums_of(sums), sz, E::exp(sz), o.smoothing, o.classes, E::kUnit);
  }
  r.objective = row_objective(r.ce, r.kd, o.ce_weight, o.kd_weight, o.labels);
  return r;
}

// The gradient pass's coefficients: the terms form (ts: the terms pass's sums, short rows) or the
// sums form (docs/design.md section 1); the CE's (a NaN row for a label outside [0, V)).
template <bool kStd, class A>
LOGITSTD_HD GradRow<A> grad_row(const PhaseSums<A>& sums, const PointwiseSums<A>& pw, const DivRow<A>& c,
                                const RowPlan<A>& plan, const RowSettings<A>& o, bool terms, const TermSums<A>& ts) {
  const A scale_x = o.grad_scale * o.kd_weight * o.tau_s;
  const A scale_y = o.grad_scale * o.kd_weight * o.tau_s * o.tau_s / o.tau_t;
  GradRow<A> g;
  if (terms) {
    g.cx = terms_coefficients(term_coefficients(ts.gx, ts.sx, o.classes, plan.sx, o.dof, scale_x, kStd, o.eps));
    g.cy = terms_coefficients(term_coefficients(ts.gy, ts.sy, o.classes, plan.sy, o.dof, scale_y, kStd, o.eps));
  } else {
    g.cx = chain_coefficients(student_chain_sum(c, sums, pw), scale_x, plan.sx, plan.mean_x, o.dof, kStd, c.rza, -c.rzb);
    g.cy = chain_coefficients(teacher_chain_sum(c, sums, pw), scale_y, plan.sy, plan.mean_y, o.dof, kStd, -c.rza, c.rzb);
  }
  const CeSums<A> ce = ce_sums_of(sums);
  const A ce_scale = o.label_ok ? o.grad_scale * o.ce_weight : A(NAN);
  g.ce = CeCoef<A>{ce_scale / ce.zc, -ce_scale * o.smoothing / o.classes,
                   ce_scale * ce_label_grad(ce, o.smoothing, o.classes)};
  return g;
}

}  // namespace logitstd
