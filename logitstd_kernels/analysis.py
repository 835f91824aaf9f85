"""Conflict analysis of saved logits (seed 000): when does plain KD's KL prefer the wrong student?

Given a teacher's logits, two students' logits and the labels, student A (e.g. trained independently)
and student B (e.g. the KD student), a sample is a **conflict** when B has the lower per-sample KL to
the teacher, yet B's prediction differs from the teacher's while A's prediction agrees with the
teacher's or with the label. A conflict is **corrected** when, after z-scoring all three logit sets,
A has the lower KL. The seed's rule, as eager code (``kl`` is the per-sample KL, ``z`` the z-score)::

    t, a, b = teacher.argmax(1), student_a.argmax(1), student_b.argmax(1)
    conflict = (kl(teacher, B) < kl(teacher, A)) & (b != t) & ((a == t) | (a == labels))
    corrected = conflict & (kl(z(teacher), z(A)) < kl(z(teacher), z(B)))

The per-sample KL is ``KL(softmax(teacher / T) || softmax(student / T))`` summed over the classes
(no ``T**2`` factor), computed by the package's fused op with ``reduction="none"``, in chunks of rows
so that arrays larger than memory (memory-mapped ``.npy``) are analysed with bounded memory. The
seed notebook instead averaged over the classes and z-scored with ``std + 1e-8``:
:data:`SEED_FIGURES` reproduces its printed figures (see :func:`per_sample_kl`).

Beyond the seed, over all samples where exactly one student's prediction agrees with the teacher's,
the report counts how often that student is also the one with the lower KL, before and after
standardization: a direct measure of how well each KL ranks the students.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Union

import numpy as np
import torch

from .functional import logitstd_kd_loss

__all__ = [
    "ArrayLike", "LogitSet", "KLSettings", "SEED_FIGURES", "SampleStats", "ConflictExample", "SplitReport",
    "per_sample_kl", "sample_stats", "conflict_masks", "summarize", "analyze_split", "analyze",
    "format_report", "default_chunk_rows",
]

ArrayLike = Union[torch.Tensor, np.ndarray]
ProgressFn = Callable[[Iterable[int], int, str], Iterable[int]]

DEFAULT_CHUNK_BYTES = 32 * 2**20


class LogitSet(NamedTuple):
    """The arrays of one split: ``(N, V)`` logits of the teacher and both students, ``(N,)`` labels.

    Each may be a torch tensor, a numpy array (including a ``np.memmap`` / ``np.load(...,
    mmap_mode="r")``) or any object with a ``shape`` whose ``[start:stop]`` returns one of those
    (e.g. :class:`logitstd_kernels.experiments.logit_io.NpyRows`); rows are read a chunk at a time.
    """

    teacher: ArrayLike
    student_a: ArrayLike
    student_b: ArrayLike
    labels: ArrayLike


@dataclass(frozen=True)
class KLSettings:
    """How the per-sample KL is computed.

    ``temperature``: softens both distributions (the seed used 3). ``class_mean``: divide the KL by
    the number of classes, as the seed notebook's ``.mean(dim=1)`` did. ``correction``/``eps``: the
    z-score's std is ``sqrt(sum (x - mean)^2 / (V - correction)) + eps`` (see
    :func:`logitstd_kernels.zscore`). ``backend``: passed to the fused op.
    """

    temperature: float = 3.0
    class_mean: bool = False
    correction: int = 1
    eps: float = 1e-7
    backend: str = "auto"


SEED_FIGURES = KLSettings(temperature=3.0, class_mean=True, correction=1, eps=1e-8)
"""Settings that reproduce seed 000's printed figures: KL averaged over classes, std + 1e-8, T = 3."""


