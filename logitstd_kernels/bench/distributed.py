"""Scaling of the vocabulary-parallel objective (``python -m logitstd_kernels bench --distributed``).

For 1, 2 and 4 gloo processes on this machine, each holding ``V / world`` classes of the same rows:
the time of a step (forward + backward of ``vocab_parallel_distillation_loss``, standardized, with
labels), rank 0's peak memory in one more step (the growth of its resident set), and the bytes each
rank contributes to the collectives per step, read from the tensors
handed to ``torch.distributed.all_gather`` (the header, phase 1 and phase 2). The bytes depend on the
rows only, not on V; docs/performance.md's communication cost model is generated from this file. The yardstick
row ``fused x1`` is the single-device fused objective (``distillation_loss``, default backend) on the
same whole rows in this process, timed and measured the same way.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .measure import copy_bandwidth_gbps, peak_memory_mb
from .report import Result, Run, metadata, write_files

WORLDS = (1, 2, 4)
DEFAULT_ROWS, DEFAULT_VOCAB = 2048, 32000
STEPS = 5


def _inputs(rows: int, width: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(rows + vocab)
    x, y = 3 * torch.randn(rows, width, generator=gen), 5 * torch.randn(rows, width, generator=gen)
    return x, y, torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(vocab))


def _rank_main(rank: int, world: int, folder: str, rows: int, vocab: int) -> None:
    from ..distributed import vocab_parallel_distillation_loss

    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    x, y, labels = _inputs(rows, vocab // world + (vocab % world if rank == 0 else 0), vocab)
    sent: list[int] = []
    original = dist.all_gather

    def counting(tensor_list, tensor, *args, **kwargs):
        sent.append(tensor.numel() * tensor.element_size())
        return original(tensor_list, tensor, *args, **kwargs)

    dist.all_gather = counting
    times = []
    for step in range(STEPS + 1):
        sent.clear()
        leaf = x.clone().requires_grad_(True)
        dist.barrier()
        start = time.perf_counter()
        vocab_parallel_distillation_loss(leaf, y, labels).backward()
        dist.barrier()
        if step:  # the first step warms up
            times.append((time.perf_counter() - start) * 1e3)
    dist.all_gather = original

    def step() -> None:
        vocab_parallel_distillation_loss(x.clone().requires_grad_(True), y, labels).backward()

    peak = peak_memory_mb(step, torch.device("cpu"))  # every rank steps: the collectives need them all
    if rank == 0:
        Path(folder, "result.json").write_text(json.dumps({"times_ms": times, "sent_bytes": sent, "peak_mb": peak}))
    dist.destroy_process_group()


def measure(world: int, rows: int, vocab: int) -> dict:
    """Median ms per step and the per-collective bytes one rank contributes, for ``world`` processes."""
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_rank_main, args=(world, folder, rows, vocab), nprocs=world, start_method="spawn")
        return json.loads(Path(folder, "result.json").read_text())


def single_device(rows: int, vocab: int) -> dict:
    """The yardstick: the fused objective on the whole rows in this process (no collectives)."""
    from ..objective import distillation_loss

    x, y, labels = _inputs(rows, vocab, vocab)

    def step() -> None:
        distillation_loss(x.clone().requires_grad_(True), y, labels).backward()

    times = []
    for index in range(STEPS + 1):
        start = time.perf_counter()
        step()
        if index:  # the first step warms up
            times.append((time.perf_counter() - start) * 1e3)
    return {"times_ms": times, "sent_bytes": [], "peak_mb": peak_memory_mb(step, torch.device("cpu"))}


def run(args: argparse.Namespace) -> int:
    rows = args.rows or DEFAULT_ROWS
    vocab = (args.vocab or (DEFAULT_VOCAB,))[0]
    device = torch.device("cpu")
    bench_run = Run(metadata(device, list(args.argv), copy_bandwidth_gbps(device), {
        "distributed": True, "backend": "gloo", "worlds": list(WORLDS), "steps": STEPS,
        "bytes": "per rank and step: the sum of the tensors it hands to all_gather (it receives world - 1 "
                 "times as much); collectives: the number of all_gather calls per step"}))
    print(f"vocab-parallel objective, gloo on {bench_run.metadata['device']}: rows={rows}, V={vocab}")
    for world in (*WORLDS, None):
        out = measure(world, rows, vocab) if world else single_device(rows, vocab)
        timing = sorted(out["times_ms"])
        result = Result(f"world{world or 1}", rows, vocab, "float32", "full", f"gloo x{world}" if world else "fused x1",
                        "ok",
                        median_ms=statistics.median(timing), p20_ms=timing[0], p80_ms=timing[-1],
                        peak_mem_mb=out["peak_mb"])
        result.sent_bytes_per_rank = sum(out["sent_bytes"])
        result.collectives = len(out["sent_bytes"])
        bench_run.results.append(result)
        print(f"  {result.provider}: {result.median_ms:.1f} ms/step, rank 0 peak {out['peak_mb'] or 0:.0f} MiB, "
              f"{len(out['sent_bytes'])} collectives, "
              f"{sum(out['sent_bytes'])} bytes sent per rank ({out['sent_bytes']})")
    paths = write_files(bench_run, args.out)
    print(f"wrote {len(paths)} files to {args.out.resolve()}: " + ", ".join(p.name for p in paths.values()))
    return 0
