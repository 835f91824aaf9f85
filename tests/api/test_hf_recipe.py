"""The Hugging Face recipe (examples/distill_causal_lm.py): a tiny run of the plain loop and of the
Trainer, whose loss goes down and whose fused loss equals the eager loss (full logits) on the same
batch, with the same student gradients. Needs the ``hf`` extra (transformers, accelerate)."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from support import load_example, needs, require_modules

import logitstd_kernels as lsk
from logitstd_kernels._backends import unavailable_reason

TINY = ["--tiny", "--device", "cpu", "--steps", "6", "--teacher-steps", "5"]


@pytest.fixture(scope="module")
def recipe() -> ModuleType:
    """The example script as a module."""
    require_modules("transformers", "accelerate", extra="hf")
    return load_example("distill_causal_lm")


@pytest.fixture(scope="module")
def report(recipe: ModuleType, tmp_path_factory: pytest.TempPathFactory):
    """One tiny run of both ways: the loop, and the Trainer once with each loss."""
    lines: list[str] = []
    out_dir = tmp_path_factory.mktemp("trainer")
    result = recipe.main(TINY + ["--out-dir", str(out_dir)], log=lines.append)
    assert any(line.startswith("loop, fused: loss") for line in lines)
    assert any(line.startswith("trainer, eager: loss") for line in lines)
    return result


def _decreases(losses: list[float]) -> bool:
    return sum(losses[-2:]) < sum(losses[:2]) and losses[-1] < losses[0]


def test_labels_are_shifted_with_ignore_padding(recipe: ModuleType) -> None:
    labels = torch.tensor([[5, 6, 7, -100], [8, 9, 10, 11]])
    assert recipe.next_token_labels(labels).tolist() == [[6, 7, -100, -100], [9, 10, 11, -100]]
    tokenizer = recipe.transformers.ByT5Tokenizer()
    blocks = recipe.make_blocks(["ab", "cdefg"], tokenizer, block_len=4)
    # "ab" + eos padded to 4; "cdefg" + eos cut into 4 + 2 (padded).
    assert blocks["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert blocks["input_ids"][0, :3].tolist() == [ord("a") + 3, ord("b") + 3, tokenizer.eos_token_id]
    assert blocks["labels"][0].tolist() == blocks["input_ids"][0, :3].tolist() + [-100]
    assert (blocks["labels"][2, 2:] == -100).all()


def test_shifted_cross_entropy_is_the_models_own(recipe: ModuleType) -> None:
    """The CE part of the fused loss, on hidden states and shifted labels, equals the loss that
    transformers computes from the model's logits and the unshifted labels: the shift is right."""
    args = recipe.parse_args(TINY)
    teacher, student, blocks = recipe.setup(args)
    batch = {k: v[:3] for k, v in blocks.items()}
    with torch.no_grad():
        expected = student(**batch).loss
        hidden, teacher_hidden = recipe.last_hidden_state(student, batch), recipe.last_hidden_state(teacher, batch)
        got = lsk.fused_linear_distillation_loss(
            hidden, student.lm_head.weight, teacher_hidden, teacher.lm_head.weight,
            recipe.next_token_labels(batch["labels"]), ce_weight=1.0, kd_weight=0.0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


# "auto" falls back to the eager loss when no fused kernel is built: the fused-vs-eager tests need one
FUSED_HERE = needs(unavailable_reason("cpu", "cpu") is None, "the C++ CPU kernel is not built: 'auto' would be eager")


@FUSED_HERE
def test_fused_gradients_equal_eager_for_every_student_parameter(recipe: ModuleType) -> None:
    args = recipe.parse_args(TINY + ["--chunk-size", "48"])  # several chunks, the last one partial
    teacher, student, blocks = recipe.setup(args)
    teacher.requires_grad_(False)
    batch = {k: v[:4] for k, v in blocks.items()}
    results = {}
    for backend in ("torch", "auto"):
        student.zero_grad(set_to_none=True)
        parts = recipe.distillation_loss(student, teacher, batch, recipe.make_loss(args, backend))
        parts.loss.backward()
        results[backend] = (parts, {name: p.grad.clone() for name, p in student.named_parameters()})
    (eager, eager_grads), (fused, fused_grads) = results["torch"], results["auto"]
    for name in ("loss", "ce", "kd"):
        torch.testing.assert_close(getattr(fused, name).detach(), getattr(eager, name).detach(), rtol=1e-5, atol=0)
    assert eager_grads.keys() == fused_grads.keys() and "lm_head.weight" in fused_grads
    for name, expected in eager_grads.items():
        scale = float(expected.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(fused_grads[name], expected, rtol=1e-5, atol=1e-5 * scale, msg=name)


@FUSED_HERE
def test_loop_loss_decreases_and_fused_equals_eager_each_step(report) -> None:
    assert len(report.loop) == 6
    for step in report.loop:
        for name in ("loss", "ce", "kd"):
            assert getattr(step.fused, name) == pytest.approx(getattr(step.eager, name), rel=1e-5)
        assert step.grad_rel_diff < 1e-5
        assert step.fused.tokens > 0 and step.fused.seconds > 0 and step.eager.seconds > 0
        assert step.fused.peak_mib is None or step.fused.peak_mib >= 0
    assert _decreases([step.fused.loss for step in report.loop])


def test_trainer_loss_decreases_with_both_losses(report) -> None:
    fused, eager = report.trainer["fused"], report.trainer["eager"]
    assert len(fused) == len(eager) == 6
    assert _decreases([r.loss for r in fused]) and _decreases([r.loss for r in eager])
    # Two runs from the same weights on the same batches: the first step is the same computation,
    # later ones drift apart only by rounding.
    assert fused[0].loss == pytest.approx(eager[0].loss, rel=1e-5)
    for a, b in zip(fused, eager):
        assert a.loss == pytest.approx(b.loss, rel=1e-3)
