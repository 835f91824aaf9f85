"""Spawning gloo processes for the vocabulary-parallel tests: each rank runs named scenarios of a
test module (its ``SCENARIOS``: name -> function(rank, world) returning a JSON-able result), checks
its own results and writes a one-line report; the test fails on a wrong report, a missing one, or a
worker still running after the timeout (no hang). Also the slicing and the error measure the
scenarios share."""

from __future__ import annotations

import datetime
import importlib
import json
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 120


def widths_for(num_classes: int, world: int) -> list[int]:
    """Uneven slices: rank 0 takes the remainder and a few more classes."""
    base = num_classes // world
    widths = [base] * world
    widths[0] += num_classes - base * world
    if world > 1:
        widths[0] += 3
        widths[-1] -= 3
    return widths


def slice_of(rank: int, world: int, num_classes: int) -> slice:
    """Rank ``rank``'s classes under :func:`widths_for`."""
    widths = widths_for(num_classes, world)
    start = sum(widths[:rank])
    return slice(start, start + widths[rank])


def max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest error relative to the largest value of ``want``."""
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-300))


def _worker(rank: int, world: int, folder: str, module: str, scenarios: tuple[str, ...]) -> None:
    """Run the scenarios one after the other; each one's result or exception goes into the report
    (a scenario that raises the same error on every rank leaves the process group usable)."""
    reports = {}
    try:
        table = importlib.import_module(module).SCENARIOS
        dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        for name in scenarios:
            torch.manual_seed(1234)  # the same full rows on every rank
            try:
                reports[name] = {"ok": True, "result": table[name](rank, world)}
            except Exception as exc:  # reported to the test, which decides
                reports[name] = {"ok": False, "type": type(exc).__name__, "error": str(exc),
                                 "traceback": traceback.format_exc()}
    finally:
        (Path(folder) / f"rank{rank}.json").write_text(json.dumps(reports))
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, module: str, scenarios: tuple[str, ...], folder: Path) -> list[dict]:
    """Spawn ``world`` processes running ``scenarios`` of test module ``module``; their reports
    (scenario -> report) in rank order."""
    context = mp.get_context("spawn")
    procs = [context.Process(target=_worker, args=(r, world, str(folder), module, scenarios)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    alive = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not alive, f"ranks {alive} still running after {TIMEOUT_S} s (a hang)"
    reports = []
    for r in range(world):
        path = folder / f"rank{r}.json"
        assert path.exists(), f"rank {r} wrote no report (exit code {procs[r].exitcode})"
        reports.append(json.loads(path.read_text()))
    return reports


def assert_ok(reports: list[dict], scenario: str) -> list[dict]:
    """Every rank ran ``scenario`` without an exception; their results in rank order."""
    for r, report in enumerate(reports):
        assert scenario in report, f"rank {r} did not get to {scenario!r}"
        assert report[scenario]["ok"], f"rank {r}: {report[scenario].get('traceback')}"
    return [report[scenario]["result"] for report in reports]
