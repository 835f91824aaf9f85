"""The paper's toy cases (seed 000): plain KD's loss prefers the student with the wrong prediction.

Figure 2 of the paper: teacher logits ``[1, 4, 3, 1]``; student 1 ``[2, 2.8, 3, 1]`` is close in
magnitude but ranks "Bird" first; student 2 ``[0.1, 0.4, 0.3, 0.1]`` is far in magnitude but ranks
the classes like the teacher. Plain KD gives student 1 the lower loss; after z-scoring (logit
standardization) student 2 has the lower loss. The 10-class case of seed 000 does the same with a
student that swaps the teacher's top two logits and a student that is the teacher divided by 5.

Each loss is ``T**2 * KL(softmax(y / T) || softmax(x / T))`` from the package's op (plain:
``kd_loss``; standardized: ``logitstd_kd_loss``). At the seed's ``T = 1`` it is the seed's KL.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..functional import logitstd_kd_loss, zscore
from .deps import check_extras, missing_extra
from .results import pyplot, save_figure, write_json

__all__ = ["ToyCase", "FIGURE2", "TEN_CLASS", "CASES", "evaluate_case", "format_case", "plot_cases",
           "add_arguments", "run"]


@dataclass(frozen=True)
class ToyCase:
    """One teacher and two students (one row of logits each) and the names of the classes."""

    name: str
    title: str
    classes: tuple[str, ...]
    teacher: tuple[float, ...]
    student1: tuple[float, ...]
    student2: tuple[float, ...]


FIGURE2 = ToyCase(
    name="figure2", title="the paper's Figure 2 (4 classes)", classes=("Cat", "Dog", "Bird", "Frog"),
    teacher=(1.0, 4.0, 3.0, 1.0), student1=(2.0, 2.8, 3.0, 1.0), student2=(0.1, 0.4, 0.3, 0.1),
)
_TEACHER10 = (1.0, 2.0, 8.0, 3.0, 7.5, 1.5, -2.0, 0.5, -1.0, 2.5)
TEN_CLASS = ToyCase(
    name="ten-class", title="seed 000's 10-class case (student 1 swaps the top two, student 2 = teacher / 5)",
    classes=tuple(f"class {i}" for i in range(10)), teacher=_TEACHER10,
    student1=(1.0, 2.0, 7.5, 3.0, 8.0, 1.5, -2.0, 0.5, -1.0, 2.5), student2=tuple(v / 5.0 for v in _TEACHER10),
)
CASES = {case.name: case for case in (FIGURE2, TEN_CLASS)}


def evaluate_case(case: ToyCase, *, temperature: float = 1.0, correction: int = 1, eps: float = 1e-8,
                  backend: str = "auto") -> dict[str, Any]:
    """Predictions and the plain and standardized KD losses of both students, and which one each prefers.

    Equivalent eager code for one student row ``x`` and the teacher row ``y``::

        plain = F.kl_div(F.log_softmax(x / T, -1), F.softmax(y / T, -1), reduction="sum") * T**2
        z = lambda v: (v - v.mean()) / (v.std(correction=correction) + eps)
        standardized = F.kl_div(F.log_softmax(z(x) / T, -1), F.softmax(z(y) / T, -1), reduction="sum") * T**2

    ``"prefers"`` names the student with the strictly lower loss (``"tie"`` if equal).
    """
    teacher = torch.tensor([case.teacher], dtype=torch.float32)
    students = torch.tensor([case.student1, case.student2], dtype=torch.float32)
    losses: dict[str, list[float]] = {}
    for key, standardize in (("plain", False), ("standardized", True)):
        rows = logitstd_kd_loss(students, teacher.expand_as(students), temperature=temperature,
                                standardize=standardize, correction=correction, eps=eps, reduction="none",
                                backend=backend)
        losses[key] = [float(v) for v in rows]
    teacher_pred = int(teacher.argmax())
    preds = [int(p) for p in students.argmax(dim=-1)]

    def prefers(values: list[float]) -> str:
        return "tie" if values[0] == values[1] else ("student 1" if values[0] < values[1] else "student 2")

    return {
        "case": case.name, "title": case.title, "classes": list(case.classes), "temperature": temperature,
        "correction": correction, "eps": eps,
        "teacher": {"logits": list(case.teacher), "prediction": case.classes[teacher_pred]},
        "students": [
            {"name": f"student {i + 1}", "logits": list(logits), "prediction": case.classes[pred],
             "agrees_with_teacher": pred == teacher_pred, "plain_kd_loss": losses["plain"][i],
             "standardized_kd_loss": losses["standardized"][i]}
            for i, (logits, pred) in enumerate(zip((case.student1, case.student2), preds))
        ],
        "plain_kd_prefers": prefers(losses["plain"]),
        "standardized_kd_prefers": prefers(losses["standardized"]),
    }


def _verdict(result: dict[str, Any], key: str, label: str) -> str:
    choice = result[f"{key}_prefers"]
    if choice == "tie":
        return f"{label}: a tie"
    student = result["students"][int(choice[-1]) - 1]
    relation = "like" if student["agrees_with_teacher"] else "unlike"
    return (f"{label} prefers {choice} (lower loss), which predicts {student['prediction']}, "
            f"{relation} the teacher")


def format_case(result: dict[str, Any]) -> str:
    """The human-readable block that ``python -m logitstd_kernels toy`` prints for one case."""
    def fmt(values: list[float]) -> str:
        return "[" + ", ".join(f"{v:g}" for v in values) + "]"

    header = (f"== {result['title']}: T={result['temperature']:g}, standardization: (x - mean) / "
              f"(std(correction={result['correction']}) + {result['eps']:g}) ==")
    rows = [("", "logits", "prediction", "plain KD", "standardized KD"),
            ("teacher", fmt(result["teacher"]["logits"]), result["teacher"]["prediction"], "", "")]
    for s in result["students"]:
        # A KL is >= 0; clamp float rounding residue (e.g. -1e-8) for display, as the seed notebook does.
        rows.append((s["name"], fmt(s["logits"]), s["prediction"], f"{max(s['plain_kd_loss'], 0.0):.4f}",
                     f"{max(s['standardized_kd_loss'], 0.0):.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [header]
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    lines.append(_verdict(result, "plain_kd", "plain KD"))
    lines.append(_verdict(result, "standardized_kd", "standardized KD"))
    return "\n".join(lines)


def plot_cases(cases: list[ToyCase], path: Path, *, temperature: float, correction: int, eps: float) -> Path:
    """Bar charts of ``softmax(x / T)`` (top) and ``softmax(z(x) / T)`` (bottom) per case; saved to ``path``."""
    plt = pyplot()
    fig, axes = plt.subplots(2, len(cases), figsize=(5.5 * len(cases), 6.5), squeeze=False)
    for col, case in enumerate(cases):
        logits = torch.tensor([case.teacher, case.student1, case.student2], dtype=torch.float32)
        for row, (name, values) in enumerate((("plain", logits / temperature),
                                              ("standardized", zscore(logits, temperature, correction=correction,
                                                                      eps=eps)))):
            probs = torch.softmax(values, dim=-1)
            ax = axes[row][col]
            width = 0.27
            positions = torch.arange(len(case.classes), dtype=torch.float32)
            for k, label in enumerate(("teacher", "student 1", "student 2")):
                ax.bar((positions + (k - 1) * width).tolist(), probs[k].tolist(), width, label=label)
            ax.set_xticks(positions.tolist())
            ax.set_xticklabels([c.replace("class ", "") for c in case.classes])
            ax.set_title(f"{case.name}: softmax of {name} logits (T={temperature:g})", fontsize=10)
            ax.set_ylabel("probability")
            ax.legend(fontsize=8)
    return save_figure(fig, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m logitstd_kernels toy``."""
    parser.add_argument("--case", choices=["all", *CASES], default="all", help="which toy case (default: all)")
    parser.add_argument("--temperature", "-T", type=float, default=1.0,
                        help="temperature of both softmaxes; the loss is T^2 * KL (default 1, as in the seed)")
    parser.add_argument("--correction", type=int, choices=[0, 1], default=1,
                        help="std convention: 1 = torch.std, as in the seed and the official code; "
                             "0 = the paper's Algorithm 1 (default 1)")
    parser.add_argument("--eps", type=float, default=1e-8,
                        help="added to the std (default 1e-8, as in the seed; the official code uses 1e-7, "
                             "Algorithm 1 uses 0)")
    parser.add_argument("--backend", default="auto", help="backend of the loss op (default auto)")
    parser.add_argument("--out-dir", type=Path, default=Path("logitstd_results"),
                        help="where toy.json and toy.png go (default ./logitstd_results)")
    parser.add_argument("--no-plot", action="store_true", help="skip the plot")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="write the results as JSON here instead of <out-dir>/toy.json")
    parser.add_argument("--plot", type=Path, default=None, metavar="PATH",
                        help="draw the probabilities before and after standardization here instead of "
                             "<out-dir>/toy.png (needs matplotlib)")


