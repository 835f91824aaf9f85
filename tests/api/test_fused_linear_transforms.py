"""The fused lm_head's logit transforms (TRL's ``student_logit_scale``, ``teacher_logit_scale``,
``student_final_logit_softcapping``, ``teacher_final_logit_softcapping``) on every backend, in float64
against the full-logits truth of tests/support.py (the transforms and their chain rule in NumPy), in
bfloat16 within twice the eager composition's error, and their argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import logitstd_kernels as lsk
from logitstd_kernels import reference
from logitstd_kernels.distributed import vocab_parallel_fused_linear_distillation_loss
from support import assert_matches, case_id, fused_cases, interpreted, labels_for, make_problem, numpy_truth, run

CASES = fused_cases()
ALL = CASES + [("torch", "cpu")]
OPTIONS = dict(ce_weight=0.3, kd_weight=2.5, temperature=1.7, teacher_temperature=2.3)
TRANSFORMS = {
    "cohere-scale": dict(student_logit_scale=0.0625, teacher_logit_scale=1.75),
    "gemma-softcap": dict(student_final_logit_softcapping=2.5, teacher_final_logit_softcapping=4.0),
    "scale-then-softcap": dict(student_logit_scale=1.5, student_final_logit_softcapping=3.0, teacher_logit_scale=0.5,
                               teacher_final_logit_softcapping=2.0),
}
DIVERGENCES = {"forward-kl": dict(divergence="forward_kl"), "reverse-kl": dict(divergence="reverse_kl"),
               "jsd-0.3": dict(divergence="jsd", beta=0.3)}


def _teacher(kind, ht, wt, bt):
    return (dict(teacher_hidden=ht, teacher_weight=wt, teacher_bias=bt) if kind == "hidden+weight"
            else dict(teacher_logits=F.linear(ht, wt, bt)))


@pytest.mark.parametrize("case", ALL, ids=case_id)
@pytest.mark.parametrize("transforms", TRANSFORMS.values(), ids=TRANSFORMS.keys())
@pytest.mark.parametrize("standardize", [True, False], ids=["standardized", "plain"])
@pytest.mark.parametrize("teacher", ["hidden+weight", "logits"])
def test_against_the_float64_truth(case, transforms, standardize, teacher):
    """Labels with ignore_index, an incoming gradient != 1, chunks that split the rows; logits large
    enough (a few x the softcaps) that tanh is far from linear."""
    backend, device = case
    h, w, b, ht, wt, bt = make_problem(13, 8, 11, 37, device)
    h, ht = 3 * h, 2 * ht
    labels = labels_for((13,), 37, "some-ignored", device)
    options = dict(OPTIONS, standardize=standardize)
    got = run(h, w, b, upstream=1.7, labels=labels, chunk_size=5, backend=backend, **_teacher(teacher, ht, wt, bt),
              **transforms, **options)
    want = numpy_truth(h, w, b, F.linear(ht, wt, bt), labels, upstream=1.7, transforms=transforms, **options)
    assert_matches(got, want, 1e-9)


@pytest.mark.parametrize("case", ALL, ids=case_id)
@pytest.mark.parametrize("divergence", DIVERGENCES.values(), ids=DIVERGENCES.keys())
@pytest.mark.parametrize("standardize", [True, False], ids=["standardized", "plain"])
def test_with_a_divergence(case, divergence, standardize):
    """The transforms and their chain rule in NumPy around the eager reference's divergence."""
    backend, device = case
    h, w, b, ht, wt, bt = make_problem(11, 6, 7, 29, device)
    labels = labels_for((11,), 29, "some-ignored", device)
    transforms = TRANSFORMS["scale-then-softcap"]
    options = dict(OPTIONS, standardize=standardize, **divergence)
    got = run(3 * h, w, b, upstream=0.6, labels=labels, chunk_size=4, backend=backend,
              **_teacher("hidden+weight", ht, wt, bt), **transforms, **options)
    want = numpy_truth(3 * h, w, b, F.linear(ht, wt, bt), labels, upstream=0.6, transforms=transforms, **options)
    assert_matches(got, want, 1e-9)


