"""Distil a causal language model with Hugging Face ``transformers`` and the fused linear loss.

The student's last hidden state and its ``lm_head.weight`` go into
:func:`logitstd_kernels.fused_linear_distillation_loss` together with the teacher's, so that
neither model's logits are ever materialized: the loss computes them chunk by chunk and returns
the gradients of the student's hidden states and lm_head weight. Everything runs offline:

- teacher and student are small Llama models built from configs with random weights (the teacher
  wider and deeper, the same vocabulary); in real use they come from ``from_pretrained``;
- the text is a fixed, sorted list of the Python standard library's own source files (read from
  ``sysconfig.get_paths()["stdlib"]``), so the data is the same on every machine with the same
  Python version;
- the tokenizer is ``transformers.ByT5Tokenizer()``, a byte-level tokenizer that needs no vocabulary
  file (token = UTF-8 byte + 3, after pad/eos/unk): a real ``transformers`` tokenizer, so the code is
  the same with ``AutoTokenizer.from_pretrained(...)``, and nothing has to be downloaded.

Labels follow the Hugging Face convention (``labels`` = ``input_ids`` with -100 on padding) and are
shifted by one in the loss (:func:`next_token_labels`): hidden state ``t`` predicts token ``t + 1``,
the last position of a block predicts nothing (-100), so the hidden states need no slicing or copy.

Two ways: a plain training loop (``--mode loop``, AdamW) and a ``transformers.Trainer`` subclass
that overrides ``compute_loss`` (``--mode trainer``). Each prints per-step loss, tokens/s and peak
memory for the fused loss and for the eager loss (``backend="torch"``: the full logits, then
:func:`logitstd_kernels.distillation_loss`): the loop evaluates both on the same batch with the same
weights (and compares their gradients), the Trainer runs once with each.

    python examples/distill_causal_lm.py --tiny          # seconds; what the tests run
    python examples/distill_causal_lm.py                 # the run of docs/hf-recipe.md
    torchrun --nproc-per-node 2 examples/distill_causal_lm.py --mode trainer   # DistributedDataParallel

The loss never calls ``student.forward`` (it takes the base model's hidden states), so it runs as the
forward of the module that wraps the student (``logitstd_kernels.integrations.wrapped.call_in_forward``):
under ``DistributedDataParallel`` the gradients are all-reduced as for any forward.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import ctypes.util
import os
import re
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

import logitstd_kernels as lsk
from logitstd_kernels.integrations.wrapped import call_in_forward

IGNORE_INDEX = -100

# Standard-library modules present in every Python >= 3.10, in sorted order: the training text.
STDLIB_FILES = (
    "abc.py", "bisect.py", "calendar.py", "colorsys.py", "contextlib.py", "copy.py", "dataclasses.py",
    "difflib.py", "fnmatch.py", "fractions.py", "functools.py", "heapq.py", "keyword.py", "numbers.py",
    "operator.py", "pprint.py", "queue.py", "random.py", "shlex.py", "statistics.py", "string.py",
    "textwrap.py", "token.py", "weakref.py",
)


@dataclass(frozen=True)
class ModelSize:
    """The shape of one Llama model."""

    hidden: int
    layers: int
    heads: int
    intermediate: int


# (student, teacher): the teacher is twice as wide and twice as deep.
SIZES = {
    "tiny": (ModelSize(32, 1, 2, 88), ModelSize(64, 2, 4, 176)),
    "small": (ModelSize(64, 2, 4, 176), ModelSize(128, 4, 4, 352)),
}


# --------------------------------------------------------------------------------------------------
# Data


def stdlib_texts(max_bytes: int) -> list[str]:
    """The source of :data:`STDLIB_FILES`, in order, until ``max_bytes`` characters (the last one cut)."""
    root = sysconfig.get_paths()["stdlib"]
    texts: list[str] = []
    left = max_bytes
    for name in STDLIB_FILES:
        if left <= 0:
            break
        with open(os.path.join(root, name), encoding="utf-8") as source:
            text = source.read()[:left]
        texts.append(text)
        left -= len(text)
    return texts


def make_blocks(texts: Sequence[str], tokenizer: transformers.PreTrainedTokenizerBase,
                block_len: int) -> dict[str, torch.Tensor]:
    """Fixed-length blocks of ``block_len`` tokens: each text (ending in its eos) is cut into blocks,
    its last block padded with the pad token.

    Returns ``input_ids``, ``attention_mask`` (0 on padding) and ``labels`` (``input_ids`` with
    ``-100`` on padding, unshifted, as Hugging Face models take them), each ``(blocks, block_len)``.
    """
    ids_blocks, mask_blocks = [], []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        for start in range(0, len(ids), block_len):
            piece = ids[start:start + block_len]
            pad = block_len - len(piece)
            ids_blocks.append(piece + [tokenizer.pad_token_id] * pad)
            mask_blocks.append([1] * len(piece) + [0] * pad)
    input_ids = torch.tensor(ids_blocks, dtype=torch.long)
    attention_mask = torch.tensor(mask_blocks, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)}


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """``labels`` shifted by one with ``-100`` padding: position ``t`` is labelled with token ``t + 1``
    and the last position with -100, so that ``hidden[:, t]`` and ``result[:, t]`` pair up without
    slicing the hidden states (the same shift as ``transformers``' own causal LM loss)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


class BlockDataset(torch.utils.data.Dataset):
    """The blocks of :func:`make_blocks` as a map-style dataset of dicts (for the Trainer)."""

    def __init__(self, blocks: dict[str, torch.Tensor]) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks["input_ids"].shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.blocks.items()}


