"""The benchmark's correctness gate (``bench.measure.correctness_violation``) rejects wrong providers.

A provider is only timed when its loss and both gradients pass the tests' accuracy criterion on
every row. Here: the real providers pass, and providers whose student or teacher gradient is 1% off
(on every row, or on one row in the middle), whose teacher gradient is zero or missing, or whose
loss is 1% off, fail, in float32 and bfloat16 at 64 x 4096 (where the gate used to check only the
student gradient on 64 rows, and let 1%-wrong gradients through).
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

from logitstd_kernels import reference
from logitstd_kernels.bench import cli as bench_cli
from logitstd_kernels.bench.measure import correctness_violation
from logitstd_kernels.bench.providers import make_loss, unavailable
from logitstd_kernels.cli import main

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
OPTIONS = dict(temperature=2.0, standardize=True)
REAL = [p for p in ("torch", "triton", "cuda", "cpu") if unavailable(p, DEVICE, True) is None]
DTYPES = [torch.float32, torch.bfloat16]


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by ``factor`` on ``rows``."""

    @staticmethod
    def forward(ctx, t, factor, rows):
        ctx.factor, ctx.rows = factor, rows
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[ctx.rows] *= ctx.factor
        return grad, None, None


def _scaled(which: str, factor: float, rows=slice(None)):
    def loss(student, teacher):
        if which == "student":
            student = _ScaleGrad.apply(student, factor, rows)
        else:
            teacher = _ScaleGrad.apply(teacher, factor, rows)
        return reference.logitstd_kd_loss(student, teacher, **OPTIONS)
    return loss


def _zero_teacher_grad(student, teacher):
    return reference.logitstd_kd_loss(student, teacher.detach(), **OPTIONS) + 0 * teacher.float().sum()


def _no_teacher_grad(student, teacher):
    return reference.logitstd_kd_loss(student, teacher.detach(), **OPTIONS)


def _loss_off(student, teacher):
    return reference.logitstd_kd_loss(student, teacher, **OPTIONS) * 1.01


WRONG = {
    "student-grad-x1.01": _scaled("student", 1.01),
    "student-grad-x0.99": _scaled("student", 0.99),
    "teacher-grad-x1.01": _scaled("teacher", 1.01),
    "student-grad-x1.01-on-row-37": _scaled("student", 1.01, rows=37),
    "teacher-grad-x0.99-on-row-41": _scaled("teacher", 0.99, rows=41),
    "teacher-grad-zero": _zero_teacher_grad,
    "no-teacher-grad": _no_teacher_grad,
    "loss-x1.01": _loss_off,
}


def _inputs(dtype, rows=64, vocab=4096):
    student = (3 * torch.randn(rows, vocab, device=DEVICE)).to(dtype)
    teacher = (5 * torch.randn(rows, vocab, device=DEVICE)).to(dtype)
    return student, teacher


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("provider", REAL)
def test_gate_accepts_the_real_providers(provider, dtype):
    student, teacher = _inputs(dtype)
    assert correctness_violation(make_loss(provider, **OPTIONS), student, teacher, **OPTIONS) is None


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("wrong", list(WRONG))
def test_gate_rejects_a_wrong_provider(wrong, dtype):
    student, teacher = _inputs(dtype)
    violation = correctness_violation(WRONG[wrong], student, teacher, **OPTIONS)
    assert violation is not None, f"the gate lets the {wrong} provider through"
    expected = "loss" if wrong.startswith("loss") else f"grad_{wrong.split('-')[0].replace('no', 'teacher')}"
    assert expected in violation, violation


def test_gate_on_sampled_rows_includes_the_first_and_last_row():
    student, teacher = _inputs(torch.float32, rows=300, vocab=512)
    for row in (0, 299):
        violation = correctness_violation(_scaled("student", 1.01, rows=row), student, teacher, check_rows=8,
                                          **OPTIONS)
        assert violation is not None and "grad_student" in violation, (row, violation)
    assert correctness_violation(make_loss("torch", **OPTIONS), student, teacher, check_rows=8, **OPTIONS) is None


def test_bench_command_reports_a_wrong_provider_as_failed(tmp_path, capsys, monkeypatch):
    """End to end: the command does not time a provider the gate rejects; it reports it as failed."""
    real_make_loss = bench_cli.make_loss

    def make(provider, **options):
        return _scaled("teacher", 1.01) if provider == "torch" else real_make_loss(provider, **options)

    monkeypatch.setattr(bench_cli, "make_loss", functools.partial(make))
    code = main(["bench", "--device", "cpu", "--vocab", "512", "--rows", "8", "--rows-sweep", "8",
                 "--rows-sweep-vocab", "512", "--providers", "torch", "--modes", "full",
                 "--cpu-budget", "0.05", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1, out
    (report,) = tmp_path.glob("*.json")
    results = json.loads(report.read_text())["results"]
    assert results and all(r["status"].startswith("failed") and "grad_teacher" in r["status"] for r in results)


def test_gate_checks_the_student_alone_for_a_provider_without_teacher_gradient():
    """teacher_grad=False (Liger's KL-divergence loss takes no gradient for its target): the student's
    gradient is still checked, and a wrong one still fails."""
    import torch.nn.functional as F

    from logitstd_kernels.bench.measure import correctness_violation

    x, y = 3 * torch.randn(16, 300), 5 * torch.randn(16, 300)

    def plain_kd(s, t, scale=1.0):
        return scale * F.kl_div(F.log_softmax(s / 2, -1), F.softmax(t.detach() / 2, -1), reduction="batchmean") * 4

    assert correctness_violation(plain_kd, x, y, teacher_grad=False, temperature=2.0, standardize=False) is None
    assert correctness_violation(plain_kd, x, y, temperature=2.0, standardize=False) is not None
    wrong = lambda s, t: plain_kd(s, t, 1.01)  # noqa: E731
    assert correctness_violation(wrong, x, y, teacher_grad=False, temperature=2.0, standardize=False) is not None
