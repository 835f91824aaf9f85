"""pytest-benchmark suite: the same providers as ``python -m logitstd_kernels bench`` at small sizes.

In CI it runs with ``--benchmark-disable`` (each case once, as a smoke test that also checks the
result against the reference); locally ``pytest benchmarks --benchmark-autosave`` records runs that
``pytest-benchmark compare`` compares across commits.
"""

from __future__ import annotations

import pytest
import torch

from logitstd_kernels.bench.measure import correctness_violation
from logitstd_kernels.bench.providers import make_loss, unavailable

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROVIDERS = [p for p in ("torch", "triton", "cuda", "cpu") if unavailable(p, DEVICE, True) is None]
SHAPES = [(64, 4096), (8, 32768)]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("rows,vocab", SHAPES, ids=[f"{r}x{v}" for r, v in SHAPES])
def test_full_step(benchmark, provider, rows, vocab):
    """Forward + backward of the standardized KD loss (the student requires grad)."""
    loss_fn = make_loss(provider, temperature=2.0, standardize=True)
    student = torch.randn(rows, vocab, device=DEVICE) * 3
    teacher = torch.randn(rows, vocab, device=DEVICE) * 5
    assert correctness_violation(loss_fn, student, teacher, temperature=2.0, standardize=True) is None
    x = student.requires_grad_(True)

    def step():
        x.grad = None
        loss_fn(x, teacher).backward()
        return x.grad

    grad = benchmark(step)
    assert grad.shape == (rows, vocab) and torch.isfinite(grad).all()
