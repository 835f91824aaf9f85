"""Tests specific to the C++/CUDA extension ``logitstd_kernels._C``.

The shared backend matrix (tests/test_loss_matrix.py) runs the C++ CPU kernel like every other
fused backend. Here: gradcheck in float64 through ``backend="cpu"``, ``torch.library.opcheck`` of
the C++ ops, results independent of the thread count, bitwise determinism, the generic (non-AVX)
build of the CPU kernel, C++ input checks that name the offending tensor, the row scaling op, and
(marked ``gpu``) the CUDA kernel at the row lengths that select each launch plan.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import logitstd_kernels as lsk
from logitstd_kernels._backends import unavailable_reason
from support import check_against_reference, needs, require_all, require_or_skip

CPU_REASON = unavailable_reason("cpu", "cpu")
needs_cpu_kernel = needs(CPU_REASON is None, f"C++ CPU kernel: {CPU_REASON}")


def logits(rows: int, num_classes: int, device: str = "cpu", dtype=torch.float32, scale: float = 3.0) -> torch.Tensor:
    return (scale * torch.randn(rows, num_classes, dtype=torch.float64)).to(device=device, dtype=dtype)


def fused(student, teacher, mask=None, grad_scale=1.0, tau_s=2.0, tau_t=2.0, standardize=True, correction=1,
          eps=1e-7, grad_student=True, grad_teacher=True):
    """torch.ops.logitstd.fused_kd_forward with the contract's grad_scale tensor: (rows, grad_x, grad_y)."""
    acc = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    scale = torch.full((1,), grad_scale, dtype=acc, device=student.device)
    return torch.ops.logitstd.fused_kd_forward(student, teacher, mask, scale, tau_s, tau_t, standardize, correction,
                                               eps, grad_student, grad_teacher)[:3]


def test_extension_is_built_where_required():
    """With LOGITSTD_REQUIRE_EXTENSION=1 or LOGITSTD_REQUIRE_ALL=1 (CI), a missing extension is a
    failure, not a skip; on a CUDA machine so is a missing CUDA kernel."""
    if os.environ.get("LOGITSTD_REQUIRE_EXTENSION") == "1" or require_all():
        assert CPU_REASON is None, CPU_REASON
        if torch.cuda.is_available():
            assert unavailable_reason("cuda", "cuda") is None, unavailable_reason("cuda", "cuda")
    if CPU_REASON is None:
        assert "cpu" in lsk.available_backends()


# --------------------------------------------------------------------------------------------
# CPU kernel
@needs_cpu_kernel
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(standardize=False),
        dict(correction=0, eps=0.0, reduction="none"),
        dict(temperature=3.0, teacher_temperature=1.5, eps=1e-3, reduction="sum"),
        dict(reduction="none", mask="mask"),
    ],
    ids=["default", "plain-kd", "algorithm-1", "two-temps", "masked"],
)
def test_gradcheck_float64(options):
    """Both gradients against finite differences, through the public API on the C++ kernel."""
    options = dict(options)
    if options.get("mask") == "mask":
        options["mask"] = torch.tensor([True, False, True, True])
    x = torch.randn(4, 13, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 13, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: lsk.logitstd_kd_loss(a, b, backend="cpu", **options), (x, y))


@needs_cpu_kernel
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                    (torch.float64, torch.float64), (torch.float16, torch.bfloat16)],
                         ids=["f32", "bf16-f32", "f64", "f16-bf16"])
def test_opcheck_fused_kd_forward(dtypes):
    """Schema, fake (meta) implementation, and tracing of the C++ op (inputs need no grad: the op
    returns gradients itself; autograd lives in torch.ops.logitstd.kd_loss)."""
    x, y = logits(5, 37, dtype=dtypes[0]), logits(5, 37, dtype=dtypes[1])
    acc = torch.float64 if torch.float64 in dtypes else torch.float32
    scale = torch.full((1,), 0.25, dtype=acc)
    mask = torch.tensor([True, False, True, True, True])
    for args in [
        (x, y, None, scale, 2.0, 2.0, True, 1, 1e-7, True, True),
        (x, y, mask, scale, 1.0, 3.0, False, 1, 1e-7, True, False),
        (x[:, 1:], y[:, :-1], mask, scale, 2.0, 1.5, True, 0, 0.0, False, True),
        (x, y, None, scale, 2.0, 2.0, True, 1, 1e-7, False, False),
    ]:
        torch.library.opcheck(torch.ops.logitstd.fused_kd_forward.default, args)


@needs_cpu_kernel
def test_opcheck_scale_rows():
    grad = torch.randn(4, 9)
    torch.library.opcheck(torch.ops.logitstd.scale_rows_.default, (grad, torch.rand(4) + 0.5))
    torch.library.opcheck(torch.ops.logitstd.scale_rows_.default, (grad, torch.tensor(3.0)))


