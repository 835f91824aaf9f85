"""Tests of what only the Triton kernels have: the launch table, the blocked path at small V (forced
through ``config=``), the alignment-dependent run length VEC, and the row-scaling kernel.

The whole-backend matrix (every reduction, option and edge case through the public API) is
tests/test_loss_matrix.py; these tests call the launchers directly. Without a GPU they run through
the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 first).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import logitstd_kernels as lsk
from logitstd_kernels import reference
from logitstd_kernels._backends import unavailable_reason
from logitstd_kernels.testing import assert_within_eager_error
from support import needs, term_magnitudes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton is a dependency on Linux (pyproject.toml): missing there, it fails under LOGITSTD_REQUIRE_ALL=1.
pytestmark = needs(unavailable_reason("triton", DEVICE) is None,
                   f"Triton cannot run here: {unavailable_reason('triton', DEVICE)}",
                   required=sys.platform.startswith("linux"))

if unavailable_reason("triton", DEVICE) is None:
    from logitstd_kernels._triton import INTERPRETED, fused_forward, scale_rows_
    from logitstd_kernels._triton.config import KernelConfig, kd_config, vector_width
    from logitstd_kernels._triton.launch import _row_vec


def fused_kd_forward(x, y, mask, scale, tau_s, tau_t, standardize, correction, eps, grad_student, grad_teacher,
                     config=None):
    """The Triton launcher for pure KD (no labels, KD weight 1), ``config`` its launch configuration."""
    settings = lsk.DistillConfig(temperature=tau_s, teacher_temperature=tau_t, standardize=standardize,
                                 correction=correction, eps=eps, ce_weight=0.0, kd_weight=1.0)
    return fused_forward(x, y, None, mask, scale, settings, grad_student, grad_teacher, kernel_config=config)


def _classes_to_check() -> list[int]:
    """2 .. 2^18 + 1: every power of two, its neighbours, and odd sizes in between."""
    sizes = {2, 3, 1000, 1271, 21843, 32000, 50257, 128256, 151936, 262144, 262145, 1 << 20}
    for k in range(1, 19):
        sizes.update({(1 << k) - 1, 1 << k, (1 << k) + 1})
    return sorted(v for v in sizes if v >= 2)


@pytest.mark.parametrize("acc64", [False, True], ids=["acc32", "acc64"])
@pytest.mark.parametrize("full_vectors", [True, False], ids=["aligned", "unaligned"])
def test_config_table_covers_every_class_count(acc64, full_vectors):
    """Every V gets a launchable entry: power-of-two tiles, <= 8 elements per thread (4 for float64),
    BLOCK >= V on the register path, and one switch from the register to the blocked path."""
    ept_max = 4 if acc64 else 8
    seen_blocked = False
    for num_classes in _classes_to_check():
        cfg = kd_config(num_classes, acc64, full_vectors)
        assert cfg.num_warps in (1, 2, 4, 8, 16, 32), (num_classes, cfg)
        assert cfg.block & (cfg.block - 1) == 0 and cfg.block >= 32, (num_classes, cfg)
        assert cfg.block // (32 * cfg.num_warps) <= ept_max, (num_classes, cfg)
        if cfg.register:
            assert not seen_blocked, f"register path again at V={num_classes} after the blocked path"
            assert cfg.block >= num_classes, (num_classes, cfg)
        else:
            seen_blocked = True
    assert seen_blocked


def test_interpreted_flag_records_the_environment():
    assert INTERPRETED == (os.environ.get("TRITON_INTERPRET") == "1")


def test_row_vec_follows_alignment():
    x = torch.randn(4, 1024, device=DEVICE)
    assert vector_width(torch.bfloat16, torch.float32) == 4 and vector_width(torch.float16) == 8
    assert _row_vec(1024, x, x) == 4
    assert _row_vec(1024, x.half(), x.half()) == 8
    wide = torch.randn(4, 1030, device=DEVICE)
    assert _row_vec(1024, wide[:, :1024], x) == 2          # row stride 1030: 8-byte aligned runs
    assert _row_vec(1021, x[:, :1021].contiguous(), x[:, :1021].contiguous()) == 1  # odd V
    assert _row_vec(1023, x[:, 1:], x[:, 1:]) == 1          # rows start one element in


def _logits(rows: int, num_classes: int, dtype: torch.dtype, scale: float = 3.0) -> torch.Tensor:
    return (scale * torch.randn(rows, num_classes, dtype=torch.float64)).to(device=DEVICE, dtype=dtype)


def _check(x, y, *, mask=None, config=None, grad_student=True, grad_teacher=True, tau_s=2.0, tau_t=1.5,
           standardize=True, correction=1, eps=1e-7):
    """fused_kd_forward against the reference in float64, within twice the eager error plus ULPS x u x
    the terms' magnitude (logitstd_kernels/testing.py, tests/support.py::term_magnitudes)."""
    acc = reference.accumulation_dtype(x, y)
    scale = torch.tensor([0.75], dtype=acc, device=DEVICE)
    rows, gx, gy, _, _ = fused_kd_forward(x, y, mask, scale, tau_s, tau_t, standardize, correction, eps,
                                          grad_student, grad_teacher, config=config)
    kwargs = dict(temperature=tau_s, teacher_temperature=tau_t, standardize=standardize,
                  correction=correction, eps=eps, reduction="none", mask=mask)
    results = []
    for dtype in (None, torch.float64):
        xr = (x if dtype is None else x.to(dtype)).detach().requires_grad_(True)
        yr = (y if dtype is None else y.to(dtype)).detach().requires_grad_(True)
        loss = reference.logitstd_kd_loss(xr, yr, **kwargs)
        gxr, gyr = torch.autograd.grad(loss.sum() * 0.75, (xr, yr))
        results.append((loss.detach(), gxr, gyr))
    (eager, eager_x, eager_y), (exact, exact_x, exact_y) = results
    mag, mag_x, mag_y = term_magnitudes(x, y, torch.full((x.shape[0],), 0.75, dtype=torch.float64), **kwargs)
    assert rows.dtype == acc and rows.shape == (x.shape[0],)
    assert_within_eager_error("loss", rows, eager, exact, magnitude=mag)
    if grad_student:
        assert gx.dtype == x.dtype and gx.shape == x.shape and gx.is_contiguous()
        assert_within_eager_error("grad_student", gx, eager_x, exact_x, magnitude=mag_x)
    else:
        assert gx.numel() == 0
    if grad_teacher:
        assert gy.dtype == y.dtype and gy.shape == y.shape and gy.is_contiguous()
        assert_within_eager_error("grad_teacher", gy, eager_y, exact_y, magnitude=mag_y)
    else:
        assert gy.numel() == 0
    return rows, gx, gy


