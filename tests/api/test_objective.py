"""The distillation objective (CE + KD in one pass) on every fused backend, against an independent
float64 NumPy implementation (tests/formula.py for the KD rows, the CE written out below), the
paper's official code, and Liger-Kernel's distillation semantics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import logitstd_kernels as lsk
from formula import objective_numpy
from support import capture_cuda_graph, case_id, fused_cases, objective_term_magnitudes
from logitstd_kernels.testing import assert_within_eager_error

CASES = fused_cases()
ALL = CASES + [("torch", "cpu")]


def run(fn, x, y, labels, upstream, **kwargs):
    """(loss, grad_x, grad_y, ce, kd) of lsk.distillation_loss-like ``fn`` on leaf copies."""
    xl = x.detach().clone().requires_grad_(True)
    yl = y.detach().clone().requires_grad_(True)
    out = fn(xl, yl, labels, return_components=True, **kwargs)
    out.loss.backward(torch.as_tensor(upstream, dtype=out.loss.dtype, device=x.device).expand_as(out.loss))
    return out.loss.detach(), xl.grad, yl.grad, out.ce, out.kd


def close(name, got, want, rtol=1e-9):
    want = torch.as_tensor(np.asarray(want), dtype=torch.float64)
    got = got.detach().double().cpu()
    scale = want.abs().max().clamp_min(1e-300)
    err = float((got - want).abs().max() / scale) if want.numel() else 0.0
    assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:.0e}"


def labels_for(lead, num_classes, pattern):
    labels = torch.randint(0, num_classes, lead)
    flat = labels.view(-1)
    if pattern == "some-ignored":
        flat[::3] = -100
    elif pattern == "all-ignored":
        flat[:] = -100
    return labels


@pytest.mark.parametrize("case", ALL, ids=case_id)
@pytest.mark.parametrize("pattern", ["none-ignored", "some-ignored", "all-ignored", "no-labels"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_against_an_independent_float64_implementation(case, pattern, reduction):
    """Loss, both gradients and both parts, float64, for (batch, seq, V) inputs with a mask."""
    backend, device = case
    lead, num_classes = (2, 5), 37
    x = 3 * torch.randn(*lead, num_classes, dtype=torch.float64)
    y = 5 * torch.randn(*lead, num_classes, dtype=torch.float64)
    labels = None if pattern == "no-labels" else labels_for(lead, num_classes, pattern)
    mask = torch.rand(lead) > 0.2
    upstream = torch.rand(lead, dtype=torch.float64) + 0.5 if reduction == "none" else torch.tensor(1.7)
    options = dict(ce_weight=0.3, kd_weight=2.5, temperature=2.0, teacher_temperature=1.5, label_smoothing=0.1,
                   mask=mask, reduction=reduction)
    got = run(lsk.distillation_loss, x.to(device), y.to(device), None if labels is None else labels.to(device),
              upstream.to(device), backend=backend, **{**options, "mask": mask.to(device)})
    want = objective_numpy(x.numpy(), y.numpy(), None if labels is None else labels.numpy(), upstream=upstream.numpy(),
                           **{**options, "mask": mask.numpy()})
    for name, g, w in zip(("loss", "grad_student", "grad_teacher", "ce", "kd"), got, want):
        close(name, g, w)
    if pattern == "all-ignored":
        assert float(got[0].abs().sum()) == 0 and torch.count_nonzero(got[1]) == 0


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("options", [
    dict(standardize=True, temperature=2.0),
    dict(standardize=False, temperature=4.0, teacher_temperature=2.0),
    dict(standardize=True, temperature=1.0, correction=0, eps=0.0, label_smoothing=0.2),
], ids=["ls-kd", "plain-kd", "algorithm-1-smoothing"])
@pytest.mark.parametrize("num_classes", [2, 1271, 5000])
def test_dtypes_within_twice_the_eager_error(case, options, num_classes):
    """float32 (and fp16/bf16 where the backend runs them) against the eager objective in the same
    dtype, the float64 objective being the truth; V = 5000 takes the Triton blocked path."""
    backend, device = case
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    for dtype in dtypes:
        x = (3 * torch.randn(6, num_classes, dtype=torch.float64)).to(device=device, dtype=dtype)
        y = (5 * torch.randn(6, num_classes, dtype=torch.float64)).to(device=device, dtype=dtype)
        labels = torch.randint(0, num_classes, (6,), device=device)
        labels[1] = -100
        kwargs = dict(ce_weight=0.5, kd_weight=0.5, **options)
        fast = run(lsk.distillation_loss, x, y, labels, 1.3, backend=backend, **kwargs)
        eager = run(lsk.reference.distillation_loss, x, y, labels, 1.3, **kwargs)
        exact = run(lsk.reference.distillation_loss, x.double(), y.double(), labels, 1.3, **kwargs)
        mags = objective_term_magnitudes(x, y, labels, 1.3, **kwargs)
        for name, f, e, w, m in zip(("loss", "grad_student", "grad_teacher"), fast, eager, exact, mags):
            assert f.dtype == e.dtype, f"{name}: dtype {f.dtype} != {e.dtype}"
            assert_within_eager_error(name, f, e, w, magnitude=m)


@pytest.mark.parametrize("case", ALL, ids=case_id)
def test_the_official_code_objective(case):
    """The paper's official code: 0.1 * CE + 9 * (LS-KD, T = 2, torch.std, +1e-7), batch means."""
    backend, device = case
    x = 3 * torch.randn(8, 100, dtype=torch.float64, device=device)
    y = 5 * torch.randn(8, 100, dtype=torch.float64, device=device)
    target = torch.randint(0, 100, (8,), device=device)

    def standardize(z):
        return (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-7)

    tau = 2.0
    kd = F.kl_div(F.log_softmax(standardize(x) / tau, 1), F.softmax(standardize(y) / tau, 1),
                  reduction="none").sum(1).mean() * tau**2
    official = 0.1 * F.cross_entropy(x, target) + 9.0 * kd
    ours = lsk.distillation_loss(x, y, target, backend=backend)  # the defaults are the official code's
    assert abs(float(ours) - float(official)) <= 1e-6 * abs(float(official))


