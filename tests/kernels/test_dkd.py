"""Decoupled KD (``lsk.dkd_loss``, the objective's ``"dkd"`` divergence) on every fused backend that
computes it, against the independent float64 formula (tests/formula.py, ``_dkd``), with the package's
accuracy rule: standardized and not, V = 2 and larger rows, a teacher with p_g -> 1 (the non-target
mass underflows), ignored labels, masks, an incoming gradient that is not 1, both gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import logitstd_kernels as lsk
from logitstd_kernels import reference
from logitstd_kernels.testing import assert_within_eager_error
from support import EXTENDED, case_id, formula, fused_cases, interpreted, loss_and_grads

DKD_BACKENDS = ("cpu", "cuda", "triton")  # the fused backends with a decoupled KD kernel
CASES = [c for c in fused_cases() if c[0] in DKD_BACKENDS]
TRITON_CASES = [c for c in CASES if c[0] == "triton"]
OPTIONS = dict(alpha=1.3, beta=7.0, temperature=2.0)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _truth(x, y, labels, upstream, options, magnitudes=False):
    """(loss, gx, gy) in float64: the formula in extended precision (the reference run in float64 for
    float32 math), and, with ``magnitudes``, the formula's term magnitudes."""
    settings = dict(temperature=options["temperature"], standardize=options.get("standardize", True),
                    reduction="mean", divergence="dkd", labels=labels.cpu().numpy(), dkd_alpha=options["alpha"],
                    dkd_beta=options["beta"])
    keep = labels.cpu().numpy() != -100
    if magnitudes:
        with np.errstate(all="ignore"):
            _, mags = formula.loss_and_grads(_numpy(x), _numpy(y), mask=keep, upstream=_numpy(upstream),
                                             magnitudes=True, **settings)
        return tuple(torch.from_numpy(np.asarray(m, dtype=np.float64)) for m in mags)
    if reference.accumulation_dtype(x, y) != torch.float64 or EXTENDED is None:
        return loss_and_grads(reference.dkd_loss, x.double(), y.double(), upstream, labels=labels, **options)
    values = formula.loss_and_grads(_numpy(x), _numpy(y), mask=keep, upstream=_numpy(upstream), dtype=EXTENDED,
                                    **settings)
    return tuple(torch.from_numpy(np.asarray(v, dtype=np.float64)) for v in values)


def check_dkd(x: torch.Tensor, y: torch.Tensor, labels: torch.Tensor, backend: str, **options) -> None:
    options = {**OPTIONS, **options}
    upstream = torch.tensor(0.7, dtype=torch.float64)
    fast = loss_and_grads(lsk.dkd_loss, x, y, upstream, labels=labels, backend=backend, **options)
    acc = reference.accumulation_dtype(x, y)
    eager = loss_and_grads(reference.dkd_loss, x.to(acc), y.to(acc), upstream, labels=labels, **options)
    exact = _truth(x, y, labels, upstream, options)
    mags = _truth(x, y, labels, upstream, options, magnitudes=True)
    for name, got, want_eager, want, mag in zip(("loss", "grad_student", "grad_teacher"), fast, eager, exact, mags):
        assert_within_eager_error(name, got, want_eager, want.to(got.device), magnitude=mag.to(got.device))


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("standardize", [True, False], ids=["std", "plain"])
@pytest.mark.parametrize("num_classes,dtype", [(2, torch.float64), (3, torch.float64), (100, torch.float64),
                                               (1000, torch.float32), (4099, torch.float32),
                                               (4104, torch.bfloat16)])
def test_dkd_matches_the_formula(case, standardize, num_classes, dtype):
    backend, device = case
    rows = 3 if interpreted(backend, device) and num_classes > 4096 else 6  # (the interpreter: one program at a time)
    x = (3 * torch.randn(rows, num_classes, dtype=torch.float64)).to(device=device, dtype=dtype)
    y = (3 * torch.randn(rows, num_classes, dtype=torch.float64)).to(device=device, dtype=dtype)
    labels = torch.randint(0, num_classes, (rows,), device=device)
    labels[rows - 2] = -100
    check_dkd(x, y, labels, backend, standardize=standardize)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_dkd_teacher_certain_of_the_target(case):
    """p_g -> 1: the non-target mass underflows in 1 - p_g but not in its own sum; q_g -> 1 likewise."""
    backend, device = case
    x = 2 * torch.randn(4, 500, dtype=torch.float64, device=device)
    y = 2 * torch.randn(4, 500, dtype=torch.float64, device=device)
    labels = torch.tensor([3, 7, 11, 499], device=device)
    y[0, 3] = 60.0
    x[1, 7] = 60.0
    y[2, 11] = x[2, 11] = 40.0
    check_dkd(x, y, labels, backend, standardize=False, temperature=1.0)
    check_dkd(x, y, labels, backend, temperature=4.0)


