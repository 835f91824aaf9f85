"""Writing results: JSON files, plain-text tables and matplotlib figures (headless)."""

from __future__ import annotations

import argparse

import json
import math
from pathlib import Path
from typing import Any, Sequence

from .deps import require

__all__ = ["write_json", "format_table", "pyplot", "save_figure", "mean_std"]


def write_json(path: Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON to ``path`` (creating its folder); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A left-aligned first column and right-aligned other columns, separated by two spaces."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for k, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of an empty sequence")
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def pyplot() -> Any:
    """``matplotlib.pyplot`` with the non-interactive Agg backend (works without a display)."""
    matplotlib = require("matplotlib", "plotting")
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", "plotting")


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out ``fig``, save it as ``path`` (creating its folder), close it; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def add_run_options(parser: "argparse.ArgumentParser", name: str) -> None:
    """The options every training experiment shares: threads, output folder, plot and progress switches."""
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: fastest for small MLPs)")
    parser.add_argument("--out-dir", type=Path, default=Path("logitstd_results"),
                        help=f"where {name}.json and {name}.png go (default ./logitstd_results)")
    parser.add_argument("--no-plot", action="store_true", help="skip the plot")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
