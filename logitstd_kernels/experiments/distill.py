"""Algorithm 2 end to end on scikit-learn's digits: CE only vs CE + KD vs CE + KD with logit standardization.

With ``--method kd dkd ...`` the command runs the paper's logit-based methods instead, each plain and
with logit standardization (:mod:`.distill_methods`).

A teacher MLP (64-256-256-10) is trained with cross-entropy. Students (64-32-10 by default) are then
trained, from the same initialization and batch order for a given seed, with

- ``ce``:    ``CE(z, y)``
- ``kd``:    ``ce_weight * CE(z, y) + kd_weight * T_kd**2 KL`` (Hinton KD, no standardization)
- ``kd+ls``: ``ce_weight * CE(z, y) + kd_weight * T_ls**2 KL`` of the z-scored logits

where ``v`` are the teacher's logits; both objectives (Algorithm 2, line 6) are one call of the
package's fused ``distillation_loss`` (CE and KD in one pass). The defaults follow the official code: ``ce_weight = 0.1``,
plain KD at ``T = 4``, logit standardization at base temperature 2, and the KD weight is swept over
the range of the paper's Table 4 (0.9 to 18). Test accuracy is reported as mean and standard
deviation over the seeds, with the paired difference to the CE-only student of the same seed.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..objective import distillation_loss
from .deps import check_extras, progress
from .digits import NUM_CLASSES, NUM_FEATURES, Digits, load_digits
from .distill_methods import MethodsConfig, run_methods, write_methods_results
from .kd_methods import METHOD_NAMES
from .method_table import format_methods
from .mlp import MLP, make_mlp
from .results import add_run_options, format_table, mean_std, pyplot, save_figure, write_json
from .training import accuracy, fit, set_threads, shuffled_batches, train_teacher

__all__ = ["METHODS", "DistillConfig", "student_loss", "train_student", "run_distill",
           "format_results", "plot_results", "add_arguments", "run"]

METHODS = ("ce", "kd", "kd+ls")


@dataclass(frozen=True)
class DistillConfig:
    """Everything that determines a ``distill`` run (the defaults are the command's defaults)."""

    kd_weights: tuple[float, ...] = (0.9, 3.0, 9.0, 18.0)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    ce_weight: float = 0.1
    kd_temperature: float = 4.0
    ls_temperature: float = 2.0
    teacher_hidden: tuple[int, ...] = (256, 256)
    student_hidden: tuple[int, ...] = (32,)
    teacher_epochs: int = 40
    student_epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-3
    test_fraction: float = 0.4
    split_seed: int = 0
    teacher_seed: int = 0


def student_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor, *, method: str,
                 kd_weight: float, ce_weight: float, temperature: float) -> torch.Tensor:
    """The training objective of one method (Algorithm 2, line 6, for ``"kd+ls"``).

    Equivalent eager code for ``"kd+ls"`` (``z``: student logits, ``v``: teacher logits)::

        Z = lambda x: (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-7) / T
        ce_weight * F.cross_entropy(z, y) + kd_weight * T**2 * F.kl_div(
            F.log_softmax(Z(z), -1), F.softmax(Z(v), -1), reduction="batchmean")

    ``"kd"`` is the same without ``Z`` (logits divided by ``T`` only); ``"ce"`` is ``F.cross_entropy(z, y)``.
    """
    if method == "ce":
        return F.cross_entropy(logits, labels)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return distillation_loss(logits, teacher_logits, labels, ce_weight=ce_weight, kd_weight=kd_weight,
                             temperature=temperature, standardize=method == "kd+ls")


def train_student(data: Digits, teacher_logits: torch.Tensor, *, method: str, kd_weight: float,
                  temperature: float, config: DistillConfig, seed: int) -> MLP:
    """A student trained with ``method``; the initialization and batch order depend only on ``seed``."""
    model = make_mlp((NUM_FEATURES, *config.student_hidden, NUM_CLASSES), seed)
    order = torch.Generator().manual_seed(seed)

    def loss(m: MLP, idx: torch.Tensor) -> torch.Tensor:
        return student_loss(m(data.x_train[idx]), data.y_train[idx], teacher_logits[idx], method=method,
                            kd_weight=kd_weight, ce_weight=config.ce_weight, temperature=temperature)

    fit(model, config.student_epochs, lambda: shuffled_batches(len(data.y_train), config.batch_size, order),
        loss, lr=config.lr)
    return model


@dataclass
class _Row:
    method: str
    kd_weight: Optional[float]
    temperature: Optional[float]
    accuracies: list[float] = field(default_factory=list)
    logit_stds: list[float] = field(default_factory=list)


def _settings(config: DistillConfig) -> list[tuple[str, Optional[float], Optional[float]]]:
    rows: list[tuple[str, Optional[float], Optional[float]]] = [("ce", None, None)]
    for method, temperature in (("kd", config.kd_temperature), ("kd+ls", config.ls_temperature)):
        rows += [(method, weight, temperature) for weight in config.kd_weights]
    return rows


