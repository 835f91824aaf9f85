"""The docs: the generated tables (docs/performance.md, the README's speed table) match the committed
result files, and the README stays a short entry point whose links reach every doc page."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from support import needs

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
PERFORMANCE = ROOT / "docs" / "performance.md"
DOC_PAGES = sorted((ROOT / "docs").glob("*.md"))


def test_generated_tables_are_up_to_date():
    """docs/performance.md's tables and the README's speed table are what make_tables.py writes."""
    check = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_tables.py"), "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 0, (f"README.md or docs/performance.md is out of date: run python "
                                   f"benchmarks/make_tables.py ({check.stderr.strip()})")


def _make_tables_module(path: Path):
    spec = importlib.util.spec_from_file_location("make_tables_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _newer_result(results: Path) -> dict:
    """The newest committed result, re-dated into the future and with other numbers: a run's output."""
    runs = (json.loads(p.read_text()) for p in results.glob("*.json"))
    newest = max((d for d in runs if "metadata" in d), key=lambda d: d["metadata"]["date"])
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
    (repo / "docs").mkdir()
    shutil.copy(README, repo / "README.md")
    shutil.copy(PERFORMANCE, repo / "docs" / "performance.md")
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
    make_tables = _make_tables_module(repo / "benchmarks" / "make_tables.py")
    before = make_tables.section(results), make_tables.speed_summary(results)
    (results / "zz-untracked.json").write_text(json.dumps(_newer_result(results)))
    assert check() == 0, "an untracked result file changed the generated tables"
    assert (make_tables.section(results), make_tables.speed_summary(results)) == before
    # The same file once committed (staged is enough) is the newest result: the docs are out of date.
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


def _summary_result(vocab: int, provider: str, median: float, dtype: str = "bfloat16", rows: int = 8192) -> dict:
    return {"sweep": "vocab", "rows": rows, "vocab": vocab, "dtype": dtype, "mode": "full", "provider": provider,
            "status": "ok", "median_ms": median, "x_floor": 3.0, "peak_mem_mb": 1.0, "speedup_vs_torch": None}


def test_readme_speed_table_comes_from_the_h200_results(tmp_path, monkeypatch):
    """The README's table: standardized KD against eager and torch.compile, plain KD against Liger, at
    8192 tokens in bf16 on the summary's GPU; other dtypes, row counts and devices do not reach it, and
    a case no file measured says so."""
    make_tables = _make_tables_module(ROOT / "benchmarks" / "make_tables.py")
    monkeypatch.setattr(make_tables, "result_files", lambda folder: sorted(folder.glob("*.json")))
    meta = {"device": make_tables.SUMMARY_DEVICE, "device_type": "cuda", "command": "bench", "torch": "t1",
            "triton": "t2", "logitstd_kernels": "0", "git_commit": "abc1234", "copy_bandwidth_gbps": 1.0,
            "peak_memory": "allocated", "date": "2026-11-28T10:00:00+00:00"}
    small, large = make_tables.SUMMARY_VOCABS
    files = {
        "gpu-standardized.json": (dict(meta, standardize=True), [
            _summary_result(small, "torch", 20.0), _summary_result(small, "torch_compile", 4.0),
            _summary_result(small, "triton", 2.0), _summary_result(small, "cuda", 1.0),
            _summary_result(large, "torch", 90.0), _summary_result(large, "triton", 6.0),
            _summary_result(large, "cuda", 5.0), _summary_result(small, "triton", 0.5, dtype="float32"),
            _summary_result(small, "triton", 0.25, rows=64)]),
        "gpu-plain.json": (dict(meta, standardize=False, date="2026-11-28T11:00:00+00:00"), [
            _summary_result(small, "liger", 9.0), _summary_result(small, "triton", 1.5),
            _summary_result(small, "cuda", 1.125)]),
        "other-gpu.json": (dict(meta, device="Other GPU", standardize=True), [
            _summary_result(small, "torch", 1000.0), _summary_result(small, "triton", 0.001)]),
    }
    for name, (metadata, results) in files.items():
        (tmp_path / name).write_text(json.dumps({"metadata": metadata, "results": results}))
    table = make_tables.speed_summary(tmp_path)
    cells = [[cell.strip() for cell in line.strip("|").split("|")]
             for line in table.splitlines() if line.startswith("|")]
    rows = {row[0]: row[1:] for row in cells}
    # the float32 and 64-row results (0.5 and 0.25 ms) and the other GPU's are left out
    assert rows["standardized KD, our kernels (Triton / CUDA C++)"] == ["2 / 1 ms", "6 / 5 ms"]
    assert rows["speedup over eager PyTorch"] == ["10.0x / 20.0x", "15.0x / 18.0x"]
    assert rows["speedup over `torch.compile`"] == ["2.0x / 4.0x", "not measured"]
    assert rows["speedup over Liger-Kernel"] == ["6.0x / 8.0x", "not measured"]
    assert rows["plain KD, our kernels (Triton / CUDA C++)"] == ["1.5 / 1.12 ms", "- / - ms"]
    assert "gpu-standardized.json" in table and "gpu-plain.json" in table and "other-gpu.json" not in table
    (tmp_path / "empty").mkdir()
    assert make_tables.speed_summary(tmp_path / "empty").startswith("No ")


