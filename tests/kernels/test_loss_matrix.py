"""Every fused backend against the reference in float64: loss and both gradients.

Parametrized over the fused backends that can run here (the Triton kernels through the interpreter
on a CPU-only machine, the C++ CPU kernel when built, the GPU kernels on a CUDA machine). Each case
uses fresh random inputs and an incoming gradient that is not 1; the tolerance is "at most twice
the error of the eager reference in the same dtype, plus 16 u of the magnitude of the terms the
result is formed from" (tests/support.py::check_against_reference, logitstd_kernels/testing.py).
"""

from __future__ import annotations

import pytest
import torch

import logitstd_kernels as lsk
from support import (assert_within_eager_error, case_id, check_against_reference, fused_cases, interpreted,
                     term_magnitudes)

CASES = fused_cases()
REDUCTIONS = ("none", "sum", "batchmean", "mean")


def test_a_fused_backend_runs_here():
    """The matrix below must never be empty: CI runs at least the Triton kernels (interpreted)."""
    assert CASES, f"no fused backend can run here: {lsk.backend_status()}"


def dtypes_for(backend: str, device: str) -> list[torch.dtype]:
    """Every dtype on every backend (bf16 under the Triton interpreter too: see support.interpreted)."""
    return [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def logits(rows, num_classes: int, device: str, dtype=torch.float32, scale: float = 3.0) -> torch.Tensor:
    shape = rows if isinstance(rows, tuple) else (rows,)
    return (scale * torch.randn(*shape, num_classes, dtype=torch.float64)).to(device=device, dtype=dtype)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("num_classes,rows", [(2, 7), (1271, 5), (65537, 2)])
def test_shapes_and_dtypes(case, num_classes, rows):
    """V = 2, an odd V, V beyond one block; every dtype the backend supports; both gradients."""
    backend, device = case
    for dtype in dtypes_for(backend, device):
        x = logits(rows, num_classes, device, dtype)
        y = logits(rows, num_classes, device, dtype, scale=5.0)
        check_against_reference(x, y, backend)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions_with_leading_dims(case, reduction):
    backend, device = case
    x, y = logits((3, 4), 300, device), logits((3, 4), 300, device)
    check_against_reference(x, y, backend, reduction=reduction)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize(
    "options",
    [
        dict(standardize=False, temperature=1.0),
        dict(standardize=False, temperature=4.0, teacher_temperature=2.0),
        dict(correction=0, eps=0.0),
        dict(correction=1, eps=0.0, temperature=1.0),
        dict(temperature=3.0, teacher_temperature=1.5),
        dict(temperature=0.5, eps=1e-3),
    ],
    ids=["plain-kd", "plain-kd-two-temps", "algorithm-1", "no-eps", "two-temps", "big-eps"],
)
def test_options(case, options):
    backend, device = case
    x, y = logits(6, 1000, device), logits(6, 1000, device)
    check_against_reference(x, y, backend, **options)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.float64)],
                         ids=["bf16-student-f32-teacher", "f32-student-f64-teacher"])
