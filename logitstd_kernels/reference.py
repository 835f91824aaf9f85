"""The eager PyTorch implementation of the public contract: ground truth for tests and benchmarks.

Written for clarity, not speed. It is the one reference implementation in the project; tests and
benchmarks import it from here. With ``correction=1, eps=1e-7, reduction="batchmean"`` it is the
paper's official code (and torchdistill's ``LogitStdKDLoss``)::

    z = (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-7) / tau
    loss = F.kl_div(F.log_softmax(z_s, -1), F.softmax(z_t, -1), reduction="batchmean") * tau**2

and with ``correction=0, eps=0`` it is the paper's Algorithm 1. The math is in docs/design.md section 1.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from . import config as cfg
from ._checks import check_inputs, check_logits
from .config import DistillConfig, LogitTransforms, check_std_args, check_temperature
from .sparse import SparseRows, SparseTeacher

__all__ = ["zscore", "logitstd_kd_loss", "kd_loss", "distillation_loss", "dkd_loss", "DistillationParts",
           "accumulation_dtype", "row_dkd",
           "objective_rows", "transform_logits", "linear_loss_of_config", "sparse_teacher_logits",
           "sparse_row_divergence", "teacher_tensor"]


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32: the dtype of the loss and of the math."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def teacher_tensor(teacher: Union[torch.Tensor, SparseRows]) -> torch.Tensor:
    """The tensor that stands for a teacher's dtype and rows: dense logits, or a sparse teacher's values."""
    return teacher.values if isinstance(teacher, SparseRows) else teacher


def zscore(logits: torch.Tensor, temperature: float = 1.0, *, correction: int = 1, eps: float = 1e-7) -> torch.Tensor:
    """Weighted Z-score of the last dimension (the paper's Algorithm 1).

    Equivalent eager code::

        (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True, correction=correction) + eps) / temperature

    The result has the input's dtype; the statistics are computed in float32 (float64 for float64).
    """
    check_logits("logits", logits)
    tau = check_temperature("temperature", temperature)
    check_std_args(logits.shape[-1], correction, eps, name="logits")
    x = logits.to(accumulation_dtype(logits))
    mean = x.mean(dim=-1, keepdim=True)
    std = x.std(dim=-1, keepdim=True, correction=correction)
    return ((x - mean) / (std + eps) / tau).to(logits.dtype)


def temperature_per_row(temperature: Optional[torch.Tensor], student: torch.Tensor,
                        teacher: torch.Tensor) -> Optional[torch.Tensor]:
    """A tensor temperature as one value per row, (N,) in the accumulation dtype (differentiable)."""
    if temperature is None:
        return None
    lead = student.shape[:-1]
    if temperature.dim() != 0 and temperature.shape != lead:
        raise ValueError(f"temperature must be 0-dim or of the leading shape {tuple(lead)}, got "
                         f"{tuple(temperature.shape)}")
    if temperature.device != student.device:
        raise ValueError(f"temperature is on {temperature.device}, the logits on {student.device}")
    rows = temperature.to(accumulation_dtype(student, teacher)).reshape(-1)
    return rows.expand(student[..., 0].numel()).contiguous() if temperature.dim() == 0 else rows.contiguous()


def _softened(x: torch.Tensor, config: DistillConfig, tau: Union[float, torch.Tensor]) -> torch.Tensor:
    """``Z(x) / tau`` (standardized when on), or ``x / tau`` (``tau``: a float or an (N, 1) column)."""
    if not config.standardize:
        return x / tau
    return (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True, correction=config.correction) + config.eps) / tau


def _logits_for_softmax(student: torch.Tensor, teacher: torch.Tensor, config: DistillConfig,
                        tau: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b): the student's and the teacher's logits standardized (when on) and over their temperatures
    (``tau``: one learnable temperature per row for both, in place of the config's)."""
    x, y = student.to(accumulation_dtype(student, teacher)), teacher.to(accumulation_dtype(student, teacher))
    tau_s, tau_t = config.temperature, config.teacher_temperature
    if tau is not None:
        tau_s = tau_t = tau[:, None]
    return _softened(x, config, tau_s), _softened(y, config, tau_t)


