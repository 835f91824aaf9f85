"""The benchmark of the paper's other methods (``bench --methods dkd,mlkd,ctkd``): one training step
(forward + backward to the student, and to CTKD's temperature) of each method, fused against eager
PyTorch and ``torch.compile`` of the same eager code.

- ``dkd``: logit-standardized decoupled KD, ``dkd_loss`` (alpha 1, beta 8, temperature 2);
- ``mlkd``: multi-level KD, ``mlkd_loss`` with the official five temperatures (five fused passes
  plus the correlation terms, which every provider computes in PyTorch);
- ``ctkd``: ``0.1 CE + 9 tau^2 KL`` of standardized logits with a global ``CTKDTemperature``.

Providers: ``torch`` (the eager code: ``backend="torch"``, the reference), ``torch_compile``
(``torch.compile`` of it) and ``cpu`` / ``cuda`` (the fused kernels). Each provider's loss and
student gradient are first checked against the eager code in float64 with the tests' criterion
(``logitstd_kernels.testing``); one that disagrees is recorded as failed and not timed.
"""

from __future__ import annotations

import argparse
import functools
from typing import Callable, Optional

import torch

from .._backends import unavailable_reason
from ..ctkd import CTKDTemperature
from ..methods import dkd_loss
from ..mlkd import mlkd_loss
from ..objective import distillation_loss
from ..testing import eager_error_violation
from .measure import copy_bandwidth_gbps, time_step
from .report import Result, Run, metadata, progress, write_files

METHODS = ("dkd", "mlkd", "ctkd")
PROVIDERS = ("torch", "torch_compile", "cpu", "cuda")
#: (rows, V) per method: two classification shapes, and DKD at an LLM vocabulary.
SHAPES = {"dkd": ((1024, 100), (256, 1000), (1024, 32000)), "mlkd": ((1024, 100), (256, 1000)),
          "ctkd": ((1024, 100), (256, 1000))}
Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _dkd(backend: str) -> Step:
    return lambda x, y, labels: dkd_loss(x, y, labels, temperature=2.0, backend=backend)


def _mlkd(backend: str) -> Step:
    return lambda x, y, labels: mlkd_loss(x, y, backend=backend)


def _ctkd(backend: str, module: CTKDTemperature) -> Step:
    return lambda x, y, labels: distillation_loss(x, y, labels, temperature=module(x, y), backend=backend)


def make_step(method: str, provider: str, module: CTKDTemperature) -> Step:
    """The loss of ``method`` on ``provider`` (``torch_compile``: ``torch.compile`` of the eager code)."""
    backend = "torch" if provider in ("torch", "torch_compile") else provider
    step = {"dkd": _dkd, "mlkd": _mlkd, "ctkd": functools.partial(_ctkd, module=module)}[method](backend)
    return torch.compile(step) if provider == "torch_compile" else step


def _loss_and_grads(step: Step, x: torch.Tensor, y: torch.Tensor, labels: torch.Tensor,
                    module: CTKDTemperature) -> tuple[torch.Tensor, ...]:
    student = x.detach().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    loss = step(student, y, labels)
    loss.backward()
    theta = module.theta.grad
    return (loss.detach(), student.grad) + ((theta,) if theta is not None else ())


def violation(method: str, provider: str, x: torch.Tensor, y: torch.Tensor, labels: torch.Tensor,
              module: CTKDTemperature) -> Optional[str]:
    """None when ``provider``'s loss and gradients agree with the eager code's in float64 within the
    tests' criterion (the eager code in the inputs' dtype being the yardstick), else why not."""
    fast = _loss_and_grads(make_step(method, provider, module), x, y, labels, module)
    eager = _loss_and_grads(make_step(method, "torch", module), x, y, labels, module)
    exact = _loss_and_grads(make_step(method, "torch", module.double()), x.double(), y.double(), labels,
                            module)
    module.float()
    for name, got, e, want in zip(("loss", "grad_student", "grad_temperature"), fast, eager, exact):
        found = eager_error_violation(name, got, e, want)
        if found:
            return found
    return None


def unavailable(provider: str, device: torch.device) -> Optional[str]:
    """None when ``provider`` can be timed on ``device``, else why not."""
    return None if provider in ("torch", "torch_compile") else unavailable_reason(provider, device.type)


def _measure(method: str, provider: str, rows: int, vocab: int, device: torch.device, cpu_budget: float) -> Result:
    base = Result(method, rows, vocab, "float32", "full", provider, "ok")
    generator = torch.Generator(device=device).manual_seed(rows * 1_000_003 + vocab)
    x = 3 * torch.randn(rows, vocab, generator=generator, device=device)
    y = 5 * torch.randn(rows, vocab, generator=generator, device=device)
    labels = torch.randint(0, vocab, (rows,), generator=generator, device=device)
    module = CTKDTemperature().to(device)
    try:
        why = violation(method, provider, x, y, labels, module)
        if why:
            base.status = f"failed: {why}"
            return base
        step, student = make_step(method, provider, module), x.clone().requires_grad_(True)

        def full() -> None:
            student.grad = None
            module.zero_grad(set_to_none=True)
            step(student, y, labels).backward()

        timing = time_step(full, device, cpu_budget_s=cpu_budget)
        base.median_ms, base.p20_ms, base.p80_ms = timing.median_ms, timing.p20_ms, timing.p80_ms
    except Exception as exc:  # one provider's error is its result, not the end of the run
        base.status = f"failed: {type(exc).__name__}: {exc}"[:300]
    return base


def _speedups(results: list[Result]) -> None:
    eager = {(r.sweep, r.rows, r.vocab): r.median_ms for r in results if r.provider == "torch" and r.status == "ok"}
    for r in results:
        ref = eager.get((r.sweep, r.rows, r.vocab))
        r.speedup_vs_torch = ref / r.median_ms if r.status == "ok" and ref else None


def run(args: argparse.Namespace) -> int:
    """Time ``args.methods`` (comma-separated) on ``args.device``; returns the exit status."""
    device = torch.device(args.device)
    methods = tuple(args.methods.split(","))
    providers = tuple(args.providers.split(",")) if args.providers else PROVIDERS
    bad = [m for m in methods if m not in METHODS] + [p for p in providers if p not in PROVIDERS]
    if bad:
        print(f"unknown method(s)/provider(s) {bad}; methods: {METHODS}, providers: {PROVIDERS}")
        return 2
    bench_run = Run(metadata(device, list(args.argv), copy_bandwidth_gbps(device), {
        "methods": list(methods), "dtype": "float32", "mode": "full (forward + backward)"}))
    usable = [p for p in providers if unavailable(p, device) is None]
    bench_run.results += [Result(m, r, v, "float32", "full", p, f"unavailable: {unavailable(p, device)}")
                          for p in providers if p not in usable for m in methods for r, v in SHAPES[m]]
    cases = [(m, r, v) for m in methods for r, v in SHAPES[m]]
    paths: dict = {}
    for index, (method, rows, vocab) in enumerate(cases, 1):
        for provider in usable:
            result = _measure(method, provider, rows, vocab, device, args.cpu_budget)
            bench_run.results.append(result)
            _speedups(bench_run.results)
            paths = write_files(bench_run, args.out, paths, with_plot=False)
            progress(index, len(cases), f"{method} rows={rows} V={vocab} {provider}: "
                     + (f"{result.median_ms:.2f} ms" if result.status == "ok" else result.status))
    print(f"\nwrote {len(paths)} files to {args.out.resolve()}: " + ", ".join(p.name for p in paths.values()))
    return 1 if any(r.status.startswith("failed") for r in bench_run.results) else 0