@needs_cpu_kernel
def test_fused_op_under_torch_compile():
    x, y = logits(3, 50), logits(3, 50)
    scale = torch.ones(1)
    eager = torch.ops.logitstd.fused_kd_forward(x, y, None, scale, 2.0, 2.0, True, 1, 1e-7, True, False)
    compiled = torch.compile(lambda a, b: torch.ops.logitstd.fused_kd_forward(
        a, b, None, scale, 2.0, 2.0, True, 1, 1e-7, True, False), fullgraph=True, backend="aot_eager")(x, y)
    for got, want in zip(compiled, eager):
        assert torch.equal(got, want)


@needs_cpu_kernel
def test_results_do_not_depend_on_the_thread_count():
    """Each row is computed by one thread in a fixed order: 1 thread and all threads agree bitwise."""
    x, y = logits(64, 3001), logits(64, 3001, dtype=torch.bfloat16)
    mask = torch.rand(64) > 0.1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = fused(x, y, mask, grad_scale=0.125)
        torch.set_num_threads(max(threads, 2))
        many = fused(x, y, mask, grad_scale=0.125)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, many):
        assert torch.equal(a, b)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_bitwise_deterministic(dtype):
    x, y = logits(16, 20001, dtype=dtype), logits(16, 20001, dtype=dtype)
    first = fused(x, y)
    second = fused(x, y)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_cpu_kernel
def test_rows_are_independent_of_their_batch():
    """A row's result does not depend on which other rows are in the batch or how it is strided."""
    x, y = logits(9, 777), logits(9, 777)
    whole = fused(x, y)
    for r in (0, 4, 8):
        alone = fused(x[r:r + 1], y[r:r + 1])
        for a, b in zip(alone, whole):
            assert torch.equal(a[0], b[r])
    wide = torch.zeros(9, 1000)
    wide[:, 100:877] = x
    strided = fused(wide[:, 100:877], y)
    for a, b in zip(strided, whole):
        assert torch.equal(a, b)


