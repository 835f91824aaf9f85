"""The Hugging Face recipe (examples/distill_causal_lm.py) under DistributedDataParallel: 2 CPU
processes (gloo) against one process on the same global batch of 4 blocks (one of them padded, so
that the processes hold different token counts).

- The building block, in a plain loop: ``distillation_loss(..., wrapper=DDP(student))`` runs the
  fused loss as DDP's forward; with the sum over the process's tokens divided by the global token
  count and multiplied by the process count, every process ends with the gradient of the global
  token mean, and the processes' losses sum to its loss. Without the wrapper (the loss computed from
  ``student.model(...)`` directly) each process keeps its local gradient: the check fails there,
  which shows it can.
- The ``Trainer`` subclass: one step under DDP (the Trainer wraps the student itself), its gradient
  and loss against a one-process Trainer with a batch of 4.
"""

from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path

import pytest
import torch

from support import load_example, require_modules, spawn_ranks

WORLD = 2
TIMEOUT_S = 600  # two processes importing transformers and running a Trainer on 2 shared cores
TINY = ["--tiny", "--device", "cpu", "--mode", "trainer", "--steps", "1", "--batch-size", str(2 * WORLD)]


def _recipe():
    return load_example("distill_causal_lm")


def _global_batch(recipe, args) -> dict[str, torch.Tensor]:
    """4 blocks of the tiny run's data: the first 3 and the last (padded) one."""
    blocks = recipe.make_blocks(recipe.stdlib_texts(args.max_bytes), recipe.transformers.ByT5Tokenizer(),
                                args.block_len)
    assert int(blocks["attention_mask"][-1].sum()) < args.block_len, "the last block is padded"
    return {key: torch.cat((value[:3], value[-1:])) for key, value in blocks.items()}


