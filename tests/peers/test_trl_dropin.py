"""``logitstd_kernels.integrations.trl``: TRL 1.16's ``DistillationTrainer`` with the fused lm_head.

The loss hook (``chunked_divergence_loss``) against TRL's ``_chunked_divergence_loss`` on the same
tensors, and a tiny offline run of the trainer: random small Llama teacher and student
(examples/distill_causal_lm.py's), the standard library's source as prompts, the byte-level
``ByT5Tokenizer``, greedy on-policy completions of 8 tokens, a teacher logit scale and a student
softcapping in the model configs (which TRL reads). With ``standardize=False`` the first step's loss
and gradients are TRL's own; with the default (standardized) the loss goes down.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from peer_support import FLOAT32, FLOAT32_LINEAR_GRAD, assert_grad, assert_loss, grads, logits, peer
from support import load_example, require_modules

B, K, H, V = 2, 5, 8, 37


@pytest.fixture(scope="module")
def trl_integration():
    peer("trl")
    from logitstd_kernels.integrations import trl as integration

    return integration


def test_importing_the_package_imports_no_training_library():
    """``import logitstd_kernels`` (and its ``integrations`` package) leaves trl and transformers
    unimported: the integration modules import them themselves."""
    code = ("import sys, logitstd_kernels, logitstd_kernels.integrations; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'trl', 'transformers', 'accelerate'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


TRANSFORMS = {"none": {}, "scale-softcap": dict(student_logit_scale=0.5, teacher_logit_scale=2.0,
                                                student_final_logit_softcapping=3.0,
                                                teacher_final_logit_softcapping=5.0)}


@pytest.mark.parametrize("transforms", list(TRANSFORMS.values()), ids=list(TRANSFORMS))
@pytest.mark.parametrize("num_items", [None, 11], ids=["mean", "num_items"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_loss_hook_is_trls_without_standardization(trl_integration, beta, num_items, transforms):
    """``chunked_divergence_loss(..., standardize=False)`` returns TRL's ``(loss, entropy_sum,
    n_valid)`` for TRL's arguments, logit scales and softcapping included (the student's entropy
    from its own no-grad lm_head pass), and the same student gradients; ``entropy=False`` gives a
    NaN entropy sum and the same loss."""
    trl_loss = peer("trl.trainer.distillation_trainer")._chunked_divergence_loss
    hidden, weight, bias = logits(B, K, H, scale=1.0, requires_grad=True), logits(V, H, requires_grad=True), logits(V)
    bias.requires_grad_(True)
    t_hidden, t_weight = logits(B, K, H + 3, scale=1.0), logits(V, H + 3)
    mask = torch.ones(B, K, dtype=torch.long)
    mask[1, 2:] = 0
    args = (hidden, t_hidden, weight, t_weight, mask, beta, num_items, bias)
    expected = trl_loss(*args, temperature=2.0, **transforms)
    got = trl_integration.chunked_divergence_loss(*args, temperature=2.0, standardize=False, **transforms)
    assert_loss(got[0], expected[0], FLOAT32)
    assert_loss(got[1], expected[1], FLOAT32, "entropy_sum")
    assert int(got[2]) == int(expected[2]) == 7
    for name, g_ours, g_trl in zip(("hidden", "weight", "bias"), grads(got[0], hidden, weight, bias),
                                   grads(expected[0], hidden, weight, bias)):
        assert_grad(g_ours, g_trl, FLOAT32_LINEAR_GRAD, f"d/d student {name}")
    quiet = trl_integration.chunked_divergence_loss(*args, temperature=2.0, standardize=False, entropy=False,
                                                    **transforms)
    assert math.isnan(float(quiet[1])) and float(quiet[0]) == float(got[0])


def test_bad_options_raise_naming_the_argument(trl_integration):
    """The trainer checks its own keywords before TRL's constructor runs."""
    for options, name in ((dict(backend="gpu"), "backend"), (dict(eps=-1.0), "eps"), (dict(correction=-1), "correction"),
                          (dict(kd_temperature=0.0), "kd_temperature"), (dict(chunk_size=0), "chunk_size")):
        with pytest.raises((ValueError, TypeError), match=name):
            trl_integration.DistillationTrainer(model=None, **options)


