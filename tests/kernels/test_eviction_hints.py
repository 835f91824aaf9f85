"""The blocked Triton path's L2 eviction hints (``_triton/config.py``: on for the long-row entry).

The hints change which cache policy the loads and stores carry, not the arithmetic: every result
must be bit for bit that of the same launch without them. Without a GPU the kernels run through the
Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), which ignores the hints but runs the
code paths they select.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

import pytest
import torch

import logitstd_kernels as lsk
from logitstd_kernels._backends import unavailable_reason
from support import needs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = needs(unavailable_reason("triton", DEVICE) is None,
                   f"Triton cannot run here: {unavailable_reason('triton', DEVICE)}",
                   required=sys.platform.startswith("linux"))

if unavailable_reason("triton", DEVICE) is None:
    from logitstd_kernels._triton import config, fused_forward, fused_regrad_
    from logitstd_kernels._triton.config import KernelConfig, kd_config

# (V, BLOCK, dtype): full tiles 0 (a partial one only), 1, 2, 3 and a partial one, 4 and a partial one;
# bf16 for the low-precision gradient stores.
CASES = [(5, 32, torch.float32), (32, 32, torch.float32), (64, 32, torch.float32), (100, 32, torch.float32),
         (257, 64, torch.float32), (257, 64, torch.bfloat16)]


def _logits(rows: int, num_classes: int, dtype: torch.dtype, scale: float) -> torch.Tensor:
    return (scale * torch.randn(rows, num_classes, dtype=torch.float64)).to(device=DEVICE, dtype=dtype)


def _forward(x: torch.Tensor, y: torch.Tensor, cfg: KernelConfig, *, mask: Optional[torch.Tensor] = None,
             labels: Optional[torch.Tensor] = None, grads: tuple[bool, bool] = (True, True),
             tau: tuple[float, float] = (2.0, 1.5), standardize: bool = True) -> tuple[torch.Tensor, ...]:
    """``fused_forward`` with a gradient factor of 0.75 and ``cfg``: (rows, gx, gy, ce_rows, kd_rows)."""
    scale = torch.tensor([0.75], dtype=torch.float32, device=DEVICE)
    settings = lsk.DistillConfig(temperature=tau[0], teacher_temperature=tau[1], standardize=standardize,
                                 label_smoothing=0.1, ce_weight=0.1, kd_weight=0.9)
    return fused_forward(x, y, labels, mask, scale, settings, grads[0], grads[1], kernel_config=cfg)


def _assert_same(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], what: str) -> None:
    """Every output bit for bit equal (NaN where the other has NaN)."""
    assert len(got) == len(want)
    for index, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}, output {index}: {m}")


@pytest.mark.gpu  # selected by scripts/gpu-check.sh (-m gpu): the hints change the code only on a GPU
@pytest.mark.parametrize("num_classes,block,dtype", CASES,
                         ids=[f"V{v}-block{b}-{str(d).removeprefix('torch.')}" for v, b, d in CASES])
def test_hinted_blocked_kernel_equals_the_unhinted_one(num_classes: int, block: int, dtype: torch.dtype):
    """Loss, both gradients, the objective's parts: bit for bit the same with and without the hints,
    for every launch the blocked kernel has (standardized, plain, loss only through the Bregman
    pass, masked rows, labels)."""
    x, y = _logits(4, num_classes, dtype, 3.0), _logits(4, num_classes, dtype, 5.0)
    x[2] = 1000.0 + 0.01 * torch.randn(num_classes, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    mask = torch.tensor([True, False, True, True], device=DEVICE)
    labels = torch.tensor([0, 3, -100, num_classes - 1], device=DEVICE)
    launches = {
        "standardized": {},
        "plain": dict(standardize=False, tau=(1.0, 1.0)),
        "loss only, high temperature (Bregman pass 3)": dict(grads=(False, False), tau=(40.0, 40.0)),
        "masked rows, student gradient": dict(mask=mask, grads=(True, False)),
        "objective with labels": dict(labels=labels, mask=mask),
    }
    for what, options in launches.items():
        want = _forward(x, y, KernelConfig(register=False, block=block, num_warps=1), **options)
        hinted = KernelConfig(register=False, block=block, num_warps=1, evict_hints=True)
        _assert_same(_forward(x, y, hinted, **options), want, what)


def test_hinted_in_place_recompute_equals_the_unhinted_one():
    """``fused_regrad_`` (ZERO_EXCLUDED off): only the active rows are rewritten, with or without hints."""
    x, y = _logits(3, 100, torch.float32, 3.0), _logits(3, 100, torch.float32, 5.0)
    active = torch.tensor([False, True, True], device=DEVICE)
    factors = torch.tensor([1.0, -2.0, 0.5], device=DEVICE)
    settings = lsk.DistillConfig(teacher_temperature=1.5, ce_weight=0.0, kd_weight=1.0)
    results = []
    for hints in (False, True):
        gx, gy = torch.full_like(x, 7.0), torch.full_like(y, 7.0)
        cfg = KernelConfig(register=False, block=32, num_warps=1, evict_hints=hints)
        fused_regrad_(x, y, None, active, factors, settings, gx, gy, kernel_config=cfg)
        results.append((gx, gy))
    _assert_same(results[1], results[0], "hinted recompute")
    assert torch.all(results[1][0][0] == 7.0) and torch.all(results[1][1][0] == 7.0)


def test_launch_table_hints_only_the_long_rows():
    """The hints are on for the float32 table's last (long-row) entry, off elsewhere, never on the
    register path; they reach the kernel as its EVICT_HINTS constexpr."""
    assert kd_config(131072, acc64=False).evict_hints and kd_config(32768, acc64=False).evict_hints
    assert not kd_config(16384, acc64=False).evict_hints
    assert not kd_config(1024, acc64=False).evict_hints and kd_config(1024, acc64=False).register
    assert not kd_config(3000, acc64=True).evict_hints
    with pytest.raises(ValueError, match="blocked path"):
        KernelConfig(register=True, block=1024, num_warps=4, evict_hints=True)
    assert config.tuning_constexprs(KernelConfig(register=True, block=1024, num_warps=4)) == {}
    blocked = KernelConfig(register=False, block=4096, num_warps=16, evict_hints=True)
    assert config.tuning_constexprs(blocked, smoothing=False) == {"EVICT_HINTS": True, "SMOOTH": False}
