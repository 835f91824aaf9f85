// The math of the CUDA kernel's passes over a row, per element and per row, in host and device code
// (tests/kernels/cuda_emulation.cpp runs the same functions on the CPU in the kernel's order). The
// design is the Triton blocked kernel's (docs/design.md section 5), on top of row_math.h and
// divergence.h:
//
//   statistics  per thread, sums of d = v - shift and d^2 around the thread's first element
//               (ShiftedSums: two adds and an FMA per element, no division), turned into moments
//               once per thread and merged across threads by Chan's formula (moments.h); the
//               magnitude scale from bounds of max |v| (no minimum per element);
//   exponents   e0 = c v - max(c v) (one FMA, <= 0, exactly 0 at the max) and s = e0 K + B (one
//               FMA; B = 0 but for the rows of note (a)), e^s = 2^s in float (ex2.approx);
//   sums        the partition sums, the KLs' sums and the standardization's sums (PhaseSums);
//   gradients   (phase_grads.h) a few FMAs of per-row coefficients (GradCoef): term A + e0 C + D
//               per element, the forward KL's student gradient as ea A/Za - eb A/Zb + e0 C + D.
//
// (a) Without standardization, a row of extreme magnitude (scale c != 1) has both exponentials
// shifted down by log2(2V) (B < 0): sums of e^sb (sb - sa) cannot overflow where |sb - sa| nears
// the float range, and every ratio is unchanged.
#pragma once

#include <cmath>

#include "row_math.h"
#include "divergence.h"

namespace logitstd {

// Exponentials in "exponent units": e^(unit * s) = exp(s) of the policy; float uses 2^s (one
// MUFU.EX2 on the device), double uses e^s.
template <class A>
struct ExpUnits;

template <>
struct ExpUnits<float> {
  static constexpr float kUnit = 0.693147180559945309f;     // ln 2: 2^s = e^(kUnit s)
  static constexpr float kInvUnit = 1.442695040888963407f;  // log2 e
  LOGITSTD_HD static float exp(float s) {
#if defined(__CUDA_ARCH__)
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(s));
    return r;
#else
    return std::exp2(s);
#endif
  }
};

template <>
struct ExpUnits<double> {
  static constexpr double kUnit = 1.0;
  static constexpr double kInvUnit = 1.0;
  LOGITSTD_HD static double exp(double s) { return ::exp(s); }
};

// ---------------------------------------------------------------------------------------------
// Statistics. One thread's sums of d = c v - shift and d^2 over its elements (shift: c times its
// first element), with the max of c v (standardized rows), or only the max and the min (rows
// without standardization, and the rare exact pass of a standardized row, see
// magnitude_scale_within).
template <class A>
struct ShiftedSums {
  A shift, s1, s2, max, min;
};

template <class A>
LOGITSTD_HD ShiftedSums<A> start_shifted(A shift) {
  return ShiftedSums<A>{shift, A(0), A(0), -static_cast<A>(INFINITY), static_cast<A>(INFINITY)};
}

// kSums: the sums (standardization); else the max and the min. kScaled: the pass over c v of a row
// of extreme magnitude (only the sums: its max is c times the first pass's, exactly).
template <bool kSums, bool kScaled, class A>
LOGITSTD_HD void add_stat(ShiftedSums<A>& s, A v, A c) {
  if (!kScaled) s.max = nan_max(s.max, v);
  if (kSums) {
    const A d = kScaled ? m_fma(v, c, -s.shift) : v - s.shift;
    s.s1 += d;
    s.s2 = m_fma(d, d, s.s2);
  } else if (!kScaled) {
    s.min = nan_min(s.min, v);
  }
}

// The row's moments of both inputs and bounds lo <= max |c v| <= hi of each (merged by max).
template <class A>
struct RowMoments {
  Moments<A> x, y;
  A lo_x, hi_x, lo_y, hi_y;
};

template <class A>
LOGITSTD_HD RowMoments<A> empty_row_moments() {
  return RowMoments<A>{empty_moments<A>(), empty_moments<A>(), A(0), A(0), A(0), A(0)};
}

