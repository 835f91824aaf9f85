"""How things are measured: time, copy bandwidth, peak memory, and the correctness gate.

Time: on CUDA, ``triton.testing.do_bench`` (which flushes L2 between runs) for the forward and full
modes, and CUDA events around the backward alone (with the same L2 flush) for the backward mode;
on CPU a warmed-up ``time.perf_counter`` loop. Median with the 20th and 80th percentiles, in ms.

Peak memory above the inputs: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the process's
peak resident set (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` before the run), which
counts every allocation the step touches, the allocator's and the kernels' own.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import reference
from ..testing import eager_error_violation

Step = Callable[[], object]


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def _quantiles(samples_ms: list[float]) -> Timing:
    ordered = sorted(samples_ms)

    def q(frac: float) -> float:
        return ordered[min(len(ordered) - 1, round(frac * (len(ordered) - 1)))]

    return Timing(statistics.median(ordered), q(0.2), q(0.8))


def _cpu_reps(once_s: float, budget_s: float) -> int:
    return max(3, min(20, int(budget_s / max(once_s, 1e-6))))


def time_step(run: Step, device: torch.device, setup: Optional[Callable[[], object]] = None,
              cpu_budget_s: float = 1.0) -> Timing:
    """Time ``run()`` (or ``run(setup())`` when ``setup`` is given, timing only ``run``)."""
    if device.type == "cuda":
        if setup is None:
            import triton.testing

            median, p20, p80 = triton.testing.do_bench(run, quantiles=[0.5, 0.2, 0.8])
            return Timing(median, p20, p80)
        return _time_cuda_events(run, setup)
    samples: list[float] = []
    start = time.perf_counter()
    run(setup()) if setup is not None else run()  # warm-up, also sizes the loop
    reps = _cpu_reps(time.perf_counter() - start, cpu_budget_s)
    for _ in range(reps):
        state = setup() if setup is not None else None
        start = time.perf_counter()
        run(state) if setup is not None else run()
        samples.append((time.perf_counter() - start) * 1e3)
    return _quantiles(samples)


def _time_cuda_events(run: Callable[[object], object], setup: Callable[[], object], reps: int = 50) -> Timing:
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    run(setup())
    samples = []
    for _ in range(reps):
        state = setup()
        flush.zero_()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        run(state)
        end.record()
        torch.cuda.synchronize()
        samples.append(begin.elapsed_time(end))
    return _quantiles(samples)


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Measured device-memory copy bandwidth (bytes read + written per second), in GB/s."""
    numel = (2**28 if device.type == "cuda" else 2**26)  # 1 GiB on GPU, 256 MiB on CPU (float32)
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timing = time_step(lambda: dst.copy_(src), device)
    return 2 * src.numel() * src.element_size() / (timing.median_ms * 1e-3) / 1e9


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{key}:\s+(\d+) kB", status.read(), re.M).group(1)) * 1024


def peak_memory_mb(run: Step, device: torch.device) -> Optional[float]:
    """Peak memory of ``run()`` above what was allocated before it (the inputs), in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current resident set
        before = _status_bytes("VmRSS")
        run()
        return (_status_bytes("VmHWM") - before) / 2**20
    except (OSError, AttributeError):
        return None  # not Linux, or /proc not writable: no CPU peak to report


def _chunked_reference_sum(student: torch.Tensor, teacher: torch.Tensor, dtype: Optional[torch.dtype],
                           chunk_rows: int, **options) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64, device=student.device)
    for start in range(0, student.shape[0], chunk_rows):
        x, y = student[start:start + chunk_rows], teacher[start:start + chunk_rows]
        if dtype is not None:
            x, y = x.to(dtype), y.to(dtype)
        total += reference.logitstd_kd_loss(x, y, reduction="sum", **options).double()
    return total


def correctness_violation(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], student: torch.Tensor,
                          teacher: torch.Tensor, check_rows: int = 32, **options) -> Optional[str]:
    """None if ``loss_fn`` (a "batchmean" loss) matches the reference on this case, else why not.

    The loss is checked on all rows, with the float64 and the eager references computed in chunks of
    rows (bounded memory); the student gradient on the first and last ``check_rows`` rows.
    """
    x = student.detach().requires_grad_(True)
    loss = loss_fn(x, teacher)
    (grad,) = torch.autograd.grad(loss, x)
    rows = student.shape[0]
    chunk = max(1, 2**24 // student.shape[1])
    exact = _chunked_reference_sum(student, teacher, torch.float64, chunk, **options) / rows
    eager = _chunked_reference_sum(student, teacher, None, chunk, **options) / rows
    violation = eager_error_violation("loss", loss.detach(), eager, exact)
    if violation:
        return violation
    picks = sorted({*range(min(check_rows, rows)), *range(max(0, rows - check_rows), rows)})
    xs, ys = student[picks], teacher[picks]
    references = []
    for dtype in (torch.float64, None):
        xr = (xs.to(dtype) if dtype else xs).detach().requires_grad_(True)
        yr = ys.to(dtype) if dtype else ys
        (g,) = torch.autograd.grad(reference.logitstd_kd_loss(xr, yr, reduction="sum", **options) / rows, xr)
        references.append(g)
    return eager_error_violation("grad_student", grad[picks], references[1], references[0])
