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

Why ``2 x eager``: the eager reference in the input dtype is the accuracy a user gets without the
fused kernels; its error contains what the inputs' conditioning forces on any implementation
(cancellation in ``q - p``, in a KL of a student close to its teacher, in the standardization's chain
rule), and the factor 2 leaves room for a different but equally good order of operations.

Why ``k u M``: on a row whose result is far smaller than its terms (a 2-class standardized row, a
gradient nearly parallel to the centered logits, a very peaked teacher), eager's error is rounding
luck between 0 and ``u M``; ``u M`` is what rounding the terms alone makes. ``k = 16`` covers what a
kernel adds with another order of operations: the final rounding, the exp/log evaluations, blocked
row sums (< 8 u over 2^18 classes) and the statistics. 16 u is 1e-6 of the terms in float32, so a
result that is 0, 0.99x or 1.01x the truth still fails every row whose result exceeds ~1e-4 of its
terms. The bound is per row because what a row shares (normalizers, KL, mean, sigma, the chain
rule's sum) carries its error into every element of the row.

Absolute terms: ``ulps`` x the accumulation dtype's smallest normal number (below it there is no
relative precision), and a caller's ``floor`` where its truth cannot resolve a row. A float64
result needs a truth more precise than float64 (tests/support.py uses extended precision); where
``eager`` equals ``exact`` no eager error was measured and the slack is at least
``UNMEASURED_FLOAT64_SLACK x (1 + max|exact|)``.

Non-finite values: the fast result must be finite wherever the float64 reference is and non-finite
wherever it is not, except where the eager reference is itself non-finite but the truth is finite
(e.g. a float32 variance that overflows): the input dtype gives no guidance there, and such a row
has no bound beyond being finite where the fast result claims to be.
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

    ``fast`` is the result under test, ``eager`` the eager reference in the same dtype(s) (or in
    float32 before its rounding to a bf16/fp16 output: then the bound is per element plus that
    rounding), ``exact`` the truth in float64, all the same shape. ``u = roundoff`` defaults to
    :func:`unit_roundoff` of ``fast.dtype``; ``M`` is the row's largest ``magnitude`` when given,
    never below ``max|exact|``. ``floor``: an absolute allowance per element (the row's maximum is
    used). The fast result must be finite exactly where the truth is, except where the eager result
    is itself non-finite. Why each term: the module docstring.
    """
    problem = _shape_problem(name, fast, eager, exact, magnitude)
    if problem is not None:
        return problem
    per_element = output_roundoff(fast.dtype) is not None and output_roundoff(eager.dtype) is None
    fast64, eager64, exact64 = (_as_rows(t.detach().double()) for t in (fast, eager, exact))
    finite = torch.isfinite(exact64)
    fast_finite = torch.isfinite(fast64)
    eager_finite = torch.isfinite(_as_rows(eager.detach().to(fast.dtype) if per_element else eager.detach()))
    eager_finite &= torch.isfinite(eager64)
    problem = _nonfinite_problem(name, fast64, exact64, finite, fast_finite, eager_finite)
    if problem is not None or exact64.numel() == 0:
        return problem
    u = unit_roundoff(fast.dtype) if roundoff is None else float(roundoff)
    scale = _row_max(finite, exact64)
    terms, slack, unmeasured = _slack(fast.dtype, eager.dtype, eager64, exact64, finite, scale, u, ulps,
                                      magnitude, floor, exact.shape)
    eager_err = _row_max(finite & eager_finite, eager64 - exact64)
    eager_err = torch.where((finite & ~eager_finite).any(dim=-1), torch.inf, eager_err)
    bound = 2 * eager_err + slack
    err = torch.where(finite & fast_finite, (fast64 - exact64).abs(), torch.zeros_like(exact64))
    rule = (f"~{ulps:g} x {u:.2e} x {'term magnitude' if magnitude is not None else 'max|exact|'} "
            "{terms:.3e}")
    if per_element:
        return _element_violation(name, fast.dtype, fast64, exact64, err, bound, eager_err, slack, terms, scale,
                                  finite & fast_finite, rule)
    fast_err = err.amax(dim=-1)
    excess = fast_err - bound
    if float(excess.max()) <= 0:
        return None
    row = int(excess.argmax())
    rule = rule.format(terms=float(terms[row]))
    if unmeasured:
        rule += f", at least {UNMEASURED_FLOAT64_SLACK:.1e} x (1 + max|exact|): no eager error, eager equals the truth"
    return (f"{name}: row {row}: error {float(fast_err[row]):.3e} exceeds 2 x eager error "
            f"{float(eager_err[row]):.3e} + slack {float(slack[row]):.3e} ({rule}; max|exact| {float(scale[row]):.3e})")


def _row_max(valid: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, t.abs(), torch.zeros((), dtype=t.dtype, device=t.device)).amax(dim=-1)


def _shape_problem(name: str, fast: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor,
                   magnitude: Optional[torch.Tensor]) -> Optional[str]:
    if fast.shape != exact.shape or eager.shape != exact.shape:
        return (f"{name}: shape {tuple(fast.shape)} (eager {tuple(eager.shape)}) "
                f"!= reference {tuple(exact.shape)}")
    if magnitude is not None and tuple(magnitude.shape) != tuple(exact.shape):
        return f"{name}: magnitude shape {tuple(magnitude.shape)} != reference {tuple(exact.shape)}"
    return None


def _nonfinite_problem(name: str, fast64: torch.Tensor, exact64: torch.Tensor, finite: torch.Tensor,
                       fast_finite: torch.Tensor, eager_finite: torch.Tensor) -> Optional[str]:
    """Why the fast result's non-finite elements are not the truth's (where eager is finite), or None."""
    extra = fast_finite & ~finite
    lost = finite & ~fast_finite & eager_finite
    if not (extra.any() or lost.any()):
        return None
    where = (extra | lost).nonzero()[0].tolist()
    return (f"{name}: non-finite pattern differs from the float64 reference at row {where[0]}, element "
            f"{where[1]} (fast {float(fast64[where[0], where[1]])}, reference "
            f"{float(exact64[where[0], where[1]])}); {int((~fast_finite).sum())} non-finite vs "
            f"{int((~finite).sum())} in the reference")


def _slack(fast_dtype: torch.dtype, eager_dtype: torch.dtype, eager64: torch.Tensor, exact64: torch.Tensor,
           finite: torch.Tensor, scale: torch.Tensor, u: float, ulps: float, magnitude: Optional[torch.Tensor],
           floor: Optional[torch.Tensor], shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(M, the slack ``ulps * (u M + tiny)`` (+ floor), whether no eager error was measured) per row."""
    terms = scale
    if magnitude is not None:
        mag64 = _as_rows(magnitude.detach().to(device=exact64.device, dtype=torch.float64))
        terms = torch.maximum(scale, _row_max(finite & torch.isfinite(mag64), mag64))
    tiny = torch.finfo(torch.float64 if fast_dtype == torch.float64 else torch.float32).tiny
    slack = ulps * (u * terms + tiny)
    unmeasured = (fast_dtype == torch.float64 and eager_dtype == torch.float64
                  and bool(((eager64 == exact64) | (eager64.isnan() & exact64.isnan())).all()))
    if unmeasured:
        slack = torch.maximum(slack, UNMEASURED_FLOAT64_SLACK * (1 + scale))
    if floor is not None:
        floor = torch.as_tensor(floor, dtype=torch.float64, device=exact64.device).detach()
        slack = slack + _as_rows(torch.nan_to_num(floor.double().expand(shape), nan=0.0)).amax(dim=-1)
    return terms, slack, unmeasured


