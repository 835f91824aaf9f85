"""``scripts/gpu-check.sh --smoke``: the prepared GPU check, run at tiny sizes on the present device.

The full check only runs on a GPU machine, which CI does not have; the smoke mode runs the same
steps (build or reuse of the extension, the gpu tests, a few loss-matrix cases, a one-case
benchmark, the summary), so that the script cannot rot between GPU runs. About a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from support import needs

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"


@needs(shutil.which("bash") is not None and shutil.which("timeout") is not None,
       "needs bash and coreutils' timeout to run scripts/gpu-check.sh")
def test_smoke_run_passes_and_writes_its_files(tmp_path):
    out = tmp_path / "gpu-check"
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(["bash", str(SCRIPT), str(out), "--smoke", "--tar", str(tmp_path / "gpu-check.tgz")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # the summary comes last on stdout and in summary.txt
    assert "== gpu-check summary" in done.stdout and "gpu-check: PASSED" in done.stdout.splitlines()[-1], output
    assert (out / "summary.txt").read_text().strip().splitlines()[-1].startswith("gpu-check: PASSED")

    steps = json.loads((out / "steps.json").read_text())
    assert steps["passed"] is True
    by_name = {s["step"]: s for s in steps["steps"]}
    assert list(by_name) == ["wheels", "build", "gpu-tests", "matrix", "bench", "bench-objective",
                             "bench-fused-linear", "bench-kd"]
    for name in ("gpu-tests", "matrix", "bench", "bench-objective", "bench-fused-linear"):
        assert by_name[name]["status"] == "ok", by_name[name]
        assert (out / by_name[name]["log"]).stat().st_size > 0
    assert by_name["build"]["status"] in ("ok", "skipped")
    assert by_name["matrix"]["tests"]["passed"] > 0 and by_name["matrix"]["tests"]["failures"] == 0

    for name in ("env.txt", "backends.txt", "junit-gpu.xml", "junit-matrix.xml"):
        assert (out / name).stat().st_size > 0, name
    (result,) = (out / "bench").glob("*.json")
    assert (out / "bench" / (result.stem + ".csv")).exists()
    data = json.loads(result.read_text())
    assert data["metadata"]["standardize"] is True
    ok = {r["provider"] for r in data["results"] if r["status"] == "ok"}
    assert {"torch", "torch_compile"} <= ok
    (objective,) = (out / "bench-objective").glob("*.json")
    data = json.loads(objective.read_text())
    assert data["metadata"]["objective"] is True
    assert {"torch", "torch_compile"} <= {r["provider"] for r in data["results"] if r["status"] == "ok"}
    # the Triton provider: timed on CUDA, reported unavailable (with the reason) elsewhere
    statuses = {r["provider"]: r["status"] for r in data["results"]}
    assert statuses["triton"] == "ok" if torch.cuda.is_available() else statuses["triton"].startswith("unavailable: ")
    (fused_linear,) = (out / "bench-fused-linear").glob("*.json")
    data = json.loads(fused_linear.read_text())
    assert data["metadata"]["fused_linear"] is True
    assert {(r["sweep"], r["provider"]) for r in data["results"] if r["status"] == "ok"} == {
        (sweep, provider) for sweep in ("fused_linear", "fused_linear_plain") for provider in ("fused", "torch")}
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