template <class A>
LOGITSTD_HD RowMoments<A> merge_row_moments(const RowMoments<A>& a, const RowMoments<A>& b) {
  return RowMoments<A>{merge_moments(a.x, b.x), merge_moments(a.y, b.y), nan_max(a.lo_x, b.lo_x),
                       nan_max(a.hi_x, b.hi_x), nan_max(a.lo_y, b.lo_y), nan_max(a.hi_y, b.hi_y)};
}

// One thread's moments from its n elements' ShiftedSums, around the row's shift (c times the row's
// first element, moments.h), with the bounds of its largest magnitude: from the sums,
// max(|max|, |shift|) <= max |v| <= |shift| + sqrt(s2) (both elements of the row; every
// |v - shift| <= sqrt(s2)); from the max and the min, exact.
template <class A>
LOGITSTD_HD void thread_moments(const ShiftedSums<A>& s, A n, A row_shift, bool sums, Moments<A>& m, A& lo, A& hi) {
  if (n == A(0)) {
    m = empty_moments<A>();
    lo = hi = A(0);
  } else if (sums) {
    const A mean_d = s.s1 / n;
    m = Moments<A>{n, (s.shift - row_shift) + mean_d, nan_max(s.s2 - s.s1 * mean_d, A(0)), s.max, s.min};
    lo = nan_max(m_abs(s.max), m_abs(s.shift));
    hi = m_abs(s.shift) + m_sqrt(s.s2);
  } else {
    m = Moments<A>{n, A(0), A(0), s.max, s.min};
    lo = hi = nan_max(m_abs(s.max), m_abs(s.min));
  }
}

// ---------------------------------------------------------------------------------------------
// What the passes after the statistics need of a row: e0 = fma(v, c, -max) (<= 0, exactly 0 at
// the max) and the exponent s = fma(e0, k, bias).
template <class A>
struct Exponent {
  A c, max, k, bias;
};

template <class A>
struct RowPlan {
  RowStats<A> sx, sy;
  Exponent<A> ex, ey;
  A mean_x, mean_y;  // the mean of e0 (centered logit: e0 - mean)
  A kz;              // the CE's exponent (x - max x) / unit = e0x kz
};

// sx, sy: the finalized statistics (moments.h); classes = V.
template <class A>
LOGITSTD_HD RowPlan<A> make_row_plan(const RowStats<A>& sx, const RowStats<A>& sy, A tau_s, A tau_t, bool standardize,
                                     A classes, A inv_unit) {
  RowPlan<A> p;
  p.sx = sx;
  p.sy = sy;
  const bool shift_down = !standardize && (sx.scale != A(1) || sy.scale != A(1));  // note (a)
  const A bias = shift_down ? -m_log(A(2) * classes) * inv_unit : A(0);
  p.ex = Exponent<A>{sx.scale, sx.max, inv_unit / (sx.s * tau_s), bias};
  p.ey = Exponent<A>{sy.scale, sy.max, inv_unit / (sy.s * tau_t), bias};
  p.mean_x = sx.mean - (sx.max - sx.shift);
  p.mean_y = sy.mean - (sy.max - sy.shift);
  p.kz = inv_unit / sx.scale;
  return p;
}

// One element's centered logits, exponents and exponentials.
template <class A>
struct Elem {
  A e0x, e0y, da, db, ea, eb;
};

template <class A>
LOGITSTD_HD Elem<A> element(A x, A y, const RowPlan<A>& p) {
  Elem<A> e;
  e.e0x = m_fma(x, p.ex.c, -p.ex.max);
  e.e0y = m_fma(y, p.ey.c, -p.ey.max);
  e.da = m_fma(e.e0x, p.ex.k, p.ex.bias);
  e.db = m_fma(e.e0y, p.ey.k, p.ey.bias);
  e.ea = ExpUnits<A>::exp(e.da);
  e.eb = ExpUnits<A>::exp(e.db);
  return e;
}

