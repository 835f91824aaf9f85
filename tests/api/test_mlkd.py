"""Multi-level KD (``lsk.mlkd_loss``, ``lsk.MLKDLoss``): loss and student gradient against the independent
float64 restatement of the official formula (tests/formula.py, ``mlkd_numpy``) for every confidence
mode, standardized and not, on the fused CPU kernel and the eager path; float32 within the package's
accuracy rule; the official code's own arithmetic (as written) for ``confidence="fraction"``; the
argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import formula
import logitstd_kernels as lsk
from logitstd_kernels._backends import unavailable_reason
from logitstd_kernels.testing import assert_within_eager_error
from support import needs

needs_cpu = needs(unavailable_reason("cpu", "cpu") is None, "the C++ extension is not built")
OPTIONS = dict(temperatures=(4.0, 3.0, 5.0, 2.0, 6.0), temperature_weights=(1.0, 0.5, 2.0, 1.0, 0.25),
               class_weight=0.7, batch_weight=1.3)


def _fused(x, y, backend, upstream=0.7, **options):
    x = x.detach().requires_grad_(True)
    loss = lsk.mlkd_loss(x, y, backend=backend, **options)
    (grad,) = torch.autograd.grad(loss * upstream, x)
    return loss, grad


def _truth(x, y, upstream=0.7, **options):
    loss, grad = formula.mlkd_numpy(x.detach().double().reshape(-1, x.shape[-1]).numpy(),
                                    y.double().reshape(-1, y.shape[-1]).numpy(), upstream=upstream, **options)
    return torch.tensor(loss, dtype=torch.float64), torch.from_numpy(grad).reshape(x.shape)


@needs_cpu
@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("confidence", ["row", "fraction", "none"])
@pytest.mark.parametrize("standardize", [True, False], ids=["std", "plain"])
@pytest.mark.parametrize("rows,classes", [(7, 2), (8, 33), (5, 300)])
def test_mlkd_matches_the_formula_float64(backend, confidence, standardize, rows, classes):
    x = 3 * torch.randn(rows, classes, dtype=torch.float64)
    y = 3 * torch.randn(rows, classes, dtype=torch.float64) + 1e3  # a large offset
    options = dict(OPTIONS, confidence=confidence, standardize=standardize)
    loss, grad = _fused(x, y, backend, **options)
    want_loss, want_grad = _truth(x, y, **options)
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-13)


@needs_cpu
@pytest.mark.parametrize("standardize", [True, False], ids=["std", "plain"])
def test_mlkd_float32_within_the_eager_error(standardize):
    x, y = 2 * torch.randn(12, 257), 2 * torch.randn(12, 257)
    x[3] = 5.0  # a constant row
    options = dict(OPTIONS, standardize=standardize)
    fast = _fused(x, y, "cpu", **options)
    eager = _fused(x, y, "torch", **options)
    exact = _truth(x, y, **options)
    assert fast[0].dtype == torch.float32 and fast[1].dtype == torch.float32
    for name, got, want_eager, want in zip(("loss", "grad_student"), fast, eager, exact):
        assert_within_eager_error(name, got, want_eager, want)


@needs_cpu
def test_student_close_to_its_teacher_float32():
    """Near convergence the correlation terms are small differences of large Gram matrices: the fused
    path's k x k form (terms second order in p_t - p_s) stays within the eager error of the direct form."""
    y = 2 * torch.randn(64, 10)
    x = y + 1e-3 * torch.randn(64, 10)
    options = dict(OPTIONS, standardize=False)
    fast, eager, exact = _fused(x, y, "cpu", **options), _fused(x, y, "torch", **options), _truth(x, y, **options)
    for name, got, want_eager, want in zip(("loss", "grad_student"), fast, eager, exact):
        assert_within_eager_error(name, got, want_eager, want)