@pytest.mark.parametrize("case", ALL, ids=case_id)
def test_liger_distillation_semantics(case):
    """Liger-Kernel 0.8.5's chunked distillation loss with the JSD's beta = 0 (KL(teacher || student) of
    logits / T, no standardization, no T^2), weight_hard_loss h, weight_soft_loss s: both terms leave
    the rows whose label is ignore_index out and are divided by the valid rows, so it is exactly
    ``ours(mean, ce_weight=h, kd_weight=s / T^2, standardize=False)``, ignored labels included."""
    backend, device = case
    n, num_classes, tau, h, s = 10, 50, 3.0, 0.4, 0.6
    x = 3 * torch.randn(n, num_classes, dtype=torch.float64, device=device)
    y = 5 * torch.randn(n, num_classes, dtype=torch.float64, device=device)
    target = torch.randint(0, num_classes, (n,), device=device)
    target[[2, 7]] = -100

    def liger(target):
        valid = target != -100
        count = valid.sum().clamp_min(1)
        hard = F.cross_entropy(x[valid], target[valid], reduction="sum") / count
        soft = F.kl_div(F.log_softmax(x[valid] / tau, -1), F.log_softmax(y[valid] / tau, -1), reduction="sum",
                        log_target=True) / count
        return h * hard + s * soft

    common = dict(temperature=tau, standardize=False, backend=backend)
    for labels in (target, torch.where(target == -100, torch.ones_like(target), target)):
        ours = lsk.distillation_loss(x, y, labels, ce_weight=h, kd_weight=s / tau**2, **common)
        assert abs(float(ours) - float(liger(labels))) <= 1e-6 * abs(float(liger(labels)))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradcheck_and_opcheck(case):
    backend, device = case
    x = torch.randn(4, 9, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.randn(4, 9, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.tensor([1, -100, 8, 0], device=device)
    mask = torch.tensor([True, True, False, True], device=device)
    for kwargs in (dict(), dict(standardize=False, label_smoothing=0.2, reduction="none", mask=mask)):
        assert torch.autograd.gradcheck(
            lambda a, b: lsk.distillation_loss(a, b, labels, temperature=1.7, backend=backend, **kwargs), (x, y))
    for reduction in ("mean", "none"):
        torch.library.opcheck(
            torch.ops.logitstd.distillation_loss.default,
            (x.float(), y.float(), labels, mask, 2.0, 1.5, True, 1, 1e-7, -100, 0.1, 0.3, 2.0, reduction, True, True,
             backend),
        )


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_torch_compile_fullgraph(case):
    backend, device = case
    x = torch.randn(6, 40, device=device, requires_grad=True)
    y = torch.randn(6, 40, device=device)
    labels = torch.randint(0, 40, (6,), device=device)
    labels[0] = -100

    def step(a, b, t):
        return lsk.distillation_loss(a, b, t, ce_weight=0.5, kd_weight=0.5, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x, y, labels)
    loss.backward()
    want = run(lsk.reference.distillation_loss, x.double(), y.double(), labels, 1.0, ce_weight=0.5, kd_weight=0.5)
    close("loss", loss, want[0].cpu().numpy(), rtol=1e-5)
    close("grad_student", x.grad, want[1].cpu().numpy(), rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_module_and_components(case):
    backend, device = case
    module = lsk.DistillationLoss(0.5, 0.5, temperature=3.0, return_components=True, backend=backend)
    x, y = torch.randn(3, 4, 20, device=device), torch.randn(3, 4, 20, device=device)
    labels = torch.randint(0, 20, (3, 4), device=device)
    out = module(x, y, labels)
    assert isinstance(out, lsk.DistillationParts) and out.loss.shape == () and out.ce.shape == ()
    torch.testing.assert_close(out.loss, 0.5 * out.ce + 0.5 * out.kd)
    ref = lsk.reference.distillation_loss(x.double(), y.double(), labels, ce_weight=0.5, kd_weight=0.5,
                                          temperature=3.0, return_components=True)
    for got, want in zip(out, ref):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    assert "ce_weight=0.5" in repr(module)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_gradients_are_rounded_once(case, dtype):
    """The objective's gradient times an upstream factor is rounded once, like the KD loss's."""
    backend, device = case
    x = (3 * torch.randn(4, 300)).to(device=device, dtype=dtype)
    y = (5 * torch.randn(4, 300)).to(device=device, dtype=dtype)
    labels = torch.tensor([3, -100, 250, 0], device=device)
    for upstream in (1.0, 9.0, 0.842):
        got = run(lsk.distillation_loss, x, y, labels, upstream, backend=backend)
        exact = run(lsk.reference.distillation_loss, x.double(), y.double(), labels, upstream)
        info = torch.finfo(dtype)
        bound = exact[1].abs().clamp_min(info.smallest_normal) * info.eps / 2 + 16 * 2.0**-24 * exact[1].abs().max()
        assert bool(((got[1].double() - exact[1]).abs() <= bound).all()), f"upstream {upstream}"


@pytest.mark.parametrize("case", ALL, ids=case_id)
def test_bad_input_names_the_argument(case):
    backend, device = case
    x, y = torch.randn(4, 10, device=device), torch.randn(4, 10, device=device)
    good = torch.tensor([1, 2, -100, 3], device=device)
    call = lambda **kw: lsk.distillation_loss(x, y, kw.pop("labels", good), backend=backend, **kw)  # noqa: E731
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        call(labels=good.float())
    with pytest.raises(ValueError, match="labels has shape"):
        call(labels=good[:3])
    with pytest.raises(ValueError, match="ce_weight must be finite and >= 0"):
        call(ce_weight=-1.0)
    with pytest.raises(ValueError, match="kd_weight must be finite and >= 0"):
        call(kd_weight=float("inf"))
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\)"):
        call(label_smoothing=1.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        call(reduction="batchmean")
    if device == "cpu":
        with pytest.raises(IndexError, match=r"labels\[3\] = 10 is outside \[0, 10\)"):
            call(labels=torch.tensor([1, 2, -100, 10], device=device))
        with pytest.raises(IndexError, match="is not ignore_index"):
            call(labels=torch.tensor([1, -1, 0, 0], device=device))
    else:
        # Checking the values on the GPU would need a host synchronization: the row's loss is NaN
        # instead (test_cuda_graph_capture_and_out_of_range_labels checks the other rows).
        for bad in ([1, 2, -100, 10], [1, -1, 0, 0]):
            loss = call(labels=torch.tensor(bad, device=device), reduction="none")
            assert torch.isnan(loss).tolist() == [v not in range(10) and v != -100 for v in bad]


GPU_CASES = [c for c in CASES if c[1] == "cuda"]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_cuda_graph_capture_and_out_of_range_labels(case):
    """No host synchronization: the objective's step is captured and replayed in a CUDA graph with
    changing labels; a label outside [0, V) (not ignore_index) gives its row NaN, the others stay exact."""
    backend, device = case
    rows, vocab = 64, 5000
    x = torch.randn(rows, vocab, device=device, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randn(rows, vocab, device=device, dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (rows,), device=device)

    graph, static = capture_cuda_graph(
        x, lambda: lsk.distillation_loss(x, y, labels, reduction="none", backend=backend))
    for replay in range(2):
        with torch.no_grad():
            x.copy_(3 * torch.randn_like(x))
            labels.copy_(torch.randint(0, vocab, (rows,), device=device))
            labels[::7] = -100
            if replay == 1:
                labels[5] = vocab + 3  # out of range: that row is NaN
        graph.replay()
        torch.cuda.synchronize()
        good = labels != vocab + 3
        want = run(lsk.reference.distillation_loss, x.detach().double()[good], y.double()[good], labels[good],
                   torch.ones(int(good.sum()), dtype=torch.float64, device=device), reduction="none")
        close("loss", static.detach()[good], want[0].cpu().numpy(), rtol=1e-5)
        assert bool(torch.isnan(static[~good]).all()) and bool(torch.isnan(x.grad[~good]).all())
        rel = (x.grad[good].double() - want[1]).abs().max() / want[1].abs().max()
        assert float(rel) < 2e-2, f"bf16 student gradient off by {float(rel):.2e}"
