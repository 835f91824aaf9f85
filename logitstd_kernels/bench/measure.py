"""How things are measured: time, copy bandwidth, peak memory, and the correctness gate.

Time: on CUDA, ``triton.testing.do_bench`` (which flushes L2 between runs) for the forward and full
modes, and CUDA events around the backward alone (with the same L2 flush) for the backward mode;
on CPU a warmed-up ``time.perf_counter`` loop. Median with the 20th and 80th percentiles, in ms.

Peak memory above the inputs: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the process's
peak resident set (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` before the run), which
counts every allocation the step touches, the allocator's and the kernels' own.
"""

from __future__ import annotations

import ctypes
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


def _return_free_heap() -> None:
    """Hand the allocator's free pages back to the OS (glibc ``malloc_trim``), so that a step reusing
    blocks an earlier run freed (below malloc's mmap threshold, e.g. a chunk's logits) faults them in
    again and shows in the peak resident set, instead of hiding in an already resident heap."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the resident set may then undercount reused heap blocks


def peak_memory_mb(run: Step, device: torch.device) -> Optional[float]:
    """Peak memory of ``run()`` above what was allocated before it (the inputs), in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    _return_free_heap()
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


def _reference_grads(student: torch.Tensor, teacher: torch.Tensor, dtype: torch.dtype, rows: int,
                     **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the reference's "batchmean" loss over ``rows`` rows, for a slice of those rows."""
    x = student.detach().to(dtype).requires_grad_(True)
    y = teacher.detach().to(dtype).requires_grad_(True)
    gx, gy = torch.autograd.grad(reference.logitstd_kd_loss(x, y, reduction="sum", **options) / rows, (x, y))
    return gx, gy


def _row_picks(rows: int, check_rows: Optional[int], device: torch.device) -> Optional[torch.Tensor]:
    """None (every row), or ``check_rows`` row indices: the first, the last and a fixed random sample."""
    if check_rows is None or check_rows >= rows:
        return None
    generator = torch.Generator().manual_seed(rows)
    middle = torch.randperm(max(rows - 2, 0), generator=generator)[:max(check_rows - 2, 0)] + 1
    return torch.cat([torch.tensor([0, rows - 1]), middle]).unique().to(device)


def correctness_violation(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], student: torch.Tensor,
                          teacher: torch.Tensor, check_rows: Optional[int] = None, teacher_grad: bool = True,
                          no_grad: bool = False, **options) -> Optional[str]:
    """None if ``loss_fn`` (a "batchmean" loss) matches the reference on this case, else why not.

    The criterion is the tests' (``logitstd_kernels.testing``): in every row, the error against the
    reference in float64 is at most twice the eager reference's error (the gradients' eager error
    taken before their rounding to bf16/fp16, which is then allowed once per element) plus 16 ulps of
    float32 times the row's largest value. Checked: the loss, and both gradients (the teacher
    requires grad here, as in online distillation; a provider through which no gradient reaches the
    teacher fails; ``teacher_grad=False`` checks the student's alone, for a provider whose target takes
    no gradient by design, such as Liger's KL-divergence loss), on every row, or on ``check_rows`` rows (the first, the last and a fixed random
    sample) when given. The references are computed a chunk of rows at a time (bounded memory).
    ``no_grad=True`` also checks the loss of a call in which no input requires grad (the fused ops
    take another path there, computing no gradient).
    """
    x = student.detach().requires_grad_(True)
    y = teacher.detach().requires_grad_(teacher_grad)
    loss = loss_fn(x, y)
    grad_x, grad_y = torch.autograd.grad(loss, (x, y) if teacher_grad else (x,), allow_unused=True) + (
        () if teacher_grad else (None,))
    if grad_x is None:
        return "grad_student: no gradient reaches the student"
    if teacher_grad and grad_y is None:
        return "grad_teacher: no gradient reaches the teacher (it requires grad in the correctness check)"
    rows, vocab = student.shape
    acc = reference.accumulation_dtype(student, teacher)
    chunk = max(1, (2**24 if student.device.type == "cuda" else 2**22) // vocab)
    exact = _chunked_reference_sum(student, teacher, torch.float64, chunk, **options) / rows
    eager = _chunked_reference_sum(student, teacher, None, chunk, **options) / rows
    violation = eager_error_violation("loss", loss.detach(), eager, exact)
    if not violation and no_grad:
        violation = eager_error_violation("loss (no input requires grad)", loss_fn(student.detach(), teacher.detach()),
                                          eager, exact)
    if violation:
        return violation
    picks = _row_picks(rows, check_rows, student.device)
    if picks is not None:
        student, teacher, grad_x = (t[picks] for t in (student, teacher, grad_x))
        grad_y = grad_y[picks] if teacher_grad else None
    for start in range(0, student.shape[0], chunk):
        part = slice(start, start + chunk)
        exact_x, exact_y = _reference_grads(student[part], teacher[part], torch.float64, rows, **options)
        eager_x, eager_y = _reference_grads(student[part], teacher[part], acc, rows, **options)
        checks = [("grad_student", grad_x[part], eager_x, exact_x)]
        if teacher_grad:
            checks.append(("grad_teacher", grad_y[part], eager_y, exact_y))
        for name, fast, e, want in checks:
            violation = eager_error_violation(name, fast, e, want)
            if violation:
                where = f"rows {start}..{start + fast.shape[0] - 1}" if picks is None else "sampled rows"
                return f"{where}: {violation}"
    return None
