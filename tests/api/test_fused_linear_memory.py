"""Peak memory of a full fused-linear step on the CPU against the eager composition's (issue target:
at most 25% at N = 8192, V = 32000, H = 256, float32). Each step runs in its own process, so that
neither sees the other's freed memory; the peak is the resident set above the inputs
(``bench.measure.peak_memory_mb``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from support import needs
from logitstd_kernels._backends import unavailable_reason

STEP = """
import sys, torch
from logitstd_kernels.bench.fused_linear import OBJECTIVES, make_inputs, make_step_loss
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
@needs(unavailable_reason("cpu", "cpu") is None, "the C++ CPU kernel is not built")
def test_fused_step_peak_is_under_a_quarter_of_eager():
    fused, eager = peak_mib("fused"), peak_mib("torch")
    assert eager > 3 * 1000, f"the eager step should hold several 1 GB logits tensors, measured {eager:.0f} MiB"
    assert fused <= 0.25 * eager, f"fused step peak {fused:.0f} MiB > 25% of eager's {eager:.0f} MiB"