def _models(recipe, args):
    """The tiny teacher (frozen) and student, the same weights in every process."""
    teacher, student, _ = recipe.setup(args)
    return teacher.requires_grad_(False).eval(), student


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _loop_step(recipe, args, batch, wrapped: bool) -> dict:
    """One forward and backward of the plain-loop building block on this process's half of the
    batch: the summed objective over the global token count, times the process count."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    rank, world = dist.get_rank(), dist.get_world_size()
    teacher, student = _models(recipe, args)
    ddp = DistributedDataParallel(student)
    local = {key: value.chunk(world)[rank] for key, value in batch.items()}
    count = (recipe.next_token_labels(local["labels"]) != recipe.IGNORE_INDEX).sum()
    dist.all_reduce(count)
    parts = recipe.distillation_loss(student, teacher, local, recipe.make_loss(args, "auto", reduction="sum"),
                                     wrapper=ddp if wrapped else None)
    (parts.loss * world / count).backward()
    return {"loss": float(parts.loss.detach() / count), "grads": _grads(student)}


def _trainer_step(recipe, args, batch, out_dir: str) -> dict:
    """One step of the recipe's Trainer subclass on ``batch`` (a process's share under DDP)."""
    from transformers import TrainerCallback, TrainingArguments

    class FirstGrads(TrainerCallback):
        """The gradients just before the first optimizer step."""

        grads: dict[str, torch.Tensor] = {}

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.grads = self.grads or _grads(model)

    teacher, student = _models(recipe, args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    training_args = TrainingArguments(
        output_dir=out_dir, max_steps=1, per_device_train_batch_size=4 // world, learning_rate=args.lr,
        max_grad_norm=0.0, seed=args.seed, use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0)
    callback = FirstGrads()
    trainer = recipe.DistillationTrainer(model=student, args=training_args, train_dataset=recipe.BlockDataset(batch),
                                         teacher=teacher, loss_fn=recipe.make_loss(args, "auto", reduction="sum"),
                                         callbacks=[callback])
    trainer.train()
    return {"loss": trainer.step_parts[0][0], "grads": callback.grads, "world": trainer.accelerator.num_processes}


def _worker(rank: int, world: int, folder: str, port: int) -> None:
    """Rank ``rank``: the loop step without and with the wrapper, then the Trainer step; the results
    (or the traceback) saved to ``folder/rank<rank>.pt``."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    report: dict = {}
    try:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method="env://")
        recipe = _recipe()
        args = recipe.parse_args(TINY)
        batch = _global_batch(recipe, args)
        report["bypassed"] = _loop_step(recipe, args, batch, wrapped=False)
        report["wrapped"] = _loop_step(recipe, args, batch, wrapped=True)
        report["trainer"] = _trainer_step(recipe, args, batch, str(Path(folder) / f"trainer{rank}"))
    except BaseException:  # the test reports it (argparse errors and all)
        report["error"] = traceback.format_exc()
    torch.save(report, Path(folder) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The single-process results and each rank's."""
    require_modules("transformers", "accelerate", extra="hf")
    recipe = _recipe()
    args = recipe.parse_args(TINY)
    batch = _global_batch(recipe, args)
    teacher, student = _models(recipe, args)
    count = (recipe.next_token_labels(batch["labels"]) != recipe.IGNORE_INDEX).sum()
    parts = recipe.distillation_loss(student, teacher, batch, recipe.make_loss(args, "auto", reduction="sum"))
    (parts.loss / count).backward()
    single = {"loop": {"loss": float(parts.loss.detach() / count), "grads": _grads(student)},
              "trainer": _trainer_step(recipe, args, batch, str(tmp_path_factory.mktemp("trainer")))}
    folder = tmp_path_factory.mktemp("ddp")
    exit_codes = spawn_ranks(_worker, WORLD, folder, _free_port(), timeout_s=TIMEOUT_S)
    ranks = []
    for rank in range(WORLD):
        path = folder / f"rank{rank}.pt"
        assert path.exists(), f"rank {rank} wrote no report (exit code {exit_codes[rank]})"
        report = torch.load(path)
        assert "error" not in report, f"rank {rank}:\n{report['error']}"
        ranks.append(report)
    return {"single": single, "ranks": ranks}


def _max_rel_diff(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    """The largest gradient difference over all parameters, relative to the largest entry of each."""
    assert got.keys() == expected.keys() and "lm_head.weight" in expected
    return max(float((got[n] - e).abs().max() / e.abs().max()) for n, e in expected.items())


def test_loop_under_ddp_is_the_single_process_step(runs):
    single = runs["single"]["loop"]
    assert sum(r["wrapped"]["loss"] for r in runs["ranks"]) == pytest.approx(single["loss"], rel=1e-6)
    for rank, report in enumerate(runs["ranks"]):
        assert _max_rel_diff(report["wrapped"]["grads"], single["grads"]) < 1e-5, f"rank {rank}"


def test_bypassing_the_wrapper_leaves_local_gradients(runs):
    """The same step computing the loss outside DDP's forward: the gradients are not all-reduced,
    each process keeps the gradient of its own half (scaled by 2), far from the global one."""
    single = runs["single"]["loop"]
    for report in runs["ranks"]:
        assert _max_rel_diff(report["bypassed"]["grads"], single["grads"]) > 0.05
    first, second = (r["bypassed"]["grads"] for r in runs["ranks"])
    halves = {n: (first[n] + second[n]) / 2 for n in first}  # what the all-reduce would have made
    assert _max_rel_diff(halves, single["grads"]) < 1e-5


def test_trainer_under_ddp_is_the_single_process_step(runs):
    """The Trainer's step over 2 processes: the same gradient as one process with the 4 blocks, and
    the processes' losses (each multiplied by the process count) average to its loss."""
    single = runs["single"]["trainer"]
    assert single["world"] == 1 and all(r["trainer"]["world"] == WORLD for r in runs["ranks"])
    mean_loss = sum(r["trainer"]["loss"] for r in runs["ranks"]) / WORLD
    assert mean_loss == pytest.approx(single["loss"], rel=1e-6)
    for rank, report in enumerate(runs["ranks"]):
        assert _max_rel_diff(report["trainer"]["grads"], single["grads"]) < 1e-5, f"rank {rank}"