class _Recorder:
    """The per-call losses and the first step's student gradients of a trainer run."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.first_grads: dict[str, torch.Tensor] = {}
        self.log_history: list[dict] = []


def _train(trainer_cls, recipe, steps: int, out_dir: str, **options) -> _Recorder:
    """``steps`` steps of ``trainer_cls`` from the same seeded models, prompts and config."""
    import datasets
    import transformers
    from trl import DistillationConfig

    record = _Recorder()

    class FirstGrads(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if not record.first_grads:
                record.first_grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters()})

    class Recording(trainer_cls):
        def compute_loss(self, *args, **kwargs):
            loss = super().compute_loss(*args, **kwargs)
            record.losses.append(float(loss.detach()))
            return loss

    tokenizer = transformers.ByT5Tokenizer()
    tokenizer.padding_side = "left"
    texts = recipe.stdlib_texts(4000)
    prompts = datasets.Dataset.from_dict({"prompt": [text[start:start + 20] for text in texts[:2] for start in (0, 200)]})
    student_size, teacher_size = recipe.SIZES["tiny"]
    teacher = recipe.build_model(teacher_size, len(tokenizer), 64, tokenizer, seed=1)
    student = recipe.build_model(student_size, len(tokenizer), 64, tokenizer, seed=0)
    # TRL reads these from the configs (Llama's own forward uses neither): a teacher logit scale that
    # makes its logits O(1), a student softcap at the size of its random logits, which it bends
    teacher.config.logit_scale, student.config.final_logit_softcapping = 10.0, 0.1
    config = DistillationConfig(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2,
        lr_scheduler_type="constant", max_grad_norm=0.0, max_completion_length=8, temperature=1.0, beta=0.5,
        generation_kwargs={"do_sample": False}, shuffle_dataset=False, gradient_checkpointing=False, bf16=False,
        use_cpu=True, seed=0, report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True)
    trainer = Recording(model=student, teacher_model=teacher, args=config, train_dataset=prompts,
                        processing_class=tokenizer, callbacks=[FirstGrads()], **options)
    trainer.train()
    record.log_history = trainer.state.log_history
    return record


@pytest.fixture(scope="module")
def runs(trl_integration, tmp_path_factory):
    """TRL's trainer and ours without standardization, one step each, and ours with it, six steps."""
    require_modules("transformers", "accelerate", "datasets", extra="peers")
    recipe = load_example("distill_causal_lm")
    out = str(tmp_path_factory.mktemp("trl"))
    return {"trl": _train(peer("trl").DistillationTrainer, recipe, 1, out),
            "plain": _train(trl_integration.DistillationTrainer, recipe, 1, out, standardize=False),
            "standardized": _train(trl_integration.DistillationTrainer, recipe, 6, out)}


def test_first_step_is_trls_without_standardization(runs):
    """Same seed, models and greedy completions: our first step's loss is TRL's (to float32
    rounding: TRL computes in float32), its student gradients too, and so is the logged entropy."""
    trl_run, ours = runs["trl"], runs["plain"]
    assert len(trl_run.losses) == len(ours.losses) == 1
    assert_loss(torch.tensor(ours.losses[0]), torch.tensor(trl_run.losses[0]), FLOAT32)
    assert trl_run.first_grads.keys() == ours.first_grads.keys() and "lm_head.weight" in ours.first_grads
    for name, expected in trl_run.first_grads.items():
        assert_grad(ours.first_grads[name], expected, FLOAT32_LINEAR_GRAD, name)
    assert_loss(torch.tensor(ours.log_history[0]["entropy"]), torch.tensor(trl_run.log_history[0]["entropy"]),
                FLOAT32, "entropy")


def test_standardized_loss_decreases(runs):
    """The default (standardized) loss on the same first batch (the same greedy completions) is
    another objective than TRL's (0.19 against 0.25 in the run of the test), and goes down over six
    steps (0.19 to 0.11, 0.08 at its lowest)."""
    losses = runs["standardized"].losses
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert abs(losses[0] - runs["plain"].losses[0]) > 0.1 * runs["plain"].losses[0]
    assert sum(losses[-2:]) < sum(losses[:2]) and losses[-1] < losses[0]
