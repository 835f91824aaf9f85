"""Multi-level logit distillation (MLKD, Jin et al., CVPR 2023), with the fused KD term.

MLKD aligns the teacher and the student at three levels, at each of several temperatures: the
instance level (KD of each row, logit-standardized when ``standardize``), the batch level (the
rows' similarity matrix ``P P^T``) and the class level (the classes' matrix ``P^T P``), P the row
softmaxes. The instance term is the fused KD loss, one pass over the logits per temperature; the
two correlation terms are Gram matrices in PyTorch (autograd), each the cheaper of the n x n and
k x k forms (:func:`gram_gap`).

Equivalent eager code: ``mlkd_loss(..., backend="torch")``: the KD rows from the reference and the
correlation terms in the official code's order of operations.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import config as cfg
from ._checks import check_inputs
from .functional import fused_loss
from .modules import ConfiguredLoss
from .reference import accumulation_dtype

__all__ = ["mlkd_loss", "MLKDLoss", "MLKD_TEMPERATURES", "CONFIDENCE_MODES", "confidence_masks",
           "correlation_terms", "gram_gap"]

#: The official temperatures: the config's KD temperature (4, mdistiller's default), then 3, 5, 2, 6.
MLKD_TEMPERATURES = (4.0, 3.0, 5.0, 2.0, 6.0)
#: How the teacher's confidence weights the terms (see :func:`mlkd_loss`).
CONFIDENCE_MODES = ("row", "fraction", "none")
#: The standardization settings of the instance term.
MLKD_SETTINGS = ("standardize", "correction", "eps")


def confidence_masks(teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row mask (N,), class mask (V,)) as 0/1 floats, without gradient: a row is kept when the
    teacher's largest probability is at most its batch median, a class when the teacher's summed
    probability over the rows is at most its median over the classes (the median interpolates
    linearly, as ``np.percentile(..., 50)``)::

        p = softmax(y); conf = p.max(-1); row = conf <= median(conf)
        mass = p.sum(0); cls = mass <= median(mass)
    """
    with torch.no_grad():
        p = F.softmax(teacher, dim=-1)
        conf, mass = p.amax(-1), p.sum(0)
        rows = (conf <= torch.quantile(conf, 0.5)).to(p.dtype)
        classes = (mass <= torch.quantile(mass, 0.5)).to(p.dtype)
    return rows, classes


def gram_gap(p: torch.Tensor, q: torch.Tensor, direct: bool = False) -> torch.Tensor:
    """``((p @ p.T - q @ q.T) ** 2).sum()`` of (n, k) ``p`` and ``q``, through the cheaper Gram matrices.

    The n x n Grams cost ``2 n^2 k`` multiply-adds. With ``s = p + q`` and ``d = p - q``,
    ``p p^T - q q^T = (s d^T + d s^T) / 2``, so the same sum is ``(<s^T s, d^T d> + <m, m^T>) / 2`` with
    ``m = s^T d``: three k x k products, ``3 n k^2``. The second form is taken when cheaper
    (``2 n > 3 k``) and ``direct`` is False; its terms are second order in ``d``, so a student close to
    its teacher loses no precision to cancellation (the first form rounds each Gram before the difference).
    """
    n, k = p.shape
    if direct or 2 * n <= 3 * k:
        return ((p @ p.T - q @ q.T) ** 2).sum()
    s, d = p + q, p - q
    m = s.T @ d
    return ((s.T @ s) * (d.T @ d)).sum() / 2 + (m * m.T).sum() / 2