@needs_cpu_kernel
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_each_cpu_build_against_the_reference(capability):
    """The kernel is compiled per instruction set; ATEN_CPU_CAPABILITY selects a narrower build.
    Runs in a fresh interpreter because ATen reads the variable once."""
    if capability == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        require_or_skip(False, "this CPU has no AVX2", required=False)
    script = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, sys.argv[1])
        from support import check_against_reference, term_magnitudes
        from logitstd_kernels import reference
        from logitstd_kernels.testing import assert_within_eager_error
        assert torch.backends.cpu.get_cpu_capability() == sys.argv[2].upper()

        def grads(x, y, scale):  # rows and scale * d(row sum)/d(x, y) of the reference
            x, y = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
            rows = reference.logitstd_kd_loss(x, y, reduction="none")
            gx, gy = torch.autograd.grad(rows.sum(), (x, y))
            return rows.detach(), gx * scale, gy * scale

        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            for classes in (2, 1271, 4099):
                x = (3 * torch.randn(3, classes, dtype=torch.float64)).to(dtype)
                y = (5 * torch.randn(3, classes, dtype=torch.float64)).to(dtype)
                if dtype in (torch.float32, torch.float64):
                    if classes > 2 and dtype == torch.float32:
                        x[0] = 1000.0 + 0.01 * torch.randn(classes)  # a large offset (stable moments)
                        y[1] = 4.0  # a constant row (eps > 0)
                    check_against_reference(x, y, "cpu")
                    check_against_reference(x, y, "cpu", standardize=False, temperature=1.0)
                    continue
                # Low precision through the op, so that grad_scale is applied before the one rounding
                # to the input dtype (the public API rounds the saved gradient, then scales it).
                scale = 0.37
                got = torch.ops.logitstd.fused_kd_forward(x, y, None, torch.full((1,), scale), 2.0, 2.0, True, 1,
                                                          1e-7, True, True)[:3]
                eager, exact = grads(x, y, scale), grads(x.double(), y.double(), scale)
                mags = term_magnitudes(x, y, torch.full((3,), scale, dtype=torch.float64), reduction="none")
                for name, a, e, w, m in zip(("rows", "grad_student", "grad_teacher"), got, eager, exact, mags):
                    assert_within_eager_error(name, a, e, w, magnitude=m)
        print("ok")
    """)
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # support.py, formula.py
    done = subprocess.run([sys.executable, "-c", script, tests_dir, capability], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout + done.stderr


@needs_cpu_kernel
def test_rows_with_non_finite_logits_follow_the_reference_exactly():
    """NaN/Inf rows take the exact-exp path: NaN where the reference is NaN, +inf loss for a student
    -inf without standardization, and the other rows untouched."""
    x, y = logits(4, 100, dtype=torch.float64), logits(4, 100, dtype=torch.float64)
    x[1, 3] = float("-inf")
    y[2, 5] = float("-inf")
    for standardize in (True, False):
        check_against_reference(x, y, "cpu", reduction="none", standardize=standardize, temperature=1.0,
                                grad_teacher=False)


@needs_cpu_kernel
def test_input_checks_name_the_tensor():
    x, y = logits(4, 10), logits(4, 10)
    one = torch.ones(1)
    op = torch.ops.logitstd.fused_kd_forward
    with pytest.raises(ValueError, match="teacher has shape"):
        op(x, y[:, :9], None, one, 2.0, 2.0, True, 1, 1e-7, True, True)
    with pytest.raises(TypeError, match="student must be float32"):
        op(x.int(), y, None, one, 2.0, 2.0, True, 1, 1e-7, True, True)
    with pytest.raises(ValueError, match="teacher must have unit stride"):
        op(x, y.t().contiguous().t(), None, one, 2.0, 2.0, True, 1, 1e-7, True, True)
    with pytest.raises(ValueError, match="student must be a 2-D"):
        op(x[0], y[0], None, one, 2.0, 2.0, True, 1, 1e-7, True, True)
    with pytest.raises(TypeError, match="mask must have dtype bool"):
        op(x, y, torch.ones(4), one, 2.0, 2.0, True, 1, 1e-7, True, True)
    with pytest.raises(ValueError, match=r"mask must have shape \(4,\)"):
        op(x, y, torch.ones(3, dtype=torch.bool), one, 2.0, 2.0, True, 1, 1e-7, True, True)
    with pytest.raises(TypeError, match="grad_scale must have the accumulation dtype"):
        op(x, y, None, one.double(), 2.0, 2.0, True, 1, 1e-7, True, True)
    with pytest.raises(ValueError, match=r"grad_scale must have one element or shape \(4,\)"):
        op(x, y, None, torch.ones(2), 2.0, 2.0, True, 1, 1e-7, True, True)
    regrad = torch.ops.logitstd.fused_kd_regrad_
    active = torch.ones(4, dtype=torch.bool)
    with pytest.raises(ValueError, match="grad_x must be a contiguous tensor of shape"):
        regrad(x, y, active, one, 2.0, 2.0, True, 1, 1e-7, torch.empty(4, 9), torch.empty(0))
    with pytest.raises(TypeError, match="grad_y must have dtype"):
        regrad(x, y, active, one, 2.0, 2.0, True, 1, 1e-7, torch.empty(0), torch.empty(4, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"mask must have shape \(4,\)"):
        regrad(x, y, active[:3], one, 2.0, 2.0, True, 1, 1e-7, torch.empty(4, 10), torch.empty(0))
    with pytest.raises(ValueError, match="tau_s must be finite and > 0"):
        op(x, y, None, one, 0.0, 2.0, True, 1, 1e-7, True, True)
    with pytest.raises(ValueError, match="correction=10"):
        op(x, y, None, one, 2.0, 2.0, True, 10, 1e-7, True, True)
    with pytest.raises(ValueError, match="eps must be finite"):
        op(x, y, None, one, 2.0, 2.0, True, 1, -1.0, True, True)
    with pytest.raises(ValueError, match="scale must have one element or shape"):
        torch.ops.logitstd.scale_rows_(torch.ones(4, 3), torch.ones(3))


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_scale_rows_skips_rows_scaled_by_one(dtype):
    grad = torch.randn(5, 33).to(dtype)
    factors = torch.tensor([1.0, 2.0, 1.0, -0.5, 3.0], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    want = (grad.double() * factors.double()[:, None]).to(dtype)
    got = grad.clone()
    torch.ops.logitstd.scale_rows_(got, factors)
    assert torch.equal(got, want)
    assert torch.equal(got[0], grad[0]) and torch.equal(got[2], grad[2])
    got = grad.clone()
    torch.ops.logitstd.scale_rows_(got, torch.tensor(0.5, dtype=factors.dtype))
    assert torch.equal(got, (grad.double() * 0.5).to(dtype))


@needs_cpu_kernel
def test_gradients_are_contiguous_in_the_input_dtype_and_empty_when_not_requested():
    x = logits(3, 40, dtype=torch.bfloat16)
    y = torch.randn(3, 50)[:, 5:45]  # rows 50 elements apart
    rows, gx, gy = fused(x, y, grad_teacher=False)
    assert rows.dtype == torch.float32 and rows.shape == (3,)
    assert gx.dtype == torch.bfloat16 and gx.is_contiguous() and gx.shape == (3, 40)
    assert gy.shape == (0,) and gy.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# The CUDA kernel's row math, emulated on the host (CI has no GPU)
EMULATION_SOURCE = r"""
// The per-row flow of csrc/cuda/kd_cuda.cu on the host, through the same header: exponents in
// log2 units (unit = ln 2, as with ex2.approx), per-thread Chan merges of per-pack moments, warp
// shuffle trees, the CTA's warps in order, the cluster's CTAs in rank order; short rows take the
// per-element-terms form of the chain rule, long rows the sums form.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>
#include "logitstd/row_math.h"
using namespace logitstd;

