"""Every divergence on every fused backend against the independent float64 formula (tests/formula.py).

forward KL, reverse KL, the generalized JSD (TRL's convention: beta 0 and 1 are the forward and the
reverse KL), Jeffreys and TVD, standardized and not, loss and both gradients, with the package's
accuracy rule (within 2x the same-dtype eager error plus 16 u of the terms; tests/support.py). The
cases that exercise each divergence's numerics: a high temperature (T = 100, where a KL computed
from its partition sums cancels), a class that is -inf in both rows, rows of large magnitude and
a teacher that puts all its mass on one class.
"""

from __future__ import annotations

import pytest
import torch

import logitstd_kernels as lsk
from support import (assert_within_eager_error, case_id, check_against_reference, exact_loss_and_grads, fused_cases,
                     loss_and_grads, term_magnitudes)

CASES = fused_cases()
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.0), ("jsd", 1.0),
               ("jeffreys", 0.5), ("tvd", 0.5)]
DIVERGENCE_IDS = [d if d != "jsd" else f"jsd-{b:g}" for d, b in DIVERGENCES]


def logits(rows: int, num_classes: int, device: str, dtype=torch.float64, scale: float = 3.0) -> torch.Tensor:
    return (scale * torch.randn(rows, num_classes, dtype=torch.float64)).to(device=device, dtype=dtype)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
@pytest.mark.parametrize("standardize", [True, False], ids=["std", "plain"])
def test_divergence_matches_the_formula(case, divergence, beta, standardize):
    """V = 2, an odd V and V beyond one block of the blocked path, in float64, float32 and bf16."""
    backend, device = case
    options = dict(divergence=divergence, beta=beta, standardize=standardize, temperature=2.0,
                   teacher_temperature=1.5)
    for num_classes, rows, dtype in ((2, 5, torch.float64), (1271, 4, torch.float64), (1271, 4, torch.float32),
                                     (4099, 1, torch.bfloat16)):
        x = logits(rows, num_classes, device, dtype)
        y = logits(rows, num_classes, device, dtype, scale=4.0)
        check_against_reference(x, y, backend, **options)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_high_temperature_does_not_cancel(case, divergence, beta):
    """T = 100 and a student close to its teacher: the divergence is ~1e-8 of its terms, which a
    difference of partition sums would lose entirely in float32. (TVD's loss only: its subgradient
    sign(p - q) is not determined by float32 data where p and q agree to rounding, which happens for
    some of these elements; test_tvd_subgradient_at_high_temperature checks its gradient.)"""
    backend, device = case
    y = logits(4, 700, device, torch.float32)
    x = (y.double() + 0.01 * torch.randn(4, 700, dtype=torch.float64, device=device)).float()
    for standardize in (True, False):
        options = dict(divergence=divergence, beta=beta, temperature=100.0, standardize=standardize,
                       reduction="none")
        if divergence != "tvd":
            check_against_reference(x, y, backend, **options)
            continue
        upstream = torch.ones(4, dtype=torch.float64, device=device)
        with torch.no_grad():
            fast = lsk.logitstd_kd_loss(x, y, backend=backend, **options)
        eager = lsk.reference.logitstd_kd_loss(x, y, **options)
        exact = exact_loss_and_grads(x, y, upstream, **options)[0]
        assert_within_eager_error("loss", fast, eager, exact, magnitude=term_magnitudes(x, y, upstream, **options)[0])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_tvd_subgradient_at_high_temperature(case):
    """TVD's gradient at T = 100 where every |ln p - ln q| is far above float32 rounding (the sign of
    p - q is determined by the data; the inputs are checked for it)."""
    backend, device = case
    y = logits(2, 200, device, torch.float32)
    x = (y.double() + torch.randn(2, 200, dtype=torch.float64, device=device)).float()
    a, b = (lsk.reference.zscore(v.double(), 100.0) for v in (x, y))
    log_ratio = torch.log_softmax(b, -1) - torch.log_softmax(a, -1)
    assert float(log_ratio.abs().min()) > 1e-6, "the inputs must not put p and q within rounding of each other"
    check_against_reference(x, y, backend, divergence="tvd", temperature=100.0, reduction="none")


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_hard_rows(case, divergence, beta):
    """A class -inf in both rows (a padded vocabulary entry: its limit is 0), a teacher with all its
    mass on one class (p = 0 elsewhere after underflow), a row of large offset, masked NaN rows."""
    backend, device = case
    x, y = logits(5, 300, device, torch.float32), logits(5, 300, device, torch.float32)
    x[0, -3:] = y[0, -3:] = float("-inf")
    y[1] = 0.0
    y[1, 4] = 200.0
    x[2] = 1000.0 + 0.01 * torch.randn(300, device=device)
    x[3, 5] = float("nan")
    mask = torch.tensor([True, True, True, False, True], device=device)
    plain = dict(divergence=divergence, beta=beta, standardize=False, temperature=1.0, reduction="none")
    check_against_reference(x, y, backend, mask=mask, **plain)
    finite = torch.tensor([False, True, True, False, True], device=device)  # a -inf logit makes the z-score NaN
    check_against_reference(x, y, backend, mask=finite, divergence=divergence, beta=beta, reduction="none")


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_objective_with_labels(case, divergence, beta):
    """The CE + divergence objective: ignored labels, label smoothing, return_components."""
    backend, device = case
    x = logits(6, 301, device).requires_grad_(True)
    y = logits(6, 301, device).requires_grad_(True)
    labels = torch.tensor([3, -100, 7, 0, 300, -100], device=device)
    options = dict(divergence=divergence, beta=beta, ce_weight=0.3, kd_weight=0.7, label_smoothing=0.1,
                   temperature=2.0)
    got = lsk.distillation_loss(x, y, labels, backend=backend, return_components=True, **options)
    want = lsk.reference.distillation_loss(x, y, labels, return_components=True, **options)
    for name in ("loss", "ce", "kd"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(got.loss, (x, y))
    want_grads = torch.autograd.grad(want.loss, (x, y))
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "jeffreys", "tvd"])
def test_gradcheck(case, divergence):
    """The autograd wiring of each divergence (fast mode: random projections of the Jacobian)."""
    backend, device = case
    x = torch.randn(3, 9, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.randn(3, 9, dtype=torch.float64, device=device, requires_grad=True)
    for standardize in (True, False):
        assert torch.autograd.gradcheck(
            lambda a, b: lsk.logitstd_kd_loss(a, b, temperature=1.7, divergence=divergence, beta=0.3,
                                              standardize=standardize, backend=backend), (x, y), fast_mode=True)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_jsd_beta_ends_are_the_kls(case):
    """jsd at beta = 0 and 1 is exactly the forward and the reverse KL (TRL's and Liger's convention),
    not the limits of the JSD there (which are 0)."""
    backend, device = case
    x, y = logits(3, 50, device), logits(3, 50, device)
    ones = torch.ones((), dtype=torch.float64)
    for beta, same in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        jsd = loss_and_grads(lsk.logitstd_kd_loss, x, y, ones, divergence="jsd", beta=beta, backend=backend)
        kl = loss_and_grads(lsk.logitstd_kd_loss, x, y, ones, divergence=same, backend=backend)
        for a, b in zip(jsd, kl):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
