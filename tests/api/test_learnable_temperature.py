"""A learnable temperature (CTKD): ``temperature`` as a tensor that requires grad, shared by student and
teacher, one value or one per row. The fused CPU kernel returns ``d loss / d temperature`` per row from
the sums its gradient pass already has (no extra pass); checked against autograd through the eager
reference in float64 for every divergence and decoupled KD, by gradcheck, and in bf16 (the backward's
recomputation of low-precision gradients must use the same temperatures)."""

from __future__ import annotations

import pytest
import torch

import logitstd_kernels as lsk
from logitstd_kernels.testing import assert_within_eager_error
from support import needs
from logitstd_kernels._backends import unavailable_reason

pytestmark = needs(unavailable_reason("cpu", "cpu") is None, "the C++ extension is not built")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "jeffreys", "tvd", "dkd")


def _grads(backend: str, x, y, labels, tau, upstream: float = 0.7, **options):
    loss = lsk.distillation_loss(x, y, labels, temperature=tau, backend=backend, **options)
    return (loss,) + torch.autograd.grad(loss * upstream, (x, y, tau))


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("standardize", [True, False], ids=["std", "plain"])
@pytest.mark.parametrize("per_row", [False, True], ids=["global", "per-row"])
def test_temperature_gradient_matches_autograd(divergence, standardize, per_row):
    x = torch.randn(6, 40, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 40, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 40, (6,))
    labels[2] = -100
    tau = (1 + 3 * torch.rand(6, dtype=torch.float64)) if per_row else torch.tensor(2.3, dtype=torch.float64)
    tau.requires_grad_(True)
    options = dict(standardize=standardize, divergence=divergence, ce_weight=0.3, kd_weight=0.7)
    fused = _grads("cpu", x, y, labels, tau, **options)
    eager = _grads("torch", x, y, labels, tau, **options)
    for name, got, want in zip(("loss", "grad_student", "grad_teacher", "grad_temperature"), fused, eager):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    if per_row:
        assert fused[3][2] == 0, "an ignored row's temperature gets no gradient"


def test_gradcheck():
    x = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 9, dtype=torch.float64)
    tau = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    rows_tau = torch.tensor([1.2, 2.0, 3.5], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, 2, 3])
    assert torch.autograd.gradcheck(lambda a, t: lsk.logitstd_kd_loss(a, y, temperature=t, backend="cpu"), (x, tau))
    assert torch.autograd.gradcheck(lambda a, t: lsk.dkd_loss(a, y, labels, temperature=t, backend="cpu"),
                                    (x, rows_tau))


def test_bf16_logits_round_once_with_a_learnable_temperature():
    """A bf16 student's gradient for an incoming gradient != 1 is recomputed (one rounding) with the
    forward's temperatures; both gradients are within the package's accuracy rule of the float64 truth
    (the temperature's is a difference of row sums: eager float32's own error there is ~1e-4)."""
    torch.manual_seed(0)
    x = torch.randn(8, 300).to(torch.bfloat16)
    y = torch.randn(8, 300).to(torch.bfloat16)

    def grads(student, teacher, backend):
        student = student.detach().requires_grad_(True)
        tau = torch.tensor(2.5, dtype=torch.float64 if student.dtype == torch.float64 else torch.float32,
                           requires_grad=True)
        (lsk.logitstd_kd_loss(student, teacher, temperature=tau, backend=backend) * 3).backward()
        return student.grad, tau.grad

    fast = grads(x, y, "cpu")
    eager = grads(x.float(), y.float(), "torch")
    exact = grads(x.double(), y.double(), "torch")
    assert fast[0].dtype == torch.bfloat16
    assert_within_eager_error("grad_student", fast[0], eager[0], exact[0])
    assert_within_eager_error("grad_temperature", fast[1], eager[1], exact[1])


def test_bad_temperatures_are_refused():
    x, y = torch.randn(4, 10), torch.randn(4, 10)
    with pytest.raises(ValueError, match="temperature"):
        lsk.logitstd_kd_loss(x, y, temperature=torch.tensor(-1.0), backend="cpu")
    with pytest.raises(ValueError, match="leading shape"):
        lsk.logitstd_kd_loss(x, y, temperature=torch.ones(3), backend="cpu")
    with pytest.raises(ValueError, match="teacher_temperature"):
        lsk.logitstd_kd_loss(x, y, temperature=torch.tensor(2.0), teacher_temperature=3.0, backend="cpu")
    with pytest.raises(TypeError, match="temperature"):
        lsk.logitstd_kd_loss(x, y, temperature=torch.tensor(2), backend="cpu")
