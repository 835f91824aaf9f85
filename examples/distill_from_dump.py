"""Offline distillation from a dumped sparse teacher: the teacher runs once over the token blocks and
its top-k per position, with the rows' statistics and log-normalizer, is kept
(``logitstd_kernels.sparse_dump``; ``python -m logitstd_kernels dump-teacher`` writes it to a file);
the student then trains against the stored rows alone, its lm_head chunked
(``fused_linear_distillation_loss`` with a ``SparseTeacher``), no teacher model in memory.

    python examples/distill_from_dump.py --tiny          # seconds; what the tests run

The models, the data and the teacher's pre-training are those of ``distill_causal_lm.py`` (a byte-level
Llama pair on standard-library source).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Callable, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import distill_causal_lm as recipe  # noqa: E402

import logitstd_kernels as lsk  # noqa: E402
from logitstd_kernels.sparse_dump import dump_teacher, load_teacher, save_teacher  # noqa: E402


def dump(teacher: torch.nn.Module, blocks: dict[str, torch.Tensor], args: argparse.Namespace, path: str) -> None:
    """The teacher's top-k over every block, written to ``path``."""
    device = next(teacher.parameters()).device

    def logits_fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return teacher(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()

    settings = dict(temperature=args.temperature, standardize=True)
    stored = dump_teacher(logits_fn, blocks["input_ids"], blocks["attention_mask"], k=args.k,
                          batch_size=args.batch_size, **settings)
    save_teacher(path, stored, settings)


def train(student: torch.nn.Module, stored: lsk.SparseTeacher, blocks: dict[str, torch.Tensor],
          args: argparse.Namespace, log: Callable[[str], None]) -> list[float]:
    """``args.steps`` steps of the student against the stored teacher; returns the losses."""
    device = next(student.parameters()).device
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr)
    indexed = dict(blocks, index=torch.arange(blocks["input_ids"].shape[0]))
    losses = []
    for step, batch in enumerate(recipe.batches(indexed, args.batch_size, args.steps, args.seed)):
        batch = {key: value.to(device) for key, value in batch.items()}
        teacher = stored.select(batch["index"].cpu()).to(device)
        parts = lsk.fused_linear_distillation_loss(
            recipe.last_hidden_state(student, batch), student.lm_head.weight,
            labels=recipe.next_token_labels(batch["labels"]), teacher_logits=teacher, ce_weight=args.ce_weight,
            kd_weight=args.kd_weight, temperature=args.temperature, support=args.support, return_components=True)
        parts.loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(parts.loss))
        log(f"step {step}: loss {parts.loss:.4f} (ce {parts.ce:.4f}, kd {parts.kd:.4f})")
    return losses


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=32, help="teacher entries stored per position")
    parser.add_argument("--support", choices=("renormalize", "renormalize_teacher", "tail"), default="tail")
    parser.add_argument("--dump", default=None, help="where to write the teacher file (default: a temporary one)")
    args, rest = parser.parse_known_args(argv)
    base = recipe.parse_args(rest + ["--mode", "loop"])
    return argparse.Namespace(**vars(base), **vars(args))


def main(argv: Optional[Sequence[str]] = None, log: Callable[[str], None] = print) -> list[float]:
    args = parse_args(argv)
    teacher, student, blocks = recipe.setup(args)
    log(f"teacher after {args.teacher_steps} steps: next-token loss {recipe.pretrain_teacher(teacher, blocks, args):.3f}")
    with tempfile.TemporaryDirectory(prefix="distill_from_dump_") as scratch:
        path = args.dump or os.path.join(scratch, "teacher.pt")
        dump(teacher, blocks, args, path)
        del teacher  # the student trains against the file alone
        stored, settings = load_teacher(path)
    log(f"stored teacher: {stored.ids.shape[0]} blocks x {stored.ids.shape[1]} positions, k = {settings['k']}")
    return train(student, stored, blocks, args, log)


if __name__ == "__main__":
    main()
