"""Dump a Hugging Face causal LM teacher's top-k logits over token blocks, with the rows' statistics.

``python -m logitstd_kernels dump-teacher --model PATH --input blocks.pt --output teacher.pt --k 64``

``--input``: a ``torch.save`` file of a dict with ``input_ids`` (N, T) and optionally
``attention_mask``; ``--output``: the file ``sparse_dump.save_teacher`` writes (read it back with
``sparse_dump.load_teacher``). Needs transformers (the ``hf`` extra).
"""

from __future__ import annotations

import argparse

import torch

from .sparse import KINDS
from .sparse_dump import dump_teacher, save_teacher


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a transformers model name or directory (AutoModelForCausalLM)")
    parser.add_argument("--input", required=True, help="torch.save file: {'input_ids': (N, T)[, 'attention_mask']}")
    parser.add_argument("--output", required=True, help="where to write the sparse teacher")
    parser.add_argument("--k", type=int, required=True, help="entries kept per position")
    parser.add_argument("--kind", choices=KINDS, default="logits", help="store logits or log-probabilities")
    parser.add_argument("--generation-temperature", type=float, default=1.0,
                        help="the temperature of stored log-probabilities (--kind logprobs)")
    parser.add_argument("--temperature", type=float, default=2.0,
                        help="the loss's teacher_temperature the log-normalizer is computed for")
    parser.add_argument("--no-standardize", action="store_true",
                        help="the log-normalizer of the unstandardized loss (standardize=False)")
    parser.add_argument("--correction", type=int, default=1, help="the standard deviation's correction")
    parser.add_argument("--eps", type=float, default=1e-7, help="the standardization's eps")
    parser.add_argument("--no-stats", action="store_true", help="leave out the rows' mean and standard deviation")
    parser.add_argument("--batch-size", type=int, default=8, help="blocks per teacher forward")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="the teacher's weights (the statistics are computed in float32)")


def run(args: argparse.Namespace) -> int:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    model.to(args.device).eval()
    blocks = torch.load(args.input, map_location="cpu", weights_only=True)
    if not isinstance(blocks, dict) or "input_ids" not in blocks:
        raise SystemExit(f"--input {args.input}: expected a dict with 'input_ids'")

    def logits_fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids.to(args.device), attention_mask=mask.to(args.device)).logits.float()

    settings = dict(kind=args.kind, generation_temperature=args.generation_temperature, temperature=args.temperature,
                    standardize=not args.no_standardize, correction=args.correction, eps=args.eps)
    teacher = dump_teacher(logits_fn, blocks["input_ids"], blocks.get("attention_mask"), k=args.k,
                           batch_size=args.batch_size, stats=not args.no_stats, **settings)
    save_teacher(args.output, teacher, dict(settings, model=args.model))
    print(f"{args.output}: {teacher.ids.shape[0]} x {teacher.ids.shape[1]} positions, k = {teacher.k}")
    return 0
