"""Benchmark of a full distillation step through the lm_heads: forward + backward of the loss from the
hidden states, the logits computed inside (``python -m logitstd_kernels bench --fused-linear``).

The providers (ours, the GEMMs alone, eager PyTorch, torch.compile, Liger-Kernel, orda-kernel, TRL)
are in ``linear_providers.py``. Three objectives per run, T = 2: the paper's (standardized,
``0.1 CE + 9 KD``; sweep ``fused_linear``), plain KD with Liger's default weights (``0.5 CE + 0.5 KL``;
sweep ``fused_linear_plain``) and the forward KL alone, without labels' cross-entropy (TRL's
distillation loss; sweep ``fused_linear_kl``). Before timing, each provider's loss and gradients on
the first rows are checked against the float64 eager composition (``gemms`` against its own eager
objective).
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Optional

import torch

from .linear_providers import (BF16_ACCUMULATOR, NOT_THE_OBJECTIVE, PROVIDERS, StepLoss, make_step_loss, reference_step,
                               unavailable)
from .measure import copy_bandwidth_gbps, peak_memory_mb, time_step
from .report import Result, Run, metadata, progress, write_files

TEMPERATURE = 2.0
OBJECTIVES = {  # sweep name -> the objective's keywords
    "fused_linear": dict(ce_weight=0.1, kd_weight=9.0, temperature=TEMPERATURE, standardize=True),
    "fused_linear_plain": dict(ce_weight=0.5, kd_weight=0.5 / TEMPERATURE**2, temperature=TEMPERATURE,
                               standardize=False),
    "fused_linear_kl": dict(ce_weight=0.0, kd_weight=1 / TEMPERATURE**2, temperature=TEMPERATURE, standardize=False),
}
FIRST_SWEEP = next(iter(OBJECTIVES))
GPU_GRID = dict(rows=8192, hidden=4096, vocab=(32768, 131072), dtypes=("bfloat16",))
CPU_GRID = dict(rows=8192, hidden=256, vocab=(32000,), dtypes=("float32",))
GATE_ROWS = 64
Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def make_inputs(rows: int, hidden: int, vocab: int, dtype: torch.dtype, device: torch.device) -> Inputs:
    """Student (h, W) and teacher (ht, Wt) with logits of O(1-10) spread, and token labels."""
    gen = torch.Generator(device=device).manual_seed(rows * 7919 + vocab)
    h = torch.randn(rows, hidden, generator=gen, device=device).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen, device=device) * (3 / hidden**0.5)).to(dtype)
    ht = torch.randn(rows, hidden, generator=gen, device=device).to(dtype)
    wt = (torch.randn(vocab, hidden, generator=gen, device=device) * (5 / hidden**0.5)).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=gen, device=device)
    return h, w, ht, wt, labels


def _loss_and_grads(fn: StepLoss, inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h, w, ht, wt, labels = inputs
    h, w = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    loss = fn(h, w, ht, wt, labels)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def gate_violation(fn: StepLoss, reference: StepLoss, inputs: Inputs, low_precision: bool = False) -> Optional[str]:
    """None if ``fn`` agrees with ``reference`` (the eager composition) in float64 on the first rows, else
    what differs.

    Tolerance: 1e-4 relative for float32 inputs, 3e-2 for bf16/fp16 (the matmuls and gradients are
    rounded in that dtype) or with ``low_precision`` (a bf16 gradient accumulator), relative to each
    tensor's largest magnitude.
    """
    h, w, ht, wt, labels = inputs
    picked = (h[:GATE_ROWS], w, ht[:GATE_ROWS], wt, labels[:GATE_ROWS])
    got = _loss_and_grads(fn, picked)
    want = _loss_and_grads(reference, tuple(t.double() if t.is_floating_point() else t for t in picked))
    rtol = 1e-4 if h.dtype == torch.float32 and not low_precision else 3e-2
    for name, g, t in zip(("loss", "grad_hidden", "grad_weight"), got, want):
        err = float((g.double() - t).abs().max() / t.abs().max().clamp_min(1e-30))
        if not err <= rtol:
            return f"{name} differs from the float64 eager reference by {err:.2e} (relative) > {rtol:g}"
    return None


def _step(fn: StepLoss, inputs: Inputs, leaves: tuple[torch.Tensor, torch.Tensor]) -> None:
    h, w = leaves
    h.grad, w.grad = None, None
    fn(h, w, *inputs[2:]).backward()


def _measure(provider: str, sweep: str, inputs: Inputs, dtype_name: str, device: torch.device,
             cpu_budget: float) -> Result:
    options = OBJECTIVES[sweep]
    rows, vocab = inputs[0].shape[0], inputs[1].shape[0]
    base = Result(sweep, rows, vocab, dtype_name, "full", provider, "ok")
    reason = unavailable(provider, sweep, FIRST_SWEEP, options)
    if reason:
        base.status = f"unavailable: {reason}"
        return base
    try:
        fn = make_step_loss(provider, options)
        violation = gate_violation(fn, reference_step(provider, options), inputs, provider in BF16_ACCUMULATOR)
        if violation:
            base.status = f"failed: {violation}"
            return base
        leaves = (inputs[0].detach().clone().requires_grad_(True), inputs[1].detach().clone().requires_grad_(True))
        step = functools.partial(_step, fn, inputs, leaves)
        step()  # warm-up (and compilation) before the memory measurement
        base.peak_mem_mb = peak_memory_mb(step, device)
        timing = time_step(step, device, cpu_budget_s=cpu_budget)
        base.median_ms, base.p20_ms, base.p80_ms = timing.median_ms, timing.p20_ms, timing.p80_ms
    except torch.OutOfMemoryError:
        base.status = "failed: out of memory"
    except Exception as exc:  # a peer's (or our) error is this provider's result, not the end of the run
        base.status = f"failed: {type(exc).__name__}: {exc}"
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return base


def _speedups(results: list[Result]) -> None:
    """Eager's time over each provider's, for the providers that compute the objective."""
    eager = {(r.sweep, r.vocab, r.dtype): r.median_ms for r in results if r.provider == "torch" and r.status == "ok"}
    for r in results:
        ref = eager.get((r.sweep, r.vocab, r.dtype))
        if r.status == "ok" and ref and r.provider not in NOT_THE_OBJECTIVE:
            r.speedup_vs_torch = ref / r.median_ms


def summary(results: list[Result]) -> str:
    """A terminal table: one line per objective and case, median ms (speedup) and peak MiB per provider."""
    lines = [f"{'objective':>18} {'V':>7} {'dtype':>9} | provider: median ms (speedup vs torch), peak MiB"]
    for key in dict.fromkeys((r.sweep, r.vocab, r.dtype) for r in results):
        cells = []
        for r in results:
            if (r.sweep, r.vocab, r.dtype) != key or r.status.startswith("unavailable"):
                continue
            speed = f" ({r.speedup_vs_torch:.1f}x)" if r.speedup_vs_torch and r.provider != "torch" else ""
            cells.append(f"{r.provider}: {r.median_ms:.0f} ms{speed}, {r.peak_mem_mb or 0:.0f} MiB" if r.status == "ok"
                         else f"{r.provider}: {r.status[:60]}")
        lines.append(f"{key[0]:>18} {key[1]:>7} {key[2]:>9} | " + "; ".join(cells))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """The fused-linear grid of the bench command (``--fused-linear``); returns the exit status."""
    device = torch.device(args.device)
    grid = GPU_GRID if device.type == "cuda" else CPU_GRID
    rows = args.rows or grid["rows"]
    hidden = args.hidden or grid["hidden"]
    vocabs = args.vocab or grid["vocab"]
    dtypes = tuple(args.dtypes.split(",")) if args.dtypes else grid["dtypes"]
    providers = tuple(args.providers.split(",")) if args.providers else PROVIDERS
    bad = [p for p in providers if p not in PROVIDERS]
    if bad:
        print(f"unknown provider(s) {bad}; providers: {PROVIDERS}")
        return 2
    copy_gbps = copy_bandwidth_gbps(device)
    bench_run = Run(metadata(device, list(args.argv), copy_gbps, {
        "fused_linear": True, "hidden": hidden, "objectives": OBJECTIVES, "gate_rows": GATE_ROWS}))
    print(f"device: {bench_run.metadata['device']}; fused linear step, rows={rows}, H={hidden}")
    cases = [(sweep, v, d) for sweep in OBJECTIVES for v in vocabs for d in dtypes]
    paths: dict = {}
    started = time.monotonic()
    for index, (sweep, vocab, dtype_name) in enumerate(cases, 1):
        if args.time_budget is not None and time.monotonic() - started > args.time_budget:
            bench_run.results += [Result(s, rows, v, d, "full", p, "skipped: time budget")
                                  for s, v, d in cases[index - 1:] for p in providers]
            break
        inputs = make_inputs(rows, hidden, vocab, getattr(torch, dtype_name), device)
        for provider in providers:
            result = _measure(provider, sweep, inputs, dtype_name, device, args.cpu_budget)
            bench_run.results.append(result)
            _speedups(bench_run.results)
            paths = write_files(bench_run, args.out, paths, with_plot=False)  # a run stopped in a case keeps it
            progress(index, len(cases), f"{sweep} V={vocab} {dtype_name} {provider}: "
                     + (f"{result.median_ms:.1f} ms, {result.peak_mem_mb or 0:.0f} MiB" if result.status == "ok"
                        else result.status))
        del inputs
        _speedups(bench_run.results)
        paths = write_files(bench_run, args.out, paths)
    print()
    print(summary(bench_run.results))
    paths = write_files(bench_run, args.out, paths)
    print(f"\nwrote {len(paths)} files to {args.out.resolve()}: " + ", ".join(p.name for p in paths.values()))
    return 1 if any(r.status.startswith("failed") and "out of memory" not in r.status
                    for r in bench_run.results) else 0
