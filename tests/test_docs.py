"""The README's generated performance tables match the committed result files."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from support import needs

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def test_readme_tables_are_generated_from_results():
    check = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_tables.py"), "--check"])
    assert check.returncode == 0, "README.md is out of date: run python benchmarks/make_tables.py"


def _make_tables_module(path: Path):
    spec = importlib.util.spec_from_file_location("make_tables_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _newer_result(results: Path) -> dict:
    """The newest committed result, re-dated into the future and with other numbers: a run's output."""
    newest = max((json.loads(p.read_text()) for p in results.glob("*.json")), key=lambda d: d["metadata"]["date"])
    newest["metadata"]["date"] = "2999-01-01T00:00:00+00:00"
    for result in newest["results"]:
        if result.get("median_ms"):
            result["median_ms"] *= 1.5
    return newest


@needs(shutil.which("git") is not None,
       "needs the git command: the test builds a throwaway repository to check which result files count")
def test_untracked_result_file_does_not_change_tables(tmp_path):
    """A benchmark run that wrote into benchmarks/results without committing leaves --check passing."""
    repo = tmp_path / "repo"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    shutil.copy(ROOT / "README.md", repo / "README.md")
    shutil.copy(ROOT / "benchmarks" / "make_tables.py", repo / "benchmarks" / "make_tables.py")
    tracked = subprocess.run(["git", "ls-files", "-z", "--", "."], cwd=RESULTS, capture_output=True, text=True)
    names = [n for n in tracked.stdout.split("\0") if n and "/" not in n] if tracked.returncode == 0 else []
    for name in names or [p.name for p in RESULTS.glob("*.json")]:
        shutil.copy(RESULTS / name, repo / "benchmarks" / "results" / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_CONFIG_NOSYSTEM="1", HOME=str(tmp_path))

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false",
                        *args], cwd=repo, env=env, check=True, capture_output=True)

    def check() -> int:
        return subprocess.run([sys.executable, str(repo / "benchmarks" / "make_tables.py"), "--check"], cwd=repo,
                              env=env, capture_output=True).returncode

    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "results")
    assert check() == 0
    results = repo / "benchmarks" / "results"
    before = _make_tables_module(repo / "benchmarks" / "make_tables.py").section(results)
    (results / "zz-untracked.json").write_text(json.dumps(_newer_result(results)))
    assert check() == 0, "an untracked result file changed the README tables"
    make_tables = _make_tables_module(repo / "benchmarks" / "make_tables.py")
    assert make_tables.section(results) == before
    # The same file once committed (staged is enough) is the newest result: the README is out of date.
    git("add", "benchmarks/results/zz-untracked.json")
    assert check() == 1
    assert "zz-untracked.json" in make_tables.section(results)


def test_without_git_every_result_file_on_disk_counts(tmp_path, monkeypatch):
    """An sdist has no .git, a machine may have no git: then the tables come from the files on disk."""
    make_tables = _make_tables_module(ROOT / "benchmarks" / "make_tables.py")
    for path in RESULTS.glob("*.json"):
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "zz-local.json").write_text(json.dumps(_newer_result(tmp_path)))

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(make_tables.subprocess, "run", no_git)
    assert (tmp_path / "zz-local.json") in make_tables.result_files(tmp_path)
    assert "zz-local.json" in make_tables.section(tmp_path)


def test_same_day_results_add_only_their_new_cases(tmp_path, monkeypatch):
    """Two calls of one GPU lease: the newest file's table, then the older file's cases the newer one
    did not measure, each case once; a file of an earlier day adds nothing."""
    make_tables = _make_tables_module(ROOT / "benchmarks" / "make_tables.py")
    monkeypatch.setattr(make_tables, "result_files", lambda folder: sorted(folder.glob("*.json")))

    def result(vocab, median):
        return {"sweep": "vocab", "rows": 8, "vocab": vocab, "dtype": "float32", "mode": "full", "provider": "cpu",
                "status": "ok", "median_ms": median, "x_floor": 2.0, "peak_mem_mb": 1.0, "speedup_vs_torch": None}

    meta = {"device": "Test CPU", "device_type": "cpu", "command": "bench", "torch": "t", "triton": "t",
            "logitstd_kernels": "0", "git_commit": "abc", "copy_bandwidth_gbps": 1.0, "peak_memory": "rss"}
    files = {"a-old-day.json": ("2026-11-27T10:00:00+00:00", [result(256, 9.0), result(1024, 9.5)]),
             "b-first-call.json": ("2026-11-28T10:00:00+00:00", [result(256, 1.25), result(512, 2.5)]),
             "c-second-call.json": ("2026-11-28T11:00:00+00:00", [result(256, 1.5)])}
    for name, (date, results) in files.items():
        (tmp_path / name).write_text(json.dumps({"metadata": dict(meta, date=date), "results": results}))
    text = make_tables.section(tmp_path)
    assert "c-second-call.json" in text and "b-first-call.json" in text and "a-old-day.json" not in text
    assert "1.5 ms" in text and "2.5 ms" in text  # V = 256 from the newer call, V = 512 from the older
    assert "1.25 ms" not in text and "9.5 ms" not in text and "| 1024 |" not in text
