"""The math between the collectives: slice statistics merged into the whole row's, the row's loss
from the summed partial sums, and the per-row coefficients the local phases read (``layout.py``).

Every per-row quantity here is float64 and the same bits on every rank (the gathered inputs are
merged in rank order); the coefficient tensors handed to the phases are in the accumulation dtype.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from ..config import DistillConfig
from . import layout


def merge_slices(stats: torch.Tensor, widths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chan's merge of (world, N, 4) slice statistics in rank order: (mean, M2, max) per row, float64.

    ``m = m_a + d n_b / n``, ``M2 = M2_a + M2_b + d^2 n_a n_b / n``, ``d = m_b - m_a``; each slice's M2
    arrives as a scale ``c`` and a scaled sum of squares (``M2 = c^2 m2s``), so rows of 1e18 do not overflow.
    """
    n = widths[0]
    mean = stats[0, :, 0]
    m2 = stats[0, :, 1].square() * stats[0, :, 2]
    top = stats[0, :, 3]
    for r in range(1, stats.shape[0]):
        n_b = widths[r]
        mean_b, m2_b = stats[r, :, 0], stats[r, :, 1].square() * stats[r, :, 2]
        total = n + n_b
        d = mean_b - mean
        mean = mean + d * (n_b / total)
        m2 = m2 + m2_b + d.square() * (n * n_b / total)
        top = torch.maximum(top, stats[r, :, 3])
        n = total
    return mean, m2, top


class RowScales(NamedTuple):
    """Per-row (N,) float64 quantities of the whole row, the same on every rank after phase 1."""

    shift_x: torch.Tensor  # the mean (standardized) or 0
    shift_y: torch.Tensor
    ka: torch.Tensor  # a = (x - shift_x) * ka: 1 / ((sigma + eps) tau) or 1 / tau
    kb: torch.Tensor
    a_max: torch.Tensor  # max of a over the whole row, rounded to the accumulation dtype (the exponentials' shift)
    b_max: torch.Tensor
    sigma_x: Optional[torch.Tensor]  # standardized only
    sigma_y: Optional[torch.Tensor]
    max_x: torch.Tensor  # the student's raw max (the CE's shift)
    dof: Union[int, torch.Tensor]  # V - correction: a host int, or a device tensor without the header


def row_scales(gathered: torch.Tensor, widths: torch.Tensor, num_classes: Union[int, torch.Tensor],
               config: DistillConfig, acc: torch.dtype) -> RowScales:
    """The scales of the whole row from the gathered (world, N, 8+) slice statistics."""
    mean_x, m2_x, max_x = merge_slices(gathered[..., 0:layout.STATS_PER_INPUT], widths)
    mean_y, m2_y, max_y = merge_slices(gathered[..., layout.STATS_PER_INPUT:layout.STATS_COLUMNS], widths)
    tau_s, tau_t = config.temperature, config.teacher_temperature
    if config.standardize:
        dof = num_classes - config.correction
        sigma_x, sigma_y = (m2_x / dof).sqrt(), (m2_y / dof).sqrt()
        ka, kb = 1.0 / ((sigma_x + config.eps) * tau_s), 1.0 / ((sigma_y + config.eps) * tau_t)
        return RowScales(mean_x, mean_y, ka, kb, ((max_x - mean_x) * ka).to(acc), ((max_y - mean_y) * kb).to(acc),
                         sigma_x, sigma_y, max_x, dof)
    ka, kb = torch.full_like(mean_x, 1.0 / tau_s), torch.full_like(mean_y, 1.0 / tau_t)
    return RowScales(torch.zeros_like(mean_x), torch.zeros_like(mean_y), ka, kb, (max_x * ka).to(acc),
                     (max_y * kb).to(acc), None, None, max_x, 1)


