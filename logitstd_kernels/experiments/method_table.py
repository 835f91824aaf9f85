"""The tables of ``distill --method``: the terminal table and the Markdown table of the docs, with the
paper's numbers for the same methods next to ours and a verdict per method.

The verdict is a rule on the paired differences (standardized minus plain, one per seed), not a
significance test: "helped" when their mean is above twice its standard error
(``std / sqrt(seeds)``), "hurt" when below minus twice, else "no clear difference".
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from .results import format_table

__all__ = ["PaperResult", "PAPER_RESULTS", "METHOD_LABELS", "verdict", "verdict_sentence", "format_methods",
           "markdown_table"]

METHOD_LABELS = {"ce": "CE only", "kd": "KD", "dkd": "DKD", "mlkd": "MLKD", "ctkd": "CTKD"}


class PaperResult(NamedTuple):
    """Top-1 accuracy (%) of a method without and with logit standardization in the paper."""

    dataset: str
    pair: str
    plain: float
    standardized: float


# KD, DKD, MLKD: the CIFAR-100 table of teachers and students of distinct structures in the official
# repository's README (sunshangquan/logit-standardization-KD); CTKD: the paper's ImageNet numbers for
# KD + CTKD, whose teacher-student pair that README does not give.
PAPER_RESULTS = {
    "kd": PaperResult("CIFAR-100", "ResNet32x4 → ShuffleNet-V2", 74.45, 75.56),
    "dkd": PaperResult("CIFAR-100", "ResNet32x4 → ShuffleNet-V2", 77.07, 77.37),
    "mlkd": PaperResult("CIFAR-100", "ResNet32x4 → WRN-16-2", 76.52, 77.53),
    "ctkd": PaperResult("ImageNet", "pair not checked here", 71.16, 72.92),
}


def verdict(comparison: dict[str, Any]) -> str:
    """"helped", "hurt" or "no clear difference" (module docstring) for one method's comparison."""
    n = comparison["seeds"]
    error = comparison["delta_std"] / math.sqrt(n) if n > 1 else math.inf
    if comparison["delta_mean"] > 2 * error:
        return "helped"
    if comparison["delta_mean"] < -2 * error:
        return "hurt"
    return "no clear difference"


def _pct(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _by_key(results: dict[str, Any]) -> dict[tuple[str, bool], dict[str, Any]]:
    return {(r["method"], r["standardize"]): r for r in results["rows"]}


def _method_cells(results: dict[str, Any]) -> list[list[str]]:
    rows = _by_key(results)
    cells = []
    for c in results["comparisons"]:
        plain, std = rows[(c["method"], False)], rows[(c["method"], True)]
        paper = PAPER_RESULTS.get(c["method"])
        cells.append([METHOD_LABELS[c["method"]], _pct(plain["mean"], plain["std"]), _pct(std["mean"], std["std"]),
                      f"{100 * c['delta_mean']:+.2f} ± {100 * c['delta_std']:.2f}",
                      f"{c['seeds_better']}/{c['seeds']}", verdict(c),
                      f"{paper.plain:.2f} → {paper.standardized:.2f} ({paper.dataset}, {paper.pair})" if paper else "-"])
    return cells


_HEADERS = ["method", "plain", "standardized", "paired difference", "seeds better", "standardization here",
            "the paper (plain → standardized)"]


def _summary(results: dict[str, Any]) -> str:
    cfg, meta = results["config"], results["metadata"]
    ce = _by_key(results)[("ce", False)]
    shape = lambda hidden: "-".join(str(s) for s in (64, *hidden, 10))  # noqa: E731
    return (f"digits ({results['train_size']} train / {results['test_size']} test), teacher MLP "
            f"{shape(cfg['teacher_hidden'])} ({results['teacher_parameters']} weights, "
            f"{100 * results['teacher_accuracy']:.2f}% test accuracy), student MLP {shape(cfg['student_hidden'])} "
            f"({results['student_parameters']} weights, CE only: {_pct(ce['mean'], ce['std'])}%), "
            f"{cfg['student_epochs']} epochs, {len(cfg['seeds'])} seeds; test accuracy in %, mean ± sample std over "
            f"seeds; paired difference: standardized minus plain, same seed; {meta['device']}, torch "
            f"{meta['torch']}, logitstd_kernels {meta['logitstd_kernels']} ({meta.get('git_commit') or 'no git'}), "
            f"{meta['date']}, {results['wall_seconds']:.0f} s wall, {results['cpu_seconds']:.0f} s CPU on "
            f"{results['threads']} thread(s), load average {meta.get('load_average_1m', '?')} at the start")


def format_methods(results: dict[str, Any]) -> str:
    """The table that ``python -m logitstd_kernels distill --method ...`` prints."""
    return _summary(results) + "\n" + format_table(_HEADERS, _method_cells(results))


def verdict_sentence(results: dict[str, Any]) -> str:
    """"Here logit standardization helped KD and DKD and hurt MLKD." from the verdicts of ``results``."""
    groups: dict[str, list[str]] = {}
    for c in results["comparisons"]:
        groups.setdefault(verdict(c), []).append(METHOD_LABELS[c["method"]])
    join = lambda names: names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]  # noqa: E731
    parts = [f"{verb} {join(groups[key])}" for key, verb in
             (("helped", "helped"), ("hurt", "hurt"), ("no clear difference", "made no clear difference to"))
             if key in groups]
    return f"Here logit standardization {join(parts)}."


def markdown_table(results: dict[str, Any], source: str) -> str:
    """The docs' table of one results file (``source``: its path in the repository), with its caption."""
    lines = ["| " + " | ".join(_HEADERS) + " |", "|---|" + "---:|" * 4 + "---|---|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in _method_cells(results)]
    command = results["metadata"]["command"]
    return "\n".join(lines + ["", f"{_summary(results)}; `{command}`; from `{source}`. \"standardization here\": "
                              "helped / hurt when the mean paired difference is beyond twice its standard error, "
                              "else no clear difference.", "", f"**{verdict_sentence(results)}**"])
