"""The benchmark command end to end at a tiny size: it checks, times and writes its files."""

from __future__ import annotations

import csv
import json

from logitstd_kernels.cli import main


def test_bench_command_writes_results(tmp_path, capsys):
    code = main(["bench", "--device", "cpu", "--vocab", "512", "--rows", "8", "--rows-sweep", "4",
                 "--rows-sweep-vocab", "256", "--providers", "torch,torch_compile,cpu,triton",
                 "--cpu-budget", "0.05", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "mode=full" in out and "copy bandwidth" in out
    (report,) = tmp_path.glob("*.json")
    data = json.loads(report.read_text())
    meta = data["metadata"]
    for key in ("device", "date", "command", "torch", "triton", "logitstd_kernels", "copy_bandwidth_gbps"):
        assert meta[key], key
    ok = [r for r in data["results"] if r["status"] == "ok"]
    assert {r["provider"] for r in ok} >= {"torch", "torch_compile"}
    assert {(r["rows"], r["vocab"]) for r in ok} == {(8, 512), (4, 256)}
    assert all(r["median_ms"] > 0 and r["gbps"] > 0 for r in ok)
    assert all(r["peak_mem_mb"] is not None for r in ok if r["mode"] == "full")
    triton_rows = [r for r in data["results"] if r["provider"] == "triton"]
    assert triton_rows and all(r["status"].startswith("unavailable") for r in triton_rows)
    (table,) = tmp_path.glob("*.csv")
    rows = list(csv.DictReader(line for line in table.read_text().splitlines() if not line.startswith("#")))
    assert len(rows) == len(data["results"])
