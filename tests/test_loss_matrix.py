"""Every fused backend against the reference in float64: loss and both gradients.

Parametrized over the fused backends that can run here (the Triton kernels through the interpreter
on a CPU-only machine, the C++ CPU kernel when built, the GPU kernels on a CUDA machine). Each case
uses fresh random inputs and an incoming gradient that is not 1; the tolerance is "at most twice
the error of the eager reference in the same dtype" (tests/support.py).
"""

from __future__ import annotations

import pytest
import torch

import logitstd_kernels as lsk
from support import assert_within_eager_error, case_id, check_against_reference, fused_cases, interpreted

CASES = fused_cases()
REDUCTIONS = ("none", "sum", "batchmean", "mean")


def test_a_fused_backend_runs_here():
    """The matrix below must never be empty: CI runs at least the Triton kernels (interpreted)."""
    assert CASES, f"no fused backend can run here: {lsk.backend_status()}"


def dtypes_for(backend: str, device: str) -> list[torch.dtype]:
    low = [] if interpreted(backend, device) else [torch.float16, torch.bfloat16]
    return [torch.float32, torch.float64, *low]


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
    if interpreted(backend, device) and torch.bfloat16 in dtypes:
        dtypes = (torch.float16, torch.float32)
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
    assert_within_eager_error("loss", fast, eager, exact)
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
    assert fast[1].dtype == torch.float16 and fast[2].dtype == torch.float16
    assert_within_eager_error("grad_student", fast[1], eager[1], exact[1])
    assert_within_eager_error("grad_teacher", fast[2], eager[2], exact[2])