template <class A> struct Units;
template <> struct Units<float> {
  static constexpr float kUnit = 0.693147180559945309f, kInv = 1.442695040888963407f;
  static float ex(float s) { return std::exp2(s); }
};
template <> struct Units<double> {
  static constexpr double kUnit = 1.0, kInv = 1.0;
  static double ex(double s) { return std::exp(s); }
};

template <class R, class F>
R kernel_order(int64_t V, int C, int T, int P, R identity, F thread_part, R (*combine)(const R&, const R&)) {
  const int64_t chunk = (((V + P - 1) / P) + C - 1) / C * P;
  R row = identity;
  for (int q = 0; q < C; ++q) {
    const int64_t start = q * chunk;
    const int packs = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(chunk, V - start)) / P);
    std::vector<R> th(T, identity);
    for (int t = 0; t < T; ++t) {
      for (int j = t; j < packs; j += T) th[t] = thread_part(th[t], start + int64_t(j) * P);
    }
    R cta = identity;
    for (int w = 0; w < T / 32; ++w) {
      for (int off = 16; off > 0; off >>= 1) {
        for (int lane = 0; lane < off; ++lane) th[32 * w + lane] = combine(th[32 * w + lane], th[32 * w + lane + off]);
      }
      cta = w == 0 ? th[0] : combine(cta, th[32 * w]);
    }
    row = q == 0 ? cta : combine(row, cta);
  }
  return row;
}

template <class A> Moments<A> merge_fn(const Moments<A>& a, const Moments<A>& b) { return merge_moments(a, b); }
template <class A> RowSums<A> add_fn(const RowSums<A>& a, const RowSums<A>& b) { return add_sums(a, b); }
template <class A> A add_scalar_fn(const A& a, const A& b) { return a + b; }
template <class A> CeSums<A> add_ce_fn(const CeSums<A>& a, const CeSums<A>& b) { return add_ce_sums(a, b); }
template <class A> TermSums<A> add_terms_fn(const TermSums<A>& a, const TermSums<A>& b) { return add_term_sums(a, b); }
constexpr int64_t terms_max_cols = 4096;  // kTermsMaxCols of csrc/cuda/launch_config.h

