"""``python -m logitstd_kernels bench --distributed``: the vocabulary-parallel scaling benchmark.

A tiny run (16 rows x 64 classes) of the whole command: 1, 2 and 4 gloo processes and the
single-device yardstick, each with its time, rank 0's peak memory and the bytes it hands to the
collectives: a 72-byte header, then 9 and 13 float64 per row (forward KL, standardized, with labels),
whatever V and the process count.
"""

from __future__ import annotations

import json
import subprocess
import sys

from logitstd_kernels.bench.distributed import STEPS

ROWS, VOCAB = 16, 64


def test_distributed_bench_writes_times_memory_and_bytes(tmp_path):
    done = subprocess.run([sys.executable, "-m", "logitstd_kernels", "bench", "--distributed", "--rows", str(ROWS),
                           "--vocab", str(VOCAB), "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (path,) = tmp_path.glob("*.json")
    data = json.loads(path.read_text())
    assert data["metadata"]["distributed"] is True and data["metadata"]["steps"] == STEPS
    results = {r["provider"]: r for r in data["results"]}
    assert set(results) == {"gloo x1", "gloo x2", "gloo x4", "fused x1"}
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in results.values())
    for world in (1, 2, 4):
        r = results[f"gloo x{world}"]
        assert (r["rows"], r["vocab"], r["collectives"]) == (ROWS, VOCAB, 3)
        assert r["sent_bytes_per_rank"] == 72 + ROWS * 9 * 8 + ROWS * 13 * 8
    assert results["fused x1"]["collectives"] == 0 and results["fused x1"]["sent_bytes_per_rank"] == 0
