// The gradients of the CUDA kernel's passes (host and device code, like phase_math.h, which it
// builds on): the chain rule's sums and per-row coefficients, the per-element gradients, the terms
// pass of short rows and the objective's CE part.
#pragma once

#include "phase_math.h"

namespace logitstd {

// ---------------------------------------------------------------------------------------------
// Gradients. The sums form (long rows): S = sum term e0 of the student's and the teacher's
// per-element terms (divergence.h) from the sums (the terms sum to 0, so the shift of e0 cancels);
// pw: the pointwise pass's sums (jsd, tvd).
template <class A>
LOGITSTD_HD A student_chain_sum(const DivRow<A>& c, const PhaseSums<A>& s, const PointwiseSums<A>& pw) {
  if (is_pointwise(c.div)) return pw.eqx - pw.eq * s.sxa * c.rza;
  A r = A(0);
  if (has_forward(c.div)) r = s.sxa * c.rza - s.sxb * c.rzb;
  if (has_reverse(c.div)) r -= (m_fma(c.unit, s.sxr, c.lz * s.sxa) + c.kl_r * s.sxa) * c.rza;
  return r;
}

template <class A>
LOGITSTD_HD A teacher_chain_sum(const DivRow<A>& c, const PhaseSums<A>& s, const PointwiseSums<A>& pw) {
  if (is_pointwise(c.div)) return pw.epy - pw.ep * s.syb * c.rzb;
  A r = A(0);
  if (has_forward(c.div)) r = (m_fma(c.unit, s.syf, c.lz * s.syb) - c.kl_f * s.syb) * c.rzb;
  if (has_reverse(c.div)) r += s.syb * c.rzb - s.sya * c.rza;
  return r;
}

// Per element: out = term a + x c + d, x = e0 (sums form) or e0 - mean (terms form, the dev of
// row_math.h's term_coefficients); a_ea, a_eb: the forward KL's student (and the reverse KL's
// teacher) gradient as ea a_ea + eb a_eb + x c + d (sums form).
template <class A>
struct GradCoef {
  A a, c, d, a_ea, a_eb;
};

// The sums form: a = scale c_v / s, c = -a S / (dof sigma s) (0 for a constant row, and without
// standardization), d = -c mean (docs/design.md section 1). scale: grad_scale kd_weight tau_s
// (student) or grad_scale kd_weight tau_s^2 / tau_t (teacher); rz_a, rz_b: the linear form's 1/Za
// and -1/Zb (student) or -1/Za and 1/Zb (teacher).
template <class A>
LOGITSTD_HD GradCoef<A> chain_coefficients(A S, A scale, const RowStats<A>& st, A mean, A dof, bool standardize,
                                            A rz_a, A rz_b) {
  GradCoef<A> g;
  g.a = scale * st.scale / st.s;
  g.c = standardize && st.sigma > A(0) ? -g.a * S / (dof * st.sigma * st.s) : A(0);
  g.d = -g.c * mean;
  g.a_ea = g.a * rz_a;
  g.a_eb = g.a * rz_b;
  return g;
}

// The terms form (short rows) from row_math.h's TermCoef: a g - b dev - a_mean.
template <class A>
LOGITSTD_HD GradCoef<A> terms_coefficients(const TermCoef<A>& t) {
  return GradCoef<A>{t.a, -t.b, -t.a_mean, A(0), A(0)};
}

// The divergence's per-element values the gradient passes need besides the exponentials: l = ln p -
// ln q and, for jsd and tvd, their g and h (divergence.h). c.div must be D.
template <class A>
struct ElemTerms {
  A lv, g, h;
};

template <Divergence D, class A>
LOGITSTD_HD ElemTerms<A> elem_terms(const Elem<A>& e, const DivRow<A>& c) {
  ElemTerms<A> t{log_ratio(e, c), A(0), A(0)};
  if (is_pointwise(D)) {
    const PointwiseTerms<A> pt = pointwise_terms(D, e.ea * c.rza, e.eb * c.rzb, t.lv, c.beta);
    t.g = pt.g;
    t.h = pt.h;
  }
  return t;
}

// The gradients of an element from its terms (kTerms: the terms form, x = e0 - mean; else the sums
// form, x = e0, with the linear form of the forward KL's student and the reverse KL's teacher).
// Without standardization (kStd false) there is no x term: a -inf logit must not give 0 * inf.
template <Divergence D, bool kStd, bool kTerms, class A>
LOGITSTD_HD A student_grad(const Elem<A>& e, const ElemTerms<A>& t, const DivRow<A>& c, const GradCoef<A>& g, A mean) {
  const A base = kStd ? m_fma(kTerms ? e.e0x - mean : e.e0x, g.c, g.d) : A(0);
  if (D == Divergence::kForwardKl && !kTerms) return m_fma(e.ea, g.a_ea, m_fma(e.eb, g.a_eb, base));
  return m_fma(student_div_term(c, e.ea, e.eb, t.lv, t.g), g.a, base);
}

template <Divergence D, bool kStd, bool kTerms, class A>
LOGITSTD_HD A teacher_grad(const Elem<A>& e, const ElemTerms<A>& t, const DivRow<A>& c, const GradCoef<A>& g, A mean) {
  const A base = kStd ? m_fma(kTerms ? e.e0y - mean : e.e0y, g.c, g.d) : A(0);
  if (D == Divergence::kReverseKl && !kTerms) return m_fma(e.eb, g.a_eb, m_fma(e.ea, g.a_ea, base));
  return m_fma(teacher_div_term(c, e.ea, e.eb, t.lv, t.h), g.a, base);
}

// The terms pass (short rows, standardized): G = sum term, S = sum term dev of both inputs.
template <Divergence D, class A>
LOGITSTD_HD void add_terms(TermSums<A>& s, const Elem<A>& e, const DivRow<A>& c, const RowPlan<A>& p, bool gx,
                           bool gy) {
  const ElemTerms<A> t = elem_terms<D>(e, c);
  if (gx) {
    const A g = student_div_term(c, e.ea, e.eb, t.lv, t.g);
    s.gx += g;
    s.sx = m_fma(g, e.e0x - p.mean_x, s.sx);
  }
  if (gy) {
    const A h = teacher_div_term(c, e.ea, e.eb, t.lv, t.h);
    s.gy += h;
    s.sy = m_fma(h, e.e0y - p.mean_y, s.sy);
  }
}

// The CE part of the student gradient: a e^sz + b, and l at the label (row_math.h, ce_label_grad).
template <class A>
struct CeCoef {
  A a, b, l;
};

template <int P, class A>
LOGITSTD_HD void add_ce_grad(A (&out)[P], const A (&e0x)[P], A kz, const CeCoef<A>& c, int64_t li) {
  A ce[P];
#pragma unroll
  for (int i = 0; i < P; ++i) ce[i] = m_fma(c.a, ExpUnits<A>::exp(e0x[i] * kz), c.b);
  if (li >= 0 && li < P) {
#pragma unroll
    for (int i = 0; i < P; ++i) ce[i] = i == li ? c.l : ce[i];
  }
#pragma unroll
  for (int i = 0; i < P; ++i) out[i] += ce[i];
}

// The per-row coefficients of the gradient pass.
template <class A>
struct GradRow {
  GradCoef<A> cx, cy;
  CeCoef<A> ce;
};

// The terms pass's body: G and S of the per-element terms of both inputs.
template <Divergence D, int P, class A>
LOGITSTD_HD void terms_pack(TermSums<A>& s, const A (&x)[P], const A (&y)[P], const RowPlan<A>& plan,
                            const DivRow<A>& c, bool gx, bool gy) {
#pragma unroll
  for (int i = 0; i < P; ++i) add_terms<D>(s, element(x[i], y[i], plan), with_div<D>(c), plan, gx, gy);
}

// The gradient pass's body: the student's (gx; plus the CE's, labels, li the label's index in the
// pack) and the teacher's (gy) gradients of a pack.
template <Divergence D, bool kStd, bool kTerms, int P, class A>
LOGITSTD_HD void grads_pack(A (&ox)[P], A (&oy)[P], const A (&x)[P], const A (&y)[P], const RowPlan<A>& plan,
                            const DivRow<A>& row, const GradRow<A>& g, bool gx, bool gy, bool labels, int64_t li) {
  const DivRow<A> c = with_div<D>(row);
  A e0x[P];
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const Elem<A> el = element(x[i], y[i], plan);
    const ElemTerms<A> t = elem_terms<D>(el, c);
    if (gx) ox[i] = student_grad<D, kStd, kTerms>(el, t, c, g.cx, plan.mean_x);
    if (gy) oy[i] = teacher_grad<D, kStd, kTerms>(el, t, c, g.cy, plan.mean_y);
    e0x[i] = el.e0x;
  }
  if (gx && labels) add_ce_grad<P>(ox, e0x, plan.kz, g.ce, li);
}

}  // namespace logitstd