@torch.inference_mode()
def _mean_logit_std(model: MLP, x: torch.Tensor) -> float:
    return float(model(x).std(dim=-1).mean())


def run_distill(config: DistillConfig = DistillConfig(), *, show_progress: bool = True) -> dict[str, Any]:
    """Train the teacher once and every (method, KD weight, seed) student; return the results as a dict.

    ``results["rows"]`` holds, per method and weight, the test accuracy of each seed, its mean and
    standard deviation, the mean paired difference to the CE-only student, and the students' mean
    per-sample logit standard deviation on the test set.
    """
    start = time.perf_counter()
    data = load_digits(config.test_fraction, config.split_seed)
    teacher = train_teacher(make_mlp((NUM_FEATURES, *config.teacher_hidden, NUM_CLASSES), config.teacher_seed), data,
                            epochs=config.teacher_epochs, batch_size=config.batch_size, lr=config.lr,
                            seed=config.teacher_seed)
    with torch.inference_mode():
        teacher_logits = teacher(data.x_train)
    teacher_acc = accuracy(teacher, data.x_test, data.y_test)
    settings = _settings(config)
    rows = [_Row(method, weight, temperature) for method, weight, temperature in settings]
    jobs = [(seed, row) for seed in config.seeds for row in rows]
    for seed, row in progress(jobs, total=len(jobs), desc="training students", enable=show_progress):
        student = train_student(data, teacher_logits, method=row.method, kd_weight=row.kd_weight or 0.0,
                                temperature=row.temperature or 1.0, config=config, seed=seed)
        row.accuracies.append(accuracy(student, data.x_test, data.y_test))
        row.logit_stds.append(_mean_logit_std(student, data.x_test))
    baseline = rows[0].accuracies
    summary = []
    for row in rows:
        mean, std = mean_std(row.accuracies)
        delta, delta_std = mean_std([a - b for a, b in zip(row.accuracies, baseline)])
        summary.append({**asdict(row), "mean": mean, "std": std, "min": min(row.accuracies),
                        "max": max(row.accuracies), "delta_vs_ce": delta, "delta_vs_ce_std": delta_std,
                        "mean_logit_std": mean_std(row.logit_stds)[0]})
    return {
        "config": asdict(config), "teacher_accuracy": teacher_acc,
        "teacher_mean_logit_std": _mean_logit_std(teacher, data.x_test),
        "train_size": len(data.y_train), "test_size": len(data.y_test), "rows": summary,
        "wall_seconds": time.perf_counter() - start, "threads": torch.get_num_threads(),
    }


def _label(row: dict[str, Any]) -> str:
    if row["method"] == "ce":
        return "CE only"
    name = "CE + KD" if row["method"] == "kd" else "CE + KD + LS"
    return f"{name} (T={row['temperature']:g}, w={row['kd_weight']:g})"


def format_results(results: dict[str, Any]) -> str:
    """The table that ``python -m logitstd_kernels distill`` prints."""
    seeds = len(results["config"]["seeds"])
    table = format_table(
        ["student", "test acc mean", "std", "min", "max", "vs CE (paired)", "logit std"],
        [[_label(r), f"{100 * r['mean']:.2f}%", f"{100 * r['std']:.2f}", f"{100 * r['min']:.2f}",
          f"{100 * r['max']:.2f}", f"{100 * r['delta_vs_ce']:+.2f} +- {100 * r['delta_vs_ce_std']:.2f}",
          f"{r['mean_logit_std']:.2f}"] for r in results["rows"]])
    best = max(results["rows"], key=lambda r: r["mean"])
    return (f"teacher test accuracy {100 * results['teacher_accuracy']:.2f}% (logit std "
            f"{results['teacher_mean_logit_std']:.2f}); {results['train_size']} train / {results['test_size']} "
            f"test digits; {seeds} seeds; accuracies in %, 'vs CE' = mean +- std over seeds of the difference "
            f"to the CE-only student of the same seed\n{table}\n"
            f"best mean: {_label(best)} at {100 * best['mean']:.2f}%")


