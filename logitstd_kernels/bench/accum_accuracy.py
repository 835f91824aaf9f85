"""What the fused lm_head's ``accum_dtype`` costs in accuracy (``python -m logitstd_kernels bench
--accum-accuracy``).

bf16 hidden states and lm_head weights (student and teacher), the paper's objective (0.1 CE + 9 KD,
T = 2, standardized) with token labels. For each chunk size and seed, the gradients of the student's
weight and hidden states against the same inputs in float64 (the eager reference), for
``accum_dtype=torch.float32`` (the default: a float32 accumulator, rounded to bf16 once) and
``torch.bfloat16`` (the accumulator in the weight's dtype, as Liger-Kernel keeps it: half the memory,
one bf16 rounding per chunk), and for the eager composition in bf16 (one GEMM over all rows) as the
yardstick. Errors: the largest absolute error over the largest true magnitude (``max``) and the
norm of the error over the norm of the truth (``norm``). Written to
``<out>/accum-dtype/<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import json
from typing import Optional

import torch

from ..fused_linear import fused_linear_distillation_loss
from .report import new_stem, run_metadata

SHAPE = dict(rows=2048, hidden=256, vocab=8192)
#: 64 rows: Liger-Kernel's chunk rule at this shape (next power of two of rows / ceil(V / H)); None:
#: the package's default rule (1024 rows on the CPU).
CHUNKS: tuple[Optional[int], ...] = (64, 256, None)
SEEDS = (0, 1, 2)
OBJECTIVE = dict(ce_weight=0.1, kd_weight=9.0, temperature=2.0, standardize=True)


def make_inputs(rows: int, hidden: int, vocab: int, seed: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """bf16 (h, W, ht, Wt) with O(1) logits, and labels."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=generator, device=device)).to(torch.bfloat16)

    labels = torch.randint(0, vocab, (rows,), generator=generator, device=device)
    return (randn(rows, hidden), randn(vocab, hidden, scale=hidden**-0.5), randn(rows, hidden),
            randn(vocab, hidden, scale=2 * hidden**-0.5), labels)


def gradients(inputs: tuple[torch.Tensor, ...], dtype: torch.dtype, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """(d/dh, d/dW) of the objective on ``inputs`` converted to ``dtype``."""
    h, w, ht, wt, labels = inputs
    leaves = [t.to(dtype, copy=True).requires_grad_(True) for t in (h, w)]
    loss = fused_linear_distillation_loss(leaves[0], leaves[1], ht.to(dtype), wt.to(dtype), labels, **OBJECTIVE,
                                          **options)
    loss.backward()
    return leaves[0].grad, leaves[1].grad


def relative_errors(got: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    err = got.double() - truth
    return {"max": float(err.abs().max() / truth.abs().max()), "norm": float(err.norm() / truth.norm())}


def measure(shape: dict, device: torch.device, seeds=SEEDS, chunks=CHUNKS) -> list[dict]:
    """One record per seed and provider: the errors of the weight's and the hidden states' gradients."""
    records = []
    for seed in seeds:
        inputs = make_inputs(shape["rows"], shape["hidden"], shape["vocab"], seed, device)
        truth = gradients(inputs, torch.float64, backend="torch")
        runs = [("eager_bf16", None, None, dict(backend="torch"))]
        runs += [("fused", accum, chunk, dict(accum_dtype=accum, chunk_size=chunk))
                 for accum in (torch.float32, torch.bfloat16) for chunk in chunks]
        for provider, accum, chunk, options in runs:
            grad_hidden, grad_weight = gradients(inputs, torch.bfloat16, **options)
            records.append({"seed": seed, "provider": provider, "accum_dtype": None if accum is None else str(accum),
                            "chunk_size": chunk, "weight_grad": relative_errors(grad_weight, truth[1]),
                            "hidden_grad": relative_errors(grad_hidden, truth[0])})
    return records


def summary(records: list[dict]) -> list[dict]:
    """The worst errors over the seeds, per provider, accumulator and chunk size."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["provider"], r["accum_dtype"], r["chunk_size"]), []).append(r)
    return [{"provider": p, "accum_dtype": a, "chunk_size": c,
             **{f"{part}_{kind}": max(r[part][kind] for r in rs) for part in ("weight_grad", "hidden_grad")
                for kind in ("max", "norm")}} for (p, a, c), rs in groups.items()]


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    shape = dict(SHAPE, **{k: v for k, v in (("rows", args.rows), ("hidden", args.hidden),
                                             ("vocab", args.vocab[0] if args.vocab else None)) if v})
    meta = run_metadata(device, list(args.argv))
    meta.update(accum_accuracy=True, **shape, dtype="bfloat16", objective=OBJECTIVE, seeds=list(SEEDS),
                errors="max: largest |error| / largest |truth|; norm: ||error|| / ||truth||; truth: the eager "
                       "reference in float64 on the same bf16 inputs",
                accumulator_bytes={"float32": 4 * shape["vocab"] * shape["hidden"],
                                   "bfloat16": 2 * shape["vocab"] * shape["hidden"]})
    records = measure(shape, device)
    rows = summary(records)
    for row in rows:
        print(f"{row['provider']:>10} accum={row['accum_dtype']} chunk={row['chunk_size']}: weight grad max "
              f"{row['weight_grad_max']:.2e} norm {row['weight_grad_norm']:.2e}; hidden grad max "
              f"{row['hidden_grad_max']:.2e}")
    path = new_stem(args.out / "accum-dtype", meta).with_suffix(".json")
    path.write_text(json.dumps({"metadata": meta, "summary": rows, "results": records}, indent=1) + "\n")
    print(f"wrote {path}")
    return 0