// ---------------------------------------------------------------------------------------------
// The sums pass (blocks of a row add).
template <class A>
struct PhaseSums {
  A za, zb;            // partition sums
  A tf, tfa;           // forward KL: sum eb delta, sum eb |delta|   (delta = db - da)
  A tr, tra;           // reverse KL: sum ea delta, sum ea |delta|
  A sxa, sxb, sxr;     // the student's standardization: sum ea e0x, sum eb e0x, sum ea delta e0x
  A syb, syf, sya;     // the teacher's: sum eb e0y, sum eb delta e0y, sum ea e0y
  A zo, lt, ltx, zs;   // CE: sum e^sz but the label's pack, that pack's sum, without the label; sum sz
};

template <class A>
LOGITSTD_HD PhaseSums<A> zero_phase_sums() {
  const A z = A(0);
  return PhaseSums<A>{z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z};
}

template <class A>
LOGITSTD_HD PhaseSums<A> add_phase_sums(const PhaseSums<A>& a, const PhaseSums<A>& b) {
  return PhaseSums<A>{a.za + b.za,   a.zb + b.zb,   a.tf + b.tf,   a.tfa + b.tfa, a.tr + b.tr,   a.tra + b.tra,
                      a.sxa + b.sxa, a.sxb + b.sxb, a.sxr + b.sxr, a.syb + b.syb, a.syf + b.syf, a.sya + b.sya,
                      a.zo + b.zo,   a.lt + b.lt,   a.ltx + b.ltx, a.zs + b.zs};
}

// delta = db - da of an element, as the forward (df) and the reverse (dr) KL's sums use it. Without
// standardization a -inf logit is finite data: delta is clamped to the finite range (df from below,
// dr from above), so that where the exponential that multiplies it is 0 the product is 0 (a class
// -inf in both rows: NaN -> 0, fmax / fmin drop it); standardized, such a row is NaN anyway.
template <class A>
struct KlDeltas {
  A df, dr;
};

template <Divergence D, bool kStd, class A>
LOGITSTD_HD KlDeltas<A> kl_deltas(const Elem<A>& e) {
  const A delta = e.db - e.da;
  KlDeltas<A> k{delta, delta};
  if (!kStd && has_forward(D)) k.df = finite_floor(delta);
  if (!kStd && has_reverse(D)) k.dr = finite_ceil(delta);
  return k;
}

// The partition sums and the KLs' sums: tf = sum eb df, tfa = sum eb |df| (eb >= 0: sum |eb df|).
template <Divergence D, class A>
LOGITSTD_HD void add_kl_sums(PhaseSums<A>& s, const Elem<A>& e, const KlDeltas<A>& k) {
  s.za += e.ea;
  s.zb += e.eb;
  if (has_forward(D)) {
    s.tf = m_fma(e.eb, k.df, s.tf);
    s.tfa = m_fma(e.eb, m_abs(k.df), s.tfa);
  }
  if (has_reverse(D)) {
    s.tr = m_fma(e.ea, k.dr, s.tr);
    s.tra = m_fma(e.ea, m_abs(k.dr), s.tra);
  }
}

template <Divergence D, class A>
LOGITSTD_HD void add_student_sums(PhaseSums<A>& s, const Elem<A>& e, const KlDeltas<A>& k) {
  s.sxa = m_fma(e.ea, e.e0x, s.sxa);
  if (has_forward(D)) s.sxb = m_fma(e.eb, e.e0x, s.sxb);
  if (has_reverse(D)) s.sxr = m_fma(e.ea * k.dr, e.e0x, s.sxr);
}

template <Divergence D, class A>
LOGITSTD_HD void add_teacher_sums(PhaseSums<A>& s, const Elem<A>& e, const KlDeltas<A>& k) {
  s.syb = m_fma(e.eb, e.e0y, s.syb);
  if (has_forward(D)) s.syf = m_fma(e.eb * k.df, e.e0y, s.syf);
  if (has_reverse(D)) s.sya = m_fma(e.ea, e.e0y, s.sya);
}