template <class A>
void emulate(const A* xs, const A* ys, int64_t N, int64_t V, int C, int T, int P, int standardize, int64_t corr,
             double eps_, double tau_s_, double tau_t_, double gs_, A* loss, A* gxs, A* gys, const int64_t* labels,
             double ce_w_, double kd_w_, double smoothing_) {
  using E = Units<A>;
  const bool std_ = standardize != 0;
  const A eps = A(eps_), tau_s = A(tau_s_), tau_t = A(tau_t_), dof = A(V - corr);
  // with labels (the objective): the KD part weighted by kd_w, plus ce_w * CE (row_math.h, CeSums)
  const A ce_w = A(ce_w_), smoothing = A(smoothing_), gs = A(gs_) * A(labels ? kd_w_ : 1.0), ce_gs = A(gs_) * ce_w;
  for (int64_t r = 0; r < N; ++r) {
    const A* x = xs + r * V; const A* y = ys + r * V; A* gx = gxs + r * V; A* gy = gys + r * V;
    auto moments_of = [&](const A* v, A c) {
      const A shift = v[0] * c;
      return kernel_order<Moments<A>>(V, C, T, P, empty_moments<A>(), [&](Moments<A> m, int64_t e) {
        A sum = 0, mx = v[e] * c, mn = mx;
        for (int i = 0; i < P; ++i) {
          sum += v[e + i] * c - shift; mx = nan_max(mx, v[e + i] * c); mn = nan_min(mn, v[e + i] * c);
        }
        const A mean = sum / A(P);
        A m2 = 0;
        if (std_) for (int i = 0; i < P; ++i) { const A d = (v[e + i] * c - shift) - mean; m2 = m_fma(d, d, m2); }
        return merge_moments(m, Moments<A>{A(P), mean, m2, mx, mn});
      }, &merge_fn<A>);
    };
    auto stats_of = [&](const A* v) {  // unscaled moments, again on c v for extreme magnitudes
      const Moments<A> m = moments_of(v, A(1));
      const A c = magnitude_scale(m.max, m.min);
      return finalize_moments(c == A(1) ? m : moments_of(v, c), c, v[0] * c, dof, eps, std_);
    };
    const RowStats<A> sx = stats_of(x);
    const RowStats<A> sy = stats_of(y);
    const ExpPlan<A> plan = make_exp_plan(sx, sy, tau_s, tau_t, E::kInv);
    const RowSums<A> sums = kernel_order<RowSums<A>>(V, C, T, P, zero_sums<A>(), [&](RowSums<A> p, int64_t e) {
      for (int i = 0; i < P; ++i) {
        const A sa = exp_arg(x[e + i], plan.x_max, plan.xa, plan.x_scale), sb = exp_arg(y[e + i], plan.y_max, plan.ya, plan.y_scale);
        const A ea = E::ex(sa), eb = E::ex(sb), ebd = eb * kl_delta(sa, sb);
        p.za += ea; p.zb += eb; p.t += ebd; p.tabs += m_abs(ebd);
        p.saa = m_fma(ea, sa, p.saa); p.sab = m_fma(eb, sa, p.sab);
        p.sbb = m_fma(eb, sb, p.sbb); p.sbd = m_fma(ebd, sb, p.sbd);
      }
      return p;
    }, &add_fn<A>);
    loss[r] = row_loss(sums, tau_s, E::kUnit);
    if (kl_needs_refinement(sums, E::kUnit)) {  // the Bregman form, in the same reduction order
      const A rza = A(1) / sums.za, rzb = A(1) / sums.zb, neg_lz = -m_log(sums.za / sums.zb);
      loss[r] = refined_row_loss(kernel_order<A>(V, C, T, P, A(0), [&](A b, int64_t e) {
        for (int i = 0; i < P; ++i) {
          const A sa = exp_arg(x[e + i], plan.x_max, plan.xa, plan.x_scale);
          const A sb = exp_arg(y[e + i], plan.y_max, plan.ya, plan.y_scale);
          b += bregman_term(E::ex(sa), E::ex(sb), bregman_arg(kl_delta(sa, sb), E::kUnit, neg_lz), rza, rzb);
        }
        return b;
      }, &add_scalar_fn<A>), tau_s);
    }
    CeSums<A> ce_sums{A(1), A(0), A(0)};
    const A z_scale = E::kInv / plan.x_scale;
    auto sz_of = [&](int64_t k) { return exp_arg(x[k], plan.x_max, z_scale, plan.x_scale); };
    if (labels) {
      const int64_t l = labels[r];
      ce_sums = kernel_order<CeSums<A>>(V, C, T, P, CeSums<A>{0, 0, 0}, [&](CeSums<A> c, int64_t e) {
        for (int i = 0; i < P; ++i) {
          const A ez = E::ex(sz_of(e + i));
          c.zc += ez; c.zsum += sz_of(e + i);
          if (e + i != l) c.excl += ez;
        }
        return c;
      }, &add_ce_fn<A>);
      const A ce = row_ce(ce_sums, sz_of(l), E::ex(sz_of(l)), smoothing, A(V), E::kUnit);
      loss[r] = row_objective(ce, loss[r], ce_w, A(kd_w_), true);
    }
    auto add_ce = [&](int64_t k) {  // the CE part of the student gradient at class k
      if (!labels) return;
      gx[k] += k == labels[r] ? ce_gs * ce_label_grad(ce_sums, smoothing, A(V))
                              : m_fma(ce_gs / ce_sums.zc, E::ex(sz_of(k)), -ce_gs * smoothing / A(V));
    };
    if (V <= terms_max_cols) {  // short rows: the chain rule from the per-element terms
      const A rza = A(1) / sums.za, rzb = A(1) / sums.zb, klc = kl_cross_term(sums, E::kUnit);
      auto term_x = [&](int64_t k) {
        return student_term(E::ex(exp_arg(x[k], plan.x_max, plan.xa, plan.x_scale)), E::ex(exp_arg(y[k], plan.y_max, plan.ya, plan.y_scale)),
                            rza, -rzb);
      };
      auto term_y = [&](int64_t k) {
        const A sa = exp_arg(x[k], plan.x_max, plan.xa, plan.x_scale), sb = exp_arg(y[k], plan.y_max, plan.ya, plan.y_scale);
        return teacher_term(E::ex(sb), kl_delta(sa, sb), rzb, E::kUnit, -klc);
      };
      const TermSums<A> ts = kernel_order<TermSums<A>>(V, C, T, P, TermSums<A>{0, 0, 0, 0},
          [&](TermSums<A> t, int64_t e) {
            for (int i = 0; i < P && std_; ++i) {
              const A gxk = term_x(e + i), gyk = term_y(e + i);
              t.gx += gxk; t.sx = m_fma(gxk, centered(x[e + i], sx), t.sx);
              t.gy += gyk; t.sy = m_fma(gyk, centered(y[e + i], sy), t.sy);
            }
            return t;
          }, &add_terms_fn<A>);
      const TermCoef<A> cx = term_coefficients(ts.gx, ts.sx, A(V), sx, dof, gs * tau_s, std_, eps);
      const TermCoef<A> cy = term_coefficients(ts.gy, ts.sy, A(V), sy, dof, gs * tau_s * tau_s / tau_t, std_, eps);
      for (int64_t k = 0; k < V; ++k) {
        gx[k] = grad_from_term(term_x(k), std_ ? centered(x[k], sx) : A(0), cx.a, -cx.b, -cx.a_mean);
        gy[k] = grad_from_term(term_y(k), std_ ? centered(y[k], sy) : A(0), cy.a, -cy.b, -cy.a_mean);
        add_ce(k);
      }
      continue;
    }
    const RowResult<A> res = finalize_row(sums, sx, sy, dof, tau_s, tau_t, std_, E::kUnit, gs);
    for (int64_t k = 0; k < V; ++k) {
      const A sa = exp_arg(x[k], plan.x_max, plan.xa, plan.x_scale), sb = exp_arg(y[k], plan.y_max, plan.ya, plan.y_scale);
      const A ea = E::ex(sa), eb = E::ex(sb);
      const A xk = std_ ? x[k] * sx.scale - sx.shift : A(0), yk = std_ ? y[k] * sy.scale - sy.shift : A(0);
      gx[k] = grad_student_elem(ea, eb, xk, res.gx.alpha_a, -res.gx.alpha_b, -res.gx.beta, res.gx.beta_m);
      gy[k] = grad_teacher_elem(eb, kl_delta(sa, sb), yk, res.gy.gamma, res.gy.unit, -res.gy.kl_cross,
                                -res.gy.beta, res.gy.beta_m);
      add_ce(k);
    }
  }
}

