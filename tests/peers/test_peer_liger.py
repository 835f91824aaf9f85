"""Parity with Liger-Kernel 0.8.5: ``LigerFusedLinearJSDLoss`` (chunked lm_head, PyTorch), ``LigerJSD``
and ``LigerTVDLoss`` (Triton kernels: on a machine without CUDA they run through the Triton
interpreter, which tests/conftest.py turns on before anything imports triton).

None of Liger's losses multiplies by ``T**2``; ours does, so ``kd_weight = 1 / T**2`` maps them.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from peer_support import BACKENDS, EXACT, FLOAT32, assert_grad, assert_loss, grads, logits, peer, token_labels

import logitstd_kernels as lsk

N, V, H = 10, 37, 8
BETAS = [0.0, 0.5, 0.9, 1.0]
# Liger's Triton kernels run on CUDA when there is one, else through the interpreter on the CPU;
# ours always run on the CPU, and the peer's results come back to it for the comparison.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def float64_default():
    """``LigerFusedLinearJSDLoss`` accumulates its loss in ``torch.get_default_dtype()``: float64 for
    the test (its gradients follow the inputs' dtype anyway), restored afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("weights", [(0.0, 1.0), (0.3, 0.7)], ids=["soft", "hard+soft"])
def test_fused_linear_jsd(float64_default, weights, beta, backend):
    """``LigerFusedLinearJSDLoss(weight_hard_loss=h, weight_soft_loss=s, beta, temperature=T)`` on
    (N, H) hidden states and (V, H) lm_heads with biases: ``h * CE + s * JSD_beta(softmax(yt / T),
    softmax(xs / T))``, CE on the raw student logits, both terms summed over the rows whose label is
    not ``ignore_index`` and divided by their count (clamped to 1). Ours:
    ``fused_linear_distillation_loss(..., ce_weight=h, kd_weight=s / T**2, divergence="jsd", beta=beta,
    temperature=T, standardize=False)`` (``reduction="mean"``). Loss and the gradients of the
    student's hidden states, weight and bias agree to float64 rounding for the soft term; Liger's
    hard term takes its log_softmax in float32 (``.float()``), so with ``h > 0`` to 1e-6. Every label
    ignored gives 0 in both."""
    loss_cls = peer("liger_kernel.chunked_loss").LigerFusedLinearJSDLoss
    (h, s), tau = weights, 2.0
    rtol = EXACT if h == 0 else FLOAT32
    hidden, weight, bias = (logits(N, H, requires_grad=True), logits(V, H, requires_grad=True),
                            logits(V, requires_grad=True))
    teacher = dict(teacher_hidden=logits(N, H + 3), teacher_weight=logits(V, H + 3), teacher_bias=logits(V))
    labels = token_labels(N, num_classes=V)
    liger_module = loss_cls(weight_hard_loss=h, weight_soft_loss=s, beta=beta, temperature=tau, compiled=False,
                            chunk_size=4)

    def liger(rows):
        return liger_module(hidden, weight, teacher["teacher_hidden"], teacher["teacher_weight"], rows, bias,
                            teacher["teacher_bias"])

    def ours(rows):
        return lsk.fused_linear_distillation_loss(
            hidden, weight, labels=rows, student_bias=bias, ce_weight=h, kd_weight=s / tau**2, divergence="jsd",
            beta=beta, temperature=tau, standardize=False, backend=backend, **teacher)

    assert_loss(ours(torch.full_like(labels, -100)), liger(torch.full_like(labels, -100)), rtol, "all ignored")
    got, expected = ours(labels), liger(labels)
    assert_loss(got, expected, rtol)
    for name, g_ours, g_liger in zip(("hidden", "weight", "bias"), grads(got, hidden, weight, bias),
                                     grads(expected, hidden, weight, bias)):
        assert_grad(g_ours, g_liger, rtol, f"d/d student {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", BETAS)
def test_jsd(beta, backend):
    """``LigerJSD(beta)(log_q, log_p, shift_labels)``, student first, on log-probabilities the caller
    makes (``log_softmax(x / T)``; the kernel takes no temperature): the generalized JSD (beta 0 / 1:
    forward / reverse KL) summed over the rows whose label is not -100 and divided by their count,
    without labels by the row count. Ours: ``distillation_loss(x, y, labels, ce_weight=0, kd_weight=1 /
    T**2, divergence="jsd", beta=beta, temperature=T, standardize=False)``. The kernel computes in
    float32 (float64 in, float64 out): agreement to 1e-6, for the loss and for the student logits'
    gradient (Liger's, through the caller's log_softmax)."""
    jsd = peer("liger_kernel.transformers").LigerJSD(beta=beta)
    tau = 2.0
    x, y = logits(N, V, requires_grad=True), logits(N, V)
    labels = token_labels(N, num_classes=V)
    for rows in (labels, None):
        xd = x.to(TRITON_DEVICE)
        extra = () if rows is None else (rows.to(TRITON_DEVICE),)
        expected = jsd(F.log_softmax(xd / tau, -1), F.log_softmax(y.to(TRITON_DEVICE) / tau, -1), *extra)
        got = lsk.distillation_loss(x, y, rows, ce_weight=0.0, kd_weight=1.0 / tau**2, divergence="jsd", beta=beta,
                                    temperature=tau, standardize=False, backend=backend)
        assert_loss(got, expected.cpu(), FLOAT32)
        assert_grad(grads(got, x)[0], grads(expected, x)[0], FLOAT32, "d/d student logits")


class _TritonFloat(float):
    """A Python float with ``.to(dtype)``: the interpreter passes a kernel's float arguments as Python
    numbers, where the compiler passes Triton scalars, and Liger's TVD kernel calls
    ``scale.to(tl.float32)`` on one."""

    def to(self, dtype: object) -> "_TritonFloat":
        return self


class _InterpretableLaunch:
    """``kernel[grid](...)`` with the argument ``name`` passed as a :class:`_TritonFloat`."""

    def __init__(self, kernel, name: str) -> None:
        self.kernel, self.position = kernel, kernel.arg_names.index(name)

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def call(*args, **kwargs):
            args = list(args)
            args[self.position] = _TritonFloat(args[self.position])
            return launch(*args, **kwargs)

        return call


@pytest.fixture
def tvd_loss(monkeypatch):
    """``LigerTVDLoss``; under the Triton interpreter its kernel's ``scale`` argument is made a
    :class:`_TritonFloat` (the compiled kernel on CUDA needs nothing)."""
    ops = peer("liger_kernel.ops.tvd")
    if os.environ.get("TRITON_INTERPRET") == "1":
        monkeypatch.setattr(ops, "_tv_distance_kernel", _InterpretableLaunch(ops._tv_distance_kernel, "scale"))
    return peer("liger_kernel.transformers").LigerTVDLoss


@pytest.mark.parametrize("backend", BACKENDS)
def test_tvd(tvd_loss, backend):
    """``LigerTVDLoss(reduction)(p, q, shift_labels)`` on probabilities the caller makes (``p =
    softmax(x / T)`` the student's, whose gradient it returns; ``q`` the teacher's): ``0.5 |p - q|``
    per element, rows whose label is -100 left out. Its reductions against ours (``divergence="tvd"``,
    ``standardize=False``, ``/ T**2``): ``"batchmean"`` (sum / labelled rows) = our ``"mean"``,
    ``"sum"`` = ``"sum"``, ``"mean"`` (sum / (labelled rows * V)) = ``logitstd_kd_loss``'s ``"mean"``,
    ``"none"`` ((N, V) elements) summed over V = our ``"none"``. Float32 kernel: agreement to 1e-6,
    the student logits' gradient included."""
    tau = 2.0
    x, y = logits(N, V, requires_grad=True), logits(N, V)
    labels = token_labels(N, num_classes=V)
    common = dict(divergence="tvd", temperature=tau, standardize=False, backend=backend)

    def liger(reduction):
        p, q = F.softmax(x.to(TRITON_DEVICE) / tau, -1), F.softmax(y.to(TRITON_DEVICE) / tau, -1)
        return tvd_loss(reduction=reduction)(p, q, labels.to(TRITON_DEVICE))

    def ours(reduction):
        return lsk.distillation_loss(x, y, labels, ce_weight=0.0, kd_weight=1.0 / tau**2, reduction=reduction, **common)

    expected, got = liger("batchmean"), ours("mean")
    assert_loss(got, expected.cpu(), FLOAT32, "batchmean")
    assert_grad(grads(got, x)[0], grads(expected, x)[0], FLOAT32, "d/d student logits")
    assert_loss(ours("sum"), liger("sum").cpu(), FLOAT32, "sum")
    element_mean = lsk.logitstd_kd_loss(x, y, mask=labels != -100, reduction="mean", **common) / tau**2
    assert_loss(element_mean, liger("mean").cpu(), FLOAT32, "mean")
    assert_grad(ours("none").detach(), liger("none").detach().cpu().sum(-1), FLOAT32, "none, per row")