@pytest.mark.parametrize("n,k", [(40, 3), (3, 40), (9, 9), (7, 5)])
def test_gram_gap_forms_agree(n, k):
    from logitstd_kernels.mlkd import gram_gap

    p, q = torch.rand(n, k, dtype=torch.float64), torch.rand(n, k, dtype=torch.float64)
    want = ((p @ p.T - q @ q.T) ** 2).sum()
    torch.testing.assert_close(gram_gap(p, q), want, rtol=1e-12, atol=0)
    torch.testing.assert_close(gram_gap(p, q, direct=True), want, rtol=0, atol=0)


@needs_cpu
def test_leading_dims_and_non_contiguous_rows():
    base = torch.randn(2, 3, 40, dtype=torch.float64)
    y = torch.randn(2, 3, 20, dtype=torch.float64)
    x = base[..., ::2]  # strided class dimension
    loss, grad = _fused(x, y, "cpu", **OPTIONS)
    want_loss, want_grad = _truth(x, y, **OPTIONS)
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-13)
    module = lsk.MLKDLoss(**OPTIONS, backend="cpu")
    torch.testing.assert_close(module(x, y), loss, rtol=1e-14, atol=0)


def _official(x, y, taus):
    """The official MLKD code's weak-view terms for one KD weight of 1, as its arithmetic runs: a
    batch-mean KD (``reduce=True``) times a (N,) mask, then ``.mean()``; the same for the
    correlation terms with the class and row masks; logit standardization on the KD only."""
    def normalize(z):
        return (z - z.mean(-1, keepdim=True)) / (1e-7 + z.std(-1, keepdim=True))

    p = F.softmax(y, 1)
    conf = p.max(1)[0]
    mask = conf.le(float(np.percentile(conf.numpy(), 50)))
    mass = p.sum(0)
    class_mask = mass.le(float(np.percentile(mass.numpy(), 50)))
    total = 0.0
    for t in taus:
        kd = F.kl_div(F.log_softmax(normalize(x) / t, 1), F.softmax(normalize(y) / t, 1),
                      reduction="none").sum(1).mean() * t**2
        ps, pt = F.softmax(x / t, 1), F.softmax(y / t, 1)
        cc = ((pt.T @ pt - ps.T @ ps) ** 2).sum() / x.shape[1]
        bc = ((pt @ pt.T - ps @ ps.T) ** 2).sum() / x.shape[0]
        total = total + (kd * mask).mean() + (cc * class_mask).mean() + (bc * mask).mean()
    return total


@needs_cpu
def test_fraction_is_the_official_code():
    x, y = torch.randn(10, 100, dtype=torch.float64), torch.randn(10, 100, dtype=torch.float64)
    taus = (4.0, 3.0, 5.0, 2.0, 6.0)
    ours = lsk.mlkd_loss(x, y, temperatures=taus, confidence="fraction", backend="cpu")
    torch.testing.assert_close(ours, _official(x, y, taus), rtol=1e-12, atol=1e-12)


def test_bad_arguments_name_themselves():
    x, y = torch.randn(4, 6), torch.randn(4, 6)
    cases = [(TypeError, "temperatures", dict(temperatures=())), (ValueError, "temperatures", dict(temperatures=(2, -1))),
             (ValueError, "temperature_weights", dict(temperatures=(2, 3), temperature_weights=(1,))),
             (ValueError, "temperature_weights", dict(temperature_weights=(1, 1, 1, 1, -1))),
             (ValueError, "confidence", dict(confidence="median")), (ValueError, "class_weight", dict(class_weight=-1)),
             (TypeError, "batch_weight", dict(batch_weight="1")), (ValueError, "backend", dict(backend="gpu")),
             (TypeError, "unexpected keyword", dict(temperature=2.0))]
    for error, match, options in cases:
        with pytest.raises(error, match=match):
            lsk.mlkd_loss(x, y, **options)
    with pytest.raises(ValueError, match="shape"):
        lsk.mlkd_loss(x, y[:, :5])
    with pytest.raises(ValueError, match="no rows"):
        lsk.mlkd_loss(x[:0], y[:0])
    with pytest.raises(ValueError, match="confidence"):
        lsk.MLKDLoss(confidence="all")
