"""Corner cases of the fused kernels' numerics, on every fused backend that runs here.

- logits near the float32 range without standardization (a KL of ~1e38 stays finite, as in float64
  and eager float32, and a zero weight on it gives 0, not 0 * inf);
- a float32 input next to a float64 one: its gradient is rounded once, as eager rounds it, whatever
  the incoming gradient;
- the backward of a low-precision loss whose incoming gradient is exactly 1 launches no kernel.
"""

from __future__ import annotations

import pytest
import torch

import logitstd_kernels as lsk
from logitstd_kernels._backends import backend_module
from support import case_id, check_against_reference, fused_cases

CASES = fused_cases()


# The GPU kernels form exponents in log2 units (one FMA + exp2 per element), so without
# standardization a logit gap |x - max x| / tau above FLT_MAX ln 2 (~2.36e38) overflows there; the C++
# CPU kernel works in natural units up to FLT_MAX (docs/validation.md, known limits).
LOG2_UNIT_BACKENDS = ("triton", "cuda")


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("big", [1e38, 2e38, -2e38, 3e38, -3e38])
def test_plain_kd_of_huge_logits_stays_finite(case, big):
    backend, device = case
    if abs(big) > 2.36e38 and backend in LOG2_UNIT_BACKENDS:
        x = torch.tensor([[0.7, 0.3, big, 0.6]], device=device)
        loss = lsk.logitstd_kd_loss(x, torch.zeros_like(x), temperature=1.0, standardize=False, backend=backend)
        assert not loss.isnan(), "an overflow may give inf, never NaN"
        return
    x = torch.tensor([[0.7, 0.3, big, 0.6], [0.1, 0.2, 0.3, 0.4]], device=device)
    y = torch.tensor([[-0.5, -0.2, -1.5, 0.4], [0.4, big / 2, 0.3, 0.1]], device=device)
    check_against_reference(x, y, backend, temperature=1.0, standardize=False, reduction="none")
    for divergence in ("reverse_kl", "jeffreys", "jsd", "tvd"):
        check_against_reference(x, y, backend, temperature=1.0, standardize=False, reduction="none",
                                divergence=divergence)
    weightless = lsk.distillation_loss(x, y, None, temperature=1.0, standardize=False, kd_weight=0.0, backend=backend)
    assert float(weightless) == 0.0


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_float32_next_to_float64_is_rounded_once(case, divergence):
    """The float32 student's gradient for an incoming 0.37 is the float64 gradient rounded once:
    within half an ulp (plus the float64 math's own error), as eager's."""
    backend, device = case
    x = torch.randn(16, 300, device=device)
    y = torch.randn(16, 300, dtype=torch.float64, device=device)
    fast = x.clone().requires_grad_(True)
    (lsk.logitstd_kd_loss(fast, y, divergence=divergence, backend=backend) * 0.37).backward()
    exact = x.double().requires_grad_(True)
    (lsk.reference.logitstd_kd_loss(exact, y, divergence=divergence) * 0.37).backward()
    rounded = exact.grad.float()
    ulp = (rounded.abs().nextafter(torch.tensor(float("inf"), device=device)) - rounded.abs()).double()
    error_in_ulps = (fast.grad.double() - exact.grad).abs() / ulp
    assert float(error_in_ulps.max()) <= 0.5 + 1e-6, float(error_in_ulps.max())


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_no_regrad_launch_for_an_incoming_gradient_of_one(case, monkeypatch):
    """bf16 gradients are recomputed for an incoming gradient other than 1 (to round them once); for
    ``loss.backward()`` on the scalar loss (incoming 1) nothing is recomputed and no kernel launched."""
    backend, device = case
    module = backend_module(backend)
    calls = []
    original = module.fused_regrad_
    monkeypatch.setattr(module, "fused_regrad_", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    x = torch.randn(8, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randn(8, 64, device=device, dtype=torch.bfloat16)
    lsk.logitstd_kd_loss(x, y, backend=backend).backward()
    assert calls == [], "a regrad launch for an incoming gradient of exactly 1"
    first = x.grad.clone()
    x.grad = None
    (lsk.logitstd_kd_loss(x, y, backend=backend) * 3).backward()
    assert calls == [1]
    assert torch.isfinite(first).all() and torch.isfinite(x.grad).all()