@pytest.mark.parametrize("case", TRITON_CASES, ids=case_id)
@pytest.mark.parametrize("standardize", [True, False], ids=["std", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_dkd_on_the_triton_blocked_path(case, standardize, dtype, monkeypatch):
    """The Triton blocked path forced at V = 100 in 32-wide tiles (three full tiles and a partial one):
    the label at class 0 (the rows' shift), at both edges of a tile, in the partial tile; an ignored
    row; a teacher certain of its target; a student that nearly equals its teacher (NCKD cancels in
    its sums: the Bregman pass, with the target left out there too)."""
    from logitstd_kernels._triton import launch
    from logitstd_kernels._triton.config import KernelConfig

    backend, device = case
    monkeypatch.setattr(launch, "kd_config", lambda *args: KernelConfig(register=False, block=32, num_warps=1))
    x = 3 * torch.randn(8, 100, dtype=torch.float64)
    y = 3 * torch.randn(8, 100, dtype=torch.float64)
    y[6, 70] = 60.0
    x[7] = y[7] + 1e-4 * torch.randn(100, dtype=torch.float64)
    labels = torch.tensor([0, 31, 32, 63, 99, -100, 70, 17], device=device)
    check_dkd(x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype), labels, backend,
              standardize=standardize)


# (case, the Triton blocked path forced): the Triton kernels on both paths, the others on theirs
PATH_CASES = [pytest.param(c, b, id=f"{case_id(c)}-{'blocked' if b else 'default'}") for c in CASES
              for b in ((False, True) if c[0] == "triton" else (False,))]


@pytest.mark.parametrize("case,blocked", PATH_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_dkd_target_far_above_the_rest(case, blocked, dtype, monkeypatch):
    """Unstandardized rows whose target leads every other class by far more than the exponent range
    (the non-target sums taken relative to the row's max would be 0): the teacher's, the student's,
    both; a row offset by 1e4. The kernels sum the non-target classes relative to their own max
    (Triton's register path always; its blocked path, the CPU and the CUDA kernel in a rare pass)."""
    from logitstd_kernels._triton import launch
    from logitstd_kernels._triton.config import KernelConfig

    backend, device = case
    if blocked:
        monkeypatch.setattr(launch, "kd_config", lambda *args: KernelConfig(register=False, block=16, num_warps=1))
    x = torch.randn(6, 40, dtype=torch.float64)
    y = torch.randn(6, 40, dtype=torch.float64)
    labels = torch.tensor([3, 7, 11, 20, 39, 0], device=device)
    y[0, 3] = 3000.0
    x[1, 7] = 3000.0
    x[2, 11] = y[2, 11] = 2000.0
    x[3] += 1e4
    y[3, 20] = 1e3
    x[4, 39] = y[4, 39] = 1500.0
    check_dkd(x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype), labels, backend, standardize=False)


@pytest.mark.parametrize("case", TRITON_CASES, ids=case_id)
@pytest.mark.parametrize("blocked", [False, True], ids=["register", "blocked"])
@pytest.mark.parametrize("standardize", [True, False], ids=["std", "plain"])
def test_dkd_label_outside_the_row_gives_a_nan_row(case, blocked, standardize):
    """The Triton launcher (the op layer rejects such labels on the CPU; a CUDA launch cannot check
    them without a host synchronization): a label outside [0, V) makes its row's loss and both
    gradients NaN, an ignored row is 0, and the other rows are bit for bit those of a launch without
    the bad rows."""
    from logitstd_kernels._triton import fused_forward
    from logitstd_kernels._triton.config import KernelConfig

    _, device = case
    x = 3 * torch.randn(4, 100, dtype=torch.float64, device=device)
    y = 3 * torch.randn(4, 100, dtype=torch.float64, device=device)
    labels = torch.tensor([5, 100, -100, -3], device=device)
    config = lsk.DistillConfig(divergence="dkd", dkd_alpha=1.3, dkd_beta=7.0, standardize=standardize,
                               ce_weight=0.0, kd_weight=1.0)
    kernel = KernelConfig(register=False, block=32, num_warps=1) if blocked else None
    scale = torch.full((1,), 0.5, dtype=torch.float64, device=device)
    rows, gx, gy, _, kd = fused_forward(x, y, labels, None, scale, config, True, True, kernel_config=kernel)
    alone = fused_forward(x[:1], y[:1], labels[:1], None, scale, config, True, True, kernel_config=kernel)
    for got in (rows, kd, gx, gy):
        assert bool(torch.isnan(got[1]).all()) and bool(torch.isnan(got[3]).all())
        assert bool((got[2] == 0).all())
    for got, want in zip((rows, gx, gy, kd), (alone[0], alone[1], alone[2], alone[4])):
        torch.testing.assert_close(got[:1], want, rtol=0, atol=0)


def test_dkd_needs_labels():
    x, y = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(ValueError, match="labels"):
        lsk.distillation_loss(x, y, None, divergence="dkd")
    with pytest.raises(ValueError, match="alpha"):
        lsk.dkd_loss(x, y, torch.tensor([1, 2]), alpha=-1.0)


def test_dkd_of_the_official_formula():
    """The official code's decoupled KD (its -1000 trick, ``F.kl_div`` with ``reduction="sum"`` over
    the batch divided by the batch size, T^2) equals ``reference.dkd_loss`` to 1e-12 in float64."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    x, y = torch.randn(8, 100, dtype=torch.float64), torch.randn(8, 100, dtype=torch.float64)
    labels = torch.randint(0, 100, (8,))
    tau, alpha, beta = 4.0, 1.0, 8.0
    gt = F.one_hot(labels, 100).bool()
    p_s, p_t = F.softmax(x / tau, 1), F.softmax(y / tau, 1)
    b_s = torch.stack(((p_s * gt).sum(1), (p_s * ~gt).sum(1)), 1)
    b_t = torch.stack(((p_t * gt).sum(1), (p_t * ~gt).sum(1)), 1)
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") * tau**2 / 8
    nckd = F.kl_div(F.log_softmax(x / tau - 1000.0 * gt, 1), F.softmax(y / tau - 1000.0 * gt, 1),
                    reduction="sum") * tau**2 / 8
    official = alpha * tckd + beta * nckd
    ours = reference.dkd_loss(x, y, labels, alpha=alpha, beta=beta, temperature=tau, standardize=False)
    torch.testing.assert_close(ours, official, rtol=1e-12, atol=1e-12)
