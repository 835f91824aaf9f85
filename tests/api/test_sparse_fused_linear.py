"""``fused_linear_distillation_loss`` with a ``SparseTeacher``: the student's lm_head in chunks, each
chunk's logits dense and one sparse kernel launch per chunk; loss and the gradients of the hidden
states, the weight and the bias equal the eager composition (float64, 1e-10) for every backend
that has the sparse kernel, chunk sizes that do and do not divide the rows, masked and ignored rows,
both reductions, a student logit transform and an incoming gradient != 1."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import logitstd_kernels as lsk
from logitstd_kernels.reference import transform_logits
from test_sparse_teacher import BACKENDS, SUPPORTS, matrix, padded_teacher

F64 = torch.float64


def _grads(loss_fn, h, w, b, upstream):
    leaves = [t.detach().clone().requires_grad_(True) for t in (h, w, b)]
    loss = loss_fn(*leaves)
    return (loss.detach(),) + torch.autograd.grad(loss, leaves, upstream)


@matrix("support,chunk_size,reduction", [(s, c, r) for s in SUPPORTS for c, r in [(None, "mean"), (3, "sum"), (4, "mean")]],
        triton=lambda s, c, r: c == 3)
def test_matches_the_eager_composition(backend, support, chunk_size, reduction):
    b, t, hid, v, k = 2, 5, 8, 23, 6
    h = torch.randn(b, t, hid, dtype=F64)
    w = torch.randn(v, hid, dtype=F64) * 0.5
    bias = torch.randn(v, dtype=F64)
    rows = padded_teacher(b * t, v, k)
    teacher = lsk.SparseTeacher(*(x.reshape(b, t, k) for x in (rows.ids, rows.values)), rows.kind,
                                rows.row_mean.reshape(b, t), rows.row_std.reshape(b, t),
                                rows.log_normalizer.reshape(b, t), rows.mask.reshape(b, t, k))
    labels = torch.randint(0, v, (b, t))
    labels[0, 3] = -100
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 0] = False
    options = dict(support=support, reduction=reduction, temperature=1.5, ce_weight=0.3, kd_weight=0.8,
                   student_final_logit_softcapping=30.0 if reduction == "sum" else None)
    upstream = torch.tensor(0.6, dtype=F64)
    fused = _grads(lambda h_, w_, b_: lsk.fused_linear_distillation_loss(
        h_, w_, labels=labels, teacher_logits=teacher, student_bias=b_, mask=mask, chunk_size=chunk_size,
        backend=backend, **options), h, w, bias, upstream)
    softcap = options.pop("student_final_logit_softcapping")
    eager = _grads(lambda h_, w_, b_: lsk.distillation_loss(
        transform_logits(F.linear(h_, w_, b_), 1.0, softcap), teacher, labels, mask=mask, backend="torch", **options),
        h, w, bias, upstream)
    for name, got, want in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), fused, eager):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_components_and_no_grad():
    h, w = torch.randn(4, 6, dtype=F64), torch.randn(11, 6, dtype=F64)
    teacher = padded_teacher(4, 11, 3, pad=False)
    parts = lsk.fused_linear_distillation_loss(h, w, teacher_logits=teacher, return_components=True, backend="cpu"
                                               if "cpu" in BACKENDS else "torch")
    want = lsk.distillation_loss(F.linear(h, w), teacher, return_components=True, backend="torch")
    for got, ref in zip(parts, want):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        loss = lsk.fused_linear_distillation_loss(h.requires_grad_(), w, teacher_logits=teacher)
    assert not loss.requires_grad and torch.isclose(loss, want.loss, rtol=1e-10)


@pytest.mark.parametrize("options,error,name", [
    (dict(teacher_hidden=torch.randn(4, 6, dtype=F64)), ValueError, "teacher_hidden"),
    (dict(teacher_logit_scale=2.0), ValueError, "teacher_logit_scale"),
    (dict(labels=torch.zeros(3, dtype=torch.long)), ValueError, "labels"),
    (dict(divergence="tvd"), ValueError, "divergence"),
])
def test_bad_input(options, error, name):
    h, w = torch.randn(4, 6, dtype=F64), torch.randn(11, 6, dtype=F64)
    with pytest.raises(error, match=name):
        lsk.fused_linear_distillation_loss(h, w, teacher_logits=padded_teacher(4, 11, 3, pad=False), **options)


def test_rows_must_match():
    h, w = torch.randn(5, 6, dtype=F64), torch.randn(11, 6, dtype=F64)
    with pytest.raises(ValueError, match="rows"):
        lsk.fused_linear_distillation_loss(h, w, teacher_logits=padded_teacher(4, 11, 3, pad=False))


def test_modules_take_a_sparse_teacher():
    """``DistillationLoss`` and ``FusedLinearDistillationLoss`` pass a SparseTeacher through: the same
    value as the functions."""
    h, w = torch.randn(4, 6, dtype=F64), torch.randn(11, 6, dtype=F64)
    teacher = padded_teacher(4, 11, 3, pad=False)
    labels = torch.tensor([1, -100, 3, 4])
    options = dict(support="tail", temperature=1.5)
    module = lsk.DistillationLoss(**options)(F.linear(h, w), teacher, labels)
    function = lsk.distillation_loss(F.linear(h, w), teacher, labels, backend="torch", **options)
    fused = lsk.FusedLinearDistillationLoss(**options)(h, w, labels=labels, teacher_logits=teacher)
    torch.testing.assert_close(module, function, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused, function, rtol=1e-10, atol=1e-12)


def test_vocab_parallel_losses_refuse_a_sparse_teacher():
    """Dense teacher shards only: a SparseTeacher raises before any collective (no process group needed)."""
    from logitstd_kernels.distributed import (vocab_parallel_distillation_loss,
                                              vocab_parallel_fused_linear_distillation_loss)

    teacher = padded_teacher(4, 11, 3, pad=False)
    with pytest.raises(NotImplementedError, match="teacher_logits"):
        vocab_parallel_distillation_loss(torch.randn(4, 11, dtype=F64), teacher)
    with pytest.raises(NotImplementedError, match="teacher_logits"):
        vocab_parallel_fused_linear_distillation_loss(torch.randn(4, 6, dtype=F64), torch.randn(11, 6, dtype=F64),
                                                      teacher_logits=teacher)