// The row's KLs and divergence constants from the sums (divergence.h: KL = unit t / Zb + lz,
// RKL = -unit sum ea delta / Za - lz), and whether each KL needs its Bregman form.
template <class A>
LOGITSTD_HD RowSums<A> forward_sums(const PhaseSums<A>& s) {
  return RowSums<A>{s.za, s.zb, s.tf, s.tfa};
}

template <class A>
LOGITSTD_HD ReverseSums<A> reverse_sums(const PhaseSums<A>& s) {
  return ReverseSums<A>{-s.tr, s.tra};
}

template <class A>
LOGITSTD_HD DivRow<A> make_div_row(Divergence div, A beta, const PhaseSums<A>& s, A unit) {
  DivRow<A> r{div, beta, A(1) / s.za, A(1) / s.zb, m_log(s.za / s.zb), unit, A(0), A(0), A(0), A(0)};
  if (has_forward(div)) r.kl_f = kl_cross_term(forward_sums(s), unit) + r.lz;
  if (has_reverse(div)) r.kl_r = reverse_kl(forward_sums(s), reverse_sums(s), unit);
  return r;
}

// ln p - ln q of an element (natural units).
template <class A>
LOGITSTD_HD A log_ratio(const Elem<A>& e, const DivRow<A>& c) {
  return m_fma(e.db - e.da, c.unit, c.lz);
}

// The Bregman terms of an element: p phi(ln q - ln p) (forward), q phi(ln p - ln q) (reverse).
template <class A>
LOGITSTD_HD A forward_bregman(const Elem<A>& e, const DivRow<A>& c) {
  return bregman_term(e.ea, e.eb, A(0) - log_ratio(e, c), c.rza, c.rzb);
}

template <class A>
LOGITSTD_HD A reverse_bregman(const Elem<A>& e, const DivRow<A>& c) {
  return bregman_term(e.eb, e.ea, log_ratio(e, c), c.rzb, c.rza);
}

// The pointwise divergences' pass (jsd, tvd): the loss and E_q g, E_p h (divergence.h), and the
// standardization's sums of their terms, sum q g e0x and sum p h e0y.
template <class A>
struct PointwiseSums {
  A loss, eq, ep, eqx, epy;
};

template <class A>
LOGITSTD_HD PointwiseSums<A> add_pointwise_sums(const PointwiseSums<A>& a, const PointwiseSums<A>& b) {
  return PointwiseSums<A>{a.loss + b.loss, a.eq + b.eq, a.ep + b.ep, a.eqx + b.eqx, a.epy + b.epy};
}

template <class A>
LOGITSTD_HD void add_pointwise(PointwiseSums<A>& s, const Elem<A>& e, const DivRow<A>& c) {
  const A q = e.ea * c.rza, p = e.eb * c.rzb;
  const PointwiseTerms<A> t = pointwise_terms(c.div, q, p, log_ratio(e, c), c.beta);
  const A qg = q * t.g, ph = p * t.h;
  s.loss += t.loss;
  s.eq += qg;
  s.ep += ph;
  s.eqx = m_fma(qg, e.e0x, s.eqx);
  s.epy = m_fma(ph, e.e0y, s.epy);
}

// ---------------------------------------------------------------------------------------------
// The objective's CE over the raw student row, sz = e0x kz (row_math.h, CeSums), one pack of P
// elements at a time: li is the label's index in the pack (outside [0, P): not this pack), whose
// pack is summed apart (PhaseSums: zo, lt, ltx), so E = sum over the other classes never cancels.
template <int P, class A>
LOGITSTD_HD void add_ce_pack(PhaseSums<A>& s, const A (&e0x)[P], A kz, int64_t li) {
  A ez[P];
  A z = A(0);
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const A sz = e0x[i] * kz;
    ez[i] = ExpUnits<A>::exp(sz);
    z += ez[i];
    s.zs += sz;
  }
  if (li >= 0 && li < P) {
    s.lt += z;
#pragma unroll
    for (int i = 0; i < P; ++i) {
      if (i != li) s.ltx += ez[i];
    }
  } else {
    s.zo += z;
  }
}

template <class A>
LOGITSTD_HD CeSums<A> ce_sums_of(const PhaseSums<A>& s) {
  return CeSums<A>{s.zo + s.lt, s.zs, s.zo + s.ltx};
}