def plot_results(results: dict[str, Any], path: Path) -> Path:
    """Test accuracy against the KD weight (mean +- std over seeds) with the CE-only and teacher levels."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = results["rows"]
    ce = rows[0]
    weights = list(results["config"]["kd_weights"])
    ax.axhspan(100 * (ce["mean"] - ce["std"]), 100 * (ce["mean"] + ce["std"]), color="gray", alpha=0.2)
    ax.axhline(100 * ce["mean"], color="gray", label="CE only (mean +- std)")
    ax.axhline(100 * results["teacher_accuracy"], color="black", linestyle="--", label="teacher")
    for method, marker in (("kd", "o"), ("kd+ls", "s")):
        sel = [r for r in rows if r["method"] == method]
        ax.errorbar(weights, [100 * r["mean"] for r in sel], yerr=[100 * r["std"] for r in sel], marker=marker,
                    capsize=4, label=f"{'CE + KD' if method == 'kd' else 'CE + KD + LS'} (T={sel[0]['temperature']:g})")
    ax.set_xscale("log")
    ax.set_xticks(weights)
    ax.set_xticklabels([f"{w:g}" for w in weights])
    ax.set_xlabel("KD loss weight")
    ax.set_ylabel("test accuracy (%)")
    cfg = results["config"]
    shape = "-".join(str(s) for s in (NUM_FEATURES, *cfg["student_hidden"], NUM_CLASSES))
    ax.set_title(f"digits: student MLP {shape}, CE weight {cfg['ce_weight']:g}, {len(cfg['seeds'])} seeds "
                 f"(mean +- std)", fontsize=10)
    low, high = ax.get_ylim()
    ax.set_ylim(low, high + 0.35 * (high - low))  # room for the legend above the curves
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    return save_figure(fig, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m logitstd_kernels distill``: the KD-weight sweep, or with ``--method`` the
    methods table of :mod:`.distill_methods` (``None`` defaults are each mode's own)."""
    d, m = DistillConfig(), MethodsConfig()
    parser.add_argument("--method", nargs="+", choices=METHOD_NAMES, metavar="METHOD",
                        help=f"run these methods ({'|'.join(METHOD_NAMES)}), each plain and with logit "
                             "standardization, instead of the KD-weight sweep; writes distill_methods.json/.csv")
    parser.add_argument("--kd-weights", type=float, nargs="+", default=list(d.kd_weights), metavar="W",
                        help=f"KD loss weights to sweep (default {' '.join(f'{w:g}' for w in d.kd_weights)})")
    parser.add_argument("--seeds", type=int, default=len(d.seeds), help=f"number of seeds (default {len(d.seeds)})")
    parser.add_argument("--ce-weight", type=float, default=d.ce_weight,
                        help=f"CE weight next to a KD loss (default {d.ce_weight:g}; CE-only uses 1)")
    parser.add_argument("--kd-temperature", type=float, default=d.kd_temperature,
                        help=f"temperature of plain KD (default {d.kd_temperature:g})")
    parser.add_argument("--ls-temperature", type=float, default=d.ls_temperature,
                        help=f"base temperature of KD with logit standardization (default {d.ls_temperature:g})")
    parser.add_argument("--student-hidden", type=int, nargs="*", default=None, metavar="H",
                        help=f"hidden layer sizes of the student (default {' '.join(map(str, d.student_hidden))}; "
                             f"with --method {' '.join(map(str, m.student_hidden))})")
    parser.add_argument("--teacher-hidden", type=int, nargs="*", default=list(d.teacher_hidden), metavar="H",
                        help=f"hidden layer sizes of the teacher (default {' '.join(map(str, d.teacher_hidden))})")
    parser.add_argument("--teacher-epochs", type=int, default=d.teacher_epochs, help="(default %(default)s)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"student epochs (default {d.student_epochs}; with --method {m.student_epochs})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="(default %(default)s)")
    parser.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (default %(default)s)")
    add_run_options(parser, "distill")


def _run_methods(args: argparse.Namespace) -> int:
    """``--method``: the methods table; prints it and writes ``distill_methods.json`` and ``.csv``."""
    m = MethodsConfig()
    config = MethodsConfig(
        methods=tuple(dict.fromkeys(args.method)), seeds=tuple(range(args.seeds)),
        teacher_hidden=tuple(args.teacher_hidden),
        student_hidden=tuple(m.student_hidden if args.student_hidden is None else args.student_hidden),
        teacher_epochs=args.teacher_epochs, student_epochs=m.student_epochs if args.epochs is None else args.epochs,
        batch_size=args.batch_size, lr=args.lr)
    results = run_methods(config, show_progress=not args.quiet, argv=getattr(args, "argv", ["distill"]))
    print(format_methods(results))
    for path in write_methods_results(results, args.out_dir):
        print(f"wrote {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the sweep (or, with ``--method``, the methods table), print the table, write the results."""
    needed = ("sklearn",) + (() if args.no_plot or args.method else ("matplotlib",))
    if not check_extras("the distill experiment", *needed):
        return 2
    set_threads(args.threads)
    if args.method:
        return _run_methods(args)
    d = DistillConfig()
    config = DistillConfig(
        kd_weights=tuple(args.kd_weights), seeds=tuple(range(args.seeds)), ce_weight=args.ce_weight,
        kd_temperature=args.kd_temperature, ls_temperature=args.ls_temperature,
        teacher_hidden=tuple(args.teacher_hidden),
        student_hidden=tuple(d.student_hidden if args.student_hidden is None else args.student_hidden),
        teacher_epochs=args.teacher_epochs, student_epochs=d.student_epochs if args.epochs is None else args.epochs,
        batch_size=args.batch_size, lr=args.lr,
    )
    results = run_distill(config, show_progress=not args.quiet)
    print(format_results(results))
    print(f"wall time {results['wall_seconds']:.1f} s on {results['threads']} thread(s)")
    print(f"wrote {write_json(args.out_dir / 'distill.json', results)}")
    if not args.no_plot:
        print(f"wrote {plot_results(results, args.out_dir / 'distill.png')}")
    return 0
