"""``bench --methods`` end to end at a tiny size (no torch.compile: its compile time), its correctness
gate catching a wrong provider, and the docs table of its results file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from logitstd_kernels._backends import unavailable_reason
from logitstd_kernels.bench import methods
from logitstd_kernels.cli import main
from support import needs

ROOT = Path(__file__).resolve().parents[2]
pytestmark = needs(unavailable_reason("cpu", "cpu") is None, "the C++ extension is not built")


def test_methods_bench_writes_results(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(methods, "SHAPES", {"dkd": ((16, 30),), "mlkd": ((12, 20),), "ctkd": ((8, 40),)})
    code = main(["bench", "--device", "cpu", "--methods", "dkd,mlkd,ctkd", "--providers", "torch,cpu,cuda",
                 "--cpu-budget", "0.02", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    (report,) = tmp_path.glob("*.json")
    data = json.loads(report.read_text())
    assert data["metadata"]["methods"] == ["dkd", "mlkd", "ctkd"] and data["metadata"]["git_commit"] is not None
    ok = [r for r in data["results"] if r["status"] == "ok"]
    assert {(r["sweep"], r["provider"]) for r in ok} == {(m, p) for m in methods.METHODS for p in ("torch", "cpu")}
    assert all(r["median_ms"] > 0 and r["speedup_vs_torch"] > 0 for r in ok)
    if not torch.cuda.is_available():
        assert all(r["status"].startswith("unavailable") for r in data["results"] if r["provider"] == "cuda")
    spec = importlib.util.spec_from_file_location("make_tables", ROOT / "benchmarks" / "make_tables.py")
    make_tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_tables)
    table = make_tables.render(report, data)
    assert "| mlkd | 12 | 20 |" in table and "cpu vs torch.compile" in table


@pytest.mark.parametrize("method", methods.METHODS)
def test_the_gate_catches_a_wrong_provider(method, monkeypatch):
    x, y = torch.randn(8, 30), torch.randn(8, 30)
    labels = torch.randint(0, 30, (8,))
    module = methods.CTKDTemperature()
    assert methods.violation(method, "cpu", x, y, labels, module) is None
    right = methods.make_step

    def wrong(name, provider, module):
        step = right(name, provider, module)
        return (lambda *a: 1.01 * step(*a)) if provider == "cpu" else step

    monkeypatch.setattr(methods, "make_step", wrong)
    assert "loss" in methods.violation(method, "cpu", x, y, labels, module)