def test_divergence_runs_and_the_no_grad_mode_get_their_own_rows_and_columns(tmp_path, monkeypatch):
    """A run of several divergences is a benchmark of its own (its forward-KL cases do not hide the KD
    loss run's), a row per divergence and case; a run that timed the no_grad mode adds the fused
    kernels' time and x floor there."""
    make_tables = _make_tables_module(ROOT / "benchmarks" / "make_tables.py")
    monkeypatch.setattr(make_tables, "result_files", lambda folder: sorted(folder.glob("*.json")))
    meta = {"device": "Test GPU", "device_type": "cuda", "command": "bench", "torch": "t", "triton": "t",
            "logitstd_kernels": "0", "git_commit": "abc", "copy_bandwidth_gbps": 1.0, "peak_memory": "allocated"}
    kd = [_summary_result(1024, "torch", 8.0), _summary_result(1024, "triton", 2.0),
          dict(_summary_result(1024, "triton", 0.75), mode="no_grad", x_floor=1.5)]
    divergences = [_summary_result(1024, provider, ms) for provider, ms in
                   (("torch", 8.0), ("triton", 2.5), ("torch@jsd", 9.0), ("triton@jsd", 3.0))]
    files = {"a-kd.json": (dict(meta, date="2026-11-28T10:00:00+00:00", divergences=["forward_kl"]), kd),
             "b-div.json": (dict(meta, date="2026-11-28T11:00:00+00:00", divergences=["forward_kl", "jsd"]),
                            divergences)}
    for name, (metadata, results) in files.items():
        (tmp_path / name).write_text(json.dumps({"metadata": metadata, "results": results}))
    text = make_tables.section(tmp_path)
    blocks = text.split("\n\n")  # a caption, then its table, per file
    kd_table, div_table = "\n".join(blocks[0:2]), "\n".join(blocks[2:4])
    assert "a-kd.json" in kd_table and "KD loss, divergences forward_kl, jsd" in div_table
    assert "| triton no_grad | triton no_grad x floor |" in kd_table
    assert "| 8192 | 1024 | bfloat16 | 8 ms | 2 ms | 3.00 | 1 | 1 | 0.75 ms | 1.50 |" in kd_table
    assert "| divergence | rows | V | dtype | torch | triton |" in div_table
    assert "| jsd | 8192 | 1024 | bfloat16 | 9 ms | 3 ms |" in div_table
    assert "| forward_kl | 8192 | 1024 | bfloat16 | 8 ms | 2.5 ms |" in div_table


def test_check_covers_both_generated_files(tmp_path):
    """--check fails when either generated block is stale, names the file, and a run rewrites both."""
    script = ROOT / "benchmarks" / "make_tables.py"
    readme, performance = tmp_path / "README.md", tmp_path / "performance.md"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), "--readme", str(readme), "--performance",
                               str(performance), *args], capture_output=True, text=True)

    for stale, marker in ((readme, "<!-- speed-table:start -->"), (performance, "<!-- perf-tables:start -->")):
        shutil.copy(README, readme)
        shutil.copy(PERFORMANCE, performance)
        assert run("--check").returncode == 0
        stale.write_text(stale.read_text().replace(marker, marker + "\n| a hand-typed row |", 1))
        result = run("--check")
        assert result.returncode == 1 and stale.name in result.stderr
        assert run().returncode == 0 and run("--check").returncode == 0
        assert readme.read_text() == README.read_text() and performance.read_text() == PERFORMANCE.read_text()
    # A file without its markers is an error that names them, not a silent pass.
    readme.write_text("# no markers\n")
    result = run("--check")
    assert result.returncode != 0 and "speed-table:start" in result.stderr


