"""Parity of the fused lm_head with TRL 1.16's ``DistillationTrainer`` loss,
``trl.trainer.distillation_trainer._chunked_divergence_loss``.

TRL's function takes (B, K, H) hidden states, (V, H) lm_heads (and biases), a (B, K)
``completion_mask``, ``beta`` and ``temperature``; it projects tiles of rows and classes, transforms
each model's logits as ``z = scale * x``, then ``z = c * tanh(z / c)`` with a softcapping ``c``, then
``z / T``, and sums the generalized JSD (beta 0 forward KL(p || q), 1 reverse KL(q || p), m = beta p +
(1 - beta) q otherwise; no ``T**2``) over the rows where the mask is nonzero, divided by their count
clamped to 1, or by ``num_items_in_batch``. It computes in float32 whatever the inputs (float64
hidden states are rounded to float32 before the matmul): the loss agrees to 1e-6, the gradients to
1e-5 of their largest entry (tests/peers/peer_support.py, ``FLOAT32_LINEAR_GRAD``).

Ours: ``fused_linear_distillation_loss(hs, Ws, ht, Wt, mask=completion_mask != 0, student_bias=bs,
teacher_bias=bt, ce_weight=0, kd_weight=1 / T**2, divergence="jsd", beta=beta, temperature=T,
standardize=False)`` (``reduction="mean"``; ``"sum"`` / n for ``num_items_in_batch=n``), and the
transforms under TRL's names ``student_logit_scale``, ``teacher_logit_scale``,
``student_final_logit_softcapping``, ``teacher_final_logit_softcapping`` (scale, then softcapping,
then the temperature).
"""

from __future__ import annotations

import pytest
import torch

from peer_support import BACKENDS, FLOAT32, FLOAT32_LINEAR_GRAD, assert_grad, assert_loss, grads, logits, peer

import logitstd_kernels as lsk

B, K, H, V = 2, 5, 8, 37
TAU = 2.0


@pytest.fixture(scope="module")
def trl_loss():
    return peer("trl.trainer.distillation_trainer")._chunked_divergence_loss


@pytest.fixture
def heads():
    """The student (requiring grad) and teacher tensors and a completion mask with 3 rows out."""
    student = dict(hidden=logits(B, K, H, scale=1.0, requires_grad=True), weight=logits(V, H, requires_grad=True),
                   bias=logits(V, scale=1.0, requires_grad=True))
    teacher = dict(hidden=logits(B, K, H + 3, scale=1.0), weight=logits(V, H + 3), bias=logits(V, scale=1.0))
    mask = torch.ones(B, K, dtype=torch.long)
    mask[0, 3:] = 0
    mask[1, 0] = 0
    return student, teacher, mask


def run_both(trl_loss, heads, beta, backend, num_items=None, **transforms):
    """(TRL's loss, ours) on the same inputs."""
    student, teacher, mask = heads
    expected, _, n_valid = trl_loss(student["hidden"], teacher["hidden"], student["weight"], teacher["weight"], mask,
                                    beta, num_items, student["bias"], teacher["bias"], temperature=TAU, **transforms)
    assert int(n_valid) == int(mask.sum())
    got = lsk.fused_linear_distillation_loss(
        student["hidden"], student["weight"], teacher["hidden"], teacher["weight"], mask=mask != 0,
        student_bias=student["bias"], teacher_bias=teacher["bias"], ce_weight=0.0, kd_weight=1.0 / TAU**2,
        divergence="jsd", beta=beta, temperature=TAU, standardize=False,
        reduction="mean" if num_items is None else "sum", backend=backend, **transforms)
    return expected, got if num_items is None else got / num_items


def check(expected, got, heads):
    """The loss (to 1e-6) and the gradients of the student's hidden states, weight and bias (to 1e-5
    of their largest entry: ``FLOAT32_LINEAR_GRAD``)."""
    student = heads[0]
    assert_loss(got, expected, FLOAT32)
    names = ("hidden", "weight", "bias")
    for name, g_ours, g_trl in zip(names, grads(got, *(student[n] for n in names)),
                                   grads(expected, *(student[n] for n in names))):
        assert_grad(g_ours, g_trl, FLOAT32_LINEAR_GRAD, f"d/d student {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_items", [None, 11], ids=["mean", "num_items"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_chunked_divergence(trl_loss, heads, beta, num_items, backend):
    """No logit transforms: TRL's mean over the completion tokens (or its sum / ``num_items_in_batch``)."""
    check(*run_both(trl_loss, heads, beta, backend, num_items), heads)


TRANSFORMS = {
    "student-scale": dict(student_logit_scale=0.5),
    "teacher-scale": dict(teacher_logit_scale=2.0),
    "student-softcap": dict(student_final_logit_softcapping=3.0),
    "teacher-softcap": dict(teacher_final_logit_softcapping=5.0),
    "all-four": dict(student_logit_scale=1.5, teacher_logit_scale=0.25, student_final_logit_softcapping=4.0,
                     teacher_final_logit_softcapping=2.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("transforms", list(TRANSFORMS.values()), ids=list(TRANSFORMS))
def test_chunked_divergence_with_logit_transforms(trl_loss, heads, transforms, beta, backend):
    """TRL's logit scale (Cohere, Granite, ...) and final softcapping (Gemma) of either model, each
    alone and all four together, softcapping small enough to bend the logits (|x| up to ~10):
    scale, then softcap, then temperature, the gradient through the softcap's tanh included."""
    check(*run_both(trl_loss, heads, beta, backend, **transforms), heads)
