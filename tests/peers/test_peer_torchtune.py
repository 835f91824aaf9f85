"""Parity with torchtune 0.6.1's KD losses (``torchtune.modules.loss``): ``ForwardKLLoss``,
``ReverseKLLoss``, ``SymmetricKLLoss``.

Each takes (N, V) student and teacher logits and labels (any shape with N elements; -100 ignored),
takes its softmaxes in float32 whatever the inputs' dtype (``dtype=torch.float32``), has no
temperature (the caller divides the logits and multiplies by ``T**2`` itself) and, with
``normalize=True``, divides the sum over the labelled rows by their count (0 when there is none);
``normalize=False`` returns the sum. Float32 math: agreement to 1e-6.

- ``ReverseKLLoss`` is KL(q || p): ours ``divergence="reverse_kl"`` exactly.
- ``ForwardKLLoss`` is the cross-entropy ``-sum_k p_k log q_k = KL(p || q) + H(p)``: ours
  ``divergence="forward_kl"`` plus the mean teacher entropy H(p) over the labelled rows (a constant
  of the student, so the student gradients agree without it).
- ``SymmetricKLLoss(r)`` is ``r * ForwardKLLoss + (1 - r) * ReverseKLLoss``: at r = 1/2 it is half
  our ``divergence="jeffreys"`` plus half the mean H(p).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peer_support import BACKENDS, FLOAT32, assert_grad, assert_loss, grads, logits, peer, token_labels

import logitstd_kernels as lsk

B, T, V = 2, 5, 37


@pytest.fixture(scope="module")
def tt():
    return peer("torchtune.modules.loss")


def teacher_entropy(y: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean over the labelled rows of H(softmax(y)) (float64)."""
    log_p = F.log_softmax(y.detach(), -1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    keep = labels.reshape(-1) != -100
    return entropy[keep].sum() / keep.sum()


def ours(x, y, labels, divergence, backend, tau=1.0, reduction="mean"):
    """Ours with one label per row (torchtune flattens its labels)."""
    return lsk.distillation_loss(x, y, labels.reshape(-1), ce_weight=0.0, kd_weight=1.0, divergence=divergence, temperature=tau,
                                 standardize=False, reduction=reduction, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reverse_kl(tt, backend):
    """``ReverseKLLoss()(x, y, labels)`` = ours ``reverse_kl`` (T = 1); ``normalize=False`` = our
    ``"sum"``; at T = 2, ``T**2 * ReverseKLLoss()(x / T, y / T, labels)`` = ours at ``temperature=2``.
    Labels (B, T) with (B * T, V) logits."""
    x, y = logits(B * T, V, requires_grad=True), logits(B * T, V)
    labels = token_labels(B, T, num_classes=V)
    expected, got = tt.ReverseKLLoss()(x, y, labels), ours(x, y, labels, "reverse_kl", backend)
    assert_loss(got, expected, FLOAT32)
    assert_grad(grads(got, x)[0], grads(expected, x)[0], FLOAT32, "d/d student logits")
    assert_loss(ours(x, y, labels, "reverse_kl", backend, reduction="sum"),
                tt.ReverseKLLoss()(x, y, labels, normalize=False), FLOAT32, "normalize=False")
    assert_loss(ours(x, y, labels, "reverse_kl", backend, tau=2.0), 4.0 * tt.ReverseKLLoss()(x / 2, y / 2, labels),
                FLOAT32, "T = 2")


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_kl_is_a_cross_entropy(tt, backend):
    """``ForwardKLLoss()`` = ours ``forward_kl`` + the mean teacher entropy; the student gradients are
    the same (the entropy does not depend on the student). All labels ignored: 0 in both."""
    x, y = logits(B * T, V, requires_grad=True), logits(B * T, V)
    labels = token_labels(B * T, num_classes=V)
    expected, got = tt.ForwardKLLoss()(x, y, labels), ours(x, y, labels, "forward_kl", backend)
    assert_loss(got + teacher_entropy(y, labels), expected, FLOAT32)
    assert_grad(grads(got, x)[0], grads(expected, x)[0], FLOAT32, "d/d student logits")
    none = torch.full_like(labels, -100)
    assert_loss(ours(x, y, none, "forward_kl", backend), tt.ForwardKLLoss()(x, y, none), FLOAT32, "all ignored")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ratio", [0.5, 0.2])
def test_symmetric_kl(tt, ratio, backend):
    """``SymmetricKLLoss(r)`` = ``r (forward_kl + H(p)) + (1 - r) reverse_kl``; at r = 1/2,
    ``2 SymmetricKLLoss(0.5) - H(p)`` = ours ``jeffreys``, gradient included."""
    x, y = logits(B * T, V, requires_grad=True), logits(B * T, V)
    labels = token_labels(B * T, num_classes=V)
    expected = tt.SymmetricKLLoss(sym_kd_ratio=ratio)(x, y, labels)
    mixed = ratio * (ours(x, y, labels, "forward_kl", backend) + teacher_entropy(y, labels)) + \
        (1 - ratio) * ours(x, y, labels, "reverse_kl", backend)
    assert_loss(mixed, expected, FLOAT32)
    if ratio == 0.5:
        jeffreys = ours(x, y, labels, "jeffreys", backend)
        assert_loss(jeffreys, 2 * expected - teacher_entropy(y, labels), FLOAT32, "jeffreys")
        assert_grad(grads(jeffreys, x)[0], 2 * grads(expected, x)[0], FLOAT32, "d/d student logits")