# (V, BLOCK): no full tile (V < BLOCK), only full tiles, full tiles and a partial one.
BLOCKED_SHAPES = [(5, 32), (64, 32), (100, 32), (257, 64)]


@pytest.mark.parametrize("num_classes,block", BLOCKED_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocked_path_at_small_v(num_classes, block, dtype):
    cfg = KernelConfig(register=False, block=block, num_warps=1)
    x, y = _logits(3, num_classes, dtype), _logits(3, num_classes, dtype, scale=5.0)
    _check(x, y, config=cfg)
    _check(x, y, config=cfg, standardize=False, tau_s=1.0, tau_t=1.0)
    _check(x, y, config=cfg, correction=0, eps=0.0, grad_teacher=False)
    _check(x, y, config=cfg, grad_student=False)
    _check(x, y, config=cfg, grad_student=False, grad_teacher=False)


@pytest.mark.parametrize("register", [True, False], ids=["register", "blocked"])
def test_mixed_dtypes_and_unaligned_rows(register):
    """fp16 student with a float32 teacher (VEC 4), and rows whose stride allows no vector (VEC 1)."""
    num_classes = 203
    cfg = KernelConfig(register=register, block=256 if register else 64, num_warps=2)
    _check(_logits(3, num_classes, torch.float16), _logits(3, num_classes, torch.float32), config=cfg)
    wide = _logits(4, num_classes + 2, torch.float32)
    _check(wide[:, 1:num_classes + 1], _logits(4, num_classes, torch.float32), config=cfg)


@pytest.mark.parametrize("register", [True, False], ids=["register", "blocked"])
def test_masked_rows_read_nothing_and_write_zeros(register):
    """NaN/Inf in masked rows never leak: exactly 0 loss and 0 gradients there; hard rows elsewhere."""
    num_classes = 150
    cfg = KernelConfig(register=register, block=256 if register else 32, num_warps=1)
    x, y = _logits(6, num_classes, torch.float32), _logits(6, num_classes, torch.float32)
    x[1] = float("nan")
    y[4, :7] = float("inf")
    x[2] = 1000.0 + 0.01 * torch.randn(num_classes, dtype=torch.float64).float().to(DEVICE)
    x[3] = 4.0  # constant row: sigma = 0, gradient g_u / eps
    mask = torch.tensor([True, False, True, True, False, True], device=DEVICE)
    rows, gx, gy = _check(x, y, mask=mask, config=cfg)
    for r in (1, 4):
        assert rows[r] == 0 and torch.count_nonzero(gx[r]) == 0 and torch.count_nonzero(gy[r]) == 0
    assert torch.isfinite(rows).all() and torch.isfinite(gx).all() and torch.isfinite(gy).all()


@pytest.mark.parametrize("register", [True, False], ids=["register", "blocked"])
def test_unmasked_non_finite_rows_stay_in_their_row(register):
    cfg = KernelConfig(register=register, block=128 if register else 32, num_warps=1)
    x, y = _logits(4, 100, torch.float64), _logits(4, 100, torch.float64)
    x[1, 3] = float("nan")
    y[2, 0] = float("inf")
    rows, gx, gy = _check(x, y, config=cfg)
    assert torch.isnan(rows[1]) and torch.isnan(rows[2])
    assert torch.isfinite(rows[[0, 3]]).all() and torch.isfinite(gx[[0, 3]]).all()


def test_zero_rows_skip_the_launch():
    x = torch.randn(0, 10, device=DEVICE)
    rows, gx, gy, _, _ = fused_kd_forward(x, x, None, torch.ones(1, device=DEVICE), 2.0, 2.0, True, 1, 1e-7,
                                          True, False)
    assert rows.shape == (0,) and gx.shape == (0, 10) and gy.shape == (0,)


@pytest.mark.parametrize("grad_dtype,scale_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                                    (torch.float32, torch.float64), (torch.float64, torch.float64)])
def test_scale_rows(grad_dtype, scale_dtype):
    grad = torch.randn(5, 300, device=DEVICE).to(grad_dtype)
    scale = torch.tensor([1.0, 0.5, -2.0, 1.0, float("nan")], device=DEVICE, dtype=scale_dtype)
    want = (grad.double() * scale.double()[:, None]).to(grad_dtype)
    out = scale_rows_(grad.clone(), scale)
    assert out.dtype == grad_dtype
    torch.testing.assert_close(out, want, equal_nan=True, rtol=1e-3 if grad_dtype == torch.float16 else 1e-6,
                               atol=0)
    assert torch.equal(out[[0, 3]], grad[[0, 3]])  # scale exactly 1: rows untouched


def test_scale_rows_scalar_and_empty():
    grad = torch.randn(3, 5000, device=DEVICE)  # more than one 4096-wide tile per row
    before = grad.clone()
    scale_rows_(grad, torch.tensor(1.0, device=DEVICE))
    assert torch.equal(grad, before)
    scale_rows_(grad, torch.tensor(0.25, dtype=torch.float64, device=DEVICE))
    torch.testing.assert_close(grad, before * 0.25, rtol=0, atol=0)
    empty = torch.randn(0, 7, device=DEVICE)
    assert scale_rows_(empty, torch.ones(0, device=DEVICE)) is empty
    with pytest.raises(ValueError, match="scale must have shape"):
        scale_rows_(grad, torch.ones(2, device=DEVICE))
