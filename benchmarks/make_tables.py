"""Regenerate README.md's performance tables from the committed result files.

    python benchmarks/make_tables.py            # rewrite the README section in place
    python benchmarks/make_tables.py --check    # exit 1 if the README is out of date

For each device and benchmark (the standardized or plain KD loss, the Triton tuning switches, the
distillation objective of ``bench --objective``, the fused lm_head, the vocabulary-parallel loss),
the newest committed ``benchmarks/results/*.json`` becomes one table of the forward+backward
("full") mode: median time and speedup over eager PyTorch per provider, the fused kernel's time as a
multiple of the memory floor, and peak memory above the inputs. Older files of the same device,
benchmark and UTC day follow as tables of their own when they measured cases the newer ones did not
(a GPU lease's second call that finished what the first left). Nothing in the section is typed by
hand.

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
START, END = "<!-- perf-tables:start -->", "<!-- perf-tables:end -->"
FUSED = ("triton", "cuda", "cpu")


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
    """What a result file measured: the KD loss (standardized or plain), the Triton tuning switches,
    the distillation objective (CE + KD), a full step through the lm_heads (``bench --fused-linear``)
    or the vocabulary-parallel objective."""
    metadata = data["metadata"]
    if metadata.get("distributed"):
        return f"vocabulary-parallel objective ({metadata['backend']}, standardized, with labels)"
    if metadata.get("fused_linear"):
        return f"fused linear step (lm_head matmuls + objective, forward + backward, H = {metadata['hidden']})"
    if metadata.get("objective"):
        return "distillation objective (0.1 CE + 9 KD, token labels)"
    plain = "" if metadata.get("standardize", True) else "plain "
    if any(r["provider"] in TUNING_PROVIDERS for r in data["results"]):
        return f"{plain}KD loss, Triton tuning switches (_triton/config.py) forced on"
    return f"{plain}KD loss"


def _measured_cases(data: dict) -> set[tuple]:
    return {(r.get("sweep"), r["rows"], r["vocab"], r["dtype"]) for r in data["results"] if r["status"] == "ok"}


def newest_per_device(results_dir: Path) -> list[tuple[Path, dict]]:
    """Per (device, benchmark): the newest file, then older files of the same UTC day, newest first,
    that measured cases none of the files before them did, with those cases alone."""
    runs: dict[tuple[str, str], list[tuple[Path, dict]]] = {}
    for path in result_files(results_dir):
        data = json.loads(path.read_text())
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
    return f"{result['median_ms']:.3g} ms" + (f" ({speedup:.1f}x)" if speedup and result["provider"] != "torch" else "")


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
    objectives = {"fused_linear": "LS-KD 0.1 CE + 9 KD", "fused_linear_plain": "plain KD 0.5 CE + 0.5 KL"}
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


def render(path: Path, data: dict) -> str:
    meta = data["metadata"]
    if meta.get("distributed"):
        return render_distributed(path, data)
    if meta.get("fused_linear"):
        return render_fused_linear(path, data)
    full = [r for r in data["results"] if r["mode"] == "full" and not r["status"].startswith("unavailable")]
    providers = list(dict.fromkeys(r["provider"] for r in full))
    fused = [p for p in providers if p in FUSED]
    lines = [
        _caption(path, data),
        "",
        "| rows | V | dtype | " + " | ".join(providers) + " | "
        + " | ".join(f"{p} x floor | {p} peak MiB" for p in fused) + " | torch peak MiB |",
        "|" + "---:|" * (3 + len(providers) + 2 * len(fused) + 1),
    ]
    # a case no provider measured (skipped for time, say) is left out
    for key in dict.fromkeys((r["rows"], r["vocab"], r["dtype"]) for r in full if r["status"] == "ok"):
        by_provider = {r["provider"]: r for r in full if (r["rows"], r["vocab"], r["dtype"]) == key}
        cells = [_cell(by_provider.get(p)) for p in providers]
        for p in fused:
            r = by_provider.get(p)
            ok = r is not None and r["status"] == "ok"
            cells.append(f"{r['x_floor']:.2f}" if ok else "-")
            cells.append(_mib(r) if ok else "-")
        cells.append(_mib(by_provider.get("torch")))
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def section(results_dir: Path) -> str:
    runs = newest_per_device(results_dir)
    if not runs:
        return "No results committed yet."
    return "\n\n".join(render(path, data) for path, data in runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args()
    text = args.readme.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    updated = f"{head}{START}\n{section(args.results)}\n{END}{tail}"
    if args.check:
        return 0 if updated == text else 1
    args.readme.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