extern "C" {
void emulate_f32(const float* x, const float* y, int64_t N, int64_t V, int C, int T, int P, int s, int64_t c,
                 double eps, double ts, double tt, double gs, float* l, float* gx, float* gy, const int64_t* labels,
                 double ce_w, double kd_w, double smoothing) {
  emulate<float>(x, y, N, V, C, T, P, s, c, eps, ts, tt, gs, l, gx, gy, labels, ce_w, kd_w, smoothing);
}
void emulate_f64(const double* x, const double* y, int64_t N, int64_t V, int C, int T, int P, int s, int64_t c,
                 double eps, double ts, double tt, double gs, double* l, double* gx, double* gy, const int64_t* labels,
                 double ce_w, double kd_w, double smoothing) {
  emulate<double>(x, y, N, V, C, T, P, s, c, eps, ts, tt, gs, l, gx, gy, labels, ce_w, kd_w, smoothing);
}
}
"""


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    require_or_skip(compiler is not None, "no C++ compiler (for the host emulation of the CUDA row math)")
    directory = tmp_path_factory.mktemp("cuda_emulation")
    source = directory / "emulation.cpp"
    source.write_text(EMULATION_SOURCE)
    library = directory / "emulation.so"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    include = os.path.join(root, "csrc", "include")
    subprocess.run([compiler, "-O2", "-std=c++17", "-shared", "-fPIC", f"-I{include}", str(source), "-o", str(library)],
                   check=True, capture_output=True)
    return ctypes.CDLL(str(library))


EMULATED_SHAPES = [(2, 1, 1), (1271, 1, 1), (4099, 4, 1), (32768, 2, 8), (65536, 16, 8)]
EMULATED_OPTIONS = {
    "default": dict(standardize=True, correction=1, eps=1e-7, tau_s=2.0, tau_t=1.5),
    "plain-kd": dict(standardize=False, correction=1, eps=1e-7, tau_s=1.0, tau_t=1.0),
    "algorithm-1": dict(standardize=True, correction=0, eps=0.0, tau_s=3.0, tau_t=3.0),
}
# V = 2 with eps = 0 is left out: there u = +-1 whatever x, so the exact gradient is 0 and only
# rounding noise would be compared.
EMULATED_CASES = [
    pytest.param(v, cluster, pack, options, id=f"{v}-{cluster}-{pack}-{name}")
    for v, cluster, pack in EMULATED_SHAPES
    for name, options in EMULATED_OPTIONS.items()
    if not (v == 2 and options["eps"] == 0.0)
]


@pytest.mark.parametrize("objective", [False, True], ids=["kd", "objective"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_classes,cluster,pack,options", EMULATED_CASES)
def test_cuda_row_math_emulated_on_host(emulation, dtype, num_classes, cluster, pack, options, objective):
    """The CUDA kernel's math and reduction order (log2 units, packs, clusters, both forms of the
    chain rule) through the shared header, against the float64 reference: covers what only the
    GPU runs, on a machine without one."""
    from logitstd_kernels import reference
    from logitstd_kernels.testing import assert_within_eager_error
    from support import objective_term_magnitudes, term_magnitudes

    x = 3 * torch.randn(3, num_classes, dtype=torch.float64)
    y = 5 * torch.randn(3, num_classes, dtype=torch.float64)
    if num_classes > 2 and dtype == torch.float32:
        # A large offset (stable moments; in float64 the reference's own mean is the less accurate
        # one on such rows) and a constant row.
        x[0] = 1000.0 + 0.01 * torch.randn(num_classes)
        if options["eps"] > 0:
            y[1] = 4.0
    grad_scale = 0.37
    xd, yd = x.to(dtype).contiguous(), y.to(dtype).contiguous()
    loss, gx, gy = torch.empty(3, dtype=dtype), torch.empty_like(xd), torch.empty_like(yd)
    fn = emulation.emulate_f32 if dtype == torch.float32 else emulation.emulate_f64
    scalar = ctypes.c_float if dtype == torch.float32 else ctypes.c_double
    ptr = lambda t: ctypes.cast(t.data_ptr(), ctypes.POINTER(scalar))  # noqa: E731
    labels = torch.randint(0, num_classes, (3,)) if objective else None
    objective_args = dict(ce_weight=0.3, kd_weight=2.0, label_smoothing=0.1)
    fn(ptr(xd), ptr(yd), ctypes.c_int64(3), ctypes.c_int64(num_classes), ctypes.c_int(cluster), ctypes.c_int(256),
       ctypes.c_int(pack), ctypes.c_int(int(options["standardize"])), ctypes.c_int64(options["correction"]),
       ctypes.c_double(options["eps"]), ctypes.c_double(options["tau_s"]), ctypes.c_double(options["tau_t"]),
       ctypes.c_double(grad_scale), ptr(loss), ptr(gx), ptr(gy),
       None if labels is None else ctypes.cast(labels.data_ptr(), ctypes.POINTER(ctypes.c_int64)),
       *(ctypes.c_double(objective_args[k]) for k in ("ce_weight", "kd_weight", "label_smoothing")))

    def ref(a, b):
        a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        common = dict(temperature=options["tau_s"], teacher_temperature=options["tau_t"],
                      standardize=options["standardize"], correction=options["correction"], eps=options["eps"],
                      reduction="none")
        if labels is None:
            rows = reference.logitstd_kd_loss(a, b, **common)
        else:
            rows = reference.distillation_loss(a, b, labels, **objective_args, **common)
        ga, gb = torch.autograd.grad(rows.sum(), (a, b))
        return rows.detach(), ga * grad_scale, gb * grad_scale

    # The truth of the inputs the kernel got (x rounded to dtype), not of the float64 draws.
    exact, eager = ref(xd.double(), yd.double()), ref(xd, yd)
    kd_options = dict(temperature=options["tau_s"], teacher_temperature=options["tau_t"],
                      standardize=options["standardize"], correction=options["correction"], eps=options["eps"],
                      reduction="none")
    upstream = torch.full((3,), grad_scale, dtype=torch.float64)
    mags = (term_magnitudes(xd, yd, upstream, **kd_options) if labels is None
            else objective_term_magnitudes(xd, yd, labels, upstream, **objective_args, **kd_options))
    for name, got, e, want, m in zip(("loss", "grad_student", "grad_teacher"), (loss, gx, gy), eager, exact, mags):
        assert_within_eager_error(name, got, e, want, magnitude=m)


# --------------------------------------------------------------------------------------------
# CUDA kernel
CUDA_REASON = unavailable_reason("cuda", "cuda")
# Required (a failure under LOGITSTD_REQUIRE_ALL=1) only where there is a CUDA device to run it on.
needs_cuda_kernel = needs(CUDA_REASON is None, f"CUDA kernel: {CUDA_REASON}", required=torch.cuda.is_available())


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                    (torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                    (torch.float32, torch.bfloat16), (torch.float64, torch.float64),
                                    (torch.float16, torch.bfloat16), (torch.float32, torch.float64)],
                         ids=lambda d: f"{str(d[0])[6:]}-{str(d[1])[6:]}" if isinstance(d, tuple) else None)
@pytest.mark.parametrize("num_classes", [2, 1000, 1271, 32768, 65537, 131072, 262144])
def test_cuda_kernel_against_reference(dtypes, num_classes):
    """Row lengths that select each launch plan: one CTA, clusters of 2..16 CTAs with the row pair
    in shared memory, 16-byte packs (V a multiple of the pack) and element-wise loads (odd V)."""
    rows = 3 if num_classes > 100_000 else 5
    x = logits(rows, num_classes, "cuda", dtypes[0])
    y = logits(rows, num_classes, "cuda", dtypes[1], scale=5.0)
    x[0] = 1000.0 + 0.01 * torch.randn(num_classes, device="cuda")
    check_against_reference(x, y, "cuda")
    check_against_reference(x, y, "cuda", standardize=False, temperature=1.0, grad_teacher=False)
    mask = torch.tensor([True, False] + [True] * (rows - 2), device="cuda")
    check_against_reference(x, y, "cuda", reduction="none", mask=mask, temperature=3.0, teacher_temperature=1.5)


@pytest.mark.gpu
@needs_cuda_kernel
def test_cuda_streamed_rows_beyond_shared_memory():
    """A row too long for shared memory even with 16 CTAs is streamed from global memory."""
    x = logits(2, 1_500_001, "cuda", torch.float32)
    y = logits(2, 1_500_001, "cuda", torch.float32)
    check_against_reference(x, y, "cuda")


@pytest.mark.gpu
@needs_cuda_kernel
def test_cuda_non_finite_rows_and_constant_rows():
    x, y = logits(6, 4096, "cuda"), logits(6, 4096, "cuda")
    x[1, 7] = float("nan")
    y[2, 3] = float("inf")
    x[3] = 2.5
    check_against_reference(x, y, "cuda", reduction="none")
    x[3] = 7.0
    check_against_reference(x[3:], y[3:], "cuda", reduction="none", eps=0.0)


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("num_classes", [1000, 131072])
def test_cuda_deterministic_and_matches_cpu_kernel(num_classes):
    x, y = logits(8, num_classes, "cuda", torch.bfloat16), logits(8, num_classes, "cuda", torch.bfloat16)
    first, second = fused(x, y, grad_scale=0.5), fused(x, y, grad_scale=0.5)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    if CPU_REASON is None:
        on_cpu = fused(x.cpu(), y.cpu(), grad_scale=0.5)
        torch.testing.assert_close(first[0].cpu(), on_cpu[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(first[1].cpu().float(), on_cpu[1].float(), rtol=2e-2, atol=1e-7)


@pytest.mark.gpu
@needs_cuda_kernel
def test_cuda_opcheck_and_scale_rows():
    x, y = logits(4, 4096, "cuda", torch.bfloat16), logits(4, 4096, "cuda", torch.float32)
    scale = torch.full((1,), 0.5, device="cuda")
    mask = torch.tensor([True, False, True, True], device="cuda")
    torch.library.opcheck(torch.ops.logitstd.fused_kd_forward.default,
                          (x, y, mask, scale, 2.0, 2.0, True, 1, 1e-7, True, True))
    grad = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
    factors = torch.tensor([1.0, 2.0, 1.0, 0.5], device="cuda")
    got = grad.clone()
    torch.ops.logitstd.scale_rows_(got, factors)
    assert torch.equal(got, (grad.float() * factors[:, None]).to(torch.bfloat16))


@pytest.mark.gpu
@needs_cuda_kernel
def test_cuda_kernel_runs_on_the_current_stream():
    """The kernel runs on the caller's current stream. The inputs are written on a side stream behind
    a long-running kernel and consumed on that stream, and the default stream never waits for it: a
    kernel launched on the default (or any other) stream would read the inputs before they are
    written (NaN) and give other results."""
    src_x, src_y = logits(64, 32768, "cuda", torch.bfloat16), logits(64, 32768, "cuda", torch.bfloat16)
    want = fused(src_x, src_y)  # on the default stream (also warms up)
    x, y = torch.full_like(src_x, float("nan")), torch.full_like(src_y, float("nan"))
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(2**30)  # ~0.5 s of spinning on the side stream before the inputs are written
        x.copy_(src_x)
        y.copy_(src_y)
        got = fused(x, y)
    assert not side.query(), "the side stream finished before the check: make the sleep longer"
    side.synchronize()  # that stream only; the default stream was never made to wait
    for name, a, b in zip(("rows", "grad_student", "grad_teacher"), got, want):
        assert torch.equal(a, b), f"{name} differs: the kernel did not run on the current (side) stream"