def sums_coefficients(scales: RowScales, owns: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Phase 2's (N, ``layout.SUMS_COLUMNS``) coefficients in the accumulation dtype."""
    ones = torch.ones_like(scales.shift_x)
    columns = {layout.SHIFT_X: scales.shift_x, layout.SHIFT_Y: scales.shift_y, layout.KA: scales.ka,
               layout.KB: scales.kb, layout.A_MAX: scales.a_max.double(), layout.B_MAX: scales.b_max.double(),
               layout.SIGMA_X: ones if scales.sigma_x is None else scales.sigma_x,
               layout.SIGMA_Y: ones if scales.sigma_y is None else scales.sigma_y,
               layout.MAX_X: scales.max_x, layout.OWNS: owns.double()}
    return torch.stack([columns[j] for j in range(layout.SUMS_COLUMNS)], 1).to(acc)


class RowLoss(NamedTuple):
    """Per-row (N,) float64 results of the summed partial sums."""

    kd: torch.Tensor  # tau_s^2 KL
    ce: torch.Tensor
    kl: torch.Tensor
    log_ratio: torch.Tensor  # log(Za e^a_max / (Zb e^b_max))
    lse: torch.Tensor  # the CE's log-sum-exp (0 without labels)


def row_loss(totals: torch.Tensor, scales: RowScales, config: DistillConfig, keep: torch.Tensor,
             has_labels: bool, num_classes: Union[int, torch.Tensor]) -> RowLoss:
    """The loss terms from the (N, S) summed partial sums (``layout.ZA`` ...). A label no rank owns
    (outside [0, V)) makes its row's CE NaN (the CPU path raises before: ``unowned_labels``)."""
    za, zb = totals[:, layout.ZA], totals[:, layout.ZB]
    log_ratio = (scales.a_max.double() + za.log()) - (scales.b_max.double() + zb.log())
    kl = totals[:, layout.SUM_PD] / zb + log_ratio
    kd = (config.temperature * config.temperature) * kl
    ce = lse = torch.zeros_like(kd)
    if has_labels:
        lse = scales.max_x + totals[:, layout.ZC].log()
        nll = lse - totals[:, layout.X_LABEL]
        smoothing = config.label_smoothing
        ce = (1 - smoothing) * nll + smoothing * (lse - totals[:, layout.SUM_X] / num_classes)
        owned = totals[:, layout.OWNERS] == 1
        ce = torch.where(owned | ~keep, ce, torch.full_like(ce, float("nan")))
    return RowLoss(kd, ce, kl, log_ratio, lse)


def unowned_labels(totals: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The included rows whose label no rank owns (a label outside [0, V))."""
    return (totals[:, layout.OWNERS] != 1) & keep


def grads_coefficients(sums_coef: torch.Tensor, totals: torch.Tensor, scales: RowScales, loss: RowLoss,
                       keep: torch.Tensor, config: DistillConfig, num_classes: Union[int, torch.Tensor]) -> torch.Tensor:
    """Phase 3's (N, ``layout.GRADS_COLUMNS``) coefficients: phase 2's and the chain rule's factors."""
    za, zb = totals[:, layout.ZA], totals[:, layout.ZB]
    t2 = config.temperature * config.temperature
    factor_x = factor_y = torch.zeros_like(loss.kd)
    if config.standardize:
        eps, dof = config.eps, scales.dof
        sum_au, sum_bu = totals[:, layout.SUM_AU], totals[:, layout.SUM_BU]
        factor_x = (t2 * (sum_au / za - sum_bu / zb)) * scales.sigma_x / ((scales.sigma_x + eps) * dof)
        s_pw, s_pdw = totals[:, layout.SUM_BW] / zb, totals[:, layout.SUM_BDW] / zb
        factor_y = (t2 * (s_pdw + loss.log_ratio * s_pw - loss.kl * s_pw)) * scales.sigma_y / ((scales.sigma_y + eps)
                                                                                              * dof)
    smooth = torch.full_like(loss.kd, config.label_smoothing) / num_classes
    columns = {layout.INV_ZA: 1 / za, layout.INV_ZB: 1 / zb, layout.FACTOR_X: factor_x, layout.FACTOR_Y: factor_y,
               layout.LOG_RATIO: loss.log_ratio, layout.KL: loss.kl, layout.LSE: loss.lse,
               layout.SMOOTH_OVER_V: smooth, layout.KEEP: keep.double()}
    extra = torch.stack([columns[j] for j in range(layout.SUMS_COLUMNS, layout.GRADS_COLUMNS)], 1)
    return torch.cat((sums_coef, extra.to(sums_coef.dtype)), 1)
