"""Accuracy criterion shared by the tests and the benchmark's correctness gate.

A fast path is correct when, in every row (a row of classes for a gradient, one element per row for
a per-row loss, the single value of a scalar loss), its error against the reference computed in
float64 (or better) is at most

    2 x (the error of the eager reference run in the input dtype)  +  k * u * M

(max norms over the row), and when it is non-finite exactly where the float64 reference is. Here
``u`` is the unit roundoff of the accumulation dtype (2^-24 for float32 math, 2^-53 for float64),
``k = ULPS = 16``, and ``M`` is the row's largest *term magnitude* where the caller has it (the
magnitudes of the terms each result is a sum / difference of, e.g. tests/formula.py with
``magnitudes=True``: the tests pass them everywhere they compare against the float64 truth), else
the row's largest value ``max|exact|`` (a lower bound of it: a sum is never larger than the sum of
its terms' magnitudes). The slack scales with each row's own values: there is no absolute floor
(beyond float32's underflow threshold, ~1e-37), so a zero gradient, or one scaled by 0.99 or 1.01,
fails even where the gradients are 1e-6 (a fixed floor such as ``2e-6 * (1 + max|exact|)`` would let
those through), and fails in every row whose result is not a cancellation to below ~1e-4 of its
terms (every well-conditioned row).

For bfloat16 / float16 results the eager reference may be given *before* its final rounding (in
float32, e.g. the reference run on the inputs converted to float32, which is the same math); then
each element may in addition be off by the output dtype's rounding, half an ulp (2^-8 relative for
bf16, 2^-11 for fp16), and nothing more: this is what makes a 1% error fail in bf16 too, where
twice a bf16 eager error (up to 2^-7 relative) would let 0.99x and 1.01x results through near
powers of two. See :func:`eager_error_violation`.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["ULPS", "UNMEASURED_FLOAT64_SLACK", "unit_roundoff", "output_roundoff", "eager_error_violation",
           "assert_within_eager_error"]

#: ``k``: the relative slack, in units of the accumulation dtype's unit roundoff (see
#: :func:`eager_error_violation`).
ULPS = 16.0
#: The slack (2^-40 x (1 + max|exact|), ~9e-13) of a float64 result whose "eager" reference is the
#: truth itself (no eager error measured), as the earlier float64 tolerance.
UNMEASURED_FLOAT64_SLACK = 2.0**-40


def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff of the dtype the math of a result in ``dtype`` is accumulated in.

    float64 results come from float64 math (2^-53); every other dtype (float32, and float16 /
    bfloat16, whose math runs in float32) from float32 math (2^-24).
    """
    return 2.0**-53 if dtype == torch.float64 else 2.0**-24


_LOW_PRECISION = {
    # dtype: (unit roundoff = half an ulp relative, half the spacing of its subnormals)
    torch.bfloat16: (2.0**-8, 2.0**-134),
    torch.float16: (2.0**-11, 2.0**-25),
}


def output_roundoff(dtype: torch.dtype) -> Optional[tuple[float, float]]:
    """(relative, absolute) bound of rounding a float32 value to ``dtype``; None for float32/float64."""
    return _LOW_PRECISION.get(dtype)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """Rows of classes for gradients; one element per row for per-row losses; one row for a scalar."""
    if t.dim() == 0:
        return t.reshape(1, 1)
    if t.dim() == 1:
        return t.reshape(-1, 1)
    return t.reshape(-1, t.shape[-1])