def per_sample_kl(teacher: torch.Tensor, student: torch.Tensor, *, standardize: bool,
                  settings: KLSettings = KLSettings()) -> torch.Tensor:
    """Per-row ``KL(softmax(y / T) || softmax(x / T))``, through the fused op (``reduction="none"``).

    With ``standardize`` both rows are z-scored first. Equivalent eager code::

        if standardize:
            y, x = zscore(y, correction=c, eps=eps), zscore(x, correction=c, eps=eps)
        p, log_q = F.softmax(y / T, -1), F.log_softmax(x / T, -1)
        kl = (p * (p.log() - log_q)).sum(-1)          # .mean(-1) when settings.class_mean

    The seed notebook wrote ``log(p + 1e-12)`` for ``log p``; that changes each class's term by at
    most ``1e-12``, far below float32 resolution, so it is not reproduced.
    """
    tau = settings.temperature
    loss = logitstd_kd_loss(student, teacher, temperature=tau, standardize=standardize,
                            correction=settings.correction, eps=settings.eps, reduction="none",
                            backend=settings.backend)
    kl = loss / (tau * tau)
    return kl / teacher.shape[-1] if settings.class_mean else kl


@dataclass
class SampleStats:
    """Per-sample predictions (argmax) and KLs of one split, as numpy arrays of length N."""

    labels: np.ndarray
    pred_teacher: np.ndarray
    pred_a: np.ndarray
    pred_b: np.ndarray
    kl_a: np.ndarray
    kl_b: np.ndarray
    kl_a_std: np.ndarray
    kl_b_std: np.ndarray


