"""Regenerate the measured-performance tables of the docs from the committed result files.

    python benchmarks/make_tables.py            # rewrite both generated blocks in place
    python benchmarks/make_tables.py --check    # exit 1 if either file is out of date

Two generated blocks, each between its own markers:

- ``docs/performance.md`` (``perf-tables``): for each device and benchmark (the standardized or plain
  KD loss, the Triton blocked-path variants, the distillation objective of ``bench --objective``, the
  fused lm_head, the vocabulary-parallel loss), the newest committed ``benchmarks/results/*.json``
  becomes one table of the forward+backward ("full") mode: median time and speedup over eager
  PyTorch per provider, the fused kernel's time as a multiple of the memory floor, and peak memory
  above the inputs. Older files of the same device, benchmark and UTC day follow as tables of their
  own when they measured cases the newer ones did not (a GPU lease's second call that finished what
  the first left).
- ``README.md`` (``speed-table``): the small speed table, from the same files: on ``SUMMARY_DEVICE``,
  8192 tokens, bf16, forward + backward, the standardized KD loss against eager PyTorch and
  ``torch.compile`` and plain KD against Liger-Kernel, at V = 32768 and 131072.

Nothing in either block is typed by hand; ``tests/tooling/test_docs.py`` runs ``--check``.

"Committed" means known to git (``git ls-files``, so a staged file counts): a result file that is
only on disk never changes the tables, and ``--check`` passes in a checkout with untracked results.
To publish a result: ``python -m logitstd_kernels bench --out benchmarks/results``, ``git add`` the
new files, then run this script. Outside a git checkout (an sdist, or no git) every file on disk counts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PERF_MARKERS = ("<!-- perf-tables:start -->", "<!-- perf-tables:end -->")
SPEED_MARKERS = ("<!-- speed-table:start -->", "<!-- speed-table:end -->")
STATIC_MARKERS = ("<!-- static-cost:start -->", "<!-- static-cost:end -->")
STATIC_REPORT = "static-cost.json"
FUSED = ("triton", "cuda", "cpu")

# The README's speed table: the GPU, the case and the class counts it summarizes.
SUMMARY_DEVICE = "NVIDIA H200"
SUMMARY_ROWS, SUMMARY_DTYPE, SUMMARY_VOCABS = 8192, "bfloat16", (32768, 131072)
# Our kernels in that table, as (provider, name) in column order.
SUMMARY_OURS = (("triton", "Triton"), ("cuda", "CUDA C++"))


def _git(results_dir: Path, *args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", "-C", str(results_dir), *args], capture_output=True, text=True)
    except OSError:  # no git
        return None


def result_files(results_dir: Path) -> list[Path]:
    """The ``*.json`` directly in ``results_dir`` that git tracks; all of them outside a git checkout."""
    on_disk = sorted(results_dir.glob("*.json"))
    inside = _git(results_dir, "rev-parse", "--is-inside-work-tree")
    if inside is None or inside.returncode != 0 or inside.stdout.strip() != "true":
        return on_disk
    listed = _git(results_dir, "ls-files", "-z", "--", ".")
    if listed is None or listed.returncode != 0:
        return on_disk
    tracked = {name for name in listed.stdout.split("\0") if name and "/" not in name}
    untracked = [path for path in on_disk if path.name not in tracked]
    if untracked:
        print("make_tables: left out untracked " + ", ".join(path.name for path in untracked)
              + " (git add a result to put it in the tables)", file=sys.stderr)
    return [path for path in on_disk if path.name in tracked]


TUNING_PROVIDERS = ("triton_evict", "triton_prefetch")


def benchmark_kind(data: dict) -> str:
    """What a result file measured: the KD loss (standardized or plain), the Triton blocked path's
    variants (eviction hints, prefetch depth 2) against its default, the distillation objective
    (CE + KD), a full step through the lm_heads (``bench --fused-linear``) or the vocabulary-parallel
    objective."""
    metadata = data["metadata"]
    if metadata.get("distributed"):
        return f"vocabulary-parallel objective ({metadata['backend']}, standardized, with labels)"
    if metadata.get("fused_linear"):
        return f"fused linear step (lm_head matmuls + objective, forward + backward, H = {metadata['hidden']})"
    divergences = metadata.get("divergences") or ["forward_kl"]
    every = "" if divergences == ["forward_kl"] else f", divergences {', '.join(divergences)}"
    if metadata.get("objective"):
        return f"distillation objective (0.1 CE + 9 KD, token labels){every}"
    plain = "" if metadata.get("standardize", True) else "plain "
    if every:
        return f"{plain}KD loss{every}"
    if any(r["provider"] in TUNING_PROVIDERS for r in data["results"]):
        return (f"{plain}KD loss, Triton blocked-path variants: eviction hints (triton_evict), "
                "prefetch depth 2 (triton_prefetch)")
    return f"{plain}KD loss"


def _measured_cases(data: dict) -> set[tuple]:
    return {(r.get("sweep"), r["rows"], r["vocab"], r["dtype"]) for r in data["results"] if r["status"] == "ok"}


def newest_per_device(results_dir: Path) -> list[tuple[Path, dict]]:
    """Per (device, benchmark): the newest file, then older files of the same UTC day, newest first,
    that measured cases none of the files before them did, with those cases alone."""
    runs: dict[tuple[str, str], list[tuple[Path, dict]]] = {}
    for path in result_files(results_dir):
        data = json.loads(path.read_text())
        if "metadata" not in data:  # not a benchmark run (static-cost.json: the static cost report)
            continue
        runs.setdefault((data["metadata"]["device"], benchmark_kind(data)), []).append((path, data))
    chosen = []
    for files in runs.values():
        files.sort(key=lambda item: item[1]["metadata"]["date"], reverse=True)
        day = files[0][1]["metadata"]["date"][:10]
        seen: set[tuple] = set()
        for path, data in files:
            cases = _measured_cases(data)
            if path == files[0][0]:
                chosen.append((path, data))
            elif data["metadata"]["date"][:10] == day and cases - seen:
                new = [r for r in data["results"] if (r.get("sweep"), r["rows"], r["vocab"], r["dtype"]) not in seen]
                chosen.append((path, dict(data, results=new)))
            seen |= cases
    return sorted(chosen, key=lambda item: (item[1]["metadata"]["device_type"] != "cuda",
                                            bool(item[1]["metadata"].get("fused_linear")),
                                            bool(item[1]["metadata"].get("distributed")),
                                            bool(item[1]["metadata"].get("objective")), benchmark_kind(item[1]),
                                            item[0].name))


def _cell(result: dict | None) -> str:
    if result is None or result["status"] != "ok":
        return "failed" if result and result["status"].startswith("failed") else "-"
    speedup = result.get("speedup_vs_torch")
    eager = result["provider"].partition("@")[0] == "torch"
    return f"{result['median_ms']:.3g} ms" + (f" ({speedup:.1f}x)" if speedup and not eager else "")


def _mib(result: dict | None) -> str:
    """Peak memory above the inputs; a resident-set reading can dip just below 0 (pages returned)."""
    if result is None or result.get("peak_mem_mb") is None:
        return "-"
    return f"{max(result['peak_mem_mb'], 0.0):.0f}"


def _caption(path: Path, data: dict) -> str:
    meta = data["metadata"]
    return (f"**{benchmark_kind(data)}, {meta['device']}** ({meta['device_type']}), torch {meta['torch']}, triton "
            f"{meta['triton']}, logitstd_kernels {meta['logitstd_kernels']} ({meta.get('git_commit') or 'no git'}), "
            f"{meta['date']}, copy bandwidth {meta['copy_bandwidth_gbps']} GB/s, load "
            f"{meta.get('load_average_1m', '?')}; `{meta['command']}`; from `benchmarks/results/{path.name}`. "
            f"Peak memory: {meta['peak_memory']}.")


def render_fused_linear(path: Path, data: dict) -> str:
    """One line per objective and case: time (speedup over eager) and peak memory per provider."""
    meta = data["metadata"]
    shown = [r for r in data["results"] if not r["status"].startswith("unavailable")]
    providers = list(dict.fromkeys(r["provider"] for r in shown))
    objectives = {"fused_linear": "LS-KD 0.1 CE + 9 KD", "fused_linear_plain": "plain KD 0.5 CE + 0.5 KL",
                  "fused_linear_kl": "forward KL alone (no CE)"}
    lines = [_caption(path, data), "",
             "| objective | rows | V | dtype | " + " | ".join(providers) + " | "
             + " | ".join(f"{p} peak MiB" for p in providers) + " |",
             "|---|" + "---:|" * (3 + 2 * len(providers))]
    for key in dict.fromkeys((r["sweep"], r["rows"], r["vocab"], r["dtype"]) for r in shown):
        by_provider = {r["provider"]: r for r in shown if (r["sweep"], r["rows"], r["vocab"], r["dtype"]) == key}
        cells = [_cell(by_provider.get(p)) for p in providers] + [_mib(by_provider.get(p)) for p in providers]
        lines.append(f"| {objectives.get(key[0], key[0])} | {key[1]} | {key[2]} | {key[3]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


NVLINK_GBPS = 450  # H100 NVLink 4, one direction; the estimate below is arithmetic, not a measurement


def render_distributed(path: Path, data: dict) -> str:
    """Time, peak memory and communication per step for each process count (and the single-device
    fused objective, ``fused x1``, where the file has it), and the cost model they give."""
    meta = data["metadata"]
    ok = [r for r in data["results"] if r["status"] == "ok"]
    lines = [_caption(path, data), "",
             "| run | rows | V | ms per step | rank 0 peak MiB | collectives per step | bytes sent per rank "
             "| per row |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in ok:
        run = (f"{r['provider'].split('x')[-1]} gloo processes" if r["provider"].startswith("gloo")
               else "single-device fused objective")
        lines.append(f"| {run} | {r['rows']} | {r['vocab']} | {r['median_ms']:.1f} | {_mib(r)} | "
                     f"{r['collectives']} | {r['sent_bytes_per_rank']} | {r['sent_bytes_per_rank'] / r['rows']:.1f} |")
    gloo = [r for r in ok if r["provider"].startswith("gloo")]
    if gloo:
        r = gloo[-1]
        per_row, header = divmod(r["sent_bytes_per_rank"], r["rows"])
        tokens, ranks = 8192, 2
        sent = per_row * tokens + header
        lines += ["", f"Cost model from this file: each rank sends {per_row} bytes per row plus a {header}-byte "
                  f"header per step, whatever V and the number of ranks (and receives (ranks - 1) times that). "
                  f"For {tokens} tokens x 256k classes on {ranks} tensor-parallel ranks: {sent / 1e6:.2f} MB per "
                  f"rank per step, about {sent / (NVLINK_GBPS * 1e9) * 1e6:.0f} µs at {NVLINK_GBPS} GB/s of NVLink "
                  f"plus the latency of {r['collectives']} collectives, against "
                  f"{2 * tokens * 128 * 1024 * 2 / 1e9:.1f} GB of bf16 logits each rank's slice of the loss reads."]
    return "\n".join(lines)


def _split(provider: str) -> tuple[str, str]:
    """(provider, divergence) of a result's provider label (``triton@jsd``; no suffix: forward KL)."""
    base, _, divergence = provider.partition("@")
    return base, divergence or "forward_kl"