def correlation_terms(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                      direct: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(class term, batch term) of (N, V) logits at ``temperature``, on the raw logits (the official
    code does not standardize them); ``direct``: the official code's order of operations::

        ps, pt = softmax(x / T), softmax(y / T)
        class_term = ((pt.T @ pt - ps.T @ ps) ** 2).sum() / V
        batch_term = ((pt @ pt.T - ps @ ps.T) ** 2).sum() / N

    Otherwise each sum takes the cheaper of the two Gram forms (:func:`gram_gap`).
    """
    ps, pt = F.softmax(student / temperature, dim=-1), F.softmax(teacher / temperature, dim=-1)
    classes = gram_gap(pt.T, ps.T, direct) / student.shape[-1]
    batch = gram_gap(pt, ps, direct) / student.shape[0]
    return classes, batch


def _check_levels(temperatures: object, temperature_weights: object, confidence: object, class_weight: object,
                  batch_weight: object) -> tuple[tuple[float, ...], tuple[float, ...], str, float, float]:
    """The MLKD-specific arguments, checked (``TypeError`` / ``ValueError`` naming the argument)."""
    if isinstance(temperatures, (str, bytes)) or not isinstance(temperatures, Sequence) or not temperatures:
        raise TypeError(f"temperatures must be a non-empty sequence of numbers, got {temperatures!r}")
    taus = tuple(cfg.check_temperature("temperatures", t) for t in temperatures)
    if temperature_weights is None:
        weights = (1.0,) * len(taus)
    else:
        if isinstance(temperature_weights, (str, bytes)) or not isinstance(temperature_weights, Sequence):
            raise TypeError(f"temperature_weights must be a sequence of numbers or None, got {temperature_weights!r}")
        if len(temperature_weights) != len(taus):
            raise ValueError(f"temperature_weights has {len(temperature_weights)} entries, temperatures {len(taus)}")
        weights = tuple(cfg.check_weight("temperature_weights", w) for w in temperature_weights)
    if confidence not in CONFIDENCE_MODES:
        raise ValueError(f"confidence must be one of {CONFIDENCE_MODES}, got {confidence!r}")
    return (taus, weights, confidence, cfg.check_weight("class_weight", class_weight),
            cfg.check_weight("batch_weight", batch_weight))


def _mlkd(student: torch.Tensor, teacher: torch.Tensor, config: cfg.DistillConfig, levels: tuple,
          backend: str) -> torch.Tensor:
    """The loss of checked (N, V) logits; ``levels``: the output of :func:`_check_levels`."""
    taus, weights, confidence, class_weight, batch_weight = levels
    rows, classes = confidence_masks(teacher.to(accumulation_dtype(student, teacher)))
    row_weight = rows if confidence == "row" else torch.ones_like(rows)
    scale_rows = rows.mean() if confidence != "none" else rows.new_ones(())
    scale_classes = classes.mean() if confidence != "none" else rows.new_ones(())
    if confidence == "fraction":
        row_weight = row_weight * scale_rows
    x, y = student.to(rows.dtype), teacher.to(rows.dtype)
    total = rows.new_zeros(())
    for tau, weight in zip(taus, weights):
        kd = fused_loss(student, teacher, None, None, config.replace(temperature=tau, teacher_temperature=tau),
                        backend)
        level = (kd * row_weight).sum() / student.shape[0]
        if class_weight or batch_weight:
            class_term, batch_term = correlation_terms(x, y, tau, direct=backend == "torch")
            level = level + class_weight * scale_classes * class_term + batch_weight * scale_rows * batch_term
        total = total + weight * level
    return total


def _prepare(student_logits: torch.Tensor, teacher_logits: torch.Tensor, config: cfg.DistillConfig):
    """(N, V) rows of the checked logits (at least one row)."""
    student, teacher, _, _ = check_inputs(student_logits, teacher_logits, None, None, config)
    student, teacher = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    if student.shape[0] == 0:
        raise ValueError("student_logits has no rows; MLKD's batch statistics need at least one")
    return student, teacher


@cfg.settings_keywords(MLKD_SETTINGS, docs=("backend",))
def mlkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
              temperatures: Sequence[float] = MLKD_TEMPERATURES, temperature_weights: Optional[Sequence[float]] = None,
              confidence: str = "row", class_weight: float = 1.0, batch_weight: float = 1.0, backend: str = "auto",
              **settings) -> torch.Tensor:
    """Multi-level KD of (..., V) logits (the rows are the leading dimensions flattened; no padding mask).

    Equivalent eager code (``T`` over ``temperatures``, ``w_T`` its weight; ``row``, ``cls``, ``correlation_terms``
    and the masks of :func:`confidence_masks`, ``kd_rows`` the KD loss of each row, standardized when on)::

        for T, w_T:
            instance = (kd_rows(x, y, T) * row).sum() / N     # confidence="row"
            class_term, batch_term = correlation_terms(x, y, T)
            loss += w_T * (instance + class_weight * cls.mean() * class_term
                           + batch_weight * row.mean() * batch_term)

    ``confidence``: ``"row"`` weights each row's KD by its mask (the official code's commented-out
    ``reduce=False``); ``"fraction"`` is what the official code computes, the batch-mean KD times the
    kept fraction ``row.mean()``; ``"none"`` drops the masks everywhere (the official strong-augmentation
    KD term: call with ``class_weight=0, batch_weight=0``). The correlation terms are scaled by the
    kept fractions in ``"row"`` and ``"fraction"``, as the official code computes them. Each temperature
    is one fused pass over the logits; the correlation terms mix the rows (a non-finite row makes them
    non-finite). The official weights (its KD weight, ``0.1 * CE``) belong to the caller.

    Args:
        temperatures: the temperatures (finite, > 0); official ``T, 3, 5, 2, 6``.
        temperature_weights: one weight per temperature (finite, >= 0); None: all 1.
        confidence: ``"row"``, ``"fraction"`` or ``"none"``.
        class_weight, batch_weight: the weights of the class- and batch-level terms (finite, >= 0).
        {keywords}

    Returns:
        a float32 scalar (float64 for float64 logits); gradients flow to both inputs when they require grad.
    """
    levels = _check_levels(temperatures, temperature_weights, confidence, class_weight, batch_weight)
    config = cfg.config_from(settings, MLKD_SETTINGS, "mlkd_loss", ce_weight=0.0, kd_weight=1.0, reduction="none")
    student, teacher = _prepare(student_logits, teacher_logits, config)
    return _mlkd(student, teacher, config, levels, cfg.check_backend(backend))


class MLKDLoss(ConfiguredLoss):
    """Multi-level KD module; ``forward(student, teacher)``: :func:`mlkd_loss` with this module's settings."""

    _shown = MLKD_SETTINGS

    @cfg.settings_keywords(MLKD_SETTINGS)
    def __init__(self, *, temperatures: Sequence[float] = MLKD_TEMPERATURES,
                 temperature_weights: Optional[Sequence[float]] = None, confidence: str = "row",
                 class_weight: float = 1.0, batch_weight: float = 1.0, backend: str = "auto", **settings) -> None:
        super().__init__()
        self.levels = _check_levels(temperatures, temperature_weights, confidence, class_weight, batch_weight)
        self.config = cfg.config_from(settings, MLKD_SETTINGS, "MLKDLoss", ce_weight=0.0, kd_weight=1.0,
                                      reduction="none")
        self.backend = cfg.check_backend(backend)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        student, teacher = _prepare(student_logits, teacher_logits, self.config)
        return _mlkd(student, teacher, self.config, self.levels, self.backend)

    def extra_repr(self) -> str:
        names = ("temperatures", "temperature_weights", "confidence", "class_weight", "batch_weight")
        levels = ", ".join(f"{name}={value!r}" for name, value in zip(names, self.levels))
        return f"{levels}, {super().extra_repr()}"