def default_chunk_rows(num_classes: int, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that one float32 chunk of one logit array takes at most ``max_chunk_bytes``."""
    return max(1, int(max_chunk_bytes) // (4 * max(1, int(num_classes))))


def _chunk(array: ArrayLike, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` as a tensor; numpy rows are copied (out of any memory map, into writable memory)."""
    chunk = array[start:stop]
    return chunk if isinstance(chunk, torch.Tensor) else torch.from_numpy(np.array(chunk))


def _rows(array: ArrayLike, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of logits in float32 (float64 stays float64)."""
    tensor = _chunk(array, start, stop)
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def _labels(array: ArrayLike, start: int, stop: int) -> torch.Tensor:
    return _chunk(array, start, stop).reshape(-1).long()


def _check_set(logits: LogitSet) -> tuple[int, int]:
    shape = tuple(logits.teacher.shape)
    if len(shape) != 2:
        raise ValueError(f"teacher logits must have shape (N, V), got {shape}")
    for name in ("student_a", "student_b"):
        other = tuple(getattr(logits, name).shape)
        if other != shape:
            raise ValueError(f"{name} logits have shape {other} but the teacher's have shape {shape}")
    if tuple(logits.labels.shape) != (shape[0],):
        raise ValueError(f"labels must have shape ({shape[0]},), got {tuple(logits.labels.shape)}")
    if shape[1] < 2:
        raise ValueError(f"the analysis needs at least 2 classes, got {shape[1]}")
    return shape[0], shape[1]


@torch.no_grad()
def sample_stats(logits: LogitSet, settings: KLSettings = KLSettings(), *, chunk_rows: Optional[int] = None,
                 progress: Optional[ProgressFn] = None) -> SampleStats:
    """Predictions and the four per-sample KLs (A and B, before and after z-scoring) of one split.

    Rows are processed ``chunk_rows`` at a time (default :func:`default_chunk_rows`: 32 MiB of float32
    per logit array), so memory is bounded by the chunk, not by N. The fused kernels compute each row
    on its own, so the result does not depend on ``chunk_rows``, bit for bit; the eager reference
    (``backend="torch"``) picks its reduction order by shape, so for wide rows it agrees to rounding. ``progress(iterable, total, description)`` may wrap the
    loop over chunk starts (e.g. :func:`logitstd_kernels.experiments.deps.progress`).
    """
    n, num_classes = _check_set(logits)
    step = default_chunk_rows(num_classes) if chunk_rows is None else int(chunk_rows)
    if step < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    out = {name: np.empty(n, dtype=np.int64) for name in ("labels", "pred_teacher", "pred_a", "pred_b")}
    out.update({name: np.empty(n, dtype=np.float64) for name in ("kl_a", "kl_b", "kl_a_std", "kl_b_std")})
    starts: Iterable[int] = range(0, n, step)
    if progress is not None:
        starts = progress(starts, -(-n // step), f"analysing {n} rows")
    for start in starts:
        stop = min(start + step, n)
        teacher, a, b = (_rows(x, start, stop) for x in logits[:3])
        out["labels"][start:stop] = _labels(logits.labels, start, stop).numpy()
        for name, tensor in (("pred_teacher", teacher), ("pred_a", a), ("pred_b", b)):
            out[name][start:stop] = tensor.argmax(dim=-1).numpy()
        for name, student, standardize in (("kl_a", a, False), ("kl_b", b, False),
                                           ("kl_a_std", a, True), ("kl_b_std", b, True)):
            out[name][start:stop] = per_sample_kl(teacher, student, standardize=standardize,
                                                  settings=settings).double().numpy()
    return SampleStats(**out)


def conflict_masks(stats: SampleStats) -> tuple[np.ndarray, np.ndarray]:
    """``(conflict, corrected)`` boolean masks of length N: the seed's rule (see the module docstring)."""
    a_matches = (stats.pred_a == stats.pred_teacher) | (stats.pred_a == stats.labels)
    conflict = (stats.kl_b < stats.kl_a) & (stats.pred_b != stats.pred_teacher) & a_matches
    corrected = conflict & (stats.kl_a_std < stats.kl_b_std)
    return conflict, corrected


@dataclass
class ConflictExample:
    """One conflict row: its index, label, the three predictions and the KLs before and after z-scoring."""

    index: int
    label: int
    teacher_pred: int
    a_pred: int
    b_pred: int
    kl_a: float
    kl_b: float
    kl_a_std: float
    kl_b_std: float
    corrected: bool


@dataclass
class SplitReport:
    """The analysis of one split; ``asdict(report)`` is JSON-serializable.

    ``decisive``: samples where exactly one student's prediction agrees with the teacher's;
    ``lower_kl_agrees_before``/``_after``: how many of them have the lower KL on the agreeing student,
    before and after z-scoring (ties count as not agreeing).
    """

    split: str
    n: int
    num_classes: int
    settings: dict[str, Any]
    conflicts: int
    conflict_fraction: float
    corrected: int
    corrected_fraction: float
    decisive: int
    lower_kl_agrees_before: int
    lower_kl_agrees_after: int
    lower_kl_agrees_before_fraction: float
    lower_kl_agrees_after_fraction: float
    accuracy: dict[str, float]
    teacher_agreement: dict[str, float]
    examples: list[ConflictExample] = field(default_factory=list)
    conflict_indices: list[int] = field(default_factory=list)
    corrected_indices: list[int] = field(default_factory=list)


def _fraction(count: int, total: int) -> float:
    return count / total if total else 0.0


def summarize(stats: SampleStats, *, split: str = "data", num_classes: int = 0,
              settings: KLSettings = KLSettings(), examples: int = 5) -> SplitReport:
    """Count conflicts and corrections in ``stats`` and pick the first ``examples`` conflicts to show."""
    conflict, corrected = conflict_masks(stats)
    n = int(stats.labels.shape[0])
    a_agrees = stats.pred_a == stats.pred_teacher
    b_agrees = stats.pred_b == stats.pred_teacher
    decisive = a_agrees != b_agrees
    before = np.where(a_agrees, stats.kl_a < stats.kl_b, stats.kl_b < stats.kl_a) & decisive
    after = np.where(a_agrees, stats.kl_a_std < stats.kl_b_std, stats.kl_b_std < stats.kl_a_std) & decisive
    conflict_idx = np.flatnonzero(conflict)
    rows = [ConflictExample(
        index=int(i), label=int(stats.labels[i]), teacher_pred=int(stats.pred_teacher[i]),
        a_pred=int(stats.pred_a[i]), b_pred=int(stats.pred_b[i]), kl_a=float(stats.kl_a[i]),
        kl_b=float(stats.kl_b[i]), kl_a_std=float(stats.kl_a_std[i]), kl_b_std=float(stats.kl_b_std[i]),
        corrected=bool(corrected[i])) for i in conflict_idx[:max(0, examples)]]
    num_conflicts, num_corrected, num_decisive = int(conflict.sum()), int(corrected.sum()), int(decisive.sum())
    return SplitReport(
        split=split, n=n, num_classes=int(num_classes), settings=asdict(settings),
        conflicts=num_conflicts, conflict_fraction=_fraction(num_conflicts, n),
        corrected=num_corrected, corrected_fraction=_fraction(num_corrected, num_conflicts),
        decisive=num_decisive,
        lower_kl_agrees_before=int(before.sum()), lower_kl_agrees_after=int(after.sum()),
        lower_kl_agrees_before_fraction=_fraction(int(before.sum()), num_decisive),
        lower_kl_agrees_after_fraction=_fraction(int(after.sum()), num_decisive),
        accuracy={name: float((pred == stats.labels).mean()) if n else 0.0 for name, pred in
                  (("teacher", stats.pred_teacher), ("a", stats.pred_a), ("b", stats.pred_b))},
        teacher_agreement={"a": float(a_agrees.mean()) if n else 0.0, "b": float(b_agrees.mean()) if n else 0.0},
        examples=rows, conflict_indices=conflict_idx.tolist(), corrected_indices=np.flatnonzero(corrected).tolist(),
    )


def analyze_split(logits: LogitSet, settings: KLSettings = KLSettings(), *, split: str = "data",
                  examples: int = 5, chunk_rows: Optional[int] = None,
                  progress: Optional[ProgressFn] = None) -> SplitReport:
    """:func:`sample_stats` then :func:`summarize`: the full conflict analysis of one split."""
    stats = sample_stats(logits, settings, chunk_rows=chunk_rows, progress=progress)
    return summarize(stats, split=split, num_classes=int(logits.teacher.shape[1]), settings=settings,
                     examples=examples)


def analyze(splits: Mapping[str, LogitSet], settings: KLSettings = KLSettings(), *, examples: int = 5,
            chunk_rows: Optional[int] = None, progress: Optional[ProgressFn] = None) -> list[SplitReport]:
    """:func:`analyze_split` for each named split, in order."""
    return [analyze_split(logits, settings, split=name, examples=examples, chunk_rows=chunk_rows,
                          progress=progress) for name, logits in splits.items()]


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.3f}%"


def format_report(reports: Iterable[SplitReport]) -> str:
    """A human-readable rendering of the reports (what ``python -m logitstd_kernels analyze`` prints)."""
    lines: list[str] = []
    for r in reports:
        s = r.settings
        kl = "mean over classes (seed figures)" if s["class_mean"] else "sum over classes"
        lines += [
            f"=== {r.split.upper()}: {r.n} samples, {r.num_classes} classes ===",
            f"per-sample KL(teacher || student) at T={s['temperature']:g}, {kl}; standardized: z-score with "
            f"correction={s['correction']}, eps={s['eps']:g}",
            f"accuracy vs labels: teacher {_percent(r.accuracy['teacher'])}, A {_percent(r.accuracy['a'])}, "
            f"B {_percent(r.accuracy['b'])}; agreement with the teacher: A {_percent(r.teacher_agreement['a'])}, "
            f"B {_percent(r.teacher_agreement['b'])}",
            f"conflicts (B has the lower KL, B disagrees with the teacher, A agrees with the teacher or the "
            f"label): {r.conflicts} ({_percent(r.conflict_fraction)})",
            f"corrected by standardization (A has the lower KL after z-scoring): {r.corrected}/{r.conflicts} "
            f"({_percent(r.corrected_fraction)})",
            f"lower-KL student = the one agreeing with the teacher, over the {r.decisive} samples where exactly "
            f"one agrees: before {r.lower_kl_agrees_before} ({_percent(r.lower_kl_agrees_before_fraction)}), "
            f"after standardization {r.lower_kl_agrees_after} ({_percent(r.lower_kl_agrees_after_fraction)})",
        ]
        if r.examples:
            lines.append(f"first {len(r.examples)} conflicts:")
            lines.append(f"  {'index':>8} {'label':>5} {'teacher':>7} {'A':>5} {'B':>5} {'KL_A':>10} {'KL_B':>10} "
                         f"{'KL_A_std':>10} {'KL_B_std':>10}  corrected")
            for e in r.examples:
                lines.append(f"  {e.index:>8} {e.label:>5} {e.teacher_pred:>7} {e.a_pred:>5} {e.b_pred:>5} "
                             f"{e.kl_a:>10.6f} {e.kl_b:>10.6f} {e.kl_a_std:>10.6f} {e.kl_b_std:>10.6f}  "
                             f"{'yes' if e.corrected else 'no'}")
        lines.append("")
    return "\n".join(lines)
