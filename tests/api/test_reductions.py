"""Reductions and masks against an independent formula, not only against the reference.

The expected loss and both gradients are built here, in NumPy float64, from tests/formula.py's
per-row function and the documented reductions (docs/design.md, section 2):

- "none": the loss of every row, 0 for a masked row;
- "sum": the sum over the included rows;
- "batchmean": that sum / the number of included rows (at least 1);
- "mean": that sum / (the number of included rows (at least 1) x V);

and a masked row gets a zero gradient whatever its data (NaN here). The reference and every fused
backend (float64 inputs) must match to ~1e-10 relative, so e.g. "batchmean counts masked rows" or
"mean behaves like batchmean" fails even if the reference and the op were changed together.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import logitstd_kernels as lsk
from formula import row_loss_and_grads
from logitstd_kernels import reference
from support import fused_cases

LEAD, V = (3, 4), 37
OPTIONS = dict(temperature=1.7, teacher_temperature=2.9, standardize=True, correction=1, eps=1e-7)
REDUCTIONS = ("none", "sum", "batchmean", "mean")
MASKS = ("no-mask", "some-rows", "all-masked")
RTOL = 1e-10

BACKENDS = [("torch", "cpu")] + fused_cases()


def _inputs(mask_kind: str):
    student = 3 * torch.randn(*LEAD, V, dtype=torch.float64)
    teacher = 5 * torch.randn(*LEAD, V, dtype=torch.float64)
    if mask_kind == "no-mask":
        return student, teacher, None
    if mask_kind == "all-masked":
        mask = torch.zeros(LEAD, dtype=torch.bool)
    else:
        mask = torch.tensor([[True, False, True, True], [False, True, True, False], [True, True, False, True]])
    student[~mask] = float("nan")  # masked rows are never read
    teacher[~mask] = float("inf")
    return student, teacher, mask


def _expected(student: torch.Tensor, teacher: torch.Tensor, mask, reduction: str, upstream: np.ndarray):
    """The loss and the upstream-weighted gradients, row by row from formula.py, reduced here."""
    x = student.reshape(-1, V).numpy()
    y = teacher.reshape(-1, V).numpy()
    keep = np.ones(x.shape[0], bool) if mask is None else mask.reshape(-1).numpy()
    rows = np.zeros(x.shape[0])
    row_gx, row_gy = np.zeros_like(x), np.zeros_like(y)
    for r in np.flatnonzero(keep):
        rows[r], row_gx[r], row_gy[r] = row_loss_and_grads(
            x[r], y[r], OPTIONS["temperature"], OPTIONS["teacher_temperature"], OPTIONS["standardize"],
            OPTIONS["correction"], OPTIONS["eps"])
    included = int(keep.sum())
    if reduction == "none":
        loss = rows.reshape(LEAD)
        weight = upstream.reshape(-1, 1)  # d loss[r] / d row r = 1, times the incoming gradient of row r
    else:
        divisor = {"sum": 1.0, "batchmean": float(max(included, 1)), "mean": float(max(included, 1) * V)}[reduction]
        loss = np.array(rows[keep].sum() / divisor)
        weight = np.full((x.shape[0], 1), float(upstream) / divisor)
    weight = np.where(keep[:, None], weight, 0.0)
    gx = np.where(keep[:, None], row_gx * weight, 0.0).reshape(student.shape)
    gy = np.where(keep[:, None], row_gy * weight, 0.0).reshape(teacher.shape)
    return loss, gx, gy


def _close(name: str, got: torch.Tensor, want: np.ndarray) -> None:
    want_t = torch.from_numpy(np.asarray(want, dtype=np.float64))
    assert got.shape == want_t.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want_t.shape)}"
    got = got.detach().cpu().double()
    scale = float(want_t.abs().max()) if want_t.numel() else 0.0
    torch.testing.assert_close(got, want_t, rtol=RTOL, atol=RTOL * scale, equal_nan=False,
                               msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=[f"{b}-{d}" for b, d in BACKENDS])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reduction_and_mask_against_formula(backend, device, mask_kind, reduction):
    student, teacher, mask = _inputs(mask_kind)
    lead = LEAD if reduction == "none" else ()
    upstream = torch.rand(lead, dtype=torch.float64) + 0.25  # not 1, different per row for "none"
    want_loss, want_gx, want_gy = _expected(student, teacher, mask, reduction, upstream.numpy())

    x = student.to(device).requires_grad_(True)
    y = teacher.to(device).requires_grad_(True)
    fn = reference.logitstd_kd_loss if backend == "torch" else lsk.logitstd_kd_loss
    extra = {} if backend == "torch" else dict(backend=backend)
    loss = fn(x, y, reduction=reduction, mask=None if mask is None else mask.to(device), **OPTIONS, **extra)
    gx, gy = torch.autograd.grad(loss, (x, y), grad_outputs=upstream.to(device))

    _close("loss", loss, want_loss)
    _close("grad_student", gx, want_gx)
    _close("grad_teacher", gy, want_gy)
    if mask is not None:  # exactly zero, not only close to it
        assert torch.count_nonzero(gx[~mask.to(device)]) == 0 and torch.count_nonzero(gy[~mask.to(device)]) == 0
        if reduction == "none":
            assert torch.count_nonzero(loss[~mask.to(device)]) == 0


def test_the_expected_values_tell_the_reductions_apart():
    """The expectations above differ between reductions by the factors the contract names."""
    student, teacher, mask = _inputs("some-rows")
    up = np.array(1.0)
    sums = {r: _expected(student, teacher, mask, r, up) for r in ("sum", "batchmean", "mean")}
    included = int(mask.sum())
    assert included < mask.numel()
    assert np.isclose(sums["batchmean"][0] * included, sums["sum"][0], rtol=1e-14)
    assert np.isclose(sums["mean"][0] * included * V, sums["sum"][0], rtol=1e-14)
    rows = _expected(student, teacher, mask, "none", np.ones(LEAD))
    assert np.isclose(rows[0].sum(), sums["sum"][0], rtol=1e-14)
    np.testing.assert_allclose(rows[1], sums["sum"][1], rtol=1e-14)
