"""benchmark the fused kernels against eager PyTorch, torch.compile and Liger-Kernel.

Every provider is first checked against the float64 reference on the case's inputs; one that
disagrees is recorded as failed and not timed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..config import DIVERGENCES
from .cases import DEFAULT_MODES, DTYPES, MODES, Case, build_cases, default_cases
from . import accum_accuracy, distributed, fused_linear, methods, objective, sparse
from .measure import copy_bandwidth_gbps, correctness_violation, peak_memory_mb, time_step
from .providers import PROVIDERS, make_loss, split_provider, unavailable, with_divergence
from .report import Result, Run, fill_speedups, metadata, progress, table, write_files


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to benchmark (default: cuda if present, else cpu)")
    parser.add_argument("--providers", default=None,
                        help=f"comma-separated providers (default: {','.join(PROVIDERS)}; or the objective's "
                             "with --objective); unavailable ones are reported and skipped")
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES),
                        help=f"comma-separated, of {','.join(MODES)} (default: {','.join(DEFAULT_MODES)}); no_grad: the "
                             "loss with no input requiring grad (reads student and teacher, writes no gradient)")
    parser.add_argument("--dtypes", default=None, help="comma-separated: float32,bfloat16,float16 "
                        "(default: bfloat16,float32 on GPU, float32 on CPU)")
    parser.add_argument("--vocab", type=_ints, default=None, help="V values of the V sweep")
    parser.add_argument("--rows", type=int, default=None, help="rows of the V sweep (>= 1)")
    parser.add_argument("--rows-sweep", type=_ints, default=None, help="row counts of the rows sweep")
    parser.add_argument("--rows-sweep-vocab", type=int, default=None, help="V of the rows sweep")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--divergences", default="forward_kl",
                        help="comma-separated divergences, each timed for every provider (forward_kl, reverse_kl, "
                             "jsd, jeffreys, tvd); providers of another than forward_kl are named provider@divergence")
    parser.add_argument("--beta", type=float, default=0.5, help="the jsd's beta")
    parser.add_argument("--no-standardize", dest="standardize", action="store_false",
                        help="plain KD (adds the liger provider on CUDA)")
    parser.add_argument("--objective", action="store_true",
                        help="benchmark the distillation objective (0.1 CE + 9 KD with token labels) instead of "
                             f"the KD loss; providers: {', '.join(objective.OBJECTIVE_PROVIDERS)}")
    parser.add_argument("--fused-linear", action="store_true",
                        help="benchmark a full step through the lm_heads (fused_linear_distillation_loss, with a "
                             "float32 or bf16 weight-gradient accumulator, vs its GEMMs alone, the eager composition, "
                             "torch.compile of it, Liger's LigerFusedLinearJSDLoss, orda-kernel and TRL's chunked "
                             "divergence); grid: 8192 rows, H=4096, V=32768,131072, bf16 on GPU; 8192 rows, H=256, "
                             f"V=32000, float32 on CPU; providers: {', '.join(fused_linear.PROVIDERS)}")
    parser.add_argument("--distributed", action="store_true",
                        help="time the vocabulary-parallel objective on 1, 2 and 4 gloo processes (CPU) and record "
                             "the bytes each rank sends per step (--rows, first --vocab value)")
    parser.add_argument("--accum-accuracy", action="store_true",
                        help="measure the fused lm_head's weight-gradient error with a float32 and a bfloat16 "
                             "accumulator (accum_dtype) against float64, bf16 inputs; default shape: 2048 rows, "
                             "H=256, V=8192 (--rows, --hidden, first --vocab); writes <out>/accum-dtype/")
    parser.add_argument("--methods", default=None, metavar="dkd,mlkd,ctkd",
                        help="time a training step of the paper's other methods (decoupled KD, multi-level KD, CTKD's "
                             "learnable temperature), fused against eager and torch.compile of the eager code, float32, "
                             f"rows x V = 1024x100 and 256x1000 (DKD also 1024x32000); providers: "
                             f"{', '.join(methods.PROVIDERS)}")
    parser.add_argument("--sparse", action="store_true",
                        help="time the objective with a sparse (top-k, k=64) teacher against the dense one, float32; "
                             "default shape: 512 rows, V=32000 (--rows, first --vocab); writes <out>/sparse/")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size H of --fused-linear and --accum-accuracy")
    parser.add_argument("--cpu-budget", type=float, default=1.0, help="seconds of timed runs per CPU measurement")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="start no new case after this many seconds; the cases left are recorded as "
                             "'skipped: time budget' (default: no limit)")
    parser.add_argument("--out", type=Path, default=Path("logitstd_results") / "bench",
                        help="results directory (default ./logitstd_results/bench, outside the tracked tree; "
                        "--out benchmarks/results to commit a result)")


def _inputs(case: Case, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(case.rows * 1_000_003 + case.vocab)
    shape = (case.rows, case.vocab)
    dtype = DTYPES[case.dtype]
    student = (3 * torch.randn(shape, generator=generator, device=device)).to(dtype)
    teacher = (5 * torch.randn(shape, generator=generator, device=device)).to(dtype)
    return student, teacher


def _floor_bytes(case: Case, mode: str) -> int:
    size = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    per_element = {"forward": 2 * size, "no_grad": 2 * size, "backward": size, "full": 3 * size}[mode]
    return case.elements * per_element


def _measure(case: Case, mode: str, loss_fn, student: torch.Tensor, teacher: torch.Tensor,
             device: torch.device, copy_gbps: float, cpu_budget: float) -> Result:
    x = student.detach().requires_grad_(True)

    def forward():
        return loss_fn(x, teacher)

    def full():
        x.grad = None
        forward().backward()

    def backward_setup():
        x.grad = None
        return forward()

    if mode == "forward":
        timing = time_step(forward, device, cpu_budget_s=cpu_budget)
    elif mode == "no_grad":
        timing = time_step(lambda: loss_fn(student, teacher), device, cpu_budget_s=cpu_budget)
    elif mode == "full":
        timing = time_step(full, device, cpu_budget_s=cpu_budget)
    else:
        timing = time_step(lambda loss: loss.backward(), device, setup=backward_setup, cpu_budget_s=cpu_budget)
    seconds = timing.median_ms * 1e-3
    moved = _floor_bytes(case, mode)
    x.grad = None
    peak = peak_memory_mb(full, device) if mode == "full" else None
    return Result(case.sweep, case.rows, case.vocab, case.dtype, mode, "", "ok", timing.median_ms, timing.p20_ms,
                  timing.p80_ms, moved / seconds / 1e9, seconds / (moved / (copy_gbps * 1e9)), peak)


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _provider_results(case: Case, provider: str, modes: tuple[str, ...], student: torch.Tensor, teacher: torch.Tensor,
                      device: torch.device, copy_gbps: float, cpu_budget: float, options: dict) -> list[Result]:
    """One result per mode: timed, or failed (disagrees with the reference, or out of memory)."""
    def failed(why: str) -> list[Result]:
        return [Result(case.sweep, case.rows, case.vocab, case.dtype, m, provider, f"failed: {why}") for m in modes]

    base, divergence = split_provider(provider)
    kd_options = dict(temperature=options["temperature"], standardize=options["standardize"], divergence=divergence,
                      beta=options["beta"])
    try:
        if options.get("objective"):
            labels = objective.labels_for(case.rows, case.vocab, device)
            fn = objective.make_objective(base, **kd_options)
            violation = objective.objective_violation(
                fn, student, teacher, labels, **kd_options, ce_weight=objective.gate_ce_weight(base),
                eager_in_input_dtype=base in objective.SUMMED_IN_INPUT_DTYPE, no_grad="no_grad" in modes)

            def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                return fn(x, y, labels)
        else:
            loss_fn = make_loss(base, **kd_options)
            # Liger's KL-divergence loss takes no gradient for its target: the student's is checked
            violation = correctness_violation(loss_fn, student, teacher, teacher_grad=base != "liger",
                                              no_grad="no_grad" in modes, **kd_options)
        if violation:
            return failed(violation)
        results = []
        for mode in modes:
            result = _measure(case, mode, loss_fn, student, teacher, device, copy_gbps, cpu_budget)
            result.provider = provider
            results.append(result)
        return results
    except torch.OutOfMemoryError:
        _release(device)
        return failed("out of memory")


def _usable(bench_run: Run, providers: tuple, cases: list, modes: tuple, device: torch.device,
            args: argparse.Namespace) -> list[str]:
    """The providers that can run here; the others' cells are recorded as unavailable, with why."""
    usable = []
    for provider in providers:
        reason = (objective.unavailable(provider, device) if args.objective
                  else unavailable(provider, device, args.standardize))
        if reason:
            print(f"  {provider}: unavailable ({reason})")
            bench_run.results += [Result(c.sweep, c.rows, c.vocab, c.dtype, m, provider, f"unavailable: {reason}")
                                  for c in cases for m in modes]
        else:
            usable.append(provider)
    return usable