def run(args: argparse.Namespace) -> int:
    """Print each case's predictions, losses and verdicts; write the JSON and the plot.

    Writes ``<out-dir>/toy.json`` and ``<out-dir>/toy.png`` (``--json``/``--plot`` name other paths).
    The plot needs matplotlib: when it is missing, an explicit ``--plot`` is an error (exit status
    2) and the default plot is skipped with a note.
    """
    plot_path = None if args.no_plot else (args.plot or args.out_dir / "toy.png")
    if args.plot is not None and not args.no_plot:
        if not check_extras("toy --plot", "matplotlib"):
            return 2
    elif plot_path is not None:
        skipped = missing_extra("the toy plot", "matplotlib")
        if skipped is not None:
            print(f"note: skipping the plot; {skipped.removeprefix('error: ')}", file=sys.stderr)
            plot_path = None
    cases = list(CASES.values()) if args.case == "all" else [CASES[args.case]]
    results = [evaluate_case(case, temperature=args.temperature, correction=args.correction, eps=args.eps,
                             backend=args.backend) for case in cases]
    print("\n\n".join(format_case(r) for r in results))
    print(f"\nwrote {write_json(args.json or args.out_dir / 'toy.json', results)}")
    if plot_path is not None:
        path = plot_cases(cases, plot_path, temperature=args.temperature, correction=args.correction, eps=args.eps)
        print(f"wrote {path}")
    return 0
