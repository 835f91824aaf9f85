"""Ghost-logit ("subliminal") distillation (seed 002) on scikit-learn's digits.

A teacher MLP with 10 class outputs and 3 extra "ghost" outputs is trained with cross-entropy on the
10 class outputs only. A student that starts from the teacher's *initial* weights is then trained
only to match the teacher's 3 ghost outputs on uniform-noise inputs; it never sees a digit or a
label, yet its test accuracy on the 10 class outputs rises, because the shared initialization makes
the gradients of the ghost outputs carry the teacher's update. The matching loss is the
temperature-scaled KL of seed 002 (``batchmean``, times ``T**2``) from the package's op, run once
as plain KD and once with logit standardization. A control student from a *different* initialization
trained with plain KD shows that the shared initialization is what carries the knowledge.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .._backends import resolve_backend
from ..functional import logitstd_kd_loss
from .deps import check_extras, progress
from .digits import NUM_CLASSES, NUM_FEATURES, Digits, load_digits
from .mlp import MLP, make_mlp
from .results import add_run_options, format_table, mean_std, pyplot, save_figure, write_json
from .training import accuracy, set_threads, train_epochs, train_teacher

__all__ = ["VARIANTS", "GhostConfig", "ghost_loss", "distill_ghost", "run_ghost", "format_results",
           "plot_results", "add_arguments", "run"]

VARIANTS = {
    "plain": "plain KD, same init",
    "standardized": "standardized KD, same init",
    "control": "control: plain KD, different init",
}


@dataclass(frozen=True)
class GhostConfig:
    """Everything that determines a ``ghost`` run (the defaults are the command's defaults)."""

    ghost: int = 3
    hidden: tuple[int, ...] = (256, 256)
    teacher_epochs: int = 30
    epochs: int = 20
    noise_per_epoch: int = 20000
    batch_size: int = 256
    teacher_batch_size: int = 64
    lr: float = 1e-3
    temperature: float = 1.0
    seeds: tuple[int, ...] = (0, 1, 2)
    control: bool = True
    test_fraction: float = 0.4
    split_seed: int = 0
    backend: str = "auto"


def ghost_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, *, standardize: bool,
               temperature: float, backend: str = "auto") -> torch.Tensor:
    """The matching loss on the ghost outputs (every output after the first ``NUM_CLASSES``).

    Equivalent eager code for ``standardize=False`` (seed 002), with ``s, t`` the ghost outputs::

        F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T * T

    With ``standardize=True`` both are z-scored first (``logitstd_kd_loss``'s defaults: ``torch.std``
    + 1e-7). With 3 ghost outputs a z-scored row keeps a single degree of freedom (zero mean, unit
    std), so standardization removes most of what the ghost outputs carry.
    """
    return logitstd_kd_loss(student_out[:, NUM_CLASSES:], teacher_out[:, NUM_CLASSES:], temperature=temperature,
                            standardize=standardize, backend=backend)


