"""Parity with TRL 1.16's ``GKDTrainer.generalized_jsd_loss`` (``trl.experimental.gkd``).

TRL's function, for (B, T, V) student logits x, teacher logits y, ``labels`` (-100 ignored):
``q = softmax(x / T)``, ``p = softmax(y / T)``; per element of each row the generalized JSD
``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``, except exactly beta = 0
(forward KL(p || q)) and beta = 1 (reverse KL(q || p)); no ``T**2`` factor. Ours multiplies every KD
term by ``T**2``, so ``kd_weight = 1 / T**2`` (or dividing by ``T**2``) undoes it.
"""

from __future__ import annotations

import pytest
import torch

from peer_support import BACKENDS, EXACT, assert_grad, assert_loss, grads, logits, peer, token_labels

import logitstd_kernels as lsk

B, T, V = 2, 5, 37


@pytest.fixture(scope="module")
def gkd_loss():
    return peer("trl.experimental.gkd").GKDTrainer.generalized_jsd_loss


def ours(x, y, labels, beta, tau, backend, reduction="mean"):
    """TRL's divergence through ``distillation_loss``: pure KD (``ce_weight=0``), the labels only
    selecting rows, ``kd_weight = 1 / T**2``."""
    return lsk.distillation_loss(x, y, labels, ce_weight=0.0, kd_weight=1.0 / tau**2, divergence="jsd", beta=beta,
                                 temperature=tau, standardize=False, reduction=reduction, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_batchmean_with_labels(gkd_loss, beta, tau, backend):
    """``reduction="batchmean"`` with labels: the sum over the rows whose label is not -100, divided by
    their count (``mask.sum().clamp_min(1)``): ours ``reduction="mean"`` with the same labels. Loss and
    the gradients of both logits (TRL's through autograd) agree to float64 rounding."""
    x, y = logits(B, T, V, requires_grad=True), logits(B, T, V, requires_grad=True)
    labels = token_labels(B, T, num_classes=V)
    expected = gkd_loss(x, y, labels=labels, beta=beta, temperature=tau)
    got = ours(x, y, labels, beta, tau, backend)
    assert_loss(got, expected, EXACT)
    for name, g_ours, g_trl in zip(("student", "teacher"), grads(got, x, y), grads(expected, x, y)):
        assert_grad(g_ours, g_trl, EXACT, f"d/d {name} logits")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_other_normalizations(gkd_loss, beta, backend):
    """TRL's other divisors, at T = 2:

    - ``batchmean`` without labels divides the sum over all B * T rows by ``size(0)`` = B (per
      sequence, not per token): ours ``reduction="sum"`` / B;
    - ``num_items_in_batch=n`` (the Trainer's count over the accumulated batch) divides the sum over
      the labelled rows by n, whatever the reduction: ours ``reduction="sum"`` / n;
    - ``"sum"``: ours ``"sum"``; ``"mean"`` (``F.kl_div``'s element mean, sum / (rows * V)): ours
      ``logitstd_kd_loss(reduction="mean")`` with the labelled rows as the mask;
    - every label -100 with ``batchmean``: 0 in both.
    """
    tau = 2.0
    x, y = logits(B, T, V), logits(B, T, V)
    labels = token_labels(B, T, num_classes=V)
    common = dict(beta=beta, temperature=tau)
    assert_loss(ours(x, y, None, beta, tau, backend, "sum") / B, gkd_loss(x, y, **common), EXACT, "batchmean, no labels")
    assert_loss(ours(x, y, labels, beta, tau, backend, "sum") / 7,
                gkd_loss(x, y, labels=labels, num_items_in_batch=torch.tensor(7), **common), EXACT, "num_items_in_batch")
    assert_loss(ours(x, y, labels, beta, tau, backend, "sum"), gkd_loss(x, y, labels=labels, reduction="sum", **common),
                EXACT, "sum")
    element_mean = lsk.logitstd_kd_loss(x, y, mask=labels != -100, reduction="mean", divergence="jsd", beta=beta,
                                        temperature=tau, standardize=False, backend=backend) / tau**2
    assert_loss(element_mean, gkd_loss(x, y, labels=labels, reduction="mean", **common), EXACT, "mean")
    none = torch.full_like(labels, -100)
    assert_loss(ours(x, y, none, beta, tau, backend), gkd_loss(x, y, labels=none, **common), EXACT, "all ignored")


@pytest.mark.parametrize("backend", BACKENDS)
def test_beta_zero_is_forward_kl_not_the_limit(gkd_loss, backend):
    """TRL (and we) treat beta = 0 exactly as forward KL and beta = 1 as reverse KL, although the
    generalized JSD tends to 0 at both ends: beta = 1e-9 gives ~1e-9 of the beta = 0 loss, in both."""
    x, y = logits(B, T, V), logits(B, T, V)
    for beta in (1e-9, 1.0 - 1e-9):
        got, expected = ours(x, y, None, beta, 1.0, backend, "sum") / B, gkd_loss(x, y, beta=beta)
        assert_loss(got, expected, 1e-6, f"beta={beta}")
        assert float(got) < 1e-6 * float(ours(x, y, None, round(beta), 1.0, backend, "sum") / B)


@pytest.mark.parametrize("backend", BACKENDS)
def test_standardized_is_trl_on_zscored_logits(gkd_loss, backend):
    """What ``standardize=True`` (our default) adds, in TRL's terms: TRL's loss of the z-scored logits
    (``lsk.zscore``: ``torch.std``'s correction, ``eps=1e-7``), times ``T**2``."""
    x, y = logits(B, T, V), logits(B, T, V)
    labels = token_labels(B, T, num_classes=V)
    tau, beta = 2.0, 0.5
    got = lsk.distillation_loss(x, y, labels, ce_weight=0.0, kd_weight=1.0, divergence="jsd", beta=beta,
                                temperature=tau, backend=backend)
    expected = tau**2 * gkd_loss(lsk.zscore(x), lsk.zscore(y), labels=labels, beta=beta, temperature=tau)
    assert_loss(got, expected, EXACT)