def test_mixed_dtypes(case, dtypes):
    backend, device = case
    x, y = logits(4, 513, device, dtypes[0]), logits(4, 513, device, dtypes[1])
    check_against_reference(x, y, backend)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_student_grad_only(case):
    backend, device = case
    check_against_reference(logits(5, 777, device), logits(5, 777, device), backend, grad_teacher=False)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mask(case, reduction):
    """Masked rows give 0 loss and 0 gradient, are not counted, and their NaN/Inf data stays out."""
    backend, device = case
    x, y = logits(6, 257, device), logits(6, 257, device)
    x[1, 3] = float("nan")
    y[4, 0] = float("inf")
    mask = torch.tensor([True, False, True, True, False, True], device=device)
    check_against_reference(x, y, backend, reduction=reduction, mask=mask)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_row_masked(case, reduction):
    backend, device = case
    x = logits(3, 65, device).requires_grad_(True)
    y = logits(3, 65, device).requires_grad_(True)
    mask = torch.zeros(3, dtype=torch.bool, device=device)
    loss = lsk.logitstd_kd_loss(x, y, mask=mask, reduction=reduction, backend=backend)
    loss.sum().backward()
    assert torch.count_nonzero(loss) == 0 and not loss.isnan().any()
    assert torch.count_nonzero(x.grad) == 0 and torch.count_nonzero(y.grad) == 0


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_hard_rows(case):
    """A large offset (naive E[x^2]-E[x]^2 fails), a constant row (eps > 0), a peaked row, a tiny row."""
    backend, device = case
    num_classes = 2049
    x, y = logits(5, num_classes, device), logits(5, num_classes, device)
    x[0] = 1000.0 + 0.01 * torch.randn(num_classes, device=device)
    y[0] = -500.0 + 0.02 * torch.randn(num_classes, device=device)
    x[1] = 7.0
    y[2] = 0.0
    y[2, 5] = 80.0  # one class dominates: softmax underflows elsewhere
    x[3] = 1e-4 * torch.randn(num_classes, device=device)
    check_against_reference(x, y, backend)
    check_against_reference(x, y, backend, standardize=False, temperature=1.0)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_constant_row_without_eps_is_nan_like_reference(case):
    backend, device = case
    x, y = logits(3, 100, device), logits(3, 100, device)
    x[1] = 2.5
    check_against_reference(x, y, backend, eps=0.0, reduction="none")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_non_finite_rows_stay_in_their_row(case):
    backend, device = case
    x, y = logits(5, 300, device), logits(5, 300, device)
    x[1, 7] = float("nan")
    y[3, 2] = float("inf")
    x[4, 0] = float("-inf")
    check_against_reference(x, y, backend, reduction="none")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_strided_rows(case):
    """Rows with a stride larger than V, and logits whose class dim is not unit-stride."""
    backend, device = case
    wide = logits(6, 900, device)
    check_against_reference(wide[:, 50:750], logits(6, 700, device), backend)
    transposed = logits(400, 4, device).t()  # (4, 400) with class stride 4
    check_against_reference(transposed, logits(4, 400, device), backend)
    every_other = logits(8, 333, device)[::2]
    check_against_reference(every_other, logits(4, 333, device)[:, :], backend, reduction="none")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_zero_rows(case):
    backend, device = case
    x = torch.randn(0, 10, device=device, requires_grad=True)
    y = torch.randn(0, 10, device=device)
    for reduction in REDUCTIONS:
        loss = lsk.logitstd_kd_loss(x, y, reduction=reduction, backend=backend)
        loss.sum().backward()
        assert loss.shape == ((0,) if reduction == "none" else ()) and torch.count_nonzero(loss) == 0
    assert x.grad.shape == (0, 10)


