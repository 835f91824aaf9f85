"""GPU-only tests (marked ``gpu``; skipped without CUDA): low precision at LLM vocabularies,
CUDA-graph capture, 64-bit offsets, and the memory bound of the fused op.

Results are compared with the accuracy criterion of logitstd_kernels/testing.py (twice the eager
error, the eager gradients taken before their rounding to bf16/fp16, plus 16 float32 ulps of each
row's largest value): a zero gradient, or one 1% off, fails. Under LOGITSTD_REQUIRE_ALL=1 a CUDA
kernel missing from the extension is a failure (support.fused_cases lists it anyway)."""

from __future__ import annotations

import pytest
import torch

import logitstd_kernels as lsk
from logitstd_kernels.testing import assert_within_eager_error
from support import (capture_cuda_graph, check_against_reference, eager_loss_and_grads, exact_loss_and_grads,
                     fused_cases, needs)

pytestmark = [
    pytest.mark.gpu,
    needs(torch.cuda.is_available(), "needs a CUDA device", required=False),  # a skip even under LOGITSTD_REQUIRE_ALL
]

GPU_BACKENDS = [b for b, device in fused_cases() if device == "cuda"]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [4096, 32768, 131072, 262144])
def test_low_precision_large_vocab(backend, dtype, vocab):
    """Loss and both gradients within the accuracy criterion (logitstd_kernels/testing.py): twice the
    float32 eager error plus one rounding to the output dtype per element, so a gradient 1% off fails."""
    x = (3 * torch.randn(4, vocab, device="cuda")).to(dtype)
    y = (5 * torch.randn(4, vocab, device="cuda")).to(dtype)
    check_against_reference(x, y, backend)
    check_against_reference(x, y.float(), backend, standardize=False, temperature=1.0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture_of_forward_and_backward(backend):
    """No host synchronization anywhere: a whole training-step loss can be captured and replayed."""
    rows, vocab = 64, 5000
    x = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    mask = torch.rand(rows, device="cuda") > 0.2

    graph, static_loss = capture_cuda_graph(x, lambda: lsk.logitstd_kd_loss(x, y, mask=mask, backend=backend))
    for _ in range(2):
        with torch.no_grad():
            x.copy_(3 * torch.randn_like(x))
            y.copy_(5 * torch.randn_like(y))
            mask.copy_(torch.rand(rows, device="cuda") > 0.2)
        graph.replay()
        torch.cuda.synchronize()
        one = torch.ones((), dtype=torch.float64, device="cuda")
        eager = eager_loss_and_grads(x.detach(), y, one, grad_teacher=False, mask=mask)
        exact = exact_loss_and_grads(x.detach(), y, one, grad_teacher=False, mask=mask)
        assert_within_eager_error("loss", static_loss, eager[0], exact[0])
        assert_within_eager_error("grad_student", x.grad, eager[1], exact[1])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_more_than_2_31_elements(backend):
    """rows x V beyond 2^31: offsets must be 64-bit (checked on the last rows)."""
    vocab = 131072
    rows = 2**31 // vocab + 3
    x = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    y = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    loss = lsk.logitstd_kd_loss(x, y, reduction="none", backend=backend)
    loss.sum().backward()
    tail = slice(rows - 4, rows)
    one = torch.ones(4, dtype=torch.float64, device="cuda")
    eager = eager_loss_and_grads(x.detach()[tail], y[tail], one, grad_teacher=False, reduction="none")
    exact = exact_loss_and_grads(x.detach()[tail], y[tail], one, grad_teacher=False, reduction="none")
    assert_within_eager_error("loss", loss[tail], eager[0], exact[0])
    assert_within_eager_error("grad_student", x.grad[tail], eager[1], exact[1])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_peak_memory_is_one_gradient_buffer(backend):
    """Forward + backward allocate the student gradient and O(rows), no other N x V temporary."""
    rows, vocab = 1024, 32768
    x = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    lsk.logitstd_kd_loss(x, y, backend=backend).backward()  # warm up (compilation, workspaces)
    x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    lsk.logitstd_kd_loss(x, y, backend=backend).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    grad_bytes = x.numel() * x.element_size()
    assert extra <= grad_bytes + 64 * rows + 2**20, f"{extra / 2**20:.1f} MiB above the inputs"
