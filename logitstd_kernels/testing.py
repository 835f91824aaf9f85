"""Accuracy criterion shared by the tests and the benchmark's correctness gate.

A fast path is correct when, in every row, its error against the reference computed in float64 is
at most twice the error of the eager reference run in the input dtype, plus a few float32 ulps of
the row's largest magnitude (for rows whose eager error happens to be exactly 0), and when it is
non-finite exactly where the float64 reference is.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["eager_error_violation", "assert_within_eager_error"]


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """Rows of classes for gradients; one element per row for per-row losses; one row for a scalar."""
    if t.dim() == 0:
        return t.reshape(1, 1)
    if t.dim() == 1:
        return t.reshape(-1, 1)
    return t.reshape(-1, t.shape[-1])


def eager_error_violation(name: str, fast: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor,
                          rel_slack: float = 2e-6) -> Optional[str]:
    """None if, in every row, ``|fast - exact| <= 2 |eager - exact| + slack`` (max norm), else what is wrong.

    The bound is applied row by row, so a row with large values cannot lend its error budget to a
    row with small ones.
    """
    if fast.shape != exact.shape:
        return f"{name}: shape {tuple(fast.shape)} != {tuple(exact.shape)}"
    fast64, eager64, exact64 = (_as_rows(t.detach().double()) for t in (fast, eager, exact))
    finite = torch.isfinite(exact64)
    if not torch.equal(torch.isfinite(fast64), finite):
        return (f"{name}: non-finite pattern differs from the reference "
                f"({int((~torch.isfinite(fast64)).sum())} vs {int((~finite).sum())} non-finite)")
    zero = torch.zeros((), dtype=torch.float64, device=exact64.device)

    def row_max(t: torch.Tensor) -> torch.Tensor:
        return torch.where(finite, t.abs(), zero).amax(dim=-1) if t.numel() else t.new_zeros(t.shape[0])

    scale = 1.0 + row_max(exact64)
    slack = (rel_slack if fast.dtype != torch.float64 else 1e-12) * scale
    fast_err = row_max(torch.where(finite, fast64 - exact64, zero))
    eager_err = row_max(torch.where(finite, eager64 - exact64, zero))
    excess = fast_err - (2 * eager_err + slack)
    if excess.numel() == 0 or float(excess.max()) <= 0:
        return None
    row = int(excess.argmax())
    return (f"{name}: row {row}: error {float(fast_err[row]):.3e} exceeds 2 x eager error "
            f"{float(eager_err[row]):.3e} + slack {float(slack[row]):.1e}")


def assert_within_eager_error(name: str, fast: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor,
                              rel_slack: float = 2e-6) -> None:
    """Raise AssertionError with the reason when :func:`eager_error_violation` finds one."""
    violation = eager_error_violation(name, fast, eager, exact, rel_slack)
    assert violation is None, violation
