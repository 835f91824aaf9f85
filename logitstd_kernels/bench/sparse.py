"""A sparse teacher against the dense one (``python -m logitstd_kernels bench --sparse``): the objective
(0.1 CE + 9 KD, T = 2, standardized, token labels) of float32 student logits, forward and backward,
with the teacher as dense logits (the fused kernel) and as its stored top-k with the rows' statistics
(the sparse kernel, each support), on the device's fused backend ("cpu" on a CPU). Records the median
step time, the teacher's bytes, and the loss's relative difference to the dense loss. Default shape:
512 rows, V = 32000, k = 64 (``--rows``, first ``--vocab``). Written to
``<out>/sparse/<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ..config import SUPPORTS
from ..objective import distillation_loss
from ..sparse import SparseTeacher
from .report import new_stem, run_metadata

SHAPE = dict(rows=512, vocab=32000, k=64)
OBJECTIVE = dict(ce_weight=0.1, kd_weight=9.0, temperature=2.0)
REPEATS = 7


def _median_seconds(step, repeats: int = REPEATS) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(shape: dict, device: torch.device, backend: str) -> list[dict]:
    """One record per teacher: dense, then the sparse teacher with each support."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(shape["rows"], shape["vocab"], generator=gen) * 2).to(device).requires_grad_(True)
    y = (torch.randn(shape["rows"], shape["vocab"], generator=gen) * 3).to(device)
    labels = torch.randint(0, shape["vocab"], (shape["rows"],), generator=gen).to(device)
    sparse = SparseTeacher.from_logits(y, shape["k"], temperature=OBJECTIVE["temperature"])
    dense_bytes = y.numel() * y.element_size()
    sparse_bytes = sum(t.numel() * t.element_size() for t in (sparse.ids, sparse.values, sparse.row_mean,
                                                            sparse.row_std, sparse.log_normalizer))
    cases = [("dense", y, {}, dense_bytes)] + [(f"sparse-{s}", sparse, {"support": s}, sparse_bytes) for s in SUPPORTS]
    reference = float(distillation_loss(x.detach(), y, labels, backend=backend, **OBJECTIVE))
    records = []
    for name, teacher, extra, nbytes in cases:
        def step():
            loss = distillation_loss(x, teacher, labels, backend=backend, **OBJECTIVE, **extra)
            loss.backward()
            x.grad = None
            return loss

        loss = float(step().detach())
        records.append(dict(teacher=name, seconds=_median_seconds(step), teacher_bytes=nbytes,
                            loss=loss, loss_rel_diff_to_dense=abs(loss - reference) / abs(reference)))
    return records


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    backend = "cpu" if device.type == "cpu" else "triton"
    shape = dict(SHAPE, **{k: v for k, v in (("rows", args.rows), ("vocab", args.vocab[0] if args.vocab else None))
                           if v})
    meta = run_metadata(device, list(args.argv))
    meta.update(sparse=True, **shape, dtype="float32", backend=backend, objective=OBJECTIVE, repeats=REPEATS,
                seconds="median of forward + backward of the objective, after one warm-up step")
    records = measure(shape, device, backend)
    for r in records:
        print(f"{r['teacher']:>28}: {r['seconds'] * 1e3:8.2f} ms, teacher {r['teacher_bytes'] / 2**20:8.2f} MiB, "
              f"loss {r['loss']:.6f} ({r['loss_rel_diff_to_dense']:.2e} from dense)")
    path = new_stem(args.out / "sparse", meta).with_suffix(".json")
    path.write_text(json.dumps({"metadata": meta, "results": records}, indent=1) + "\n")
    print(f"wrote {path}")
    return 0