@pytest.mark.parametrize("case", ALL, ids=case_id)
def test_edge_rows(case):
    """Logits far beyond the softcap (tanh saturates: their gradient is exactly 0, nothing overflows),
    a constant row (zero hidden state, no bias), a NaN hidden state in a masked row (on the fused
    backends it reaches no other row and no weight gradient), ignored labels; mean and sum; then
    every row ignored."""
    backend, device = case
    h, w, _, ht, wt, _ = make_problem(10, 6, 6, 23, device, biases=False)
    h[2] *= 1e4
    h[7] = 0.0
    labels = labels_for((10,), 23, "some-ignored", device)
    mask = torch.ones(10, dtype=torch.bool, device=device)
    mask[5] = False
    clean = h.clone()
    if backend != "torch":  # the eager composition's G.T @ H takes 0 * NaN from the masked row
        h[5] = float("nan")
    transforms = dict(student_final_logit_softcapping=1.5, teacher_final_logit_softcapping=1.5)
    teacher = _teacher("hidden+weight", ht, wt, None)
    for reduction in ("mean", "sum"):
        got = run(h, w, None, labels=labels, mask=mask, chunk_size=3, reduction=reduction, backend=backend,
                  **teacher, **transforms, **OPTIONS)
        want = numpy_truth(clean, w, None, F.linear(ht, wt), labels, mask=mask, reduction=reduction,
                           transforms=transforms, **OPTIONS)
        assert all(bool(torch.isfinite(g).all()) for g in got if g is not None)
        assert_matches(got, want, 1e-9)
    ignored = torch.full_like(labels, -100)
    got = run(h, w, None, labels=ignored, chunk_size=3, backend=backend, **teacher, **transforms, **OPTIONS)
    assert float(got[0]) == 0.0 and not got[2].any()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bfloat16_within_twice_the_eager_error(case):
    """In bf16 (the transforms in the logits' dtype, as a model computes them) every result within
    twice the error of the eager composition in bf16, both against float64."""
    backend, device = case
    h, w, b, ht, wt, bt = make_problem(24, 16, 16, 96, device)
    labels = labels_for((24,), 96, "some-ignored", device)
    transforms = TRANSFORMS["scale-then-softcap"]
    want = numpy_truth(3 * h, w, b, F.linear(ht, wt, bt), labels, upstream=2.0, transforms=transforms, **OPTIONS)
    low = [t.to(torch.bfloat16) for t in (3 * h, w, b, ht, wt, bt)]
    common = dict(upstream=2.0, labels=labels, **_teacher("hidden+weight", *low[3:]), **transforms, **OPTIONS)
    got = run(*low[:3], chunk_size=5, backend=backend, **common)
    eager = run(*low[:3], backend="torch", **common)
    for name, g, e, t in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, eager, want):
        t = torch.as_tensor(np.asarray(t), dtype=torch.float64)
        scale = t.abs().max()
        err, eager_err = (float((v.double().cpu() - t).abs().max() / scale) for v in (g, e))
        assert err <= 2 * eager_err, f"{name}: error {err:.2e}, eager bf16 {eager_err:.2e}"


def test_the_reference_is_the_eager_composition():
    """``backend="torch"`` is reference.linear_loss_of_config: transform_logits of F.linear, then
    distillation_loss; transform_logits is Cohere's scale, then Gemma's softcap, in the logits' dtype."""
    h, w, b, ht, wt, bt = make_problem(5, 4, 4, 9, "cpu", dtype=torch.float32)
    x = F.linear(h, w, b)
    torch.testing.assert_close(reference.transform_logits(x, 0.5, 2.0), 2.0 * torch.tanh(0.5 * x / 2.0),
                               rtol=0, atol=1e-6)
    assert reference.transform_logits(x) is x
    transforms = TRANSFORMS["scale-then-softcap"]
    got = lsk.fused_linear_distillation_loss(h, w, ht, wt, student_bias=b, teacher_bias=bt, backend="torch",
                                             **transforms)
    want = reference.distillation_loss(reference.transform_logits(x, 1.5, 3.0),
                                       reference.transform_logits(F.linear(ht, wt, bt), 0.5, 2.0))
    assert torch.equal(got, want)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("pattern", ["no-labels", "some-ignored"])
