"""The benchmark command end to end at a tiny size: it checks, times and writes its files."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from logitstd_kernels import reference
from logitstd_kernels.bench import objective
from logitstd_kernels.bench.measure import correctness_violation
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


def test_backward_mode_reports_no_speedups():
    """The fused op's gradient is computed in its forward: eager's backward over its backward is no speedup."""
    from logitstd_kernels.bench.report import Result, fill_speedups, table

    results = [Result("vocab", 8, 512, "float32", mode, provider, "ok", ms, ms, ms, 1.0, 2.0, None)
               for mode in ("full", "backward") for provider, ms in (("torch", 4.0), ("cpu", 0.001))]
    fill_speedups(results)
    speedups = {(r.mode, r.provider): r.speedup_vs_torch for r in results}
    assert speedups[("full", "cpu")] == 4000.0 and speedups[("backward", "cpu")] is None
    backward = table(results, "backward")
    assert "no speedups" in backward and "x," not in backward
    assert "(4000.0x," in table(results, "full")


def test_time_budget_skips_the_cases_left(tmp_path, capsys):
    code = main(["bench", "--device", "cpu", "--vocab", "256,512", "--rows", "4", "--rows-sweep", "",
                 "--providers", "torch", "--modes", "full", "--cpu-budget", "0.01", "--time-budget", "0",
                 "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "case(s) skipped" in out
    (report,) = tmp_path.glob("*.json")
    statuses = [r["status"] for r in json.loads(report.read_text())["results"]]
    assert statuses and all(s == "skipped: time budget" for s in statuses)


def test_divergences_are_timed_per_provider_with_their_own_eager_baseline(tmp_path, capsys):
    """``--divergences``: every provider once per divergence (``provider@divergence``), checked against
    the reference of that divergence, its speedup over the eager code of the same divergence."""
    code = main(["bench", "--device", "cpu", "--objective", "--divergences", "forward_kl,jsd,tvd", "--beta", "0.3",
                 "--vocab", "300", "--rows", "8", "--rows-sweep", "8", "--rows-sweep-vocab", "300",
                 "--providers", "torch,cpu", "--modes", "full", "--cpu-budget", "0.05", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert data["metadata"]["divergences"] == ["forward_kl", "jsd", "tvd"]
    assert data["metadata"]["beta"] == 0.3
    ok = {r["provider"]: r for r in data["results"] if r["status"] == "ok"}
    assert set(ok) == {"torch", "cpu", "torch@jsd", "cpu@jsd", "torch@tvd", "cpu@tvd"}
    for divergence in ("jsd", "tvd"):
        eager, fused = ok[f"torch@{divergence}"], ok[f"cpu@{divergence}"]
        assert abs(fused["speedup_vs_torch"] - eager["median_ms"] / fused["median_ms"]) < 1e-9
    bad = main(["bench", "--device", "cpu", "--divergences", "kl", "--out", str(tmp_path)])
    assert bad == 2 and "divergence" in capsys.readouterr().err


def test_accum_accuracy_writes_its_results(tmp_path, capsys):
    """``--accum-accuracy`` at a tiny shape: one record per seed, provider, accumulator and chunk size,
    errors against float64 of the size of bf16 rounding, and the run's metadata."""
    code = main(["bench", "--accum-accuracy", "--device", "cpu", "--rows", "32", "--hidden", "16", "--vocab", "64",
                 "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    (report,) = (tmp_path / "accum-dtype").glob("*.json")
    data = json.loads(report.read_text())
    for key in ("device", "date", "command", "torch", "logitstd_kernels", "git_commit"):
        assert key in data["metadata"], key
    assert data["metadata"]["accumulator_bytes"] == {"float32": 4 * 64 * 16, "bfloat16": 2 * 64 * 16}
    assert len(data["results"]) == 3 * (1 + 2 * 3) and len(data["summary"]) == 1 + 2 * 3
    for row in data["summary"]:
        assert all(0 < row[key] < 0.05 for key in ("weight_grad_max", "weight_grad_norm", "hidden_grad_max")), row


def test_no_grad_mode_times_the_loss_alone(tmp_path, capsys):
    """``--modes no_grad``: the loss with no input requiring grad, beside the full step; its floor is
    the two inputs' bytes (the full step's: those and the gradient's), its speedup over eager's no_grad."""
    code = main(["bench", "--device", "cpu", "--vocab", "512", "--rows", "8", "--rows-sweep", "", "--providers",
                 "torch,cpu", "--modes", "no_grad,full", "--cpu-budget", "0.05", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "mode=no_grad" in out
    results = {(r["provider"], r["mode"]): r for r in json.loads(next(tmp_path.glob("*.json")).read_text())["results"]}
    assert set(results) == {(p, m) for p in ("torch", "cpu") for m in ("no_grad", "full")}
    for (provider, mode), r in results.items():
        assert r["status"] == "ok", r
        moved = r["gbps"] * 1e9 * r["median_ms"] * 1e-3
        assert moved == pytest.approx(8 * 512 * 4 * (2 if mode == "no_grad" else 3))
        assert (r["peak_mem_mb"] is None) == (mode == "no_grad")
    fused, eager = results[("cpu", "no_grad")], results[("torch", "no_grad")]
    assert fused["speedup_vs_torch"] == pytest.approx(eager["median_ms"] / fused["median_ms"])


def test_the_gates_check_the_loss_without_gradients_when_no_grad_is_timed():
    """A provider whose loss is right when the student requires grad and 1% off when no input does
    passes the gates, unless the no_grad mode is timed (``no_grad=True``)."""
    options = dict(temperature=2.0, standardize=True)
    student, teacher = torch.randn(8, 64) * 3, torch.randn(8, 64) * 5
    labels = objective.labels_for(8, 64, torch.device("cpu"))

    def kd(x, y):
        loss = reference.logitstd_kd_loss(x, y, **options)
        return loss if x.requires_grad else loss * 1.01

    assert correctness_violation(kd, student, teacher, **options) is None
    assert "no input requires grad" in correctness_violation(kd, student, teacher, no_grad=True, **options)
    eager = objective.make_objective("torch", **options)

    def full(x, y, t):
        loss = eager(x, y, t)
        return loss if x.requires_grad else loss * 1.01

    kwargs = dict(options, eager_in_input_dtype=True)
    assert objective.objective_violation(full, student, teacher, labels, **kwargs) is None
    assert "no input requires grad" in objective.objective_violation(full, student, teacher, labels, no_grad=True,
                                                                      **kwargs)