def batches(blocks: dict[str, torch.Tensor], batch_size: int, steps: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """``steps`` batches of ``batch_size`` blocks, epoch after epoch in a seeded random order."""
    generator = torch.Generator().manual_seed(seed)
    count = blocks["input_ids"].shape[0]
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if order.numel() < batch_size:
            order = torch.cat((order, torch.randperm(count, generator=generator)))
        pick, order = order[:batch_size], order[batch_size:]
        yield {key: value[pick] for key, value in blocks.items()}


# --------------------------------------------------------------------------------------------------
# Models and the loss


def build_model(size: ModelSize, vocab_size: int, block_len: int, tokenizer: transformers.PreTrainedTokenizerBase,
                seed: int) -> LlamaForCausalLM:
    """A Llama causal LM of ``size`` with random weights (seeded)."""
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=size.hidden, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, num_key_value_heads=size.heads, intermediate_size=size.intermediate,
        max_position_embeddings=block_len, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def last_hidden_state(model: LlamaForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The final (normed) hidden state ``(B, T, H)`` from the base model: the lm_head, and with it
    the logits, is skipped."""
    return model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


def student_loss(student: LlamaForCausalLM, teacher_weight: torch.Tensor, loss_fn: lsk.FusedLinearDistillationLoss,
                 batch: dict[str, torch.Tensor], teacher_hidden: torch.Tensor) -> lsk.DistillationParts:
    """The student's side of the loss: its hidden states and lm_head weight with the teacher's into the
    fused loss. It runs as the student's forward (see :func:`distillation_loss`)."""
    return loss_fn(last_hidden_state(student, batch), student.lm_head.weight, teacher_hidden, teacher_weight,
                   next_token_labels(batch["labels"]))


def distillation_loss(student: LlamaForCausalLM, teacher: LlamaForCausalLM, batch: dict[str, torch.Tensor],
                      loss_fn: lsk.FusedLinearDistillationLoss,
                      wrapper: Optional[torch.nn.Module] = None) -> lsk.DistillationParts:
    """The distillation objective of one batch (``loss_fn`` with ``return_components``): the teacher
    under ``torch.no_grad``, then :func:`student_loss` as the forward of ``wrapper``, the module that
    wraps the student (``DistributedDataParallel(student)``; default the student itself), so that
    the wrapper's gradient all-reduce runs although the loss never calls ``student.forward``."""
    with torch.no_grad():
        teacher_hidden = last_hidden_state(teacher, batch)
    fn = functools.partial(student_loss, student, teacher.lm_head.weight, loss_fn)
    return call_in_forward(wrapper if wrapper is not None else student, student, fn, batch, teacher_hidden)


def make_loss(args: argparse.Namespace, backend: str, reduction: str = "mean") -> lsk.FusedLinearDistillationLoss:
    """The loss module of the run's weights and temperature; ``backend="torch"`` is the eager loss."""
    return lsk.FusedLinearDistillationLoss(args.ce_weight, args.kd_weight, chunk_size=args.chunk_size,
                                           temperature=args.temperature, reduction=reduction,
                                           return_components=True, backend=backend)


def pretrain_teacher(teacher: LlamaForCausalLM, blocks: dict[str, torch.Tensor], args: argparse.Namespace) -> float:
    """A few steps of plain next-token training, so that the random teacher knows some byte statistics
    (a stand-in for ``from_pretrained``). Returns its last loss; NaN for no step."""
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=args.lr)
    loss = torch.tensor(float("nan"))
    device = teacher.device
    for batch in batches(blocks, args.batch_size, args.teacher_steps, args.seed + 1):
        loss = teacher(**{k: v.to(device) for k, v in batch.items()}).loss  # the model shifts the labels itself
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    teacher.requires_grad_(False)  # the fused loss takes a constant teacher
    teacher.eval()
    return float(loss.detach())


# --------------------------------------------------------------------------------------------------
# Measurement


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{key}:\s+(\d+) kB", status.read(), re.M).group(1))


_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


class PeakMemory:
    """Peak memory of a ``with`` block above what was in use when it began, in MiB (``self.mib``).

    CUDA: ``torch.cuda.max_memory_allocated``. CPU (Linux): the peak resident set (``VmHWM``), reset
    to the present resident set through ``/proc/self/clear_refs``; glibc's ``malloc_trim`` first
    returns the memory that earlier steps freed, so a step is not credited with reusing it. None
    where neither is available.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib: Optional[float] = None
        self._before = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            return self
        if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
            _LIBC.malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
            self._before = _status_kib("VmRSS")
        except (OSError, AttributeError):
            self._before = -1
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self._before) / 2**20
        elif self._before >= 0:
            self.mib = (_status_kib("VmHWM") - self._before) / 1024


@dataclass
class StepRecord:
    """One variant's measurement of one step."""

    loss: float
    ce: float
    kd: float
    seconds: float
    tokens: int
    peak_mib: Optional[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


@dataclass
class LoopStep:
    """One step of the plain loop: the fused and the eager loss on the same batch and weights, and the
    largest difference between their student gradients relative to the largest gradient entry."""

    fused: StepRecord
    eager: StepRecord
    grad_rel_diff: float


@dataclass
class Report:
    """What a run measured: the loop's steps, and the Trainer's per-step records for each loss."""

    loop: list[LoopStep] = field(default_factory=list)
    trainer: dict[str, list[StepRecord]] = field(default_factory=dict)
    teacher_loss: float = float("nan")


def _fmt_mib(mib: Optional[float]) -> str:
    return "n/a" if mib is None else f"{mib:.1f}"


def measured_step(student: LlamaForCausalLM, teacher: LlamaForCausalLM, batch: dict[str, torch.Tensor],
                  loss_fn: lsk.FusedLinearDistillationLoss) -> StepRecord:
    """Forward (teacher and student) and backward of one batch, timed and with its peak memory; the
    student's gradients are left in ``.grad``."""
    device = batch["input_ids"].device
    student.zero_grad(set_to_none=True)
    with PeakMemory(device) as peak:
        start = time.perf_counter()
        parts = distillation_loss(student, teacher, batch, loss_fn)
        parts.loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return StepRecord(float(parts.loss.detach()), float(parts.ce), float(parts.kd), seconds,
                      int(batch["attention_mask"].sum()), peak.mib)


def _student_grads(student: LlamaForCausalLM) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in student.parameters() if p.grad is not None]


def _grad_rel_diff(first: list[torch.Tensor], second: list[torch.Tensor]) -> float:
    scale = max(float(g.abs().max()) for g in first)
    return max(float((a - b).abs().max()) for a, b in zip(first, second)) / max(scale, 1e-30)


# --------------------------------------------------------------------------------------------------
# (a) The plain training loop


def train_loop(student: LlamaForCausalLM, teacher: LlamaForCausalLM, blocks: dict[str, torch.Tensor],
               args: argparse.Namespace, log: Callable[[str], None] = print) -> list[LoopStep]:
    """AdamW on the fused loss. Each step first runs the eager loss on the same batch and weights
    (measured, its gradients kept for the comparison), then the fused loss, whose gradients the
    optimizer applies."""
    fused, eager = make_loss(args, "auto"), make_loss(args, "torch")
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    steps: list[LoopStep] = []
    log("loop  step | fused: loss (ce, kd)  tokens/s  peak MiB | eager: loss  tokens/s  peak MiB | grad diff")
    device = student.device
    for number, batch in enumerate(batches(blocks, args.batch_size, args.steps, args.seed), 1):
        batch = {k: v.to(device) for k, v in batch.items()}
        eager_record = measured_step(student, teacher, batch, eager)
        eager_grads = _student_grads(student)
        fused_record = measured_step(student, teacher, batch, fused)
        step = LoopStep(fused_record, eager_record, _grad_rel_diff(eager_grads, _student_grads(student)))
        steps.append(step)
        torch.nn.utils.clip_grad_norm_(student.parameters(), args.max_grad_norm)
        optimizer.step()
        log(f"loop {number:5d} | {fused_record.loss:.5f} ({fused_record.ce:.3f}, {fused_record.kd:.3f}) "
            f"{fused_record.tokens_per_s:8.0f} {_fmt_mib(fused_record.peak_mib):>8} | "
            f"{eager_record.loss:.5f} {eager_record.tokens_per_s:8.0f} {_fmt_mib(eager_record.peak_mib):>8} | "
            f"{step.grad_rel_diff:.1e}")
    return steps


# --------------------------------------------------------------------------------------------------
# (b) The Trainer


class DistillationTrainer(Trainer):
    """A ``Trainer`` whose ``model`` is the student; it holds the (frozen) teacher and the loss.

    ``compute_loss`` passes the last hidden states and lm_head weights of both models to the fused
    loss (``reduction="sum"``), never computing logits, and divides the sum by ``num_items_in_batch``
    when the Trainer gives it (the predicted tokens of the whole accumulated batch, as
    ``transformers``' own causal LM loss does, so that gradient accumulation is exact), else by the
    batch's predicted tokens. Under ``torchrun`` the Trainer wraps the student in
    ``DistributedDataParallel``; the loss runs as the wrapper's forward, so that the gradients are
    all-reduced. ``step_parts`` keeps (loss, ce, kd, tokens) of every call (this process's).
    """

    def __init__(self, *args, teacher: LlamaForCausalLM, loss_fn: lsk.FusedLinearDistillationLoss,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        if loss_fn.reduction != "sum":
            raise ValueError("DistillationTrainer normalizes the loss itself: pass a loss with reduction='sum'")
        self.loss_fn = loss_fn
        self.step_parts: list[tuple[float, float, float, int]] = []

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Optional[torch.Tensor | int] = None):
        """The distillation loss of ``inputs`` (``input_ids``, ``attention_mask``, unshifted ``labels``).

        ``model`` is what the Trainer trains through, ``DistributedDataParallel(student)`` under
        ``torchrun``: the loss runs as its forward (:func:`distillation_loss`). ``num_items_in_batch``
        then counts the tokens of every process (``average_tokens_across_devices``), and the loss is
        multiplied by the process count, as the Trainer's own loss is, since DDP averages the
        processes' gradients: the step's gradient is that of the global token mean."""
        parts = distillation_loss(self.accelerator.unwrap_model(model), self.teacher, inputs, self.loss_fn,
                                  wrapper=model)
        labels = next_token_labels(inputs["labels"])
        count = num_items_in_batch if num_items_in_batch is not None else (labels != IGNORE_INDEX).sum().clamp_min(1)
        scale = self.accelerator.num_processes if (num_items_in_batch is not None
                                                    and self.args.average_tokens_across_devices) else 1
        loss = parts.loss * scale / count
        self.step_parts.append((float(loss.detach()), float(parts.ce * scale / count),
                                float(parts.kd * scale / count), int(inputs["attention_mask"].sum())))
        return (loss, parts._asdict()) if return_outputs else loss


class StepStats(TrainerCallback):
    """Time and peak memory of each Trainer step (forward, backward and optimizer step)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.records: list[tuple[float, Optional[float]]] = []
        self._peak: Optional[PeakMemory] = None
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self._peak = PeakMemory(self.device).__enter__()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        seconds = time.perf_counter() - self._start
        self._peak.__exit__(None, None, None)
        self.records.append((seconds, self._peak.mib))


def train_with_trainer(student: LlamaForCausalLM, teacher: LlamaForCausalLM, blocks: dict[str, torch.Tensor],
                       args: argparse.Namespace, backend: str, out_dir: str) -> list[StepRecord]:
    """``args.steps`` steps of :class:`DistillationTrainer` on ``student`` with the loss's ``backend``;
    the per-step loss, tokens/s and peak memory. Writes nothing but ``out_dir`` (no checkpoints)."""
    training_args = TrainingArguments(
        output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=args.max_grad_norm,
        seed=args.seed, use_cpu=student.device.type == "cpu", report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )
    device = training_args.device
    stats = StepStats(device)
    dataset = BlockDataset(blocks)
    trainer = DistillationTrainer(model=student, args=training_args, train_dataset=dataset, teacher=teacher,
                                  loss_fn=make_loss(args, backend, reduction="sum"), callbacks=[stats])
    trainer.remove_callback(PrinterCallback)  # its end-of-training line; this script prints its own
    trainer.train()
    return [StepRecord(loss, ce, kd, seconds, tokens, peak)
            for (loss, ce, kd, tokens), (seconds, peak) in zip(trainer.step_parts, stats.records)]


def _print_trainer(records: dict[str, list[StepRecord]], log: Callable[[str], None]) -> None:
    log("trainer step | fused: loss (ce, kd)  tokens/s  peak MiB | eager: loss  tokens/s  peak MiB")
    for number, (fused, eager) in enumerate(zip(records["fused"], records["eager"]), 1):
        log(f"trainer {number:4d} | {fused.loss:.5f} ({fused.ce:.3f}, {fused.kd:.3f}) {fused.tokens_per_s:8.0f} "
            f"{_fmt_mib(fused.peak_mib):>8} | {eager.loss:.5f} {eager.tokens_per_s:8.0f} {_fmt_mib(eager.peak_mib):>8}")


def _summary(name: str, records: list[StepRecord], log: Callable[[str], None]) -> None:
    """Mean loss of the first and last quarter, median tokens/s and the largest step peak."""
    quarter = max(1, len(records) // 4)
    first = sum(r.loss for r in records[:quarter]) / quarter
    last = sum(r.loss for r in records[-quarter:]) / quarter
    speeds = sorted(r.tokens_per_s for r in records[1:] or records)
    peaks = [r.peak_mib for r in records if r.peak_mib is not None]
    log(f"{name}: loss {first:.4f} (first {quarter} steps) -> {last:.4f} (last {quarter}); "
        f"median {speeds[len(speeds) // 2]:.0f} tokens/s; peak {max(peaks):.1f} MiB" if peaks else
        f"{name}: loss {first:.4f} -> {last:.4f}; median {speeds[len(speeds) // 2]:.0f} tokens/s")


# --------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--mode", choices=("loop", "trainer", "both"), default="both")
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny models and data of the tests (the defaults below are the small run's)")
    parser.add_argument("--steps", type=int, default=None, help="distillation steps (default 20; --tiny: 8)")
    parser.add_argument("--batch-size", type=int, default=None, help="blocks per batch (default 8; --tiny: 4)")
    parser.add_argument("--block-len", type=int, default=None, help="tokens per block (default 64; --tiny: 64)")
    parser.add_argument("--max-bytes", type=int, default=None,
                        help="characters of standard-library source to train on (default 100000; --tiny: 20000)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="rows of the embedding and lm_head (default: the tokenizer's 384); larger pads the "
                             "vocabulary to show an LLM-sized lm_head (the extra rows are never labels)")
    parser.add_argument("--teacher-steps", type=int, default=None,
                        help="next-token training steps of the random teacher before distilling (default 12; "
                             "--tiny: 10)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--ce-weight", type=float, default=0.5)
    parser.add_argument("--kd-weight", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk of the fused loss (default: "
                                                                       "its rule, logitstd_kernels.default_chunk_size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda when there is one, else cpu")
    parser.add_argument("--out-dir", default=None,
                        help="the Trainer's output_dir (it saves no checkpoint); default: a temporary directory")
    args = parser.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.mode != "trainer":
        parser.error("with several processes (torchrun) run --mode trainer: the plain loop is for one process")
    preset = {"steps": 8, "batch_size": 4, "block_len": 64, "max_bytes": 20000, "teacher_steps": 10} if args.tiny \
        else {"steps": 20, "batch_size": 8, "block_len": 64, "max_bytes": 100000, "teacher_steps": 12}
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.size = "tiny" if args.tiny else "small"
    return args


def setup(args: argparse.Namespace) -> tuple[LlamaForCausalLM, LlamaForCausalLM, dict[str, torch.Tensor]]:
    """The teacher and the student (on ``args.device``) and the tokenized blocks (on the CPU)."""
    tokenizer = transformers.ByT5Tokenizer()
    vocab_size = args.vocab_size or len(tokenizer)
    if vocab_size < len(tokenizer):
        raise ValueError(f"--vocab-size must be at least the tokenizer's {len(tokenizer)}, got {vocab_size}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    blocks = make_blocks(stdlib_texts(args.max_bytes), tokenizer, args.block_len)
    student_size, teacher_size = SIZES[args.size]
    teacher = build_model(teacher_size, vocab_size, args.block_len, tokenizer, args.seed + 1).to(device)
    student = build_model(student_size, vocab_size, args.block_len, tokenizer, args.seed).to(device)
    return teacher, student, blocks


def main(argv: Optional[Sequence[str]] = None, log: Callable[[str], None] = print) -> Report:
    """Run the recipe (see the module docstring and ``--help``); returns what it measured. Under
    ``torchrun`` only the first process logs (its own steps: each process's loss share, times the
    process count, which average over the processes to the global loss)."""
    args = parse_args(argv)
    if int(os.environ.get("RANK", "0")) != 0:
        log = lambda line: None  # noqa: E731
    report = Report()
    teacher, student, blocks = setup(args)
    start = time.perf_counter()
    report.teacher_loss = pretrain_teacher(teacher, blocks, args)
    log(f"{blocks['input_ids'].shape[0]} blocks of {args.block_len} tokens, vocabulary {student.config.vocab_size}; "
        f"student {sum(p.numel() for p in student.parameters()):,} parameters, teacher "
        f"{sum(p.numel() for p in teacher.parameters()):,}; teacher after {args.teacher_steps} steps: "
        f"next-token loss {report.teacher_loss:.3f} ({time.perf_counter() - start:.1f} s)")
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    if args.mode in ("loop", "both"):
        report.loop = train_loop(student, teacher, blocks, args, log)
        _summary("loop, fused", [s.fused for s in report.loop], log)
        _summary("loop, eager", [s.eager for s in report.loop], log)
        loss_diff = max(abs(s.fused.loss - s.eager.loss) / abs(s.eager.loss) for s in report.loop)
        log(f"loop, fused vs eager on the same batches and weights: loss relative difference <= {loss_diff:.1e}, "
            f"student gradients <= {max(s.grad_rel_diff for s in report.loop):.1e} of the largest entry")
    if args.mode in ("trainer", "both"):
        with tempfile.TemporaryDirectory(prefix="distill_causal_lm_") as scratch:
            for name, backend in (("fused", "auto"), ("eager", "torch")):
                student.load_state_dict(initial)
                report.trainer[name] = train_with_trainer(student, teacher, blocks, args, backend,
                                                          args.out_dir or scratch)
        _print_trainer(report.trainer, log)
        for name, records in report.trainer.items():
            _summary(f"trainer, {name}", records, log)
    return report


if __name__ == "__main__":
    main()
