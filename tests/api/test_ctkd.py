"""CTKD (``lsk.CTKDTemperature``, ``lsk.GradientReversal``): the reversal's sign and scale, the cosine
schedule's endpoints, and the temperature module's gradients through the fused CPU kernel against the
eager reference's autograd in float64 (global and per instance), and the argument checks."""

from __future__ import annotations

import math

import pytest
import torch

import logitstd_kernels as lsk
from logitstd_kernels._backends import unavailable_reason
from support import needs

needs_cpu = needs(unavailable_reason("cpu", "cpu") is None, "the C++ extension is not built")


@pytest.mark.parametrize("lambda_", [0.0, 0.3, 1.0, 2.5])
def test_gradient_reversal_sign_and_scale(lambda_):
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(5, 3, dtype=torch.float64)
    y = lsk.GradientReversal(lambda_)(x)
    assert torch.equal(y, x)
    y.backward(upstream)
    torch.testing.assert_close(x.grad, -lambda_ * upstream, rtol=0, atol=0)
    x.grad = None
    (lsk.gradient_reversal(x, lambda_) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, -lambda_ * upstream, rtol=0, atol=0)


def test_cosine_schedule_endpoints():
    assert lsk.cosine_lambda(0, 10) == 0.0
    assert lsk.cosine_lambda(-3, 10) == 0.0
    assert lsk.cosine_lambda(10, 10) == pytest.approx(1.0, abs=1e-15)
    assert lsk.cosine_lambda(25, 10, lambda_max=0.5) == pytest.approx(0.5, abs=1e-15)
    assert lsk.cosine_lambda(5, 10) == pytest.approx(0.5, abs=1e-15)
    assert lsk.cosine_lambda(2, 10) == pytest.approx((1 - math.cos(math.pi / 5)) / 2, abs=1e-15)
    values = [lsk.cosine_lambda(e, 10) for e in range(12)]
    assert all(a < b for a, b in zip(values[:10], values[1:11])), "rises over the decay epochs"
    module = lsk.CTKDTemperature(decay_epochs=4)
    module.set_epoch(4)
    assert module.reversal.lambda_ == pytest.approx(1.0, abs=1e-15)
    assert module.lambda_at(2) == pytest.approx(0.5, abs=1e-15)


def _step(module, x, y, labels, backend, lambda_, standardize=True):
    """(loss, d/dx, d/d parameters) of 0.1 CE + 9 tau^2 KL with the module's temperature."""
    module.reversal.lambda_ = lambda_
    x = x.detach().requires_grad_(True)
    tau = module(x, y)
    loss = lsk.distillation_loss(x, y, labels, temperature=tau, ce_weight=0.1, kd_weight=9.0, backend=backend,
                                 standardize=standardize)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(loss * 0.7, [x] + params)
    return loss, grads[0], grads[1:]


@needs_cpu
@pytest.mark.parametrize("per_instance", [False, True], ids=["global", "instance"])
@pytest.mark.parametrize("standardize", [True, False], ids=["std", "plain"])
def test_temperature_gradient_fused_equals_eager(per_instance, standardize):
    torch.manual_seed(0)
    x, y = 3 * torch.randn(6, 20, dtype=torch.float64), 3 * torch.randn(6, 20, dtype=torch.float64)
    labels = torch.randint(0, 20, (6,))
    labels[1] = -100
    module = lsk.CTKDTemperature(20 if per_instance else None, hidden=8).double()
    if not per_instance:
        module.theta.data.fill_(-1.3)
    if not standardize:
        module.t_start, module.t_end = 1.0, 4.0
    loss, gx, gp = _step(module, x, y, labels, "cpu", 0.6, standardize)
    loss_e, gx_e, gp_e = _step(module, x, y, labels, "torch", 0.6, standardize)
    torch.testing.assert_close(loss, loss_e, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx, gx_e, rtol=1e-10, atol=1e-12)
    for got, want in zip(gp, gp_e):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    plain = _step(module, x, y, labels, "cpu", -1.0, standardize)[2]  # -(-1) * grad: the gradient without reversal
    assert any(bool(g.abs().max() > 1e-8) for g in plain), "the temperature has a gradient"
    for got, unreversed in zip(gp, plain):
        torch.testing.assert_close(got, -0.6 * unreversed, rtol=1e-12, atol=1e-15)


@needs_cpu
def test_per_instance_temperature_is_per_row_and_detached():
    torch.manual_seed(1)
    x, y = torch.randn(2, 3, 10, dtype=torch.float64), torch.randn(2, 3, 10, dtype=torch.float64)
    module = lsk.CTKDTemperature(10, t_start=2.0, t_end=5.0, hidden=4).double()
    tau = module(x, y)
    assert tau.shape == (2, 3) and bool(((tau > 2.0) & (tau < 5.0)).all())
    assert len(set(tau.reshape(-1).tolist())) == 6, "one temperature per row"
    student = x.clone().requires_grad_(True)
    lsk.logitstd_kd_loss(student, y, temperature=module(student, y), backend="cpu").backward()
    fixed = x.clone().requires_grad_(True)
    lsk.logitstd_kd_loss(fixed, y, temperature=tau.detach(), backend="cpu").backward()
    torch.testing.assert_close(student.grad, fixed.grad, rtol=0, atol=0)  # no gradient through the MLP's input


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="t_start"):
        lsk.CTKDTemperature(t_start=5.0, t_end=2.0)
    with pytest.raises(ValueError, match="t_start"):
        lsk.CTKDTemperature(t_start=0.0)
    with pytest.raises(ValueError, match="t_end"):
        lsk.CTKDTemperature(t_end=float("inf"))
    with pytest.raises(ValueError, match="lambda_max"):
        lsk.CTKDTemperature(lambda_max=-1.0)
    with pytest.raises(ValueError, match="decay_epochs"):
        lsk.CTKDTemperature(decay_epochs=0)
    with pytest.raises(ValueError, match="num_classes"):
        lsk.CTKDTemperature(num_classes=0)
    with pytest.raises(ValueError, match="hidden"):
        lsk.CTKDTemperature(4, hidden=-1)
    with pytest.raises(TypeError, match="lambda_"):
        lsk.GradientReversal("1")
    with pytest.raises(ValueError, match="epoch"):
        lsk.cosine_lambda(float("nan"), 10)
    with pytest.raises(ValueError, match="student_logits"):
        lsk.CTKDTemperature(4)(torch.randn(3, 5), torch.randn(3, 5))
    with pytest.raises(ValueError, match="teacher_logits"):
        lsk.CTKDTemperature(4)(torch.randn(3, 4), None)
