"""Memory of the fused lm_head on the CPU.

- What a step allocates, seen allocation by allocation (``torch.profiler`` with
  ``profile_memory=True`` reports every block of c10's CPU allocator): the weight's accumulator, the
  gradients handed to autograd and the chunks' C x V buffers, nothing else; in particular no
  weight-sized temporary, in the forward or in the backward.
- A full step's resident-set peak against the eager composition's (at most 25% at N = 8192,
  V = 32000, H = 256, float32). Each step runs in its own process, so that neither sees the other's
  freed memory; the peak is the resident set above the inputs (``bench.measure.peak_memory_mb``).
"""

from __future__ import annotations

import subprocess
import sys
from typing import Callable

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import logitstd_kernels as lsk
from support import case_id, fused_cases, labels_for, make_problem, needs, run
from logitstd_kernels._backends import unavailable_reason

NEEDS_CPU_KERNEL = needs(unavailable_reason("cpu", "cpu") is None, "the C++ CPU kernel is not built")

STEP = """
import sys, torch
from logitstd_kernels.bench.fused_linear import OBJECTIVES, make_inputs
from logitstd_kernels.bench.linear_providers import make_step_loss
from logitstd_kernels.bench.measure import peak_memory_mb
inputs = make_inputs(8192, 256, 32000, torch.float32, torch.device("cpu"))
fn = make_step_loss(sys.argv[1], OBJECTIVES["fused_linear"])
h, w = (t.clone().requires_grad_(True) for t in inputs[:2])
print(peak_memory_mb(lambda: fn(h, w, *inputs[2:]).backward(), torch.device("cpu")))
"""


def peak_mib(provider: str) -> float:
    done = subprocess.run([sys.executable, "-c", STEP, provider], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.split()[-1])


@needs(sys.platform == "linux", "the resident-set peak is read from Linux's /proc")
@NEEDS_CPU_KERNEL
def test_fused_step_peak_is_under_a_quarter_of_eager():
    fused, eager = peak_mib("fused"), peak_mib("torch")
    assert eager > 3 * 1000, f"the eager step should hold several 1 GB logits tensors, measured {eager:.0f} MiB"
    assert fused <= 0.25 * eager, f"fused step peak {fused:.0f} MiB > 25% of eager's {eager:.0f} MiB"


def allocations(step: Callable[[], object]) -> tuple[int, int]:
    """``(peak, end)``: the most bytes ``step`` holds allocated at once on the CPU, and at its end,
    above what was allocated before it (the profiler's allocation events, in time order; a block
    allocated before the step is not counted when the step frees it, which only raises the numbers)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, live


ROWS, HIDDEN, VOCAB, CHUNK = 32, 512, 8192, 4
MIB = 2**20


@NEEDS_CPU_KERNEL
@pytest.mark.parametrize("dtype,accum_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                               (torch.bfloat16, torch.bfloat16)], ids=["fp32", "bf16", "bf16-acc"])
@pytest.mark.parametrize("upstream", [1.0, 0.5], ids=["grad-1", "grad-0.5"])
def test_a_step_allocates_the_accumulator_the_gradients_and_chunks(dtype, accum_dtype, upstream):
    """A (V, H) weight of 8-16 MiB, chunks of 4 rows (128 KiB per float32 C x V block), the hidden
    states' gradient too. The step's peak: the weight's accumulator (float32, or bf16 with
    ``accum_dtype=torch.bfloat16``), plus the bf16 gradient the backward casts it to when the dtypes
    differ, plus at most 1 MiB of chunk buffers and small tensors (8 float32 C x V blocks); at its end
    only the gradients are left. The backward alone allocates the cast gradient or nothing: the
    incoming gradient scales the accumulator in place (a temporary of the weight's size, the old
    ``saved * grad_loss``, would add 8-16 MiB)."""
    weight = (torch.randn(VOCAB, HIDDEN) / HIDDEN**0.5).to(dtype).requires_grad_(True)
    hidden = torch.randn(ROWS, HIDDEN).to(dtype).requires_grad_(True)
    teacher_hidden, teacher_weight = torch.randn(ROWS, HIDDEN).to(dtype), torch.randn(VOCAB, HIDDEN).to(dtype)
    labels = labels_for((ROWS,), VOCAB, "some-ignored", "cpu")
    grad = torch.tensor(upstream)

    def forward():
        return lsk.fused_linear_distillation_loss(hidden, weight, teacher_hidden, teacher_weight, labels,
                                                  chunk_size=CHUNK, accum_dtype=accum_dtype, backend="cpu")

    accum_size = torch.empty((), dtype=accum_dtype or torch.float32).element_size()
    accumulator = weight.numel() * accum_size
    cast = weight.numel() * weight.element_size() if accum_size != weight.element_size() else 0
    gradients = (weight.numel() + hidden.numel()) * weight.element_size()
    chunks = 8 * CHUNK * VOCAB * 4 + 4 * hidden.numel() * 4
    peak, end = allocations(lambda: forward().backward(grad))
    assert accumulator <= peak <= accumulator + cast + chunks, \
        f"step peak {peak / MIB:.2f} MiB, accumulator {accumulator / MIB:.2f} MiB, cast {cast / MIB:.2f} MiB"
    assert gradients <= end <= gradients + 64 * 1024, f"left {end / MIB:.2f} MiB, gradients {gradients / MIB:.2f} MiB"
    weight.grad = hidden.grad = None
    loss = forward()
    peak, _ = allocations(lambda: loss.backward(grad))
    assert peak <= cast + hidden.numel() * weight.element_size() + 64 * 1024, f"backward peak {peak / MIB:.2f} MiB"


@pytest.mark.parametrize("case", fused_cases(), ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_the_backends_row_scaling_gives_the_same_gradients(case, dtype, monkeypatch):
    """The backward's path on CUDA (the saved gradients scaled in place by the backend's
    ``scale_rows_``), forced here: bit for bit the CPU path's ``mul_``, weight, bias and hidden states."""
    from logitstd_kernels._backends import backend_module
    from logitstd_kernels._ops import fused_linear_op

    backend, device = case
    h, w, b, ht, wt, bt = make_problem(9, 6, 6, 21, device, dtype=dtype)
    common = dict(upstream=0.37, teacher_hidden=ht, teacher_weight=wt, teacher_bias=bt, chunk_size=4, backend=backend)
    want = run(h, w, b, **common)
    monkeypatch.setattr(fused_linear_op, "row_scaling", lambda name, device: backend_module(name).scale_rows_)
    got = run(h, w, b, **common)
    assert all(torch.equal(g, t) for g, t in zip(got, want))
