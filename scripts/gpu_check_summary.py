"""The summary of a ``scripts/gpu-check.sh`` run, which the script prints last and writes to
OUTDIR/summary.txt: each step's status (with the tests' counts from their JUnit files), then each
benchmark's results: median ms and "x floor" per provider and mode, beside the floor itself in ms (the
bytes the mode must move over the copy bandwidth the run measured, as ``bench`` records it), and for
the fused lm_head the time and peak memory per provider with what the GEMMs and the accumulator
account for. Also writes OUTDIR/steps.json; exits 1 when a step failed, timed out or ran out of time.

    python scripts/gpu_check_summary.py OUTDIR SECONDS BUDGET
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

BENCH_STEPS = ("bench", "bench-small", "bench-objective", "bench-divergences", "bench-fused-linear", "bench-kd")
MODE_TITLES = {"full": "full (forward + backward: reads x and y, writes the student gradient)",
               "no_grad": "no_grad (no input requires grad: reads x and y)"}


def read_steps(out: Path) -> list[dict]:
    steps = []
    for line in (out / "steps.tsv").read_text().splitlines():
        name, status, rc, secs, log, note = (line.split("\t") + [""] * 6)[:6]
        steps.append({"step": name, "status": status, "rc": None if rc == "-" else int(rc), "seconds": int(secs),
                      "log": Path(log).name, "note": note})
    return steps


def junit(path: Path):
    """(counts, failed test names) of a JUnit file, or None when there is none (or it is cut off)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root)
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    count["passed"] = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    failed = [f"{c.get('classname', '').split('.')[-1]}::{c.get('name')}" for s in suites for c in s.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return count, failed


def add_test_counts(steps: list[dict], out: Path) -> None:
    for step in steps:
        xml = {"gpu-tests": "junit-gpu.xml", "matrix": "junit-matrix.xml"}.get(step["step"])
        result = junit(out / xml) if xml else None
        if result:
            step["tests"], step["failed_tests"] = result
            c = result[0]
            step["note"] = (f"{c['passed']} passed, {c['failures'] + c['errors']} failed, {c['skipped']} skipped"
                            + (f"; {step['note']}" if step["note"] else ""))


def step_lines(steps: list[dict], total: int, budget: int, out: Path) -> list[str]:
    width = max(len(s["step"]) for s in steps)
    lines = [f"== gpu-check summary ({total} s of a {budget} s budget; files in {out}) ==",
             f"{'step':<{width}}  {'status':<8} {'rc':>4} {'s':>5}  log / note"]
    for s in steps:
        rc = "-" if s["rc"] is None else s["rc"]
        lines.append(f"{s['step']:<{width}}  {s['status']:<8} {rc:>4} {s['seconds']:>5}  {s['log']}"
                     + (f"  ({s['note']})" if s["note"] else ""))
        lines += [f"{'':<{width}}    FAILED {name}" for name in s.get("failed_tests", [])[:8]]
    return lines


def _split(provider: str) -> tuple[str, str]:
    base, _, divergence = provider.partition("@")
    return base, divergence or "forward_kl"


def _cell(r: dict | None) -> str:
    if r is None:
        return "-"
    if r["status"] != "ok":
        return r["status"].split(":")[0]
    return f"{r['median_ms']:.3f} ({r['x_floor']:.1f}f)"


def kd_lines(name: str, path: Path, data: dict) -> list[str]:
    """A table per mode: a line per case (and divergence), the floor in ms, ms (x floor) per provider."""
    meta, results = data["metadata"], data["results"]
    shown = [r for r in results if not r["status"].startswith("unavailable")]
    kind = ("objective (0.1 CE + 9 KD)" if meta.get("objective")
            else "standardized KD" if meta.get("standardize", True) else "plain KD")
    lines = [f"{name}: {meta['device']}, copy {meta['copy_bandwidth_gbps']} GB/s, {kind}: median ms (x memory floor); "
             f"{path.name}"]
    providers = list(dict.fromkeys(_split(r["provider"])[0] for r in shown))
    several = len({_split(r["provider"])[1] for r in shown}) > 1
    for mode in [m for m in MODE_TITLES if any(r["mode"] == m for r in shown)]:
        chosen = [r for r in shown if r["mode"] == mode]
        lines += [f"  mode {MODE_TITLES[mode]}",
                  f"  {'rows':>6} {'V':>7} {'dtype':>9} " + (f"{'divergence':>10} " if several else "")
                  + f"{'floor ms':>9}  " + "  ".join(f"{p:>16}" for p in providers)]
        for key in dict.fromkeys((r["rows"], r["vocab"], r["dtype"], _split(r["provider"])[1]) for r in chosen):
            row = {_split(r["provider"])[0]: r for r in chosen if (r["rows"], r["vocab"], r["dtype"],
                                                                    _split(r["provider"])[1]) == key}
            timed = [r for r in row.values() if r["status"] == "ok" and r["x_floor"]]
            floor = f"{timed[0]['median_ms'] / timed[0]['x_floor']:.3f}" if timed else "-"
            lines.append(f"  {key[0]:>6} {key[1]:>7} {key[2]:>9} " + (f"{key[3]:>10} " if several else "")
                         + f"{floor:>9}  " + "  ".join(f"{_cell(row.get(p)):>16}" for p in providers))
    lines += [f"  {r['provider']} rows={r['rows']} V={r['vocab']} {r['dtype']} {r['mode']}: {r['status'][:150]}"
              for r in results if r["status"].startswith("failed")]
    return lines


def fused_linear_lines(name: str, path: Path, data: dict) -> list[str]:
    """Time and peak memory per objective and provider; the GEMMs' share and rate, the accumulators' memory."""
    meta = data["metadata"]
    ok = {(r["sweep"], r["vocab"], r["dtype"], r["provider"]): r for r in data["results"] if r["status"] == "ok"}
    lines = [f"{name}: {meta['device']}, H = {meta['hidden']}, forward + backward: median ms, peak MiB; {path.name}"]
    for r in data["results"]:
        if not r["status"].startswith("unavailable"):
            shown = f"{r['median_ms']:.2f} ms, {r['peak_mem_mb'] or 0:.0f} MiB" if r["status"] == "ok" else r["status"][:150]
            lines.append(f"  {r['sweep']:>18} rows={r['rows']} V={r['vocab']} {r['dtype']} {r['provider']:>16}: {shown}")
    for (sweep, vocab, dtype, provider), r in ok.items():
        fused = ok.get((sweep, vocab, dtype, "fused"))
        if provider == "gemms" and fused:
            tflop = 4 * 2 * r["rows"] * meta["hidden"] * vocab / 1e12
            lines.append(f"  V={vocab} {dtype}: the four GEMMs alone {r['median_ms']:.2f} ms ({tflop:.1f} TFLOP, "
                         f"{tflop / r['median_ms'] * 1e3:.0f} TFLOP/s), {r['median_ms'] / fused['median_ms']:.0%} of "
                         f"the fused step; the loss adds {fused['median_ms'] - r['median_ms']:.2f} ms")
        if provider == "fused_accum_bf16" and fused:
            lines.append(f"  V={vocab} {dtype}: peak {fused['peak_mem_mb'] or 0:.0f} MiB with a float32 weight-gradient "
                         f"accumulator, {r['peak_mem_mb'] or 0:.0f} MiB with bf16 ({fused['median_ms']:.2f} vs "
                         f"{r['median_ms']:.2f} ms)")
    return lines


def bench_lines(out: Path) -> list[str]:
    lines = []
    for name in BENCH_STEPS:
        files = sorted((out / name).glob("*.json"))
        if files:
            data = json.loads(files[-1].read_text())
            render = fused_linear_lines if data["metadata"].get("fused_linear") else kd_lines
            lines += [""] + render(name, files[-1], data)
    return lines


def main() -> int:
    out, total, budget = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    steps = read_steps(out)
    add_test_counts(steps, out)
    lines = step_lines(steps, total, budget, out) + bench_lines(out)
    passed = all(s["status"] in ("ok", "skipped") and not s["note"].startswith("out of time") for s in steps)
    lines += ["", f"gpu-check: {'PASSED' if passed else 'FAILED'}: "
              + ", ".join(f"{s['step']} {s['status']}" for s in steps)]
    print("\n".join(lines))
    (out / "steps.json").write_text(json.dumps({"passed": passed, "seconds": total, "budget": budget, "steps": steps},
                                               indent=1))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
