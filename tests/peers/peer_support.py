"""Helpers of the peer parity tests: the peers (TRL, Liger-Kernel, torchtune) are the optional
``peers`` extra, so each test imports its peer through :func:`peer`, which skips the test when the
peer is missing and fails it under ``LOGITSTD_REQUIRE_ALL=1`` (tests/support.py).

Every parity test runs our losses with ``standardize=False`` in float64, on the eager reference and
on the C++ CPU kernel (``BACKENDS``), and compares the loss and the gradients with the peer's under
a stated mapping of arguments. The tolerances: ``EXACT`` where the peer computes in the inputs'
float64, ``FLOAT32`` where the peer computes in float32 whatever the inputs (its own rounding is
then what the comparison can resolve, ~1e-7 relative), ``FLOAT32_LINEAR_GRAD`` for the lm_head
gradients of such a peer.
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from support import needs, require_module

from logitstd_kernels._backends import unavailable_reason

#: Relative tolerance against a peer that computes in float64.
EXACT = 1e-12
#: Relative tolerance against a peer that computes in float32 internally.
FLOAT32 = 1e-6
#: The same for the gradients of a float32 peer's fused lm_head, relative to their largest entry: the
#: peer rounds each logit to float32 (an absolute error of ~u |x|, 5e-7 at |x| ~ 8), which the softmax
#: gradient carries into the hidden states' and weight's gradients, sums over V that cancel to a few
#: percent of their terms (measured: up to 5.2e-6 of the largest entry against TRL's).
FLOAT32_LINEAR_GRAD = 1e-5

#: Our backends in every parity test: the eager reference and the C++ kernel ("auto" on the CPU).
BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("cpu", id="cpu", marks=needs(unavailable_reason("cpu", "cpu") is None,
                                              "the C++ CPU kernel is not built")),
]


def peer(name: str) -> ModuleType:
    """Import the peer module ``name`` of the ``peers`` extra, or skip (fail under LOGITSTD_REQUIRE_ALL=1)."""
    return require_module(name, extra="peers")


def logits(*shape: int, scale: float = 3.0, requires_grad: bool = False) -> torch.Tensor:
    """float64 random logits (seeded per test by the root conftest.py)."""
    return (scale * torch.randn(*shape, dtype=torch.float64)).requires_grad_(requires_grad)


def token_labels(*shape: int, num_classes: int, ignored: int = 3) -> torch.Tensor:
    """Random labels with ``ignored`` positions set to -100 (the first, the last and one between)."""
    labels = torch.randint(0, num_classes, shape)
    flat = labels.view(-1)
    flat[torch.linspace(0, flat.numel() - 1, ignored).round().long()] = -100
    return labels


def assert_loss(got: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "loss") -> None:
    """``|got - expected| <= rtol * |expected|`` for scalar losses (expected 0: got exactly 0)."""
    got, expected = float(got.detach()), float(expected.detach())
    assert abs(got - expected) <= rtol * abs(expected), f"{what}: ours {got!r}, peer {expected!r}"


def assert_grad(got: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "gradient") -> None:
    """Every element within ``rtol`` of the largest expected entry, which must be nonzero."""
    scale = float(expected.abs().max())
    assert scale > 0, f"{what}: the peer's gradient is 0"
    torch.testing.assert_close(got.double(), expected.double(), rtol=0, atol=rtol * scale,
                               msg=lambda detail: f"{what}: {detail}")


def grads(loss: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """d loss / d inputs."""
    return torch.autograd.grad(loss, inputs)
