"""Gloo processes for the vocabulary-parallel tests (``support.spawn_ranks``): each rank runs named
scenarios of a test module (its ``SCENARIOS``: name -> function(rank, world) returning a JSON-able
result), checks its own results and writes a one-line report; the test fails on a wrong report, a
missing one, or a worker still running after the timeout (no hang). Also the slicing, the error
measure and the collective recorder the scenarios share."""

from __future__ import annotations

import contextlib
import datetime
import importlib
import json
import traceback
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from support import spawn_ranks

# A hung collective raises in its worker after the process group's timeout (60 s); the test's own
# timeout is the backstop: start-up plus a budget per scenario (the Triton interpreter on a busy
# 2-core machine takes up to about a minute for the slowest).
STARTUP_S, PER_SCENARIO_S = 60, 45


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


_COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce_scatter", "gather",
                "scatter", "all_to_all", "all_to_all_single")


@contextlib.contextmanager
def recorded_collectives() -> Iterator[list[tuple[str, int]]]:
    """Within the block, every ``torch.distributed`` collective call is appended to the yielded list
    as (name, bytes this rank hands over), whatever the collective."""
    calls: list[tuple[str, int]] = []
    patched = {}
    for name in _COLLECTIVES:
        original = getattr(dist, name)
        patched[name] = original

        def counting(*args, _name=name, _original=original, **kwargs):
            tensor = args[1] if _name in ("all_gather", "all_gather_into_tensor") else args[0]
            calls.append((_name, tensor.numel() * tensor.element_size()))
            return _original(*args, **kwargs)

        setattr(dist, name, counting)
    try:
        yield calls
    finally:
        for name, original in patched.items():
            setattr(dist, name, original)


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
    exit_codes = spawn_ranks(_worker, world, folder, module, scenarios,
                             timeout_s=STARTUP_S + PER_SCENARIO_S * len(scenarios))
    reports = []
    for r in range(world):
        path = folder / f"rank{r}.json"
        assert path.exists(), f"rank {r} wrote no report (exit code {exit_codes[r]})"
        reports.append(json.loads(path.read_text()))
    return reports


def assert_ok(reports: list[dict], scenario: str) -> list[dict]:
    """Every rank ran ``scenario`` without an exception; their results in rank order."""
    for r, report in enumerate(reports):
        assert scenario in report, f"rank {r} did not get to {scenario!r}"
        assert report[scenario]["ok"], f"rank {r}: {report[scenario].get('traceback')}"
    return [report[scenario]["result"] for report in reports]