// ---------------------------------------------------------------------------------------------
// The passes' bodies, one pack of P consecutive elements (x, y in A) at a time, in the order the
// CUDA kernel runs them; the flags are compile-time constants there for the common launches.
template <bool kSums, bool kScaled, int P, class A>
LOGITSTD_HD void stats_pack(ShiftedSums<A>& sx, ShiftedSums<A>& sy, const A (&x)[P], const A (&y)[P], A cx, A cy) {
#pragma unroll
  for (int i = 0; i < P; ++i) {
    add_stat<kSums, kScaled>(sx, x[i], cx);
    add_stat<kSums, kScaled>(sy, y[i], cy);
  }
}

// student, teacher: the standardization's sums of each (kStd only); li: the label's index in the
// pack (labels: the CE's sums).
template <Divergence D, bool kStd, int P, class A>
LOGITSTD_HD void sums_pack(PhaseSums<A>& s, const A (&x)[P], const A (&y)[P], const RowPlan<A>& plan, bool student,
                           bool teacher, bool labels, int64_t li) {
  A e0x[P];
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const Elem<A> el = element(x[i], y[i], plan);
    const KlDeltas<A> k = kl_deltas<D, kStd>(el);
    add_kl_sums<D>(s, el, k);
    if (kStd && student) add_student_sums<D>(s, el, k);
    if (kStd && teacher) add_teacher_sums<D>(s, el, k);
    e0x[i] = el.e0x;
  }
  if (labels) add_ce_pack<P>(s, e0x, plan.kz, li);
}

// c with its divergence D known at compile time (folds every has_forward(c.div) ... test).
template <Divergence D, class A>
LOGITSTD_HD DivRow<A> with_div(const DivRow<A>& c) {
  DivRow<A> r = c;
  r.div = D;
  return r;
}

template <Divergence D, int P, class A>
LOGITSTD_HD void pointwise_pack(PointwiseSums<A>& s, const A (&x)[P], const A (&y)[P], const RowPlan<A>& plan,
                                const DivRow<A>& c) {
  const DivRow<A> cd = with_div<D>(c);
#pragma unroll
  for (int i = 0; i < P; ++i) add_pointwise(s, element(x[i], y[i], plan), cd);
}

// The Bregman sums of the forward (f) and the reverse (r) KL.
template <class A>
struct BregmanSums {
  A f, r;
};

template <Divergence D, int P, class A>
LOGITSTD_HD void refine_pack(BregmanSums<A>& s, const A (&x)[P], const A (&y)[P], const RowPlan<A>& plan,
                             const DivRow<A>& c) {
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const Elem<A> el = element(x[i], y[i], plan);
    if (has_forward(D)) s.f += forward_bregman(el, c);
    if (has_reverse(D)) s.r += reverse_bregman(el, c);
  }
}

// How the reductions combine each pass's values (associative; the kernel applies them in a fixed order).
struct CombineMoments {
  template <class A>
  LOGITSTD_HD RowMoments<A> operator()(const RowMoments<A>& a, const RowMoments<A>& b) const {
    return merge_row_moments(a, b);
  }
};
struct CombineSums {
  template <class A>
  LOGITSTD_HD PhaseSums<A> operator()(const PhaseSums<A>& a, const PhaseSums<A>& b) const {
    return add_phase_sums(a, b);
  }
  template <class A>
  LOGITSTD_HD PointwiseSums<A> operator()(const PointwiseSums<A>& a, const PointwiseSums<A>& b) const {
    return add_pointwise_sums(a, b);
  }
  template <class A>
  LOGITSTD_HD BregmanSums<A> operator()(const BregmanSums<A>& a, const BregmanSums<A>& b) const {
    return BregmanSums<A>{a.f + b.f, a.r + b.r};
  }
  template <class A>
  LOGITSTD_HD TermSums<A> operator()(const TermSums<A>& a, const TermSums<A>& b) const {
    return add_term_sums(a, b);
  }
};

}  // namespace logitstd
