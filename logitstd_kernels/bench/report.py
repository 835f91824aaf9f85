"""Where the numbers go: run metadata, the terminal table, CSV, JSON and the plot."""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

FIELDS = ("sweep", "rows", "vocab", "dtype", "mode", "provider", "status", "median_ms", "p20_ms", "p80_ms",
          "gbps", "x_floor", "peak_mem_mb", "speedup_vs_torch", "sent_bytes_per_rank", "collectives")


@dataclass
class Result:
    sweep: str
    rows: int
    vocab: int
    dtype: str
    mode: str
    provider: str
    status: str  # "ok", "failed: <why>", "unavailable: <why>" or "skipped: time budget"
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    gbps: Optional[float] = None
    x_floor: Optional[float] = None
    peak_mem_mb: Optional[float] = None
    speedup_vs_torch: Optional[float] = None
    sent_bytes_per_rank: Optional[int] = None  # distributed runs: bytes one rank hands to the collectives
    collectives: Optional[int] = None  # distributed runs: collective calls per step


@dataclass
class Run:
    metadata: dict
    results: list[Result] = field(default_factory=list)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read(), re.M)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()} ({torch.get_num_threads()} threads)"


def git_commit() -> Optional[str]:
    """``$LOGITSTD_GIT_COMMIT`` when set (a copy of the tree whose ``.git`` may not match it, e.g. on a
    lent GPU machine), else the checkout's commit (with "+dirty" for uncommitted changes)."""
    import subprocess

    if os.environ.get("LOGITSTD_GIT_COMMIT"):
        return os.environ["LOGITSTD_GIT_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def run_metadata(device: torch.device, argv: list[str]) -> dict:
    """What every results file records: the device, the date, the command, the versions and the commit."""
    from .. import __version__

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m logitstd_kernels", *argv]),
        "torch": torch.__version__,
        "triton": triton_version,
        "logitstd_kernels": __version__,
        "git_commit": git_commit(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
    }


def metadata(device: torch.device, argv: list[str], copy_gbps: float, options: dict) -> dict:
    """:func:`run_metadata` of a timing run, with the copy bandwidth and what the floor and the peak mean."""
    return {
        **run_metadata(device, argv),
        "copy_bandwidth_gbps": round(copy_gbps, 1),
        "floor": "bytes that must move / measured copy bandwidth; forward reads student and teacher, "
                 "backward writes the student gradient, full does both, no_grad (no input requires grad) reads "
                 "student and teacher. The fused kernels write the gradient during the forward, so their "
                 "forward/backward split differs from eager's: compare full",
        "peak_memory": ("torch.cuda.max_memory_allocated above the inputs" if device.type == "cuda" else
                        "process peak resident set (VmHWM) above the resident set before the step"),
        **options,
    }


# Modes whose times are comparable across providers. Not "backward": the fused kernels compute the
# gradient in the forward, and their backward only applies the incoming gradient (nothing at all for
# a scalar loss's gradient of 1), so eager's backward time over theirs is no speedup of anything.
SPEEDUP_MODES = ("forward", "full", "no_grad")
BACKWARD_NOTE = ("no speedups: the fused kernels compute the gradient during the forward and their backward "
                 "only applies the incoming gradient, so their backward times are not comparable to eager's; "
                 "compare mode=full")


def fill_speedups(results: list[Result]) -> None:
    """``speedup_vs_torch`` (eager's median over the provider's, eager of the same divergence: the
    ``torch@divergence`` provider) of every timed result of a mode in ``SPEEDUP_MODES``; None in the
    backward mode."""
    def divergence(provider: str) -> str:
        return provider.partition("@")[2]

    baseline = {(r.rows, r.vocab, r.dtype, r.mode, divergence(r.provider)): r.median_ms for r in results
                if r.provider.partition("@")[0] == "torch" and r.status == "ok"}
    for r in results:
        base = baseline.get((r.rows, r.vocab, r.dtype, r.mode, divergence(r.provider)))
        r.speedup_vs_torch = base / r.median_ms if (r.status == "ok" and base and r.mode in SPEEDUP_MODES) else None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]


