"""The reference implementation: the paper's code, Algorithm 1, docs/design.md's formula, its properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import logitstd_kernels as lsk
from formula import row_loss_and_grads
from logitstd_kernels import reference
from support import case_id, fused_cases


def official_loss(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """The paper's official code (mdistiller ``kd_loss`` with logit standardization), verbatim math."""
    def normalize(logit):
        mean = logit.mean(dim=-1, keepdims=True)
        stdv = logit.std(dim=-1, keepdims=True)
        return (logit - mean) / (1e-7 + stdv)

    log_pred_student = F.log_softmax(normalize(student) / tau, dim=1)
    pred_teacher = F.softmax(normalize(teacher) / tau, dim=1)
    loss = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
    return loss * tau**2


def test_matches_official_code():
    x, y = torch.randn(16, 100, dtype=torch.float64), torch.randn(16, 100, dtype=torch.float64)
    for tau in (1.0, 2.0, 4.0):
        ours = reference.logitstd_kd_loss(x, y, temperature=tau, correction=1, eps=1e-7, reduction="batchmean")
        torch.testing.assert_close(ours, official_loss(x, y, tau), rtol=1e-12, atol=1e-14)


def test_zscore_is_algorithm_1():
    x = torch.randn(5, 64, dtype=torch.float64) * 4 + 3
    tau = 2.5
    k = x.shape[-1]
    mean = x.sum(-1, keepdim=True) / k
    sigma = (((x - mean) ** 2).sum(-1, keepdim=True) / k).sqrt()
    torch.testing.assert_close(lsk.zscore(x, tau, correction=0, eps=0.0), (x - mean) / sigma / tau)


@pytest.mark.parametrize("standardize", [True, False])
@pytest.mark.parametrize("correction,eps", [(1, 1e-7), (0, 0.0)])
def test_reference_and_fused_backends_match_design_formula(standardize, correction, eps):
    """Loss and both gradients, against the independent transcription of docs/design.md section 1."""
    rows, num_classes, tau_s, tau_t = 4, 37, 1.7, 2.3
    x = torch.randn(rows, num_classes, dtype=torch.float64) * 3
    y = torch.randn(rows, num_classes, dtype=torch.float64) * 3
    x[2] = 1.25  # a constant student row
    if eps == 0.0:
        x[2] += torch.linspace(0, 1, num_classes, dtype=torch.float64)
    expected = [row_loss_and_grads(x[r].numpy(), y[r].numpy(), tau_s, tau_t, standardize, correction, eps)
                for r in range(rows)]
    want_loss = torch.tensor([e[0] for e in expected], dtype=torch.float64)
    want_gx = torch.from_numpy(np.stack([e[1] for e in expected]))
    want_gy = torch.from_numpy(np.stack([e[2] for e in expected]))
    runs = [("torch", "cpu")] + [c for c in fused_cases() if c[1] == "cpu"]
    for backend, _ in runs:
        xs, ys = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        loss = lsk.logitstd_kd_loss(xs, ys, temperature=tau_s, teacher_temperature=tau_t, standardize=standardize,
                                    correction=correction, eps=eps, reduction="none", backend=backend)
        loss.sum().backward()
        torch.testing.assert_close(loss, want_loss, rtol=1e-9, atol=1e-12, msg=f"{backend}: loss")
        torch.testing.assert_close(xs.grad, want_gx, rtol=1e-7, atol=1e-9, msg=f"{backend}: student grad")
        torch.testing.assert_close(ys.grad, want_gy, rtol=1e-7, atol=1e-9, msg=f"{backend}: teacher grad")


def test_reference_gradcheck():
    x = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([True, False, True])
    for kwargs in (dict(), dict(standardize=False, temperature=3.0), dict(mask=mask, reduction="mean")):
        assert torch.autograd.gradcheck(lambda a, b: reference.logitstd_kd_loss(a, b, **kwargs), (x, y))


