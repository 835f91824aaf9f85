"""The blocked Triton path's tuning switches (``_triton/config.py``: eviction hints, prefetch depth)
and the benchmark providers that force them on.

The switches change when bytes move and with which cache hints, not the arithmetic: every result
must be bit for bit the default's. Without a GPU the kernels run through the Triton interpreter
(tests/conftest.py sets TRITON_INTERPRET=1), which ignores the hints but runs the code paths the
switches select (the second prefetched tile's queue in every loop of full tiles).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Optional, Sequence

import pytest
import torch

from logitstd_kernels._backends import Objective, unavailable_reason
from logitstd_kernels.bench import providers
from support import needs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = needs(unavailable_reason("triton", DEVICE) is None,
                   f"Triton cannot run here: {unavailable_reason('triton', DEVICE)}",
                   required=sys.platform.startswith("linux"))

if unavailable_reason("triton", DEVICE) is None:
    from logitstd_kernels._triton import fused_kd_forward, fused_kd_regrad_
    from logitstd_kernels._triton import config
    from logitstd_kernels._triton.config import KernelConfig, forced_tuning, kd_config

SWITCHES = {"evict": {"evict_hints": True}, "prefetch2": {"prefetch_depth": 2}}
# (V, BLOCK, dtype): full tiles 0 (a partial one only), 1, 2, 3 and a partial one, 4 and a partial one:
# the second prefetched tile lies past the row, inside it, and is a queue of two in every loop; bf16
# for the low-precision gradient stores.
CASES = [(5, 32, torch.float32), (32, 32, torch.float32), (64, 32, torch.float32), (100, 32, torch.float32),
         (257, 64, torch.float32), (257, 64, torch.bfloat16)]


def _logits(rows: int, num_classes: int, dtype: torch.dtype, scale: float) -> torch.Tensor:
    return (scale * torch.randn(rows, num_classes, dtype=torch.float64)).to(device=DEVICE, dtype=dtype)


def _forward(x: torch.Tensor, y: torch.Tensor, cfg: KernelConfig, *, mask: Optional[torch.Tensor] = None,
             objective: Optional[Objective] = None, grads: tuple[bool, bool] = (True, True),
             tau: tuple[float, float] = (2.0, 1.5), standardize: bool = True) -> tuple[torch.Tensor, ...]:
    """``fused_kd_forward`` with a gradient factor of 0.75 and ``cfg``: (rows, gx, gy, ce_rows, kd_rows)."""
    scale = torch.tensor([0.75], dtype=torch.float32, device=DEVICE)
    return fused_kd_forward(x, y, mask, scale, tau[0], tau[1], standardize, 1, 1e-7, grads[0], grads[1], objective,
                            config=cfg)


def _assert_same(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], what: str) -> None:
    """Every output bit for bit equal (NaN where the other has NaN)."""
    assert len(got) == len(want)
    for index, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}, output {index}: {m}")


@pytest.mark.gpu  # selected by scripts/gpu-check.sh (-m gpu): the hints change the code only on a GPU
@pytest.mark.parametrize("num_classes,block,dtype", CASES,
                         ids=[f"V{v}-block{b}-{str(d).removeprefix('torch.')}" for v, b, d in CASES])
def test_switched_blocked_kernel_equals_the_default(num_classes: int, block: int, dtype: torch.dtype):
    """Loss, both gradients, the objective's parts: bit for bit the default's with each switch, for
    every launch the blocked kernel has (standardized, plain, loss only through the Bregman pass,
    masked rows, labels)."""
    x, y = _logits(4, num_classes, dtype, 3.0), _logits(4, num_classes, dtype, 5.0)
    x[2] = 1000.0 + 0.01 * torch.randn(num_classes, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    mask = torch.tensor([True, False, True, True], device=DEVICE)
    labels = torch.tensor([0, 3, -100, num_classes - 1], device=DEVICE)
    objective = Objective(labels, -100, 0.1, 0.1, 0.9)
    launches = {
        "standardized": {},
        "plain": dict(standardize=False, tau=(1.0, 1.0)),
        "loss only, high temperature (Bregman pass 3)": dict(grads=(False, False), tau=(40.0, 40.0)),
        "masked rows, student gradient": dict(mask=mask, grads=(True, False)),
        "objective with labels": dict(objective=objective, mask=mask),
    }
    for what, options in launches.items():
        want = _forward(x, y, KernelConfig(register=False, block=block, num_warps=1), **options)
        for switch, fields in SWITCHES.items():
            switched = KernelConfig(register=False, block=block, num_warps=1, **fields)
            _assert_same(_forward(x, y, switched, **options), want, f"{switch}, {what}")


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_switched_in_place_recompute_equals_the_default(switch: str):
    """``fused_kd_regrad_`` (ZERO_EXCLUDED off): only the active rows are rewritten, as by the default."""
    default = KernelConfig(register=False, block=32, num_warps=1)
    switched = KernelConfig(register=False, block=32, num_warps=1, **SWITCHES[switch])
    x, y = _logits(3, 100, torch.float32, 3.0), _logits(3, 100, torch.float32, 5.0)
    active = torch.tensor([False, True, True], device=DEVICE)
    factors = torch.tensor([1.0, -2.0, 0.5], device=DEVICE)
    results = []
    for cfg in (default, switched):
        gx, gy = torch.full_like(x, 7.0), torch.full_like(y, 7.0)
        fused_kd_regrad_(x, y, active, factors, 2.0, 1.5, True, 1, 1e-7, gx, gy, config=cfg)
        results.append((gx, gy))
    _assert_same(results[1], results[0], switch)
    assert torch.all(results[1][0][0] == 7.0) and torch.all(results[1][1][0] == 7.0)


def test_launch_table_switches_and_forcing():
    """The table's switches reach every blocked entry and no register entry; ``forced_tuning`` overrides
    them inside its block only, nested blocks combine, and bad values fail before any launch."""
    table = {"evict_hints": config.BLOCKED_EVICT_HINTS, "prefetch_depth": config.BLOCKED_PREFETCH_DEPTH}
    long_rows = kd_config(131072, acc64=False)
    assert not long_rows.register and (long_rows.evict_hints, long_rows.prefetch_depth) == tuple(table.values())
    with forced_tuning(evict_hints=True):
        assert kd_config(131072, acc64=False).evict_hints
        assert kd_config(3000, acc64=True, full_vectors=False).evict_hints  # float64 and halved tiles too
        short = kd_config(1024, acc64=False)
        assert short.register and not short.evict_hints and short.prefetch_depth == 1
        with forced_tuning(prefetch_depth=2):
            inner = kd_config(65536, acc64=False)
            assert (inner.evict_hints, inner.prefetch_depth) == (True, 2)
        assert kd_config(65536, acc64=False).prefetch_depth == table["prefetch_depth"]
    assert kd_config(131072, acc64=False) == long_rows
    with pytest.raises(ValueError, match="prefetch_depth"):
        with forced_tuning(prefetch_depth=3):
            pass
    with pytest.raises(ValueError, match="blocked path"):
        KernelConfig(register=True, block=1024, num_warps=4, evict_hints=True)
    assert config.tuning_constexprs(KernelConfig(register=True, block=1024, num_warps=4)) == {}
    assert config.tuning_constexprs(KernelConfig(register=False, block=4096, num_warps=16, prefetch_depth=2)) == {
        "EVICT_HINTS": False, "PREFETCH": 2}


@pytest.mark.parametrize("provider,switches", list(providers.TUNED_TRITON.items()))
def test_tuned_providers_force_their_switch(provider: str, switches: dict, monkeypatch: pytest.MonkeyPatch):
    """``triton_evict``/``triton_prefetch``: the Triton backend's loss with the switch forced for its
    launches; timed on CUDA only, reported unavailable with a reason elsewhere."""
    seen = []

    def fake_loss(student: torch.Tensor, teacher: torch.Tensor, backend: str, **options) -> torch.Tensor:
        seen.append((backend, kd_config(student.shape[1], acc64=False)))
        return student.sum()

    monkeypatch.setattr(providers, "logitstd_kd_loss", fake_loss)
    outside = kd_config(65536, acc64=False)
    x = torch.zeros(2, 65536)
    providers.make_loss(provider, temperature=2.0, standardize=True)(x, x)
    (backend, cfg), = seen
    assert backend == "triton" and cfg == dataclasses.replace(outside, **switches)
    assert kd_config(65536, acc64=False) == outside  # forced inside the loss call only
    reason = providers.unavailable(provider, torch.device("cpu"), standardize=True)
    assert reason is not None and "CUDA only" in reason
    if torch.cuda.is_available():
        assert providers.unavailable(provider, torch.device("cuda"), standardize=True) is None


def test_tuned_provider_runs_the_switched_kernel_end_to_end():
    """Through the public loss and its autograd op: the forced kernel's loss and gradient equal the
    default Triton backend's (odd V: scalar runs, 1024-wide tiles, four full ones and a partial one)."""
    x, y = _logits(2, 4099, torch.float32, 3.0), _logits(2, 4099, torch.float32, 5.0)
    results = {}
    for provider in ("triton", *providers.TUNED_TRITON):
        fn = providers.make_loss(provider, temperature=2.0, standardize=True)
        leaf = x.clone().requires_grad_(True)
        loss = fn(leaf, y)
        loss.backward()
        results[provider] = (loss.detach(), leaf.grad)
    for provider in providers.TUNED_TRITON:
        _assert_same(results[provider], results["triton"], provider)