def test_given_teacher_logits_are_not_modified(case, pattern):
    """The chunks' teacher logits are slices of the caller's tensor (or, rows gathered, copies):
    transformed out of place."""
    backend, device = case
    h, w, b, ht, wt, bt = make_problem(6, 4, 4, 9, device)
    teacher_logits = F.linear(ht, wt, bt)
    before = teacher_logits.clone()
    lsk.fused_linear_distillation_loss(h, w, labels=labels_for((6,), 9, pattern, device), teacher_logits=teacher_logits,
                                       chunk_size=4, backend=backend, **TRANSFORMS["scale-then-softcap"])
    assert torch.equal(teacher_logits, before)


def test_the_module_passes_them_through():
    h, w, b, ht, wt, bt = make_problem(7, 5, 5, 11, "cpu")
    transforms = TRANSFORMS["scale-then-softcap"]
    module = lsk.FusedLinearDistillationLoss(chunk_size=3, **transforms, **OPTIONS)
    assert "student_final_logit_softcapping=3.0" in repr(module)
    want = lsk.fused_linear_distillation_loss(h, w, ht, wt, chunk_size=3, **transforms, **OPTIONS)
    assert torch.equal(module(h, w, ht, wt), want)


def test_opcheck_with_transforms():
    h, w, b, ht, wt, bt = make_problem(6, 4, 5, 9, "cpu")
    labels = labels_for((6,), 9, "some-ignored", "cpu")
    args = (h.requires_grad_(True), w.requires_grad_(True), b, ht, wt, bt, None, labels, None, 2.0, 2.0, True, 1,
            1e-7, -100, 0.0, 0.1, 9.0, "mean", 4, torch.float64, True, True, False, "cpu",
            *lsk.DistillConfig().op_tail_args(), 1.5, 0.5, 3.0, None)
    torch.library.opcheck(torch.ops.logitstd.fused_linear_distillation_loss.default, args)


BAD = [("student_logit_scale", 0.0, ValueError), ("student_logit_scale", -1.0, ValueError),
       ("teacher_logit_scale", float("inf"), ValueError), ("teacher_logit_scale", float("nan"), ValueError),
       ("student_logit_scale", True, TypeError), ("teacher_logit_scale", "2", TypeError),
       ("student_final_logit_softcapping", 0.0, ValueError), ("teacher_final_logit_softcapping", -30.0, ValueError),
       ("student_final_logit_softcapping", float("inf"), ValueError),
       ("teacher_final_logit_softcapping", "30", TypeError)]


@pytest.mark.parametrize("name,value,error", BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_bad_values_name_the_argument(name, value, error):
    h, w, _, ht, wt, _ = make_problem(6, 4, 5, 9, "cpu")
    with pytest.raises(error, match=name):
        lsk.fused_linear_distillation_loss(h, w, ht, wt, **{name: value})
    with pytest.raises(error, match=name):
        lsk.FusedLinearDistillationLoss(**{name: value})
    with pytest.raises(error, match=name):  # raised locally, before any collective (check_shards=False)
        vocab_parallel_fused_linear_distillation_loss(h, w, ht, wt, check_shards=False, chunk_size=4, **{name: value})


@pytest.mark.parametrize("case", [c for c in CASES if not interpreted(*c)], ids=case_id)
def test_identity_transforms_are_bit_identical(case):
    """Scale 1 and no softcap: the same operations as without the keywords."""
    backend, device = case
    h, w, b, ht, wt, bt = make_problem(9, 6, 6, 21, device, dtype=torch.float32)
    common = dict(teacher_hidden=ht, teacher_weight=wt, teacher_bias=bt, chunk_size=4, backend=backend)
    got = run(h, w, b, student_logit_scale=1.0, teacher_logit_scale=1.0, **common)
    want = run(h, w, b, **common)
    assert all(torch.equal(g, t) for g, t in zip(got, want))