class TestStandardizedLogitProperties:
    """The four properties of Z(x; tau) listed in the paper (Algorithm 1: correction=0, eps=0)."""

    tau = 2.0

    def z(self, x):
        return lsk.zscore(x, self.tau, correction=0, eps=0.0)

    def test_zero_mean(self):
        z = self.z(torch.randn(8, 100, dtype=torch.float64) * 5 + 7)
        torch.testing.assert_close(z.mean(-1), torch.zeros(8, dtype=torch.float64), atol=1e-12, rtol=0)

    def test_std_is_one_over_tau(self):
        z = self.z(torch.randn(8, 100, dtype=torch.float64) * 5 + 7)
        torch.testing.assert_close(z.std(-1, correction=0), torch.full((8,), 1 / self.tau, dtype=torch.float64))

    def test_monotone(self):
        x = torch.randn(8, 100, dtype=torch.float64)
        assert torch.equal(x.argsort(-1), self.z(x).argsort(-1))

    def test_bounded_by_sqrt_k_minus_1_over_tau(self):
        k = 50
        x = torch.randn(64, k, dtype=torch.float64)
        x[0] = 0.0
        x[0, 0] = 1.0  # a one-hot row attains the bound
        bound = math.sqrt(k - 1) / self.tau
        z = self.z(x)
        assert z.abs().max() <= bound * (1 + 1e-12)
        assert z[0].max() == pytest.approx(bound, rel=1e-12)


BACKENDS_HERE = ["torch"] + [c[0] for c in fused_cases() if c[1] == "cpu"]


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize(
    "teacher,student_wrong,student_right",
    [
        ([1.0, 4.0, 3.0, 1.0], [2.0, 2.8, 3.0, 1.0], [0.1, 0.4, 0.3, 0.1]),  # the paper's Figure 2
        (
            [1.0, 2.0, 8.0, 3.0, 7.5, 1.5, -2.0, 0.5, -1.0, 2.5],
            [1.0, 2.0, 7.5, 3.0, 8.0, 1.5, -2.0, 0.5, -1.0, 2.5],
            [v / 5.0 for v in [1.0, 2.0, 8.0, 3.0, 7.5, 1.5, -2.0, 0.5, -1.0, 2.5]],
        ),  # seed 000's 10-class case
    ],
    ids=["4-class", "10-class"],
)
def test_seed_toy_cases(backend, teacher, student_wrong, student_right):
    """Plain KD prefers the wrong-rank student; standardized KD gives the rank-correct one ~0 loss."""
    t = torch.tensor([teacher])
    s_wrong, s_right = torch.tensor([student_wrong]), torch.tensor([student_right])
    assert s_wrong.argmax() != t.argmax() and s_right.argmax() == t.argmax()
    plain = [lsk.kd_loss(s, t, 1.0, backend=backend) for s in (s_wrong, s_right)]
    assert plain[0] < plain[1]
    standardized = [lsk.logitstd_kd_loss(s, t, temperature=1.0, backend=backend) for s in (s_wrong, s_right)]
    assert standardized[1] < 1e-6 < standardized[0]


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize(
    "student,teacher,temperature,expected",
    [
        ([1.0, 2.0], [1.5, 2.5], 1.0, 0.0),
        ([0.5, 1.5, 2.5], [1.0, 2.0, 3.0], 2.0, 0.0),
        ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], 1.0, 0.0),
        # beyond the exercise, closed forms: log(p/q) = (2, 0, -2) so KL = 2 (p_1 - p_3)
        ([1.0, 2.0, 3.0], [3.0, 2.0, 1.0], 1.0, 2 * (math.e**2 - 1) / (math.e**2 + math.e + 1)),
        # q uniform, p = softmax([0, 1]): T^2 KL = 4 (log 2 - H(p))
        ([0.0, 0.0], [0.0, 2.0], 2.0, 4 * (math.log(2) + sum(
            v * math.log(v) for v in (1 / (1 + math.e), math.e / (1 + math.e))))),
    ],
)
def test_seed_exercise_003(backend, student, teacher, temperature, expected):
    """The worked examples of the plain KD exercise (0.0000 after rounding to 4 decimals) and two more."""
    loss = lsk.kd_loss(torch.tensor([student]), torch.tensor([teacher]), temperature, backend=backend)
    assert round(float(loss), 4) == round(expected, 4)
    assert float(loss) == pytest.approx(expected, rel=1e-5, abs=1e-6)
