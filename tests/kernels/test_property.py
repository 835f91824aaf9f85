"""Property-based tests (hypothesis): every fused backend against the float64 truth on drawn problems.

A drawn problem: rows 0..6; V in {1, 2, 3, 5, 17, 64, 1271, 4097, 5000} (V > 4096 takes the blocked
Triton path); float32 / float64 / float16 / bfloat16 inputs, mixed pairs too (bf16 is left out
where the Triton kernels run in the interpreter: support.interpreted()); contiguous rows, rows with a
stride larger than V (a slice of a wider tensor) and every other row; temperatures 0.05..100 and a
separate teacher temperature; correction 0/1; eps 0, 1e-7 or 1e-3; every reduction; no mask, a
random mask or every row masked; standardize on or off; an incoming gradient that is not 1; the
teacher gradient requested or not; and rows of the kinds that break naive kernels: constant, a large
offset (1000 + 0.01 randn), huge values (1e18 randn, up to 3e38 in float32/bf16), tiny values
(1e-30 randn), -inf teacher logits (without standardization), a peaked row (one class 80 above the
rest), and NaN/Inf in masked rows.

Checked for each fused backend that runs here (support.fused_cases()): no exception, and the loss
and both gradients pass the accuracy criterion (logitstd_kernels/testing.py) against the truth, with
the eager reference's error as the yardstick. The criterion also checks the non-finite pattern: the
result may not be NaN/Inf where the truth and the eager result are finite, and must be non-finite
where the truth is (so such draws need no skipping: their finite parts are compared too).

The truth: support.exact_loss_and_grads (the reference in float64, or for float64 math the
independent formula in extended precision); where that is non-finite but formula.py in float64 is
finite, the formula's value. That happens for -inf teacher logits: the reference's autograd gives
NaN teacher gradients there (0 * log 0 in the KL's backward) while the loss and the true gradient
are finite. The criterion's allowance is ULPS x u x the magnitude of the terms each result is
formed from (formula.py, ``magnitudes=True``; see logitstd_kernels/testing.py), as in every test
that compares against the truth. The truth itself is only as exact as its own precision allows: a
row whose result cancels far below its terms (e.g. two near-uniform rows of 1e-30 logits: gradients
~1e-28, while 1 + 1e-30 rounds to 1 in float64) is resolved to ULPS x u(truth) x those terms'
magnitude, which the criterion gets in addition as an absolute ``floor`` (2^29 below the float32
allowance, 2^11 below the float64 one where the truth is in extended precision).

Examples: by default the ``logitstd-ci`` profile of the root conftest.py (``derandomize=True``, 60
examples, no database): the same examples on every run. ``LOGITSTD_TEST_SEED=<int>|random`` switches
to the ``logitstd-fuzz`` profile, seeded from that int and the test's node id; a failure prints the
setting that reproduces it, and hypothesis prints the falsifying problem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import torch

import formula
import logitstd_kernels as lsk
from logitstd_kernels.testing import ULPS, eager_error_violation
from support import (EXTENDED, case_id, eager_loss_and_grads, exact_loss_and_grads, fused_cases, interpreted,
                     loss_and_grads, require_module)

hypothesis = require_module("hypothesis", extra="test")
from hypothesis import Phase, event, given, note, seed, settings, strategies as st  # noqa: E402

CASES = fused_cases()
VOCABS = (1, 2, 3, 5, 17, 64, 1271, 4097, 5000)
ROW_KINDS = ("normal", "normal", "normal", "constant", "offset", "huge", "tiny", "peaked", "neg-inf", "poison")


@dataclass(frozen=True)
class Problem:
    """Everything the test draws; the tensors are built from it (and its seed) by :func:`build`."""

    rows: int
    num_classes: int
    student_dtype: torch.dtype
    teacher_dtype: torch.dtype
    student_layout: str
    teacher_layout: str
    temperature: float
    teacher_temperature: Optional[float]
    standardize: bool
    correction: int
    eps: float
    reduction: str
    mask: str
    student_kinds: tuple[str, ...]
    teacher_kinds: tuple[str, ...]
    upstream_scale: float
    grad_teacher: bool
    seed: int

    def options(self) -> dict:
        return dict(temperature=self.temperature, teacher_temperature=self.teacher_temperature,
                    standardize=self.standardize, correction=self.correction, eps=self.eps,
                    reduction=self.reduction)


@st.composite
def problems(draw, allow_bf16: bool) -> Problem:
    dtypes = [torch.float32, torch.float64, torch.float16] + ([torch.bfloat16] if allow_bf16 else [])
    rows = draw(st.integers(0, 6))
    num_classes = draw(st.sampled_from(VOCABS))
    student_dtype = draw(st.sampled_from(dtypes))
    teacher_dtype = draw(st.one_of(st.just(student_dtype), st.sampled_from(dtypes)))
    layouts = st.sampled_from(("contiguous", "wide", "every-other"))
    temperatures = st.one_of(st.sampled_from((0.05, 1.0, 2.0, 4.0, 100.0)), st.floats(0.05, 100.0))
    standardize = draw(st.booleans()) and num_classes >= 2  # standardizing V = 1: an argument error
    correction = draw(st.sampled_from((0, 1)))
    mask = draw(st.sampled_from(("none", "random", "all-false")))
    kinds = st.lists(st.sampled_from(ROW_KINDS), min_size=rows, max_size=rows).map(tuple)
    return Problem(
        rows=rows, num_classes=num_classes, student_dtype=student_dtype, teacher_dtype=teacher_dtype,
        student_layout=draw(layouts), teacher_layout=draw(layouts),
        temperature=draw(temperatures),
        teacher_temperature=draw(st.one_of(st.none(), temperatures)),
        standardize=standardize, correction=correction,
        eps=draw(st.sampled_from((0.0, 1e-7, 1e-3))),
        reduction=draw(st.sampled_from(("none", "sum", "batchmean", "mean"))),
        mask=mask, student_kinds=draw(kinds), teacher_kinds=draw(kinds),
        upstream_scale=draw(st.sampled_from((0.37, -1.7, 1e-4, 4096.0))),
        grad_teacher=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def _huge_scale(dtype: torch.dtype, gen: torch.Generator) -> float:
    if dtype == torch.float16:
        return 1.5e4  # float16's range ends at 65504
    return float((1e18, 1e30, 3e38)[int(torch.randint(0, 3, (), generator=gen))])


def _row(kind: str, num_classes: int, dtype: torch.dtype, base_scale: float, masked: bool, standardize: bool,
         teacher: bool, gen: torch.Generator) -> torch.Tensor:
    randn = torch.randn(num_classes, dtype=torch.float64, generator=gen)
    if kind == "constant":
        return torch.full((num_classes,), float(3 * randn[0]), dtype=torch.float64)
    if kind == "offset":
        return 1000.0 + 0.01 * randn
    if kind == "huge":
        limit = 3e38 if dtype != torch.float16 else 6e4
        return (_huge_scale(dtype, gen) * randn).clamp(-limit, limit)
    if kind == "tiny":
        return 1e-30 * randn
    if kind == "peaked":
        row = base_scale * randn
        row[int(torch.randint(0, num_classes, (), generator=gen))] += 80.0
        return row
    if kind == "neg-inf" and teacher and not standardize:
        row = base_scale * randn
        count = int(torch.randint(1, num_classes + 1, (), generator=gen))
        row[torch.randperm(num_classes, generator=gen)[:count]] = float("-inf")
        return row
    if kind == "poison" and masked:
        row = base_scale * randn
        row[int(torch.randint(0, num_classes, (), generator=gen))] = float("nan")
        row[int(torch.randint(0, num_classes, (), generator=gen))] = float("inf")
        return row
    return base_scale * randn


def _layout(values: torch.Tensor, layout: str, dtype: torch.dtype) -> torch.Tensor:
    rows, num_classes = values.shape
    values = values.to(dtype)
    if layout == "wide":  # a slice of a wider tensor: row stride V + 7
        wide = torch.zeros(rows, num_classes + 7, dtype=dtype)
        wide[:, 3:3 + num_classes] = values
        return wide[:, 3:3 + num_classes]
    if layout == "every-other":
        doubled = torch.zeros(2 * rows, num_classes, dtype=dtype)
        doubled[::2] = values
        return doubled[::2]
    return values


def build(problem: Problem):
    gen = torch.Generator().manual_seed(problem.seed)
    rows, num_classes = problem.rows, problem.num_classes
    if problem.mask == "none":
        mask = None
    elif problem.mask == "all-false":
        mask = torch.zeros(rows, dtype=torch.bool)
    else:
        mask = torch.rand(rows, generator=gen) < 0.6
    masked = [mask is not None and not bool(mask[r]) for r in range(rows)]

    def logits(kinds, dtype, scale, teacher):
        values = torch.stack([_row(k, num_classes, dtype, scale, masked[r], problem.standardize, teacher, gen)
                              for r, k in enumerate(kinds)]) if rows else torch.zeros(0, num_classes,
                                                                                      dtype=torch.float64)
        return values

    student = _layout(logits(problem.student_kinds, problem.student_dtype, 3.0, False), problem.student_layout,
                      problem.student_dtype)
    teacher = _layout(logits(problem.teacher_kinds, problem.teacher_dtype, 5.0, True), problem.teacher_layout,
                      problem.teacher_dtype)
    lead = (rows,) if problem.reduction == "none" else ()
    upstream = problem.upstream_scale * (torch.rand(lead, dtype=torch.float64, generator=gen) + 0.25)
    return student, teacher, mask, upstream


def truth(student, teacher, mask, upstream, problem: Problem):
    """The exact loss and gradients, the magnitudes of their terms, and the truth's absolute
    uncertainty (see the module docstring).

    The truth: support.exact_loss_and_grads; where that is non-finite and formula.py (float64) is
    finite, the formula's value. Its uncertainty: ULPS x its unit roundoff x the magnitude of the
    terms each result is formed from (formula.py): rows whose result cancels far below its terms
    (near-uniform rows of 1e-30 logits, say) are only resolved to that, by any truth.
    """
    kwargs = dict(problem.options(), mask=mask)
    exact = exact_loss_and_grads(student, teacher, upstream, problem.grad_teacher, **kwargs)
    independent, magnitudes = formula.loss_and_grads(
        student.double().numpy(), teacher.double().numpy(), mask=None if mask is None else mask.numpy(),
        upstream=upstream.numpy(), magnitudes=True, **problem.options())
    float64_math = lsk.reference.accumulation_dtype(student, teacher) == torch.float64 and EXTENDED is not None
    u_truth = float(np.finfo(EXTENDED).eps) / 2 if float64_math else 2.0**-53
    results, mags, floors = [], [], []
    for t, f, m in zip(exact, independent, magnitudes):
        f = torch.from_numpy(np.asarray(f, dtype=np.float64))
        mags.append(torch.from_numpy(np.asarray(m, dtype=np.float64)))
        floors.append(ULPS * u_truth * mags[-1])
        results.append(None if t is None else torch.where(~torch.isfinite(t) & torch.isfinite(f), f, t))
    return tuple(results), tuple(mags), tuple(floors)


def check_problem(problem: Problem, backend: str, device: str) -> None:
    student, teacher, mask, upstream = build(problem)
    note(f"student {tuple(student.shape)} stride {student.stride()}, teacher stride {teacher.stride()}")
    exact, mags, floors = truth(student, teacher, mask, upstream, problem)
    eager = eager_loss_and_grads(student, teacher, upstream, problem.grad_teacher, **problem.options(), mask=mask)
    if not all(t is None or bool(torch.isfinite(t).all()) for t in exact):
        event("the truth has non-finite values")
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    fast = loss_and_grads(lsk.logitstd_kd_loss, dev(student), dev(teacher), dev(upstream), problem.grad_teacher,
                          backend=backend, mask=dev(mask), **problem.options())
    assert fast[0].dtype == lsk.reference.accumulation_dtype(student, teacher), fast[0].dtype
    assert fast[1].dtype == student.dtype, fast[1].dtype
    found = {name: None if x is None else eager_error_violation(name, f.cpu(), e, x, magnitude=m, floor=floor)
             for name, f, e, x, m, floor in zip(("loss", "grad_student", "grad_teacher"), fast, eager, exact, mags,
                                                floors)}
    # One assertion per result, so that hypothesis shrinks and reports each kind of failure separately.
    assert found["loss"] is None, found["loss"]
    assert found["grad_student"] is None, found["grad_student"]
    assert found["grad_teacher"] is None, found["grad_teacher"]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fused_backend_matches_the_truth_on_drawn_problems(case, node_seed):
    backend, device = case
    allow_bf16 = not interpreted(backend, device)

    @given(problem=problems(allow_bf16))
    def run(problem: Problem) -> None:
        check_problem(problem, backend, device)

    if interpreted(backend, device):
        # Seconds per example in the Triton interpreter: no shrinking (it ran past 5 minutes); a
        # failure is reported with the unshrunk problem, which reproduces it all the same.
        run = settings(phases=[Phase.explicit, Phase.reuse, Phase.generate])(run)

    if os.environ.get("LOGITSTD_TEST_SEED", "").strip():  # fuzzing: seeded from the variable and the node id
        run = seed(node_seed)(run)
    run()


def test_the_profiles_are_registered():
    """The default profile is derandomized and bounded (CI); the fuzzing one is not derandomized."""
    ci, fuzz = settings.get_profile("logitstd-ci"), settings.get_profile("logitstd-fuzz")
    assert ci.derandomize and ci.max_examples == 60 and ci.deadline is None and ci.database is None
    assert not fuzz.derandomize
    expected = "logitstd-fuzz" if os.environ.get("LOGITSTD_TEST_SEED", "").strip() else "logitstd-ci"
    if "HYPOTHESIS_PROFILE" not in os.environ:
        assert settings.default.derandomize == settings.get_profile(expected).derandomize