def _report(bench_run: Run, modes: tuple, out, paths: dict) -> list:
    """Print the tables and the failures, write the files; returns the failures (not out of memory)."""
    fill_speedups(bench_run.results)
    for mode in modes:
        print()
        print(table(bench_run.results, mode))
    failed = [r for r in bench_run.results if r.status.startswith("failed") and "out of memory" not in r.status]
    for r in bench_run.results:
        if r.status.startswith("failed"):
            print(f"{r.status.split(':')[0].upper()} {r.provider} rows={r.rows} V={r.vocab} {r.dtype} {r.mode}: {r.status}")
    paths = write_files(bench_run, out, paths)
    print(f"\nwrote {len(paths)} files to {out.resolve()}: " + ", ".join(p.name for p in paths.values()))
    return failed


def run(args: argparse.Namespace) -> int:
    if args.fused_linear:
        return fused_linear.run(args)
    if args.accum_accuracy:
        return accum_accuracy.run(args)
    if args.sparse:
        return sparse.run(args)
    if args.distributed:
        return distributed.run(args)
    if args.methods:
        return methods.run(args)
    device = torch.device(args.device)
    defaults = default_cases(device)
    dtypes = tuple(args.dtypes.split(",")) if args.dtypes else defaults.dtypes
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        print(f"unknown dtype(s) {unknown}; choose from {list(DTYPES)}", file=sys.stderr)
        return 2
    modes = tuple(args.modes.split(","))
    known = objective.OBJECTIVE_PROVIDERS if args.objective else PROVIDERS
    providers = (tuple(args.providers.split(",")) if args.providers
                 else objective.OBJECTIVE_PROVIDERS if args.objective else PROVIDERS)
    divergences = tuple(args.divergences.split(","))
    bad = ([m for m in modes if m not in MODES] + [p for p in providers if p not in known]
           + [d for d in divergences if d not in DIVERGENCES])
    if bad:
        print(f"unknown mode(s)/provider(s)/divergence(s) {bad}; modes: {MODES}, providers: {known}, "
              f"divergences: {DIVERGENCES}", file=sys.stderr)
        return 2
    providers = tuple(with_divergence(p, d) for d in divergences for p in providers)

    def given(value, default):
        return default if value is None else value

    cases = build_cases(given(args.vocab, defaults.vocab_sweep), given(args.rows, defaults.rows_for_vocab_sweep),
                        given(args.rows_sweep, defaults.rows_sweep),
                        given(args.rows_sweep_vocab, defaults.vocab_for_rows_sweep), dtypes)
    if any(c.rows < 1 or c.vocab < 2 for c in cases):
        print("--rows, --rows-sweep must be >= 1 and --vocab, --rows-sweep-vocab >= 2", file=sys.stderr)
        return 2
    copy_gbps = copy_bandwidth_gbps(device)
    options = {"temperature": args.temperature, "standardize": args.standardize, "objective": args.objective,
               "divergences": list(divergences), "beta": args.beta}
    bench_run = Run(metadata(device, list(args.argv), copy_gbps, options))
    print(f"device: {bench_run.metadata['device']}, copy bandwidth {copy_gbps:.1f} GB/s, "
          f"{len(cases)} cases x {len(providers)} providers x {len(modes)} modes")
    usable = _usable(bench_run, providers, cases, modes, device, args)
    paths: dict = {}
    started = time.monotonic()
    for index, case in enumerate(cases, 1):
        if args.time_budget is not None and time.monotonic() - started > args.time_budget:
            left = cases[index - 1:]
            print(f"time budget of {args.time_budget:g} s spent: {len(left)} case(s) skipped")
            bench_run.results += [Result(c.sweep, c.rows, c.vocab, c.dtype, m, p, "skipped: time budget")
                                  for c in left for p in usable for m in modes]
            break
        cells = []
        try:
            student, teacher = _inputs(case, device)
        except torch.OutOfMemoryError:
            bench_run.results += [Result(case.sweep, case.rows, case.vocab, case.dtype, m, p, "failed: out of memory (inputs)")
                                  for p in usable for m in modes]
            _release(device)
            continue
        for provider in usable:
            for result in _provider_results(case, provider, modes, student, teacher, device, copy_gbps, args.cpu_budget,
                                            options):
                bench_run.results.append(result)
            last = bench_run.results[-1]
            cells.append(f"{provider} {last.median_ms:.3f} ms" if last.status == "ok" else f"{provider} {last.status[:40]}")
            fill_speedups(bench_run.results)
            paths = write_files(bench_run, args.out, paths, with_plot=False)  # a run stopped in a case keeps it
        progress(index, len(cases), f"rows={case.rows} V={case.vocab} {case.dtype} ({modes[-1]}): " + " | ".join(cells))
        del student, teacher
        fill_speedups(bench_run.results)
        paths = write_files(bench_run, args.out, paths)  # after every case: a crash keeps what was measured
    failed = _report(bench_run, modes, args.out, paths)
    return 1 if failed else 0