def eager_error_violation(name: str, fast: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, *,
                          ulps: float = ULPS, roundoff: Optional[float] = None,
                          magnitude: Optional[torch.Tensor] = None,
                          floor: Optional[torch.Tensor] = None) -> Optional[str]:
    """None if, in every row, ``|fast - exact| <= 2 |eager - exact| + ulps * u * M``, else why not.

    ``fast`` is the result under test, ``eager`` the eager reference in the same dtype(s), ``exact``
    the truth in float64 (all the same shape). Norms are max norms over a row, and the bound is
    applied row by row, so a row with large values cannot lend its error budget to a row with small
    ones. ``u = roundoff`` defaults to :func:`unit_roundoff` of ``fast.dtype``. ``M`` is the row's
    largest term magnitude, ``max(magnitude)``, when ``magnitude`` is given, and ``max|exact|``
    otherwise (``M`` is never taken below ``max|exact|``).

    Why ``2 x eager``: the eager reference in the input dtype is the accuracy a user gets without the
    fused kernels. Its error already contains, *on average*, what the inputs' conditioning forces on
    any implementation (cancellation in ``q - p``, in the KL when the student is close to the
    teacher, in the standardization's chain rule); the factor 2 leaves room for a different but
    equally good order of operations.

    Why ``k * u * M`` on top, with ``M`` the terms' magnitude: on a row whose result is far smaller
    than the terms it is computed from (a 2-class standardized row, whose gradient is O(eps / sigma)
    of the chain rule's terms; a 3-class row whose gradient is nearly parallel to the centered
    logits; a teacher so peaked that its gradient is 1e-11 of its O(1) terms), the eager error is
    rounding luck: anywhere between 0 and ``u * M``, and a kernel as accurate as eager fails "2 x
    eager" on such rows by chance. ``u * M`` is the error of a float32 (float64) evaluation of the
    formula's own terms, each correctly rounded: an error that large is what the rounding of those
    terms alone already makes, so it is no sign of a worse kernel, and a kernel is not asked to
    resolve a result better than its terms can be represented. ``k = 16`` covers what a float32
    kernel adds to that with a different (blocked, tree-shaped) order of operations: the final
    rounding (<= 1 u), the exp/log evaluations (a few u), the row sums (a blocked tree over <= 2^18
    classes adds ~log2(blocks) u, with blocks of 1024+ classes: < 8 u) and the statistics. The
    allowance stays honest: 16 u is 1e-6 relative to the terms in float32 (2e-15 in float64), so a
    result that is 0, or 0.99x or 1.01x the truth (an error of 1% of the result), still fails every
    row whose result is more than ~1e-4 of its terms, i.e. every well-conditioned row, and so fails
    every test that computes such a row. Where no magnitudes are given, ``M = max|exact|``: the
    same allowance for rows that are not cancellations (``max|exact|`` is a lower bound of ``M``).

    Why per row and not per element: the quantities a row shares (the softmax normalizers, the KL,
    the mean, sigma and the chain rule's sum over the row) carry errors of ``u x`` their own terms
    into every element of the row, weighted by coefficients a per-element magnitude tracks only in
    part; the criterion's other parts are row max norms too, and a 1% error of a well-conditioned
    row is a 1% error of its largest element, which a row bound catches.

    bfloat16 / float16 results: if ``eager`` is given in float32 (the eager math before its final
    rounding to the output dtype), the bound is per element: ``2 |eager - exact|`` (row max) plus
    the slack as above, plus the rounding of that value to the output dtype (``2^-8`` relative for
    bf16, ``2^-11`` for fp16, and half the subnormal spacing). A correctly rounded fast result of a
    float32 value within the float32 bound passes; a 1.01x one is >= 0.61% off after rounding and
    fails. If ``eager`` is given in the output dtype, its error contains that rounding already and
    the row form above applies.

    Two absolute terms join the slack. ``ulps`` x the accumulation dtype's smallest normal number
    (2^-126 for float32 math: ~2e-37): below it floating point has no relative precision left
    (gradual underflow), so results that small are compared absolutely. And ``floor`` (default none):
    an absolute allowance per element (the row's maximum is used) for callers whose truth cannot
    resolve every row, e.g. ``ulps * u(truth) * magnitude`` where the truth is computed with a unit
    roundoff ``u(truth)`` not far below ``u``. (The tests' truths have ``u(truth) <= 2^-11 u``: their
    own error is then covered by the margin in ``k``.)

    float64 results need a truth more precise than float64 (tests/support.py::exact_loss_and_grads
    uses extended precision), else the eager float64 reference *is* the truth and its error reads 0.
    When ``eager`` equals ``exact`` for a float64 result, no eager error was measured (and the float64
    truth cannot resolve a result that cancels far below its terms either), so the slack is at least
    the earlier float64 tolerance, ``UNMEASURED_FLOAT64_SLACK x (1 + max|exact|)``
    (~9e-13 x (1 + max)): still far below a 1% error of any result above 1e-10.

    Non-finite values: the fast result must be finite wherever the float64 reference is, and
    non-finite wherever it is not. The one exception: where the eager reference is itself
    non-finite (after rounding to the output dtype) but the float64 one is finite (e.g. a float32
    variance that overflows), the input dtype gives no guidance, so the fast result may be
    non-finite too, and a row holding such an element has no error bound beyond being finite where
    the fast result claims to be. Magnitudes are read where the reference is finite (a non-finite or
    NaN magnitude there counts as 0).
    """
    if fast.shape != exact.shape or eager.shape != exact.shape:
        return (f"{name}: shape {tuple(fast.shape)} (eager {tuple(eager.shape)}) "
                f"!= reference {tuple(exact.shape)}")
    if magnitude is not None and tuple(magnitude.shape) != tuple(exact.shape):
        return f"{name}: magnitude shape {tuple(magnitude.shape)} != reference {tuple(exact.shape)}"
    u = unit_roundoff(fast.dtype) if roundoff is None else float(roundoff)
    out = output_roundoff(fast.dtype)
    per_element = out is not None and output_roundoff(eager.dtype) is None
    fast64, eager64, exact64 = (_as_rows(t.detach().double()) for t in (fast, eager, exact))
    finite = torch.isfinite(exact64)
    fast_finite = torch.isfinite(fast64)
    eager_finite = torch.isfinite(_as_rows(eager.detach().to(fast.dtype) if per_element else eager.detach()))
    eager_finite &= torch.isfinite(eager64)
    extra = fast_finite & ~finite
    lost = finite & ~fast_finite & eager_finite
    if extra.any() or lost.any():
        where = (extra | lost).nonzero()[0].tolist()
        return (f"{name}: non-finite pattern differs from the float64 reference at row {where[0]}, element "
                f"{where[1]} (fast {float(fast64[where[0], where[1]])}, reference "
                f"{float(exact64[where[0], where[1]])}); {int((~fast_finite).sum())} non-finite vs "
                f"{int((~finite).sum())} in the reference")
    if exact64.numel() == 0:
        return None
    zero = torch.zeros((), dtype=torch.float64, device=exact64.device)

    def row_max(valid: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, t.abs(), zero).amax(dim=-1)

    scale = row_max(finite, exact64)
    terms = scale
    if magnitude is not None:
        mag64 = _as_rows(magnitude.detach().to(device=exact64.device, dtype=torch.float64))
        terms = torch.maximum(scale, row_max(finite & torch.isfinite(mag64), mag64))
    tiny = torch.finfo(torch.float64 if fast.dtype == torch.float64 else torch.float32).tiny
    slack = ulps * (u * terms + tiny)
    unmeasured = (fast.dtype == torch.float64 and eager.dtype == torch.float64
                  and bool(((eager64 == exact64) | (eager64.isnan() & exact64.isnan())).all()))
    if unmeasured:
        slack = torch.maximum(slack, UNMEASURED_FLOAT64_SLACK * (1 + scale))
    if floor is not None:
        floor = torch.as_tensor(floor, dtype=torch.float64, device=exact64.device).detach()
        floor = _as_rows(torch.nan_to_num(floor.double().expand(exact.shape), nan=0.0)).amax(dim=-1)
        slack = slack + floor
    eager_err = row_max(finite & eager_finite, eager64 - exact64)
    eager_err = torch.where((finite & ~eager_finite).any(dim=-1), torch.inf, eager_err)
    bound = 2 * eager_err + slack
    err = torch.where(finite & fast_finite, (fast64 - exact64).abs(), zero)
    measure = "term magnitude" if magnitude is not None else "max|exact|"
    if per_element:
        relative, absolute = out
        rounding = torch.maximum(relative * (exact64.abs() + bound[:, None]), torch.full_like(exact64, absolute))
        excess = err - (bound[:, None] + rounding)
        excess = torch.where(finite & fast_finite, excess, -torch.inf)
        if float(excess.max()) <= 0:
            return None
        row, col = divmod(int(excess.argmax()), excess.shape[-1])
        return (f"{name}: row {row}, element {col}: fast {float(fast64[row, col]):.6e}, exact "
                f"{float(exact64[row, col]):.6e}: error {float(err[row, col]):.3e} exceeds 2 x eager "
                f"(float32) error {float(eager_err[row]):.3e} + slack {float(slack[row]):.3e} (~{ulps:g} x "
                f"{u:.2e} x {measure} {float(terms[row]):.3e}; max|exact| {float(scale[row]):.3e}) + rounding to "
                f"{str(fast.dtype).removeprefix('torch.')} {float(rounding[row, col]):.3e}")
    fast_err = err.amax(dim=-1)
    excess = fast_err - bound
    if float(excess.max()) <= 0:
        return None
    row = int(excess.argmax())
    rule = f"~{ulps:g} x {u:.2e} x {measure} {float(terms[row]):.3e}"
    if unmeasured:
        rule += f", at least {UNMEASURED_FLOAT64_SLACK:.1e} x (1 + max|exact|): no eager error, eager equals the truth"
    return (f"{name}: row {row}: error {float(fast_err[row]):.3e} exceeds 2 x eager error "
            f"{float(eager_err[row]):.3e} + slack {float(slack[row]):.3e} ({rule}; max|exact| {float(scale[row]):.3e})")


def assert_within_eager_error(name: str, fast: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, *,
                              ulps: float = ULPS, roundoff: Optional[float] = None,
                              magnitude: Optional[torch.Tensor] = None,
                              floor: Optional[torch.Tensor] = None) -> None:
    """Raise AssertionError with the reason when :func:`eager_error_violation` finds one."""
    violation = eager_error_violation(name, fast, eager, exact, ulps=ulps, roundoff=roundoff, magnitude=magnitude,
                                      floor=floor)
    assert violation is None, violation