@pytest.mark.parametrize("case", [c for c in CASES if not interpreted(*c)], ids=case_id)
def test_more_rows_than_one_grid_dimension(case):
    """More than 65535 rows (the CUDA grid's y/z limit); the interpreter would run them one by one."""
    backend, device = case
    x, y = logits(70_001, 3, device), logits(70_001, 3, device)
    check_against_reference(x, y, backend, reduction="sum")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_inference_only(case):
    """Without grad the kernel writes no gradient, and the loss is the same."""
    backend, device = case
    x, y = logits(4, 500, device), logits(4, 500, device)
    with torch.no_grad():
        fast = lsk.logitstd_kd_loss(x, y, backend=backend, reduction="none")
    exact = lsk.reference.logitstd_kd_loss(x.double(), y.double(), reduction="none")
    eager = lsk.reference.logitstd_kd_loss(x, y, reduction="none")
    magnitude = term_magnitudes(x, y, torch.ones(4, dtype=torch.float64), reduction="none")[0]
    assert_within_eager_error("loss", fast, eager, exact, magnitude=magnitude)
    _, saved_x, saved_y = torch.ops.logitstd.kd_loss(x, y, None, 2.0, 2.0, True, 1, 1e-7, "none", False, False, backend)
    assert saved_x.numel() == 0 and saved_y.numel() == 0


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradcheck(case):
    backend, device = case
    x = torch.randn(3, 11, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.randn(3, 11, dtype=torch.float64, device=device, requires_grad=True)
    mask = torch.tensor([True, False, True], device=device)
    for kwargs in (dict(), dict(standardize=False), dict(correction=0, eps=0.0, reduction="none", mask=mask)):
        assert torch.autograd.gradcheck(
            lambda a, b: lsk.logitstd_kd_loss(a, b, temperature=1.7, backend=backend, **kwargs), (x, y)
        )


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_backward_twice_through_a_retained_graph(case):
    """The saved gradient is only overwritten when the graph is freed; retain_graph keeps it intact."""
    backend, device = case
    x = torch.randn(3, 9, device=device, requires_grad=True)
    y = torch.randn(3, 9, device=device)
    loss = lsk.logitstd_kd_loss(x, y, backend=backend, reduction="none")
    upstream = torch.tensor([0.5, 2.0, -1.0], device=device)
    loss.backward(upstream, retain_graph=True)
    first = x.grad.clone()
    loss.backward(upstream)
    xr = x.detach().double().requires_grad_(True)
    lsk.reference.logitstd_kd_loss(xr, y.double(), reduction="none").backward(upstream.double())
    torch.testing.assert_close(first.double(), xr.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad, 2 * first)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradient_buffer_is_reused(case):
    """Without retain_graph the saved gradient becomes x.grad itself: one N x V buffer, no copy."""
    backend, device = case
    x = torch.randn(4, 300, device=device, requires_grad=True)
    loss, saved, _ = torch.ops.logitstd.kd_loss(x, torch.randn(4, 300, device=device), None, 2.0, 2.0, True,
                                                1, 1e-7, "batchmean", True, False, backend)
    pointer = saved.data_ptr()
    del saved
    (loss * 3).backward()
    assert x.grad.data_ptr() == pointer


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_opcheck(case):
    backend, device = case
    x = torch.randn(4, 37, device=device, requires_grad=True)
    y = torch.randn(4, 37, device=device, requires_grad=True)
    mask = torch.tensor([True, True, False, True], device=device)
    for reduction in ("batchmean", "none"):
        torch.library.opcheck(
            torch.ops.logitstd.kd_loss.default,
            (x, y, mask, 2.0, 1.5, True, 1, 1e-7, reduction, True, True, backend),
        )


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_float16_with_loss_scaling(case, reduction):
    """GradScaler-style upstream gradients: tiny float16 gradients must not underflow before scaling."""
    from support import loss_and_grads

    backend, device = case
    x = logits(256, 2048, device, torch.float16)
    y = logits(256, 2048, device, torch.float16, scale=5.0)
    upstream = torch.tensor(65536.0, dtype=torch.float64, device=device)
    fast = loss_and_grads(lsk.logitstd_kd_loss, x, y, upstream, backend=backend, reduction=reduction)
    eager = loss_and_grads(lsk.reference.logitstd_kd_loss, x, y, upstream, reduction=reduction)
    exact = loss_and_grads(lsk.reference.logitstd_kd_loss, x.double(), y.double(), upstream, reduction=reduction)
    mags = term_magnitudes(x, y, upstream, reduction=reduction)
    assert fast[1].dtype == torch.float16 and fast[2].dtype == torch.float16
    assert_within_eager_error("grad_student", fast[1], eager[1], exact[1], magnitude=mags[1])
    assert_within_eager_error("grad_teacher", fast[2], eager[2], exact[2], magnitude=mags[2])


# --------------------------------------------------------------------------------------------
# Findings of an independent fuzzer, each pinned by a test (every fused backend that runs here).
def _leaf_grads(fn, student, teacher, upstream, retain=False, **kwargs):
    """(loss, grad_student, grad_teacher) of ``fn`` for an upstream gradient (retain: keep the graph)."""
    x = student.detach().clone().requires_grad_(True)
    y = teacher.detach().clone().requires_grad_(True)
    loss = fn(x, y, **kwargs)
    loss.backward(upstream.to(device=loss.device, dtype=loss.dtype), retain_graph=retain)
    return loss.detach(), x.grad, y.grad


def _assert_relative(name, got, exact, ulps=64.0):
    """Per row: |got - exact| <= ulps * 2^-24 * max|exact| (float32 noise of the row, no eager bound)."""
    got64, exact64 = got.double().reshape(-1, got.shape[-1]), exact.reshape(-1, exact.shape[-1])
    err = (got64 - exact64).abs().amax(-1)
    bound = ulps * 2.0**-24 * exact64.abs().amax(-1)
    assert torch.isfinite(got64).all(), f"{name}: non-finite values where the float64 result is finite"
    assert bool((err <= bound).all()), f"{name}: relative error {float((err / bound).max()) * ulps:.1f} ulps"


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("magnitude", [1e18, 3e37, 1e-30, 1e-40], ids=lambda m: f"{m:g}")
def test_rows_of_extreme_magnitude(case, magnitude):
    """float32 rows whose variance sum would overflow (sigma sqrt(V) > ~1.8e19) or underflow: the
    z-score is scale-free, so loss and gradients (times the magnitude) are those of ordinary rows."""
    backend, device = case
    x = (magnitude * torch.randn(3, 1000, dtype=torch.float64)).float().to(device)
    y = (magnitude * torch.randn(3, 1000, dtype=torch.float64)).float().to(device)
    # eps = 1e-7 would make rows of tiny logits constant (u = 0): compare those with Algorithm 1's eps = 0.
    options = dict(eps=0.0, correction=0) if magnitude < 1 else {}
    upstream = torch.ones(3, dtype=torch.float64)
    exact = _leaf_grads(lsk.reference.logitstd_kd_loss, x.double(), y.double(), upstream, reduction="none", **options)
    loss, gx, gy = _leaf_grads(lsk.logitstd_kd_loss, x, y, upstream, backend=backend, reduction="none", **options)
    _assert_relative("loss", loss.reshape(-1, 1), exact[0].reshape(-1, 1))
    # Gradients of size 1 / magnitude: subnormal in float32 beyond ~1e36, and beyond its range below ~1e-36.
    if 1e-36 < magnitude < 1e36:
        _assert_relative("grad_student", gx, exact[1])
        _assert_relative("grad_teacher", gy, exact[2])


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("temperature", [8.0, 16.0, 100.0])
@pytest.mark.parametrize("standardize", [True, False], ids=["standardized", "plain"])
def test_high_temperatures(case, temperature, standardize):
    """tau^2 KL at high temperatures is a small difference of large terms in the partition-sum form;
    the kernels switch to the cancellation-free Bregman form there (row_math.h)."""
    backend, device = case
    for num_classes in (5, 1000, 5000):
        x, y = logits(6, num_classes, device), logits(6, num_classes, device, scale=5.0)
        check_against_reference(x, y, backend, temperature=temperature, standardize=standardize)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_two_classes_with_close_student_logits(case):
    """V = 2: the gradient is O(eps / s) of the chain rule's terms; the closed form keeps it exact."""
    backend, device = case
    spread = torch.logspace(-1, -3, 30, dtype=torch.float64)
    base = torch.randn(30, dtype=torch.float64)
    x = torch.stack([base, base + spread * torch.sign(torch.randn(30, dtype=torch.float64))], 1)
    y = 3 * torch.randn(30, 2, dtype=torch.float64)
    check_against_reference(x.float().to(device), y.float().to(device), backend, reduction="sum")


@pytest.mark.parametrize("vocab", [4, 5000], ids=["in-registers", "blocked"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_minus_inf_teacher_logit_without_standardization(case, vocab):
    """A class with p = 0 contributes exactly 0 to both gradients (0 * -inf must not become NaN), in
    a row held in registers and in one streamed in tiles."""
    backend, device = case
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(1, vocab, generator=gen).to(device)
    y = torch.randn(1, vocab, generator=gen)
    y[0, 1] = float("-inf")
    y = y.to(device)
    loss, gx, gy = _leaf_grads(lsk.kd_loss, x, y, torch.tensor(1.0, dtype=torch.float64), backend=backend)
    # The eager reference's teacher gradient is NaN in every class (autograd of 0 * log 0 through the
    # softmax); the limit is that of a logit so low that p is exactly 0 in float64 (e^-1000 = 0), which
    # the independent NumPy formula computes without NaN.
    from formula import row_loss_and_grads

    limit = y.double().cpu().numpy()[0]
    limit[1] = -1000.0
    kl, grad_x, grad_y = row_loss_and_grads(x.double().cpu().numpy()[0], limit, 1.0, 1.0, False, 1, 0.0)
    assert torch.isfinite(gy).all() and gy[0, 1] == 0
    _assert_relative("grad_teacher", gy.cpu(), torch.from_numpy(grad_y).reshape(1, -1))
    _assert_relative("grad_student", gx.cpu(), torch.from_numpy(grad_x).reshape(1, -1))
    assert abs(float(loss) - kl) <= 1e-6 * kl


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_strided_mask_at_the_op_level(case):
    """torch.ops.logitstd.kd_loss with a non-contiguous mask (the public functions make it contiguous)."""
    backend, device = case
    x, y = logits(4, 50, device), logits(4, 50, device)
    wide = torch.tensor([True, False, False, True, True, True, False, True], device=device)
    mask = wide[::2]
    loss, _, _ = torch.ops.logitstd.kd_loss(x, y, mask, 2.0, 2.0, True, 1, 1e-7, "none", False, False, backend)
    expected = lsk.reference.logitstd_kd_loss(x.double(), y.double(), mask=mask.contiguous(), reduction="none")
    assert torch.equal(loss == 0, expected == 0)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)


def _half_ulp_violation(got: torch.Tensor, exact: torch.Tensor) -> float:
    """max over elements of |got - exact| / (half an ulp of exact in got's dtype + float32 noise of the row)."""
    info = torch.finfo(got.dtype)
    rows_exact = exact.reshape(-1, exact.shape[-1])
    half_ulp = rows_exact.abs().clamp_min(info.smallest_normal) * info.eps / 2
    noise = 16 * 2.0**-24 * rows_exact.abs().amax(-1, keepdim=True)
    return float(((got.double().reshape(rows_exact.shape) - rows_exact).abs() / (half_ulp + noise)).max())


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("upstream", [1.0, 0.842, 3.0, 9.0, 65536.0])
@pytest.mark.parametrize("retain", [False, True], ids=["in-place", "retained-graph"])
def test_low_precision_gradients_are_rounded_once(case, dtype, upstream, retain):
    """A bf16/fp16 gradient is within half an ulp of the float64 truth plus float32 noise of the row,
    for any upstream gradient (``loss * 9``, a GradScaler's 65536): it is recomputed with the factor
    folded in, not rescaled after rounding (which rounds twice), and both teacher dtypes keep theirs."""
    backend, device = case
    x = logits(4, 513, device, dtype)
    for teacher_dtype in (dtype, torch.float32):
        y = logits(4, 513, device, teacher_dtype, scale=5.0)
        factor = torch.tensor(upstream, dtype=torch.float64)
        _, gx, gy = _leaf_grads(lsk.logitstd_kd_loss, x, y, factor, retain=retain, backend=backend)
        exact = _leaf_grads(lsk.reference.logitstd_kd_loss, x.double(), y.double(), factor)
        assert gx.dtype == dtype and gy.dtype == teacher_dtype
        assert _half_ulp_violation(gx, exact[1]) <= 1.0, "student gradient rounded more than once"
        if teacher_dtype == dtype:
            assert _half_ulp_violation(gy, exact[2]) <= 1.0, "teacher gradient rounded more than once"
        else:
            _assert_relative("grad_teacher", gy, exact[2])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_low_precision_gradients_with_per_row_upstream(case):
    """reduction="none" with an upstream gradient per row (some rows exactly 1, one masked row)."""
    backend, device = case
    x, y = logits(5, 300, device, torch.bfloat16), logits(5, 300, device, torch.bfloat16)
    mask = torch.tensor([True, True, False, True, True], device=device)
    upstream = torch.tensor([1.0, 0.3, 7.0, 1.0, -2.5], dtype=torch.float64)
    _, gx, gy = _leaf_grads(lsk.logitstd_kd_loss, x, y, upstream, backend=backend, reduction="none", mask=mask)
    exact = _leaf_grads(lsk.reference.logitstd_kd_loss, x.double(), y.double(), upstream, reduction="none", mask=mask)
    assert _half_ulp_violation(gx, exact[1]) <= 1.0 and _half_ulp_violation(gy, exact[2]) <= 1.0
    assert torch.count_nonzero(gx[2]) == 0 and torch.count_nonzero(gy[2]) == 0
