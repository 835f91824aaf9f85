"""``bench --fused-linear``'s providers beyond the fused step and eager PyTorch: the fused step's GEMMs
alone, the bf16 weight-gradient accumulator, and which objectives each provider is timed on. (The
peers' timings at a tiny size run in the GPU check's smoke mode, tests/tooling/test_gpu_check_script.py.)"""

from __future__ import annotations

import pytest
import torch

from logitstd_kernels.bench.fused_linear import FIRST_SWEEP, OBJECTIVES, gate_violation, make_inputs
from logitstd_kernels.bench.linear_providers import gemms_only, make_step_loss, reference_step, unavailable
from logitstd_kernels.fused_linear import default_chunk_size

CPU = torch.device("cpu")


def test_gemms_step_is_half_the_squared_logits_through_the_chunk_loop():
    """The ``gemms`` provider: loss 0.5 ||h W^T||^2, gradients (h W^T) W and (h W^T)^T h (float64
    formulas here), accumulated over the chunks of the fused step's chunk rule (3 chunks here: the
    first overwrites the weight's gradient, the others add to it)."""
    rows, hidden, vocab = 300, 8, 32000
    assert default_chunk_size(rows, vocab, torch.float32, CPU) == 128
    h, w, ht, wt, labels = make_inputs(rows, hidden, vocab, torch.float32, CPU)
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = gemms_only(hh, ww, ht, wt, labels)
    loss.backward()
    logits = h.double() @ w.double().T
    assert loss.item() == pytest.approx(0.5 * logits.pow(2).sum().item(), rel=1e-4)  # float32 dots of 4M terms
    for got, want in ((hh.grad, logits @ w.double()), (ww.grad, logits.T @ h.double())):
        assert got.dtype == torch.float32
        assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-5


def test_the_gate_holds_the_gemms_step_to_its_own_objective():
    inputs = make_inputs(64, 16, 256, torch.float32, CPU)
    assert gate_violation(gemms_only, reference_step("gemms", OBJECTIVES[FIRST_SWEEP]), inputs) is None
    assert "differs" in gate_violation(gemms_only, reference_step("fused", OBJECTIVES[FIRST_SWEEP]), inputs)


def test_the_bf16_accumulator_rounds_the_weight_gradient():
    """``fused_accum_bf16`` accumulates the weight's gradient in bf16 (float32 inputs here): off by bf16
    rounding at the float32 tolerance, within the low-precision one; the default accumulator is not."""
    inputs = make_inputs(64, 16, 256, torch.float32, CPU)
    options = OBJECTIVES[FIRST_SWEEP]
    eager = reference_step("fused_accum_bf16", options)
    bf16 = make_step_loss("fused_accum_bf16", options)
    assert "grad_weight" in gate_violation(bf16, eager, inputs)
    assert gate_violation(bf16, eager, inputs, low_precision=True) is None
    assert gate_violation(make_step_loss("fused", options), eager, inputs) is None


@pytest.mark.parametrize("provider,sweep,why", [
    ("gemms", "fused_linear_plain", "does not depend on the objective"),
    ("fused_accum_bf16", "fused_linear_kl", "does not depend on the objective"),
    ("liger", "fused_linear", "no logit standardization"),
    ("orda", "fused_linear", "no logit standardization"),
    ("trl", "fused_linear_plain", "no cross-entropy term"),
])
def test_providers_are_left_out_of_the_objectives_they_do_not_compute(provider, sweep, why):
    assert why in unavailable(provider, sweep, FIRST_SWEEP, OBJECTIVES[sweep])
    for name in ("fused", "torch"):
        assert unavailable(name, sweep, FIRST_SWEEP, OBJECTIVES[sweep]) is None
