"""Accuracy criterion shared by the tests and the benchmark's correctness gate.

A fast path is correct when its error against the reference computed in float64 is at most twice
the error of the eager reference run in the input dtype, plus a few float32 ulps of the largest
magnitude (for results whose eager error happens to be exactly 0), and when it is non-finite
exactly where the float64 reference is.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["eager_error_violation", "assert_within_eager_error"]


def _max_abs(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def eager_error_violation(name: str, fast: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor,
                          rel_slack: float = 2e-6) -> Optional[str]:
    """None if ``|fast - exact| <= 2 |eager - exact| + slack`` (max norm), else what is wrong."""
    if fast.shape != exact.shape:
        return f"{name}: shape {tuple(fast.shape)} != {tuple(exact.shape)}"
    fast64, eager64, exact64 = fast.double(), eager.double(), exact.double()
    finite = torch.isfinite(exact64)
    if not torch.equal(torch.isfinite(fast64), finite):
        return (f"{name}: non-finite pattern differs from the reference "
                f"({int((~torch.isfinite(fast64)).sum())} vs {int((~finite).sum())} non-finite)")
    if not finite.any():
        return None
    scale = 1.0 + _max_abs(exact64[finite])
    slack = (rel_slack if fast.dtype != torch.float64 else 1e-12) * scale
    fast_err = _max_abs(fast64[finite] - exact64[finite])
    eager_err = _max_abs(eager64[finite] - exact64[finite])
    if fast_err <= 2 * eager_err + slack:
        return None
    return f"{name}: error {fast_err:.3e} exceeds 2 x eager error {eager_err:.3e} + slack {slack:.1e}"


def assert_within_eager_error(name: str, fast: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor,
                              rel_slack: float = 2e-6) -> None:
    """Raise AssertionError with the reason when :func:`eager_error_violation` finds one."""
    violation = eager_error_violation(name, fast, eager, exact, rel_slack)
    assert violation is None, violation