def _kl(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of each row, ``sum p (log p - log q)``; a class with p = 0 contributes 0 and no
    gradient (its logs are masked before the product, so that log q = -inf there, as in a class that
    is -inf in both rows, gives neither a NaN loss nor a NaN gradient)."""
    support = p != 0  # (a NaN row stays NaN)
    zero = log_p.new_zeros(())
    return (p * (torch.where(support, log_p, zero) - torch.where(support, log_q, zero))).sum(-1)


def row_divergence(b: torch.Tensor, a: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """D(p, q) of each row, p = softmax(b) the teacher's, q = softmax(a) the student's (docs/design.md,
    section 8).

    ``jsd`` is the generalized JSD of TRL and Liger, ``beta KL(p || m) + (1 - beta) KL(q || m)`` with
    ``m = beta p + (1 - beta) q``, which is forward KL at beta = 0 and reverse KL at beta = 1 by their
    convention (its limits there are 0); ``tvd`` is ``0.5 sum |p - q|``, whose autograd subgradient at
    p = q is 0.
    """
    p, log_p = F.softmax(b, dim=-1), F.log_softmax(b, dim=-1)
    q, log_q = F.softmax(a, dim=-1), F.log_softmax(a, dim=-1)
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        return _kl(p, log_p, log_q)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return _kl(q, log_q, log_p)
    if divergence == "jeffreys":
        return _kl(p, log_p, log_q) + _kl(q, log_q, log_p)
    if divergence == "jsd":
        # a class with p = q = 0 has no m (masked to a finite stand-in: _kl leaves it out)
        either = (p != 0) | (q != 0)
        zero = log_p.new_zeros(())
        log_m = torch.logsumexp(torch.stack((torch.where(either, log_p, zero) + math.log(beta),
                                             torch.where(either, log_q, zero) + math.log1p(-beta))), 0)
        return beta * _kl(p, log_p, log_m) + (1 - beta) * _kl(q, log_q, log_m)
    if divergence == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise ValueError(f"unknown divergence {divergence!r}")


def row_dkd(b: torch.Tensor, a: torch.Tensor, labels: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Decoupled KD of each row (Zhao et al., CVPR 2022), ``alpha TCKD + beta NCKD``, with p = softmax(b)
    the teacher's and q = softmax(a) the student's and g the label:

    - TCKD = KL([p_g, 1 - p_g] || [q_g, 1 - q_g]), the target class against all the others;
    - NCKD = KL(p^ || q^), p^ and q^ the softmaxes over the non-target classes (the official code
      subtracts 1000 from the target logit; here it is left out exactly).

    ``1 - p_g`` is the non-target mass itself (a log-sum-exp over the other classes), not 1 minus p_g,
    so that it keeps its precision where p_g is near 1.
    """
    target = F.one_hot(labels.long(), a.shape[-1]).bool()
    hat_a, hat_b = a.masked_fill(target, float("-inf")), b.masked_fill(target, float("-inf"))
    log_q, log_p = F.log_softmax(a, -1), F.log_softmax(b, -1)
    log_rest_q = torch.logsumexp(hat_a, -1) - torch.logsumexp(a, -1)  # log(1 - q_g)
    log_rest_p = torch.logsumexp(hat_b, -1) - torch.logsumexp(b, -1)
    index = labels.long()[:, None]
    log_bins_q = torch.stack((log_q.gather(-1, index)[:, 0], log_rest_q), -1)
    log_bins_p = torch.stack((log_p.gather(-1, index)[:, 0], log_rest_p), -1)
    tckd = _kl(log_bins_p.exp(), log_bins_p, log_bins_q)
    hat_log_p = F.log_softmax(hat_b, -1)
    nckd = _kl(hat_log_p.exp(), hat_log_p, F.log_softmax(hat_a, -1))
    return alpha * tckd + beta * nckd


def _masked_logsumexp(v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` of each row's ``valid`` entries (keepdim), ``-inf`` for a row without one, with a
    finite gradient (zero for the left-out entries) in every case."""
    any_valid = valid.any(-1, keepdim=True)
    filled = torch.where(valid, v, torch.where(any_valid, float("-inf"), 0.0))
    return torch.where(any_valid, torch.logsumexp(filled, -1, keepdim=True), float("-inf"))


def _valid_moments(r: torch.Tensor, valid: torch.Tensor, correction: int) -> tuple[torch.Tensor, ...]:
    """``(c, mu, sigma)`` of each row's valid ``r`` in the units of ``c r``, ``c = 1 / max(1, max |r|)``
    (no overflow for huge values; ``sigma`` 0 where ``n - correction <= 0``)."""
    count = valid.sum(-1, keepdim=True)
    c = 1.0 / torch.where(valid, r.abs(), 0.0).amax(-1, keepdim=True).clamp_min(1.0)
    mu = torch.where(valid, r * c, 0.0).sum(-1, keepdim=True) / count.clamp_min(1)
    dev = torch.where(valid, r * c - mu, 0.0)
    dof = count - correction
    return c, mu, torch.where(dof > 0, (dev * dev).sum(-1, keepdim=True) / dof.clamp_min(1), 0.0).sqrt()


def sparse_teacher_logits(teacher: SparseRows, config: DistillConfig, acc: torch.dtype) -> torch.Tensor:
    """The teacher's KD logits ``b`` (N, k) at its entries, ``-inf`` where an entry is not valid
    (docs/design.md, section 9): ``r = values * T_gen`` (``kind="logprobs"``; ``values`` for logits),
    ``b = (r - mu) / (sigma + eps) / tau_t`` with the stored full-row statistics (times ``T_gen``), or
    with those of the row's valid ``r`` (``sigma`` 0 where ``n - correction <= 0``), or ``b = r / tau_t``."""
    valid = teacher.valid()
    scale = config.generation_temperature if teacher.kind == "logprobs" else 1.0
    r = teacher.values.to(acc) * scale
    if not config.standardize:
        b = r / config.teacher_temperature
    elif teacher.row_std is not None:
        mu, sigma = teacher.row_mean.to(acc)[:, None] * scale, teacher.row_std.to(acc)[:, None] * scale
        b = (r - mu) / (sigma + config.eps) / config.teacher_temperature
    else:
        c, mu, sigma = _valid_moments(r, valid, config.correction)
        b = (r * c - mu) / (sigma + config.eps * c) / config.teacher_temperature
    return torch.where(valid, b, float("-inf"))


def _support_kl(log_p: torch.Tensor, log_q: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``sum p (log p - log q)`` over the valid entries with p != 0 (their logs masked before the product)."""
    on = valid & (log_p != float("-inf"))  # NaN stays in: it makes its row NaN
    p = torch.where(on, log_p, float("-inf")).exp()
    return (p * (torch.where(on, log_p, 0.0) - torch.where(on, log_q, 0.0))).sum(-1)


def sparse_row_divergence(student: torch.Tensor, teacher: SparseRows, config: DistillConfig) -> torch.Tensor:
    """Forward KL of each row between the sparse teacher's p and the dense student's q (docs/design.md,
    section 9), with ``a`` the student's softened logits, ``b`` :func:`sparse_teacher_logits`, S the
    valid entries::

        "renormalize":          KL(softmax_S(b) || softmax_S(a))
        "renormalize_teacher":  sum_S p (log p - log softmax_V(a)_S),   p = softmax_S(b)
        "tail":                 sum_S p (log p - log q_S) + p_T log(p_T / q_T),
                                p = exp(b - L'),  p_T = 1 - sum_S p,  q_T = sum_{not S} softmax_V(a)

    ``L' = max(L, logsumexp_S b)`` (``log_normalizer``; 0 where derived); a support of all V classes
    has no tail class. A row without a valid entry has D = 0 (renormalizing) or 0 (tail: p_T = q_T = 1).
    """
    acc = accumulation_dtype(student, teacher.values)
    a = _softened(student.to(acc), config, config.temperature)
    log_q = F.log_softmax(a, -1)
    valid = teacher.valid()
    ids = torch.where(valid, teacher.ids, 0)
    log_q_s = log_q.gather(-1, ids)
    b = sparse_teacher_logits(teacher, config, acc)
    lse_b = _masked_logsumexp(b, valid)
    if config.support != "tail":
        log_p = b - lse_b
        if config.support == "renormalize":
            log_q_s = log_q_s - _masked_logsumexp(log_q_s, valid)
        return _support_kl(log_p, log_q_s, valid)
    normalizer = (torch.zeros_like(lse_b) if teacher.log_normalizer is None
                  else teacher.log_normalizer.to(acc)[:, None])
    whole = valid.sum(-1, keepdim=True) == student.shape[-1]
    log_norm = torch.where(whole, lse_b, torch.maximum(normalizer, lse_b))
    log_p_tail = torch.log(-torch.expm1(lse_b - log_norm))  # -inf: no tail mass
    # the classes outside the support (a dense mask: reference only); counts, since left-out entries stand at 0
    outside = torch.zeros_like(log_q, dtype=torch.long).scatter_add(-1, ids, valid.long()) == 0
    log_q_tail = _masked_logsumexp(log_q, outside)
    tail = torch.where(log_p_tail > float("-inf"),
                       log_p_tail.exp() * (log_p_tail - torch.where(log_p_tail > float("-inf"), log_q_tail, 0.0)),
                       0.0)
    return _support_kl(b - log_norm, log_q_s, valid) + tail[:, 0]


def _row_kl(student: torch.Tensor, teacher: Union[torch.Tensor, SparseRows], config: DistillConfig,
            labels: Optional[torch.Tensor] = None, tau: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``tau_s**2 * D(softmax(b), softmax(a))`` for each row, in the accumulation dtype (D: the config's
    divergence, forward KL by default; ``dkd`` reads the rows' ``labels``; ``tau``: a learnable
    temperature per row, for student and teacher; a sparse teacher: :func:`sparse_row_divergence`)."""
    acc = accumulation_dtype(student, teacher_tensor(teacher))
    if student.shape[0] == 0:  # no rows: nothing to standardize (torch.std would warn); still in the graph
        zero = (student.to(acc).sum(-1) + teacher_tensor(teacher).to(acc).sum(-1)) * 0
        return zero if tau is None else zero + tau * 0
    if isinstance(teacher, SparseRows):
        return sparse_row_divergence(student, teacher, config) * (config.temperature * config.temperature)
    a, b = _logits_for_softmax(student, teacher, config, tau)
    if config.divergence == "dkd":
        divergence = row_dkd(b, a, labels, config.dkd_alpha, config.dkd_beta)
    else:
        divergence = row_divergence(b, a, config.divergence, config.beta)
    tau_s = config.temperature if tau is None else tau
    return divergence * (tau_s * tau_s)


class DistillationParts(NamedTuple):
    """``distillation_loss(..., return_components=True)``: the loss and its two (detached) parts,
    reduced like the loss: ``ce`` the cross-entropy, ``kd`` the ``tau_s**2 * KL`` term (unweighted),
    so that ``loss = ce_weight * ce + kd_weight * kd``."""

    loss: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor


def objective_rows(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                   mask: Optional[torch.Tensor], config: DistillConfig,
                   tau: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
    """``(rows, ce, kd, keep)`` of (N, V) rows: the objective per row and its parts (0 where excluded),
    and the included rows ``mask & (labels != ignore_index)``."""
    acc = accumulation_dtype(student, teacher_tensor(teacher))
    keep = torch.ones(student.shape[0], dtype=torch.bool, device=student.device) if mask is None else mask
    if labels is not None:
        keep = keep & (labels != config.ignore_index)
    # Index the included rows out so that excluded rows (even NaN ones) get an exact 0 gradient.
    kd = torch.zeros(student.shape[0], dtype=acc, device=student.device).index_put(
        (keep,), _row_kl(student[keep], teacher[keep], config, None if labels is None else labels[keep],
                         None if tau is None else tau[keep]))
    ce = torch.zeros_like(kd)
    if labels is None:
        return config.kd_weight * kd, ce, kd, keep
    ce = ce.index_put((keep,), F.cross_entropy(student[keep].to(acc), labels[keep].long(), reduction="none",
                                               label_smoothing=config.label_smoothing))
    return config.ce_weight * ce + config.kd_weight * kd, ce, kd, keep


def _reduce(values: torch.Tensor, keep: torch.Tensor, config: DistillConfig, num_classes: int,
            lead: torch.Size) -> torch.Tensor:
    if config.reduction == "none":
        return values.reshape(lead)
    total = values.sum()
    if config.reduction == "sum":
        return total
    count = keep.sum().clamp_min(1).to(total.dtype)  # (a tensor: no host synchronization)
    return total / (count * num_classes if config.reduction == "class_mean" else count)


def loss_of_config(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor],
                   mask: Optional[torch.Tensor], config: DistillConfig, return_components: bool = False,
                   temperature_rows: Optional[torch.Tensor] = None) -> Union[torch.Tensor, DistillationParts]:
    """The objective of ``config`` over checked (..., V) logits; what every function here computes
    (``temperature_rows``: a learnable (N,) temperature for student and teacher)."""
    num_classes = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    teacher = teacher_logits.rows() if isinstance(teacher_logits, SparseTeacher) else \
        teacher_logits.reshape(-1, num_classes)
    rows, ce, kd, keep = objective_rows(
        student_logits.reshape(-1, num_classes), teacher,
        None if labels is None else labels.reshape(-1), None if mask is None else mask.reshape(-1), config,
        temperature_rows)
    loss = _reduce(rows, keep, config, num_classes, lead)
    if not return_components:
        return loss
    return DistillationParts(loss, _reduce(ce, keep, config, num_classes, lead).detach(),
                             _reduce(kd, keep, config, num_classes, lead).detach())


def transform_logits(logits: torch.Tensor, scale: float = 1.0, softcap: Optional[float] = None) -> torch.Tensor:
    """A model's last transforms of its logits, in their dtype, as TRL orders them::

        z = logits * scale                      # Cohere's logit_scale (skipped at 1)
        z = softcap * tanh(z / softcap)         # Gemma 2/3's final_logit_softcapping (None: skipped)
    """
    z = logits if scale == 1.0 else logits * scale
    return z if softcap is None else torch.tanh(z / softcap) * softcap


def linear_loss_of_config(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                          student_bias: Optional[torch.Tensor], teacher_logits: torch.Tensor,
                          labels: Optional[torch.Tensor], mask: Optional[torch.Tensor], config: DistillConfig,
                          transforms: LogitTransforms = LogitTransforms(),
                          return_components: bool = False) -> Union[torch.Tensor, DistillationParts]:
    """The fused lm_head's objective with the full logits (``teacher_logits``: the teacher's lm_head
    output, before its transforms)::

        z_s = transform_logits(F.linear(student_hidden, student_weight, student_bias), *transforms.student())
        z_t = transform_logits(teacher_logits, *transforms.teacher())
        loss_of_config(z_s, z_t, labels, mask, config)      # the CE term of z_s too
    """
    student = transform_logits(F.linear(student_hidden, student_weight, student_bias), *transforms.student())
    teacher = transform_logits(teacher_logits, *transforms.teacher())
    return loss_of_config(student, teacher, labels, mask, config, return_components)


@cfg.settings_keywords(cfg.KD_SETTINGS)
def logitstd_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, reduction: str = "batchmean",
                     mask: Optional[torch.Tensor] = None, **settings) -> torch.Tensor:
    """Logit-standardized KD loss ``tau_s**2 * KL(softmax(Z(y)/tau_t) || softmax(Z(x)/tau_s))``.

    The last dimension holds the classes; every leading index is a row. Rows where ``mask`` is
    False contribute 0 loss and 0 gradient and are not counted by ``"batchmean"``/``"mean"``.
    The loss is float32 (float64 when an input is float64); gradients come back in each input's dtype.

    Args:
        {keywords}
    """
    settings, tau = cfg.split_temperature(settings, "logitstd_kd_loss")
    config = cfg.config_from(settings, cfg.KD_SETTINGS, "logitstd_kd_loss", ce_weight=0.0, kd_weight=1.0,
                             reduction=cfg.kd_reduction(reduction))
    student, teacher, _, mask = check_inputs(student_logits, teacher_logits, None, mask, config)
    return loss_of_config(student, teacher, None, mask, config, False, temperature_per_row(tau, student, teacher))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0, *,
            reduction: str = "batchmean", mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Vanilla (Hinton) KD: ``T**2 * KL(softmax(y/T) || softmax(x/T))``, i.e. no standardization."""
    return logitstd_kd_loss(student_logits, teacher_logits, temperature=temperature, standardize=False,
                            reduction=reduction, mask=mask)


@cfg.settings_keywords(cfg.OBJECTIVE_SETTINGS)
def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: Optional[torch.Tensor] = None, *, mask: Optional[torch.Tensor] = None,
                      reduction: str = "mean", return_components: bool = False,
                      **settings) -> Union[torch.Tensor, DistillationParts]:
    """The distillation objective (the paper's Algorithm 2 with token labels)::

        included = mask & (labels != ignore_index)            # rows of the objective
        ce = F.cross_entropy(x[included], labels[included], label_smoothing=label_smoothing, reduction="none")
        kd = tau_s**2 * KL(softmax(Z(y)/tau_t) || softmax(Z(x)/tau_s))[included]
        loss = (ce_weight * ce + kd_weight * kd).sum() / max(included.sum(), 1)     # reduction="mean"

    Without labels the CE term is absent (pure KD: ``kd_weight * kd``). ``reduction``: ``"mean"``
    (over the included rows: token-level averaging, ``batchmean`` for classification), ``"sum"``, or
    ``"none"`` (per row; excluded rows 0). All rows excluded: loss 0, gradients 0.

    Args:
        {keywords}
    """
    settings, tau = cfg.split_temperature(settings, "distillation_loss")
    config = cfg.config_from(settings, cfg.OBJECTIVE_SETTINGS, "distillation_loss",
                             reduction=cfg.objective_reduction(reduction))
    student, teacher, labels, mask = check_inputs(student_logits, teacher_logits, labels, mask, config)
    return loss_of_config(student, teacher, labels, mask, config, return_components,
                          temperature_per_row(tau, student, teacher))


@cfg.settings_keywords(cfg.DKD_SETTINGS)
def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
             alpha: float = 1.0, beta: float = 8.0, mask: Optional[torch.Tensor] = None, reduction: str = "mean",
             **settings) -> torch.Tensor:
    """Decoupled KD (the official code's ``dkd_loss``) of logit-standardized rows::

        a, b = Z(x) / tau_s, Z(y) / tau_t                       # (plain x / tau_s, y / tau_t without standardize)
        kd = tau_s**2 * (alpha * TCKD + beta * NCKD)            # per row: row_dkd(b, a, labels, alpha, beta)
        loss = kd[included].sum() / max(included.sum(), 1)    # included = mask & (labels != ignore_index)

    The official code's warm-up factor ``min(epoch / 20, 1)`` and its CE belong to the caller.

    Args:
        {keywords}
    """
    settings, tau = cfg.split_temperature(settings, "dkd_loss")
    config = cfg.dkd_config(settings, "dkd_loss", alpha, beta, reduction)
    student, teacher, labels, mask = check_inputs(student_logits, teacher_logits, labels, mask, config)
    return loss_of_config(student, teacher, labels, mask, config, False, temperature_per_row(tau, student, teacher))