def new_stem(out_dir: Path, meta: dict) -> Path:
    """``out_dir/<device>-<date>`` (``-2``, ``-3``, ... after a name an earlier run took), the folder made."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = meta["date"].replace(":", "").replace("-", "").replace("+0000", "Z")
    stem = out_dir / f"{_slug(meta['device'].split('(')[0])}-{stamp}"
    suffix = 1
    while stem.with_suffix(".json").exists():
        suffix += 1
        stem = out_dir / f"{_slug(meta['device'].split('(')[0])}-{stamp}-{suffix}"
    return stem


def write_files(run: Run, out_dir: Path, previous: Optional[dict[str, Path]] = None,
                with_plot: bool = True) -> dict[str, Path]:
    """CSV and JSON (and a PNG when matplotlib is installed and ``with_plot``) named after the device
    and the date.

    ``previous``: the paths of an earlier call of the same run, rewritten in place (a PNG written
    before stays in the paths); a new run picks a name no earlier run has.
    """
    stem = previous["json"].with_suffix("") if previous else new_stem(out_dir, run.metadata)
    paths = {"json": stem.with_suffix(".json"), "csv": stem.with_suffix(".csv")}
    with open(paths["json"], "w") as f:
        json.dump({"metadata": run.metadata, "results": [asdict(r) for r in run.results]}, f, indent=1)
    with open(paths["csv"], "w", newline="") as f:
        f.write("".join(f"# {k}: {v}\n" for k, v in run.metadata.items()))
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(asdict(r) for r in run.results)
    png = stem.with_suffix(".png")
    if (with_plot and plot(run, png)) or (previous and "png" in previous):
        paths["png"] = png
    return paths


def plot(run: Run, path: Path) -> bool:
    """Time and GB/s against V (full mode, V sweep), one line per provider, one row per dtype."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    chosen = [r for r in run.results if r.sweep == "vocab" and r.mode == "full" and r.status == "ok"]
    dtypes = sorted({r.dtype for r in chosen})
    if not dtypes:
        return False
    fig, axes = plt.subplots(len(dtypes), 2, figsize=(11, 4 * len(dtypes)), squeeze=False)
    for row, dtype in enumerate(dtypes):
        for provider in sorted({r.provider for r in chosen}):
            points = sorted((r.vocab, r.median_ms, r.gbps) for r in chosen if r.dtype == dtype and r.provider == provider)
            if points:
                vocab, ms, gbps = zip(*points)
                axes[row][0].plot(vocab, ms, marker="o", label=provider)
                axes[row][1].plot(vocab, gbps, marker="o", label=provider)
        rows = next(r.rows for r in chosen if r.dtype == dtype)
        for col, label in enumerate(("time (ms, median)", "achieved GB/s (read x, y; write dx)")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log") if col == 0 else None
            ax.set_xlabel(f"classes V ({rows} rows, {dtype}, forward+backward)")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        if run.metadata.get("copy_bandwidth_gbps"):
            axes[row][1].axhline(run.metadata["copy_bandwidth_gbps"], color="gray", ls="--", lw=1)
    fig.suptitle(f"{run.metadata['device']} | torch {run.metadata['torch']} | {run.metadata['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: list[Result], mode: str = "full") -> str:
    """A terminal table of one mode: a line per case, ms (speedup vs eager, x floor) per provider;
    the backward mode shows ms and x floor only (see ``SPEEDUP_MODES``)."""
    chosen = [r for r in results if r.mode == mode]
    providers = list(dict.fromkeys(r.provider for r in chosen if not r.status.startswith("unavailable")))
    header = f"{'rows':>6} {'V':>7} {'dtype':>9} | " + " | ".join(f"{p:>22}" for p in providers)
    if mode in SPEEDUP_MODES:
        title = f"mode={mode}: median ms (speedup vs torch eager, x memory floor)"
    else:
        title = f"mode={mode}: median ms (x memory floor); {BACKWARD_NOTE}"
    lines = [title, header, "-" * len(header)]
    for key in dict.fromkeys((r.rows, r.vocab, r.dtype) for r in chosen):
        cells = []
        for p in providers:
            r = next((r for r in chosen if (r.rows, r.vocab, r.dtype) == key and r.provider == p), None)
            if r is None or r.status != "ok":
                cells.append(f"{(r.status.split(':')[0] if r else '-'):>22}")
            elif mode in SPEEDUP_MODES:
                cells.append(f"{r.median_ms:>8.3f} ({_fmt(r.speedup_vs_torch, '5.1f')}x,{_fmt(r.x_floor, '5.1f')}f)")
            else:
                cells.append(f"{r.median_ms:>8.3f} ({_fmt(r.x_floor, '5.1f')}f)".rjust(22))
        lines.append(f"{key[0]:>6} {key[1]:>7} {key[2]:>9} | " + " | ".join(cells))
    return "\n".join(lines)


def progress(index: int, total: int, text: str) -> None:
    print(f"[{index:>3}/{total}] {text}", flush=True)