def _markdown_lines(text: str) -> list[tuple[int, str, bool]]:
    """(line number, line, inside a fenced code block) for every line."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            out.append((number, line, True))
            fenced = not fenced
            continue
        out.append((number, line, fenced))
    return out


def test_readme_is_a_short_entry_point():
    """At most ~2,000 words; the first code block is the two set-up commands within 40 lines, and a
    usage snippet starts within 80."""
    text = README.read_text()
    assert len(text.split()) <= 2000, f"README.md has {len(text.split())} words (wc -w); move detail to docs/"
    fences = [(number, line.strip()) for number, line, _ in _markdown_lines(text) if line.lstrip().startswith("```")]
    first_open, first_close = fences[0][0], fences[1][0]
    assert fences[0][1] == "```bash" and first_open <= 40, "the first code block must be the set-up commands"
    body = text.splitlines()[first_open:first_close - 1]
    commands = [line.split("#")[0].strip() for line in body if line.split("#")[0].strip()]
    assert commands == ["bash scripts/run-benchmark.sh", "bash scripts/run-tests.sh"]
    python_blocks = [number for number, fence in fences[::2] if fence == "```python"]
    assert python_blocks and python_blocks[0] <= 80, "a usage snippet must start within the first 80 lines"
    assert "lsk.logitstd_kd_loss(" in text and "lsk.distillation_loss(" in text
    assert "lsk.fused_linear_distillation_loss(" in text
    assert "pip install --no-build-isolation ." in text


_LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def _links(path: Path) -> list[str]:
    targets = []
    for _, line, fenced in _markdown_lines(path.read_text()):
        if not fenced:
            targets += [a or b for a, b in _LINK.findall(re.sub(r"`[^`]*`", "", line))]
    return targets


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    anchors: set[str] = set()
    for _, line, fenced in _markdown_lines(path.read_text()):
        match = re.match(r"#{1,6} +(.*)", line)
        if match and not fenced:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).replace("`", "").strip().lower()).replace(" ", "-")
            anchor, n = slug, 0
            while anchor in anchors:
                n += 1
                anchor = f"{slug}-{n}"
            anchors.add(anchor)
    return anchors


def test_readme_links_every_doc_page():
    linked = {(ROOT / target.split("#")[0]).resolve() for target in _links(README) if not re.match(r"\w+:", target)}
    missing = [page.name for page in DOC_PAGES if page.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


def test_relative_links_resolve_inside_the_repository():
    """Every relative link of the README and docs/ names a file of this repository, and an anchor
    names a heading of that file."""
    broken = []
    for page in [README, *DOC_PAGES]:
        for target in _links(page):
            if re.match(r"\w+:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (page.parent / file_part).resolve() if file_part else page.resolve()
            if ROOT.resolve() not in resolved.parents and resolved != ROOT.resolve():
                broken.append(f"{page.name}: {target} points outside the repository")
            elif not resolved.exists():
                broken.append(f"{page.name}: {target} does not exist")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{page.name}: {target} names no heading of {resolved.name}")
    assert not broken, "\n".join(broken)


def test_no_section_appears_twice():
    """Each topic is said once: no section heading is repeated across the README and docs/."""
    seen: dict[str, str] = {}
    repeated = []
    for page in [README, *DOC_PAGES]:
        for _, line, fenced in _markdown_lines(page.read_text()):
            match = re.match(r"(#{2,3}) +(.*)", line)
            if match and not fenced:
                title = re.sub(r"^[\d.]+ +", "", match.group(2)).strip().lower()
                if title in seen and seen[title] != page.name:
                    repeated.append(f"{title!r} in {seen[title]} and {page.name}")
                seen.setdefault(title, page.name)
    assert not repeated, "sections repeated across files: " + "; ".join(repeated)