def distill_ghost(student: MLP, teacher: MLP, data: Digits, *, standardize: bool, config: GhostConfig,
                  seed: int) -> Iterator[float]:
    """Train ``student`` on the teacher's ghost outputs over fresh uniform noise in [-1, 1] each epoch.

    A generator: yields the student's test accuracy (first ``NUM_CLASSES`` outputs) after each epoch.
    The noise depends only on ``seed``. The teacher is not trained.
    """
    noise = torch.Generator().manual_seed(seed)

    def batches() -> Iterator[torch.Tensor]:
        x = torch.rand(config.noise_per_epoch, NUM_FEATURES, generator=noise) * 2 - 1
        for start in range(0, config.noise_per_epoch, config.batch_size):
            yield x[start:start + config.batch_size]

    def loss(model: MLP, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = teacher(x)
        return ghost_loss(model(x), target, standardize=standardize, temperature=config.temperature,
                          backend=config.backend)

    teacher.eval()
    for _ in train_epochs(student, config.epochs, batches, loss, lr=config.lr):
        yield accuracy(student, data.x_test, data.y_test, NUM_CLASSES)


def run_ghost(config: GhostConfig = GhostConfig(), *, show_progress: bool = True) -> dict[str, Any]:
    """Train a teacher per seed and each variant's student; return per-epoch accuracies and their summary.

    ``results["curves"][variant]["per_seed"][k]`` is seed ``k``'s test accuracy at epochs 0 (the
    initialization) to ``config.epochs``; ``"mean"``/``"std"`` summarize them over the seeds.
    """
    start = time.perf_counter()
    data = load_digits(config.test_fraction, config.split_seed)
    sizes = (NUM_FEATURES, *config.hidden, NUM_CLASSES + config.ghost)
    variants = [v for v in VARIANTS if config.control or v != "control"]
    per_seed: dict[str, list[list[float]]] = {v: [] for v in variants}
    teachers: list[float] = []

    def epochs() -> Iterator[None]:
        for seed in config.seeds:
            teacher = make_mlp(sizes, seed)
            initial_state = {k: v.clone() for k, v in teacher.state_dict().items()}
            train_teacher(teacher, data, epochs=config.teacher_epochs, batch_size=config.teacher_batch_size,
                          lr=config.lr, seed=seed)
            teachers.append(accuracy(teacher, data.x_test, data.y_test, NUM_CLASSES))
            for variant in variants:
                student = make_mlp(sizes, seed + 10_000)
                if variant != "control":
                    student.load_state_dict(initial_state)
                curve = [accuracy(student, data.x_test, data.y_test, NUM_CLASSES)]
                per_seed[variant].append(curve)
                for acc in distill_ghost(student, teacher, data, standardize=variant == "standardized",
                                         config=config, seed=seed):
                    curve.append(acc)
                    yield None

    total = len(config.seeds) * len(variants) * config.epochs
    for _ in progress(epochs(), total=total, desc="ghost distillation (epochs)", enable=show_progress):
        pass
    curves = {}
    for variant, runs in per_seed.items():
        stats = [mean_std([run[e] for run in runs]) for e in range(config.epochs + 1)]
        curves[variant] = {"label": VARIANTS[variant], "per_seed": runs, "mean": [m for m, _ in stats],
                           "std": [s for _, s in stats]}
    return {"config": asdict(config), "teacher_accuracy": teachers, "teacher_accuracy_mean": mean_std(teachers)[0],
            "curves": curves, "train_size": len(data.y_train), "test_size": len(data.y_test),
            "wall_seconds": time.perf_counter() - start, "threads": torch.get_num_threads(),
            "backend": resolve_backend(config.backend, torch.device("cpu")),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def format_results(results: dict[str, Any]) -> str:
    """The per-epoch table (mean +- std over seeds, in %) that ``python -m logitstd_kernels ghost`` prints."""
    cfg = results["config"]
    curves = results["curves"]
    headers = ["epoch", *[curves[v]["label"] for v in curves]]
    rows = [[str(e), *[f"{100 * curves[v]['mean'][e]:.1f} +- {100 * curves[v]['std'][e]:.1f}" for v in curves]]
            for e in range(cfg["epochs"] + 1)]
    final = "; ".join(f"{c['label']}: {100 * c['mean'][-1]:.1f}%" for c in curves.values())
    return (f"teacher test accuracy {100 * results['teacher_accuracy_mean']:.1f}% (mean of {len(cfg['seeds'])} "
            f"seeds); students see only the teacher's {cfg['ghost']} ghost outputs on uniform noise "
            f"({cfg['noise_per_epoch']} inputs per epoch, T={cfg['temperature']:g}); student test accuracy in %, "
            f"mean +- std over seeds, epoch 0 = initialization (chance = 10%)\n"
            f"{format_table(headers, rows)}\nfinal: {final}")


def plot_results(results: dict[str, Any], path: Path) -> Path:
    """Student test accuracy per epoch (mean +- std over seeds) for each variant, with the teacher's level."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    epochs = list(range(results["config"]["epochs"] + 1))
    for curve in results["curves"].values():
        mean = [100 * m for m in curve["mean"]]
        std = [100 * s for s in curve["std"]]
        ax.plot(epochs, mean, marker=".", label=curve["label"])
        ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    ax.axhline(100 * results["teacher_accuracy_mean"], color="black", linestyle="--", label="teacher")
    ax.axhline(10, color="gray", linestyle=":", label="chance")
    ax.set_xlabel("epoch of ghost-logit distillation on noise")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title(f"digits, {results['config']['ghost']} ghost logits, T={results['config']['temperature']:g}, "
                 f"{len(results['config']['seeds'])} seeds", fontsize=10)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)
    return save_figure(fig, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m logitstd_kernels ghost``."""
    d = GhostConfig()
    parser.add_argument("--temperature", "-T", type=float, default=d.temperature,
                        help="temperature of the KL (default %(default)s, as in seed 002)")
    parser.add_argument("--ghost", type=int, default=d.ghost, help="number of ghost outputs (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=d.epochs, help="student epochs (default %(default)s)")
    parser.add_argument("--noise-per-epoch", type=int, default=d.noise_per_epoch,
                        help="uniform-noise inputs per student epoch (default %(default)s)")
    parser.add_argument("--teacher-epochs", type=int, default=d.teacher_epochs, help="(default %(default)s)")
    parser.add_argument("--hidden", type=int, nargs="*", default=list(d.hidden), metavar="H",
                        help=f"hidden layer sizes of teacher and student (default {' '.join(map(str, d.hidden))})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="student batch size (default %(default)s)")
    parser.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (default %(default)s)")
    parser.add_argument("--seeds", type=int, default=len(d.seeds), help=f"number of seeds (default {len(d.seeds)})")
    parser.add_argument("--control", action=argparse.BooleanOptionalAction, default=d.control,
                        help="also train a student from a different initialization (default: on)")
    parser.add_argument("--backend", default=d.backend,
                        help="backend of the loss op (default auto: the C++ kernel when built, else torch)")
    add_run_options(parser, "ghost")


def run(args: argparse.Namespace) -> int:
    """Run both variants (and the control), print the per-epoch table, write ``ghost.json`` and ``ghost.png``."""
    needed = ("sklearn",) + (() if args.no_plot else ("matplotlib",))
    if not check_extras("the ghost experiment", *needed):
        return 2
    if args.ghost < 2:
        print("error: --ghost must be >= 2 (standardization needs at least 2 outputs)", file=sys.stderr)
        return 2
    set_threads(args.threads)
    config = GhostConfig(ghost=args.ghost, hidden=tuple(args.hidden), teacher_epochs=args.teacher_epochs,
                         epochs=args.epochs, noise_per_epoch=args.noise_per_epoch, batch_size=args.batch_size,
                         lr=args.lr, temperature=args.temperature, seeds=tuple(range(args.seeds)),
                         control=args.control, backend=args.backend)
    results = run_ghost(config, show_progress=not args.quiet)
    print(format_results(results))
    print(f"wall time {results['wall_seconds']:.1f} s on {results['threads']} thread(s); loss backend "
          f"{results['backend']}, CPU capability {results['cpu_capability']}")
    print(f"wrote {write_json(args.out_dir / 'ghost.json', results)}")
    if not args.no_plot:
        print(f"wrote {plot_results(results, args.out_dir / 'ghost.png')}")
    return 0
