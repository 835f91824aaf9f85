"""``distill --method``: the paper's logit-based methods on digits, each plain and with logit standardization.

A teacher MLP (64-256-256-10, about 85k weights) is trained once with cross-entropy; a much smaller
student (64-16-10, 1210 weights) is then trained per seed with CE alone and with every method
of :mod:`.kd_methods`, plain and standardized, from the same initialization and batch order for a
given seed. The result is the test accuracy per (method, standardization, seed) and, per method,
the paired difference standardized minus plain over the seeds.
"""

from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..bench.report import run_metadata
from .deps import progress
from .digits import NUM_CLASSES, NUM_FEATURES, Digits, load_digits
from .kd_methods import METHOD_NAMES, StudentBatch, build_objective, method_settings
from .mlp import MLP, make_mlp
from .results import mean_std, write_json
from .training import accuracy, shuffled_batches, train_epochs, train_teacher

__all__ = ["MethodsConfig", "train_method_student", "run_methods", "write_methods_results", "count_parameters",
           "CSV_FIELDS"]

CSV_FIELDS = ("method", "standardize", "seed", "test_accuracy")


@dataclass(frozen=True)
class MethodsConfig:
    """Everything that determines a ``distill --method`` run (the defaults are the command's defaults)."""

    methods: tuple[str, ...] = METHOD_NAMES
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    teacher_hidden: tuple[int, ...] = (256, 256)
    student_hidden: tuple[int, ...] = (16,)
    teacher_epochs: int = 40
    student_epochs: int = 80
    batch_size: int = 64
    lr: float = 1e-3
    test_fraction: float = 0.4
    split_seed: int = 0
    teacher_seed: int = 0

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHOD_NAMES]
        if unknown or not self.methods:
            raise ValueError(f"methods must be one or more of {METHOD_NAMES}, got {self.methods!r}")
        if not self.seeds or self.student_epochs < 1 or self.teacher_epochs < 1:
            raise ValueError("a run needs at least one seed, one student epoch and one teacher epoch")


class _Student(nn.Module):
    """The student and the modules its objective trains with it (one optimizer for all); calls the student."""

    def __init__(self, student: MLP, extras: list[nn.Module]) -> None:
        super().__init__()
        self.student = student
        self.extras = nn.ModuleList(extras)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train_method_student(data: Digits, teacher: nn.Module, teacher_logits: torch.Tensor, *, method: str,
                         standardize: bool, config: MethodsConfig, seed: int) -> MLP:
    """A student trained with ``method`` (``"ce"``: cross-entropy alone); its initialization, batch
    order and augmentations depend only on ``seed``."""
    order = torch.Generator().manual_seed(seed)
    if method == "ce":
        objective, extras = (lambda m, b: F.cross_entropy(m(b.x), b.y)), []
    else:
        objective, extras = build_objective(method_settings(method, standardize), teacher=teacher,
                                            epochs=config.student_epochs,
                                            generator=torch.Generator().manual_seed(1_000_003 * (seed + 1)))
    model = _Student(make_mlp((NUM_FEATURES, *config.student_hidden, NUM_CLASSES), seed), extras)
    epoch = 1

    def loss(m: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        return objective(m, StudentBatch(data.x_train[idx], data.y_train[idx], teacher_logits[idx], epoch))

    batches = lambda: shuffled_batches(len(data.y_train), config.batch_size, order)  # noqa: E731
    for done in train_epochs(model, config.student_epochs, batches, loss, lr=config.lr):
        epoch = done + 1
    return model.student


def _runs(config: MethodsConfig) -> list[tuple[str, bool]]:
    return [("ce", False)] + [(m, s) for m in config.methods for s in (False, True)]


def _comparison(method: str, runs: dict[tuple[str, bool], list[float]]) -> dict[str, Any]:
    plain, standardized = runs[(method, False)], runs[(method, True)]
    delta = [b - a for a, b in zip(plain, standardized)]
    mean, std = mean_std(delta)
    return {"method": method, "delta_mean": mean, "delta_std": std, "seeds_better": sum(d > 0 for d in delta),
            "seeds_worse": sum(d < 0 for d in delta), "seeds": len(delta)}


def run_methods(config: MethodsConfig = MethodsConfig(), *, show_progress: bool = True,
                argv: Sequence[str] = ()) -> dict[str, Any]:
    """Train the teacher once and every (method, standardization, seed) student; the results as a dict.

    ``rows``: per method and standardization, its settings, the test accuracy of each seed, their
    mean and sample standard deviation. ``comparisons``: per method, the mean and standard deviation
    over seeds of the paired difference (standardized minus plain) and how many seeds it was > 0 / < 0.
    ``metadata``: device, date, versions, commit and the command (``argv``, after ``python -m logitstd_kernels``).
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    metadata = run_metadata(torch.device("cpu"), list(argv))  # the commit and date the run starts from
    data = load_digits(config.test_fraction, config.split_seed)
    teacher = train_teacher(make_mlp((NUM_FEATURES, *config.teacher_hidden, NUM_CLASSES), config.teacher_seed), data,
                            epochs=config.teacher_epochs, batch_size=config.batch_size, lr=config.lr,
                            seed=config.teacher_seed)
    teacher.requires_grad_(False)
    with torch.inference_mode():
        teacher_logits = teacher(data.x_train)
    runs: dict[tuple[str, bool], list[float]] = {key: [] for key in _runs(config)}
    jobs = [(seed, key) for seed in config.seeds for key in runs]
    for seed, (method, standardize) in progress(jobs, total=len(jobs), desc="training students", enable=show_progress):
        student = train_method_student(data, teacher, teacher_logits, method=method, standardize=standardize,
                                       config=config, seed=seed)
        runs[(method, standardize)].append(accuracy(student, data.x_test, data.y_test))
    rows = []
    for (method, standardize), accuracies in runs.items():
        mean, std = mean_std(accuracies)
        settings = None if method == "ce" else asdict(method_settings(method, standardize))
        rows.append({"method": method, "standardize": standardize, "settings": settings, "accuracies": accuracies,
                     "mean": mean, "std": std})
    return {
        "metadata": metadata, "config": asdict(config),
        "teacher_accuracy": accuracy(teacher, data.x_test, data.y_test),
        "teacher_parameters": count_parameters(teacher),
        "student_parameters": count_parameters(make_mlp((NUM_FEATURES, *config.student_hidden, NUM_CLASSES), 0)),
        "train_size": len(data.y_train), "test_size": len(data.y_test), "rows": rows,
        "comparisons": [_comparison(m, runs) for m in config.methods],
        "wall_seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start,
        "threads": torch.get_num_threads(),
    }


def write_methods_results(results: dict[str, Any], out_dir: Path, stem: str = "distill_methods") -> tuple[Path, Path]:
    """``<stem>.json`` (everything) and ``<stem>.csv`` (one line per student, after ``# key: value``
    lines of the run's metadata) in ``out_dir``; returns both paths."""
    out_dir = Path(out_dir)
    json_path = write_json(out_dir / f"{stem}.json", results)
    csv_path = out_dir / f"{stem}.csv"
    with csv_path.open("w", newline="") as f:
        for key, value in results["metadata"].items():
            f.write(f"# {key}: {value}\n")
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for row in results["rows"]:
            for seed, acc in zip(results["config"]["seeds"], row["accuracies"]):
                writer.writerow([row["method"], int(row["standardize"]), seed, f"{acc:.6f}"])
    return json_path, csv_path
