"""Every divergence of the vocabulary-parallel objective (reverse KL, Jeffreys, jsd and tvd, and forward
KL alongside) over gloo processes spawned from the test (``ranks.py``), on both phase backends (the
Triton phases through the interpreter): loss, student and teacher gradient slices against the
single-process float64 reference on the whole rows, uneven slices, labels with ``ignore_index``, a
mask, standardization on and off; high temperature (T = 100) in float32, where the KLs' direct form
cancels; classes that are -inf, rows of extreme magnitude and NaN rows; the fused lm_head; and the
number and size of the collectives per divergence (docs/tensor-parallel.md)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from logitstd_kernels import reference
from logitstd_kernels.distributed import (vocab_parallel_distillation_loss,
                                          vocab_parallel_fused_linear_distillation_loss)
from logitstd_kernels.objective import distillation_loss
from ranks import assert_ok, max_rel, recorded_collectives, run_ranks, slice_of

# (divergence, beta): jsd at an interior beta, and at beta = 1 (TRL's convention: reverse KL)
DIVERGENCES = (("forward_kl", 0.5), ("reverse_kl", 0.5), ("jeffreys", 0.5), ("jsd", 0.3), ("jsd", 1.0), ("tvd", 0.5))
BACKENDS = ("torch", "triton")


def _leaf(t: torch.Tensor, cols: slice, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype)[:, cols].clone().requires_grad_(True)


def _errors(rank: int, world: int, x64: torch.Tensor, y64: torch.Tensor, labels, dtype: torch.dtype, backend: str,
            **options) -> list[float]:
    """(loss, student gradient, teacher gradient) errors of this rank's slices against the reference
    on the whole rows (the inputs rounded to ``dtype`` first), reduction "none" with an upstream
    gradient that is not 1."""
    cols = slice_of(rank, world, x64.shape[1])
    xs, ys = _leaf(x64, cols, dtype), _leaf(y64, cols, dtype)
    loss = vocab_parallel_distillation_loss(xs, ys, labels, backend=backend, reduction="none", **options)
    upstream = torch.linspace(0.5, 1.5, x64.shape[0], dtype=torch.float64)
    loss.backward(upstream.to(loss.dtype))
    xf, yf = (t.to(dtype).double().clone().requires_grad_(True) for t in (x64, y64))
    want = reference.distillation_loss(xf, yf, labels, reduction="none", **options)
    want.backward(upstream)
    return [max_rel(loss, want), max_rel(xs.grad, xf.grad[:, cols]), max_rel(ys.grad, yf.grad[:, cols])]


def _matrix(rank: int, world: int, backend: str) -> dict:
    """Every divergence x standardization x float64 / float32, with labels (ignore_index, label
    smoothing), a mask, two temperatures: 1e-12 in float64, 2e-5 (of the largest value) in float32."""
    num_classes, rows = 61, 6
    x64 = 3 * torch.randn(rows, num_classes, dtype=torch.float64)
    y64 = 5 * torch.randn(rows, num_classes, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (rows,))
    labels[::4] = -100
    mask = torch.tensor([True, True, False, True, True, True])
    worst = {}
    for divergence, beta in DIVERGENCES:
        for standardize in (True, False):
            for dtype, bound in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
                options = dict(divergence=divergence, beta=beta, standardize=standardize, mask=mask, ce_weight=0.3,
                               kd_weight=2.0, temperature=1.5, teacher_temperature=2.5, label_smoothing=0.1)
                errors = _errors(rank, world, x64, y64, labels, dtype, backend, **options)
                assert max(errors) <= bound, f"{divergence} beta={beta} standardize={standardize} {dtype}: {errors}"
                key = f"{divergence}-{beta}"
                worst[key] = max(worst.get(key, 0.0), *errors)
    return worst


def _high_temperature(rank: int, world: int, backend: str) -> dict:
    """T = 100: tau^2 D from float32 slices within 2e-6 per row of the float64 reference, where eager
    float32 (and the KLs' direct form, sum p d + L) loses ~1e-3 to cancellation; gradients within
    2e-5; float64 within 1e-10 (the float64 reference's own cancellation)."""
    num_classes, rows = 400, 4
    cols = slice_of(rank, world, num_classes)
    x64 = 3 * torch.randn(rows, num_classes, dtype=torch.float64)
    y64 = 5 * torch.randn(rows, num_classes, dtype=torch.float64)
    found = {}
    for divergence, beta in DIVERGENCES:
        for standardize in (True, False):
            options = dict(divergence=divergence, beta=beta, standardize=standardize, temperature=100.0)
            kd = vocab_parallel_distillation_loss(x64.float()[:, cols], y64.float()[:, cols], None, backend=backend,
                                                  reduction="none", return_components=True, **options).kd
            exact = reference.distillation_loss(x64.float().double(), y64.float().double(), None, reduction="none",
                                                return_components=True, **options).kd
            error = float(((kd.double() - exact) / exact).abs().max())
            assert error <= 2e-6, f"{divergence} beta={beta} standardize={standardize}: {error}"
            if divergence == "forward_kl" and standardize:  # the bound is one the direct form fails
                eager = reference.distillation_loss(x64.float(), y64.float(), None, reduction="none",
                                                    return_components=True, **options).kd
                assert float(((eager.double() - exact) / exact).abs().max()) > 20 * 2e-6
            grads = _errors(rank, world, x64, y64, None, torch.float32, backend, **options)[1:]
            assert max(grads) <= 2e-5, f"{divergence} beta={beta} standardize={standardize}: {grads}"
            errors64 = _errors(rank, world, x64, y64, None, torch.float64, backend, **options)
            assert max(errors64) <= 1e-10, f"{divergence} beta={beta} standardize={standardize}: {errors64}"
            found[f"{divergence}-{beta}-{standardize}"] = error
    return found


def _minus_inf_classes(rank: int, world: int, backend: str) -> dict:
    """Without standardization: a class -inf in both rows (in the last rank's slice) contributes 0,
    so loss and gradients equal those of the rows without it, and its gradients are 0; a class
    -inf in the teacher only (p = 0, in rank 0's slice) gives the C++ kernel's finite loss and
    gradients (forward KL, jsd, tvd; the reverse KL is infinite there)."""
    num_classes, rows, dead = 40, 3, 37
    cols = slice_of(rank, world, num_classes)
    x, y = torch.randn(rows, num_classes, dtype=torch.float64), torch.randn(rows, num_classes, dtype=torch.float64)
    x[:, dead] = y[:, dead] = float("-inf")
    labels = torch.tensor([1, 2, 3])
    kept = [k for k in range(num_classes) if k != dead]
    for divergence, beta in DIVERGENCES:
        options = dict(divergence=divergence, beta=beta, standardize=False, reduction="none")
        xs, ys = x[:, cols].clone().requires_grad_(True), y[:, cols].clone().requires_grad_(True)
        loss = vocab_parallel_distillation_loss(xs, ys, labels, backend=backend, **options)
        loss.sum().backward()
        xf, yf = x[:, kept].clone().requires_grad_(True), y[:, kept].clone().requires_grad_(True)
        want = reference.distillation_loss(xf, yf, labels, **options)
        want.sum().backward()
        full_x, full_y = (torch.zeros(rows, num_classes, dtype=torch.float64) for _ in range(2))
        full_x[:, kept], full_y[:, kept] = xf.grad, yf.grad
        errors = [max_rel(loss, want), max_rel(xs.grad, full_x[:, cols]), max_rel(ys.grad, full_y[:, cols])]
        assert max(errors) <= 1e-12, f"both -inf, {divergence}: {errors}"
    x, y = torch.randn(rows, num_classes, dtype=torch.float64), torch.randn(rows, num_classes, dtype=torch.float64)
    y[0, 1] = float("-inf")
    for divergence, beta in (("forward_kl", 0.5), ("jsd", 0.3), ("tvd", 0.5)):
        options = dict(divergence=divergence, beta=beta, standardize=False, reduction="none")
        xs, ys = x[:, cols].clone().requires_grad_(True), y[:, cols].clone().requires_grad_(True)
        loss = vocab_parallel_distillation_loss(xs, ys, labels, backend=backend, **options)
        loss.sum().backward()
        xf, yf = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        want = distillation_loss(xf, yf, labels, backend="cpu", **options)
        want.sum().backward()
        errors = [max_rel(loss, want), max_rel(xs.grad, xf.grad[:, cols]), max_rel(ys.grad, yf.grad[:, cols])]
        assert torch.isfinite(loss).all() and torch.isfinite(ys.grad).all(), divergence
        assert max(errors) <= 1e-12, f"teacher -inf, {divergence}: {errors}"
    return {"ok": True}


def _extreme_rows(rank: int, world: int, backend: str) -> dict:
    """float32 rows of 1e18 and (eps = 0) 1e-30 keep float32 rounding against the float64 truth for
    every divergence; a NaN row stays in its row (the pointwise phase's collective included)."""
    num_classes = 40
    cols = slice_of(rank, world, num_classes)
    for divergence, beta in DIVERGENCES:
        for magnitude, options in ((1e18, {}), (1e-30, dict(eps=0.0, correction=0))):
            x64 = magnitude * torch.randn(3, num_classes, dtype=torch.float64)
            y64 = magnitude * torch.randn(3, num_classes, dtype=torch.float64)
            errors = _errors(rank, world, x64, y64, None, torch.float32, backend, divergence=divergence, beta=beta,
                             **options)
            assert max(errors) <= 2e-5, (divergence, magnitude, errors)
        x = torch.randn(3, num_classes)
        x[1, 5] = float("nan")  # in rank 0's slice: every rank's row 1 is NaN, no other row
        xs = x[:, cols].clone().requires_grad_(True)
        loss = vocab_parallel_distillation_loss(xs, torch.randn(3, num_classes)[:, cols], None, reduction="none",
                                                backend=backend, divergence=divergence, beta=beta)
        loss.sum().backward()
        assert torch.isnan(loss).tolist() == [False, True, False], divergence
        assert torch.isnan(xs.grad).any(-1).tolist() == [False, True, False], divergence
    return {"ok": True}


def _fused_linear(rank: int, world: int, backend: str) -> dict:
    """The fused lm_head with vocabulary-sharded weights for every divergence, in chunks of 4 rows
    (jsd and tvd: three collectives per chunk): loss, the all-reduced hidden gradient, the weight and
    bias shards' gradients, float64 to 1e-12."""
    num_classes, hidden, rows = 53, 8, 11
    cols = slice_of(rank, world, num_classes)
    h = torch.randn(rows, hidden, dtype=torch.float64)
    w = torch.randn(num_classes, hidden, dtype=torch.float64) / 2
    b = torch.randn(num_classes, dtype=torch.float64)
    ht, wt = torch.randn(rows, hidden, dtype=torch.float64), torch.randn(num_classes, hidden, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (rows,))
    labels[1::3] = -100
    worst = 0.0
    for divergence, beta in DIVERGENCES:
        options = dict(divergence=divergence, beta=beta, temperature=2.0, ce_weight=0.5, kd_weight=0.5)
        hl, wl, bl = h.clone().requires_grad_(True), w[cols].clone().requires_grad_(True), b[cols].clone()
        bl.requires_grad_(True)
        loss = vocab_parallel_fused_linear_distillation_loss(hl, wl, ht, wt[cols], labels, student_bias=bl,
                                                             chunk_size=4, backend=backend, **options)
        loss.backward()
        grad_hidden = hl.grad.clone()
        dist.all_reduce(grad_hidden)  # the tensor-parallel layer's all-reduce of the partial sums
        hf, wf, bf = (t.clone().requires_grad_(True) for t in (h, w, b))
        want = reference.distillation_loss(F.linear(hf, wf, bf), F.linear(ht, wt), labels, **options)
        want.backward()
        errors = [max_rel(loss, want), max_rel(grad_hidden, hf.grad), max_rel(wl.grad, wf.grad[cols]),
                  max_rel(bl.grad, bf.grad[cols])]
        assert max(errors) <= 1e-12, f"{divergence} beta={beta}: {errors}"
        worst = max(worst, *errors)
    return {"worst": worst}


def _collectives(rank: int, world: int) -> dict:
    """The collectives of one step (``check_shards=False``) per divergence, standardized with labels
    and plain without: their names and bytes."""
    cols = slice_of(rank, world, 100)
    x, y = torch.randn(16, 100), torch.randn(16, 100)
    labels = torch.randint(0, 100, (16,))
    counts = {}
    for divergence in ("forward_kl", "reverse_kl", "jeffreys", "jsd", "tvd"):
        for standardize, given in ((True, labels), (False, None)):
            with recorded_collectives() as calls:
                xs = x[:, cols].clone().requires_grad_(True)
                vocab_parallel_distillation_loss(xs, y[:, cols], given, check_shards=False, standardize=standardize,
                                                 divergence=divergence).backward()
            counts[f"{divergence}-{standardize}"] = [size // (16 * 8) for _, size in calls]
    return counts


def _backends_agree(rank: int, world: int) -> dict:
    """The Triton phases against the PyTorch phases on slices of several tiles (1300 or more classes
    per rank against tiles of 1024, and of 512 and 256 in float64), float64 / float32 / bf16: the
    same loss and gradients but for rounding (as test_distributed's forward KL case)."""
    num_classes, rows = 2 * 1300 + 7, 3
    cols = slice_of(rank, world, num_classes)
    x64 = 3 * torch.randn(rows, num_classes, dtype=torch.float64)
    y64 = 5 * torch.randn(rows, num_classes, dtype=torch.float64)
    labels = torch.tensor([5, -100, 2000])
    worst = {}
    for divergence, beta in (("jeffreys", 0.5), ("jsd", 0.3), ("tvd", 0.5)):
        for dtype, bound in ((torch.float64, 1e-12), (torch.float32, 2e-5), (torch.bfloat16, 2.0**-7)):
            got = []
            for backend in BACKENDS:
                xs, ys = _leaf(x64, cols, dtype), _leaf(y64, cols, dtype)
                loss = vocab_parallel_distillation_loss(xs, ys, labels, reduction="none", label_smoothing=0.1,
                                                        divergence=divergence, beta=beta, backend=backend)
                loss.backward(torch.linspace(0.5, 1.5, rows, dtype=loss.dtype))
                got.append((loss.detach(), xs.grad, ys.grad))
            errors = [max_rel(a, b) for a, b in zip(*got)]
            assert max(errors) <= bound, f"{divergence} {dtype}: {errors}"
            worst[f"{divergence}-{dtype}"] = max(errors)
    return worst


SCENARIOS = {**{f"{name}_{backend}": functools.partial(fn, backend=backend) for backend in BACKENDS
                for name, fn in (("matrix", _matrix), ("high_temperature", _high_temperature),
                                 ("minus_inf", _minus_inf_classes), ("extreme", _extreme_rows),
                                 ("fused_linear", _fused_linear))},
             "collectives": _collectives, "backends_agree": _backends_agree}


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[int, list[dict]]:
    """One spawn per world size: every scenario at 2 ranks, the matrix at 3."""
    runs = {2: tuple(SCENARIOS), 3: ("matrix_torch", "matrix_triton")}
    return {world: run_ranks(world, __name__, names, tmp_path_factory.mktemp(f"div-world{world}"))
            for world, names in runs.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [2, 3])
def test_every_divergence_matches_the_single_process_objective(world, backend, reports):
    results = assert_ok(reports[world], f"matrix_{backend}")
    assert set(results[0]) == {f"{d}-{b}" for d, b in DIVERGENCES}


@pytest.mark.parametrize("backend", BACKENDS)
def test_high_temperature_without_cancellation(backend, reports):
    assert_ok(reports[2], f"high_temperature_{backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_classes(backend, reports):
    assert_ok(reports[2], f"minus_inf_{backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_of_extreme_magnitude_and_nan_rows(backend, reports):
    assert_ok(reports[2], f"extreme_{backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_every_divergence(backend, reports):
    assert_ok(reports[2], f"fused_linear_{backend}")


def test_triton_phases_agree_on_several_tiles(reports):
    assert_ok(reports[2], "backends_agree")


def test_collectives_per_divergence(reports):
    """Two all_gathers for the KLs, three for jsd and tvd, each O(rows): float64 per row, phase 1
    (9: 4 statistics of x and of y, the width), phase 2 (Za, Zb; standardized 2; per KL direction 3,
    standardized 5; with labels 4), the pointwise phase (3, standardized 5)."""
    counts = assert_ok(reports[2], "collectives")[0]
    assert counts == {"forward_kl-True": [9, 13], "forward_kl-False": [9, 5],
                      "reverse_kl-True": [9, 13], "reverse_kl-False": [9, 5],
                      "jeffreys-True": [9, 18], "jeffreys-False": [9, 8],
                      "jsd-True": [9, 8, 5], "jsd-False": [9, 2, 3],
                      "tvd-True": [9, 8, 5], "tvd-False": [9, 2, 3]}
