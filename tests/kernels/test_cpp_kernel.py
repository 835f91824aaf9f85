"""Tests specific to the C++/CUDA extension ``logitstd_kernels._C``.

The shared backend matrix (tests/test_loss_matrix.py) runs the C++ CPU kernel like every other
fused backend. Here: gradcheck in float64 through ``backend="cpu"``, ``torch.library.opcheck`` of
the C++ ops, results independent of the thread count, bitwise determinism, the generic (non-AVX)
build of the CPU kernel, C++ input checks that name the offending tensor, the row scaling op, and
(marked ``gpu``) the CUDA kernel at the row lengths that select each launch plan (its math on the
host: tests/kernels/test_cuda_emulation.py).
"""

from __future__ import annotations

import os
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