def _element_violation(name: str, dtype: torch.dtype, fast64: torch.Tensor, exact64: torch.Tensor,
                       err: torch.Tensor, bound: torch.Tensor, eager_err: torch.Tensor, slack: torch.Tensor,
                       terms: torch.Tensor, scale: torch.Tensor, both_finite: torch.Tensor,
                       rule: str) -> Optional[str]:
    """The per-element bound of a bf16/fp16 result against a float32 eager: the row bound plus the
    output dtype's rounding of each element."""
    relative, absolute = output_roundoff(dtype)
    rounding = torch.maximum(relative * (exact64.abs() + bound[:, None]), torch.full_like(exact64, absolute))
    excess = torch.where(both_finite, err - (bound[:, None] + rounding), -torch.inf)
    if float(excess.max()) <= 0:
        return None
    row, col = divmod(int(excess.argmax()), excess.shape[-1])
    return (f"{name}: row {row}, element {col}: fast {float(fast64[row, col]):.6e}, exact "
            f"{float(exact64[row, col]):.6e}: error {float(err[row, col]):.3e} exceeds 2 x eager "
            f"(float32) error {float(eager_err[row]):.3e} + slack {float(slack[row]):.3e} "
            f"({rule.format(terms=float(terms[row]))}; max|exact| {float(scale[row]):.3e}) + rounding to "
            f"{str(dtype).removeprefix('torch.')} {float(rounding[row, col]):.3e}")


def assert_within_eager_error(name: str, fast: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, *,
                              ulps: float = ULPS, roundoff: Optional[float] = None,
                              magnitude: Optional[torch.Tensor] = None,
                              floor: Optional[torch.Tensor] = None) -> None:
    """Raise AssertionError with the reason when :func:`eager_error_violation` finds one."""
    violation = eager_error_violation(name, fast, eager, exact, ulps=ulps, roundoff=roundoff, magnitude=magnitude,
                                      floor=floor)
    assert violation is None, violation
