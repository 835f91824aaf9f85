"""``scripts/gpu-check.sh --smoke``: the prepared GPU check, run at tiny sizes on the present device.

The full check only runs on a GPU machine, which CI does not have; the smoke mode runs the same
steps (build or reuse of the extension, the gpu tests, a few loss-matrix cases, each benchmark step
at one tiny case, the summary), so that the script cannot rot between GPU runs. About 1.5 minutes on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from support import needs, require_all

from logitstd_kernels.bench.linear_providers import PEERS

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
STEPS = ["wheels", "build", "gpu-tests", "matrix", "bench", "bench-small", "bench-objective", "bench-divergences",
         "bench-fused-linear", "bench-kd"]
# the fused-linear providers each objective times when no peer is installed; a peer adds itself to the
# plain objectives it computes
FUSED_LINEAR_OK = {("fused_linear", p) for p in ("fused", "fused_accum_bf16", "gemms", "torch")} | {
    (sweep, p) for sweep in ("fused_linear_plain", "fused_linear_kl") for p in ("fused", "torch")}
PEER_SWEEPS = {"liger": ("fused_linear_plain", "fused_linear_kl"), "orda": ("fused_linear_plain", "fused_linear_kl"),
               "trl": ("fused_linear_kl",)}


def _results(folder: Path) -> list[dict]:
    (result,) = folder.glob("*.json")
    assert (folder / (result.stem + ".csv")).exists()
    return json.loads(result.read_text())["results"]


def _installed_peers() -> set[str]:
    """The peers the fused-linear step can time here; in CI (LOGITSTD_REQUIRE_ALL=1) every one of them
    (the ``peers`` extra)."""
    installed = {p for p, (_, module) in PEERS.items() if importlib.util.find_spec(module.split(".")[0])}
    assert installed == set(PEERS) or not require_all(), f"the peers extra is incomplete: only {installed}"
    return installed


@needs(shutil.which("bash") is not None and shutil.which("timeout") is not None,
       "needs bash and coreutils' timeout to run scripts/gpu-check.sh")
def test_smoke_run_passes_and_writes_its_files(tmp_path):
    out = tmp_path / "gpu-check"
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(["bash", str(SCRIPT), str(out), "--smoke", "--tar", str(tmp_path / "gpu-check.tgz")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # the summary comes last on stdout and in summary.txt
    assert "== gpu-check summary" in done.stdout and "gpu-check: PASSED" in done.stdout.splitlines()[-1], output
    assert (out / "summary.txt").read_text().strip().splitlines()[-1].startswith("gpu-check: PASSED")

    steps = json.loads((out / "steps.json").read_text())
    assert steps["passed"] is True
    by_name = {s["step"]: s for s in steps["steps"]}
    assert list(by_name) == STEPS
    for name in STEPS[2:-1]:
        assert by_name[name]["status"] == "ok", by_name[name]
        assert (out / by_name[name]["log"]).stat().st_size > 0
    assert by_name["build"]["status"] in ("ok", "skipped")
    assert by_name["matrix"]["tests"]["passed"] > 0 and by_name["matrix"]["tests"]["failures"] == 0

    for name in ("env.txt", "backends.txt", "junit-gpu.xml", "junit-matrix.xml"):
        assert (out / name).stat().st_size > 0, name
    ok = {r["provider"] for r in _results(out / "bench") if r["status"] == "ok"}
    assert {"torch", "torch_compile"} <= ok
    # the small classes: the loss alone (no_grad) and the full step, each with its floor
    small = [r for r in _results(out / "bench-small") if r["status"] == "ok"]
    assert {(r["provider"], r["mode"]) for r in small} == {(p, m) for p in ("torch", "cpu") for m in ("no_grad", "full")}
    assert all(r["x_floor"] > 0 for r in small)
    results = _results(out / "bench-objective")
    assert {"torch", "torch_compile", "cpu_kd_only"} <= {r["provider"] for r in results if r["status"] == "ok"}
    # the Triton provider: timed on CUDA, reported unavailable (with the reason) elsewhere
    statuses = {r["provider"]: r["status"] for r in results}
    assert statuses["triton"] == "ok" if torch.cuda.is_available() else statuses["triton"].startswith("unavailable: ")
    divergences = ("reverse_kl", "jsd", "jeffreys", "tvd")
    assert {r["provider"] for r in _results(out / "bench-divergences") if r["status"] == "ok"} == {
        "torch", "cpu", *(f"{p}@{d}" for p in ("torch", "cpu") for d in divergences)}
    results = _results(out / "bench-fused-linear")
    peers = {(sweep, p) for p in _installed_peers() for sweep in PEER_SWEEPS[p]}
    assert {(r["sweep"], r["provider"]) for r in results if r["status"] == "ok"} == FUSED_LINEAR_OK | peers
    assert all(r["status"].startswith("unavailable: ") for r in results if (r["sweep"], r["provider"]) not in
               FUSED_LINEAR_OK | peers)
    summary = (out / "summary.txt").read_text()
    assert "floor ms" in summary and "mode no_grad" in summary and "the four GEMMs alone" in summary
    assert (tmp_path / "gpu-check.tgz").stat().st_size > 0


@needs(shutil.which("bash") is not None and shutil.which("timeout") is not None,
       "needs bash and coreutils' timeout to run scripts/gpu-check.sh")
def test_selected_steps_only_with_their_extra_arguments(tmp_path):
    """--steps runs the named steps alone; GPU_CHECK_ARGS_<STEP> overrides a bench step's arguments."""
    out = tmp_path / "gpu-check"
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_ARGS_BENCH="--vocab 128")
    done = subprocess.run(["bash", str(SCRIPT), str(out), "--smoke", "--steps", "bench"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    steps = {s["step"]: s for s in json.loads((out / "steps.json").read_text())["steps"]}
    assert steps["bench"]["status"] == "ok"
    assert all(s["status"] == "skipped" and s["note"] == "not selected (--steps)"
               for name, s in steps.items() if name not in ("bench", "wheels", "bench-kd")), steps
    (result,) = sorted((out / "bench").glob("*.json"))
    assert {r["vocab"] for r in json.loads(result.read_text())["results"]} == {128}


def test_bad_arguments_exit_2(tmp_path):
    for args in ([], ["--no-such-option", str(tmp_path)], [str(tmp_path), "--wheels", str(tmp_path / "missing")],
                 [str(tmp_path), "--steps", "build,no-such-step"]):
        done = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
