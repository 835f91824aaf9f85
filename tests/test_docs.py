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