def render(path: Path, data: dict) -> str:
    """The full mode's table: a line per case (and divergence, when the run timed several), time and
    speedup per provider, the fused kernels' x floor and peak memory, eager's peak memory; and, when
    the run timed the ``no_grad`` mode (no input requires grad), the fused kernels' time and x floor
    there."""
    meta = data["metadata"]
    if meta.get("distributed"):
        return render_distributed(path, data)
    if meta.get("fused_linear"):
        return render_fused_linear(path, data)
    shown = [r for r in data["results"] if not r["status"].startswith("unavailable")]
    full = [r for r in shown if r["mode"] == "full"]
    providers = list(dict.fromkeys(_split(r["provider"])[0] for r in full))
    fused = [p for p in providers if p in FUSED]
    no_grad = [p for p in fused if any(r["mode"] == "no_grad" and _split(r["provider"])[0] == p for r in shown)]
    several = len({_split(r["provider"])[1] for r in full}) > 1
    lines = [
        _caption(path, data),
        "",
        ("| divergence " if several else "") + "| rows | V | dtype | " + " | ".join(providers) + " | "
        + " | ".join(f"{p} x floor | {p} peak MiB" for p in fused) + " | torch peak MiB |"
        + "".join(f" {p} no_grad | {p} no_grad x floor |" for p in no_grad),
        "|" + ("---|" if several else "") + "---:|" * (3 + len(providers) + 2 * len(fused) + 1 + 2 * len(no_grad)),
    ]

    def key(r: dict) -> tuple:
        return (_split(r["provider"])[1], r["rows"], r["vocab"], r["dtype"])

    # a case no provider measured (skipped for time, say) is left out
    for case in dict.fromkeys(key(r) for r in full if r["status"] == "ok"):
        by_provider = {(r["mode"], _split(r["provider"])[0]): r for r in shown if key(r) == case}
        cells = [_cell(by_provider.get(("full", p))) for p in providers]
        for p in fused:
            r = by_provider.get(("full", p))
            ok = r is not None and r["status"] == "ok"
            cells.append(f"{r['x_floor']:.2f}" if ok else "-")
            cells.append(_mib(r) if ok else "-")
        cells.append(_mib(by_provider.get(("full", "torch"))))
        for p in no_grad:
            r = by_provider.get(("no_grad", p))
            ok = r is not None and r["status"] == "ok"
            cells += [_cell(r), f"{r['x_floor']:.2f}" if ok else "-"]
        lines.append(("| " + case[0] + " " if several else "") + f"| {case[1]} | {case[2]} | {case[3]} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_section(runs: list[tuple[Path, dict]]) -> str:
    """docs/performance.md's generated block: every chosen result file as a table."""
    if not runs:
        return "No results committed yet."
    return "\n\n".join(render(path, data) for path, data in runs)


def section(results_dir: Path) -> str:
    return render_section(newest_per_device(results_dir))


def _times(runs: list[tuple[Path, dict]], kind: str) -> tuple[dict[tuple[int, str], float], list[tuple[Path, dict]]]:
    """{(V, provider): median ms} of the summary's cases in the ``kind`` files of ``SUMMARY_DEVICE``,
    and the files they came from. ``newest_per_device`` gives each case to one file only."""
    times: dict[tuple[int, str], float] = {}
    sources = []
    for path, data in runs:
        if data["metadata"]["device"] != SUMMARY_DEVICE or benchmark_kind(data) != kind:
            continue
        used = False
        for r in data["results"]:
            if (r["mode"] == "full" and r["status"] == "ok" and r["rows"] == SUMMARY_ROWS
                    and r["dtype"] == SUMMARY_DTYPE and r["vocab"] in SUMMARY_VOCABS):
                times.setdefault((r["vocab"], r["provider"]), r["median_ms"])
                used = True
        if used:
            sources.append((path, data))
    return times, sources


def _ours_ms(times: dict, vocab: int) -> str:
    cells = [f"{times[(vocab, p)]:.3g}" if (vocab, p) in times else "-" for p, _ in SUMMARY_OURS]
    return " / ".join(cells) + " ms"


def _speedups(times: dict, vocab: int, other: str) -> str:
    """The other provider's time over each of ours: "12.3x / 18.7x"."""
    if (vocab, other) not in times:
        return "not measured"
    cells = [f"{times[(vocab, other)] / times[(vocab, p)]:.1f}x" if (vocab, p) in times else "-"
             for p, _ in SUMMARY_OURS]
    return " / ".join(cells)


def render_summary(runs: list[tuple[Path, dict]]) -> str:
    """README.md's generated block: the small speed table of ``SUMMARY_DEVICE``."""
    standardized, std_files = _times(runs, "KD loss")
    plain, plain_files = _times(runs, "plain KD loss")
    if not standardized and not plain:
        return f"No {SUMMARY_DEVICE} results committed yet."
    ours = " / ".join(name for _, name in SUMMARY_OURS)
    dtype = {"bfloat16": "bf16"}.get(SUMMARY_DTYPE, SUMMARY_DTYPE)
    lines = [f"| {SUMMARY_DEVICE}, {SUMMARY_ROWS} tokens, {dtype}, forward + backward | "
             + " | ".join(f"V = {v}" for v in SUMMARY_VOCABS) + " |",
             "|---|" + "---:|" * len(SUMMARY_VOCABS)]

    def row(label: str, cell) -> None:
        lines.append(f"| {label} | " + " | ".join(cell(v) for v in SUMMARY_VOCABS) + " |")

    row(f"standardized KD, our kernels ({ours})", lambda v: _ours_ms(standardized, v))
    row("speedup over eager PyTorch", lambda v: _speedups(standardized, v, "torch"))
    row("speedup over `torch.compile`", lambda v: _speedups(standardized, v, "torch_compile"))
    row(f"plain KD, our kernels ({ours})", lambda v: _ours_ms(plain, v))
    row("speedup over Liger-Kernel", lambda v: _speedups(plain, v, "liger"))
    files = std_files + [item for item in plain_files if item[0] not in {path for path, _ in std_files}]
    versions = "; ".join(dict.fromkeys(f"torch {data['metadata']['torch']}, triton {data['metadata']['triton']}"
                                       for _, data in files))
    sources = ", ".join(f"`benchmarks/results/{path.name}` ({data['metadata'].get('git_commit') or 'no git'})"
                        for path, data in files)
    lines += ["", f"Median times; a speedup is the other's time divided by ours. {versions}; from {sources}."]
    return "\n".join(lines)


def speed_summary(results_dir: Path) -> str:
    return render_summary(newest_per_device(results_dir))


def render_static_cost(results_dir: Path) -> str:
    """The static cost report (``scripts/static_cost.py``): per kernel and launch-table entry, SASS
    instructions per element summed over the passes every row takes, MUFU per element, registers
    and spills, for bf16 and fp32 inputs (the x/y dtypes), one row per objective and divergence."""
    path = results_dir / STATIC_REPORT
    if not path.exists():
        return "No static cost report is committed."
    entries = json.loads(path.read_text())["entries"]
    groups: dict[tuple, dict[tuple, dict]] = {}
    for e in entries:
        cells = groups.setdefault((e["backend"], e["kernel"], e["entry"]), {})
        cells.setdefault((e["objective"], e["divergence"]), {})[e["dtype"].split("/")[0]] = e
    compilers = sorted({e["compiler"] for e in entries})
    lines = [f"Compiled for sm_90 without a GPU ({', '.join(compilers)}); `{STATIC_REPORT}`.", ""]
    for (backend, kernel, entry), cells in groups.items():
        lines += [f"**{backend} `{kernel}`, {entry}**", "",
                  "| objective | divergence | instructions / element (bf16 / fp32) | MUFU / element (bf16) | "
                  "registers (bf16 / fp32) | spills |", "|---|---|---:|---:|---:|---:|"]
        for (objective, divergence), by_dtype in cells.items():
            bf, fp = by_dtype.get("bf16", {}), by_dtype.get("fp32", {})
            spills = max(bf.get("spills") or 0, fp.get("spills") or 0)
            lines.append(f"| {objective} | {divergence} | {bf.get('instructions_per_element', '-')} / "
                         f"{fp.get('instructions_per_element', '-')} | {bf.get('mufu_per_element', '-')} | "
                         f"{bf.get('registers', '-')} / {fp.get('registers', '-')} | {spills} |")
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def replace_block(text: str, markers: tuple[str, str], content: str, path: Path) -> str:
    """``text`` with what lies between the two markers replaced by ``content``."""
    start, end = markers
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise SystemExit(f"make_tables: {path} needs the lines {start} and {end}, once each, in that order")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{content}\n{end}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if README.md or docs/performance.md is out of date")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--performance", type=Path, default=ROOT / "docs" / "performance.md")
    args = parser.parse_args()
    runs = newest_per_device(args.results)
    stale = []
    blocks = {args.performance: [(PERF_MARKERS, render_section(runs)),
                                 (STATIC_MARKERS, render_static_cost(args.results))],
              args.readme: [(SPEED_MARKERS, render_summary(runs))]}
    for path, replacements in blocks.items():
        text = path.read_text()
        updated = text
        for markers, content in replacements:
            updated = replace_block(updated, markers, content, path)
        if updated != text:
            stale.append(path)
            if not args.check:
                path.write_text(updated)
    if args.check and stale:
        print("make_tables: out of date: " + ", ".join(str(p) for p in stale)
              + " (run python benchmarks/make_tables.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
