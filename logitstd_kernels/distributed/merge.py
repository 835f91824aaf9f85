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
    shift_d: torch.Tensor  # c: the whole row's mean of d = b - a (0 where not finite), in the accumulation dtype


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
        zero = torch.zeros_like(mean_x, dtype=acc)  # the z-scores' means are 0: so is d's
        return RowScales(mean_x, mean_y, ka, kb, ((max_x - mean_x) * ka).to(acc), ((max_y - mean_y) * kb).to(acc),
                         sigma_x, sigma_y, max_x, dof, zero)
    ka, kb = torch.full_like(mean_x, 1.0 / tau_s), torch.full_like(mean_y, 1.0 / tau_t)
    shift_d = (mean_y * kb - mean_x * ka).to(acc)
    shift_d = torch.where(torch.isfinite(shift_d), shift_d, torch.zeros_like(shift_d))  # e.g. a -inf logit
    return RowScales(torch.zeros_like(mean_x), torch.zeros_like(mean_y), ka, kb, (max_x * ka).to(acc),
                     (max_y * kb).to(acc), None, None, max_x, 1, shift_d)


def sums_coefficients(scales: RowScales, owns: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Phase 2's (N, ``layout.SUMS_COLUMNS``) coefficients in the accumulation dtype."""
    ones = torch.ones_like(scales.shift_x)
    a_max, b_max, shift_d = scales.a_max.double(), scales.b_max.double(), scales.shift_d.double()
    columns = {layout.SHIFT_X: scales.shift_x, layout.SHIFT_Y: scales.shift_y, layout.KA: scales.ka,
               layout.KB: scales.kb, layout.A_MAX: a_max, layout.B_MAX: b_max,
               layout.SIGMA_X: ones if scales.sigma_x is None else scales.sigma_x,
               layout.SIGMA_Y: ones if scales.sigma_y is None else scales.sigma_y,
               layout.MAX_X: scales.max_x, layout.OWNS: owns.double(), layout.SHIFT_D: shift_d,
               layout.K_F: (a_max - b_max - shift_d).exp(), layout.K_R: (b_max - a_max + shift_d).exp()}
    return torch.stack([columns[j] for j in range(layout.SUMS_COLUMNS)], 1).to(acc)


class RowLoss(NamedTuple):
    """Per-row (N,) float64 results of the summed partial sums."""

    kd: torch.Tensor  # tau_s^2 D (jsd, tvd: after the pointwise phase, ``with_pointwise``)
    ce: torch.Tensor
    kl: torch.Tensor  # forward KL (0 where the divergence has none)
    kl_r: torch.Tensor  # reverse KL (0 where the divergence has none)
    log_ratio: torch.Tensor  # L = log(Za e^a_max / (Zb e^b_max)) = log(q_k / p_k) - (a_k - b_k)
    lse: torch.Tensor  # the CE's log-sum-exp (0 without labels)
    e_qg: torch.Tensor  # jsd, tvd: E_q g and E_p h (0 elsewhere)
    e_ph: torch.Tensor


def _kl(totals: torch.Tensor, at: int, z: torch.Tensor, log_ratio: torch.Tensor, shift_d: torch.Tensor,
        sign: float) -> torch.Tensor:
    """One KL direction (sign 1 forward, -1 reverse) from its group of sums at ``at``.

    The direct form ``sign (sum e d / Z + L)`` adds terms of size ``sum |e d| / Z + |L|``; where they
    cancel (high temperatures, a student close to its teacher) the Bregman form with the shift c is
    exact and made of non-negative terms: ``KL = sum e phi(t) / Z - phi(v)``, ``v = sign (L - c)``,
    phi(t) = e^t - 1 - t (the identity ``sum p e^-(d + c) = e^(L - c)``), with c the row's mean of d,
    close to L where the direct form cancels, so that ``phi(v)`` is small. Each row takes the form
    whose rounding bound is smaller (the Bregman one only where it is finite)."""
    direct = sign * (totals[:, at + layout.KL_D] / z + log_ratio)
    direct_size = totals[:, at + layout.KL_ABS] / z + log_ratio.abs()
    breg = totals[:, at + layout.KL_BREG] / z
    v = sign * (log_ratio - shift_d)
    phi_v = torch.expm1(v) - v
    refined = breg - phi_v
    refined_size = breg + phi_v + torch.expm1(v).abs()
    better = torch.isfinite(refined) & (refined_size < direct_size)
    return torch.where(better, refined, direct)


def row_loss(totals: torch.Tensor, scales: RowScales, config: DistillConfig, keep: torch.Tensor,
             sums: layout.SumLayout, num_classes: Union[int, torch.Tensor]) -> RowLoss:
    """The loss terms from the (N, S) summed partial sums (``sums``: their positions). A label no rank
    owns (outside [0, V)) makes its row's CE NaN (the CPU path raises before: ``unowned_labels``).
    jsd and tvd leave ``kd`` 0 here (``with_pointwise``)."""
    za, zb = totals[:, layout.ZA], totals[:, layout.ZB]
    log_ratio = (scales.a_max.double() + za.log()) - (scales.b_max.double() + zb.log())
    shift_d = scales.shift_d.double()
    zero = torch.zeros_like(za)
    kl = _kl(totals, sums.forward, zb, log_ratio, shift_d, 1.0) if sums.forward >= 0 else zero
    kl_r = _kl(totals, sums.reverse, za, log_ratio, shift_d, -1.0) if sums.reverse >= 0 else zero
    kd = (config.temperature * config.temperature) * (kl + kl_r)
    ce = lse = zero
    if sums.labels >= 0:
        at = sums.labels
        lse = scales.max_x + totals[:, at + layout.ZC].log()
        nll = lse - totals[:, at + layout.X_LABEL]
        smoothing = config.label_smoothing
        ce = nll if smoothing == 0 else (1 - smoothing) * nll + smoothing * (lse - totals[:, at + layout.SUM_X]
                                                                              / num_classes)  # sum x: -inf
        owned = totals[:, at + layout.OWNERS] == 1
        ce = torch.where(owned | ~keep, ce, torch.full_like(ce, float("nan")))
    return RowLoss(kd, ce, kl, kl_r, log_ratio, lse, zero, zero)


def unowned_labels(totals: torch.Tensor, keep: torch.Tensor, sums: layout.SumLayout) -> torch.Tensor:
    """The included rows whose label no rank owns (a label outside [0, V))."""
    return (totals[:, sums.labels + layout.OWNERS] != 1) & keep


def pointwise_coefficients(sums_coef: torch.Tensor, totals: torch.Tensor, loss: RowLoss) -> torch.Tensor:
    """The pointwise phase's (N, ``layout.POINTWISE_COLUMNS``) coefficients: phase 2's, 1/Za, 1/Zb, L."""
    extra = torch.stack((1 / totals[:, layout.ZA], 1 / totals[:, layout.ZB], loss.log_ratio), 1)
    return torch.cat((sums_coef, extra.to(sums_coef.dtype)), 1)


def with_pointwise(loss: RowLoss, pointwise: torch.Tensor, config: DistillConfig) -> RowLoss:
    """jsd, tvd: the divergence, E_q g and E_p h from the (N, ``layout.pointwise_count``) summed
    pointwise sums."""
    kd = (config.temperature * config.temperature) * pointwise[:, layout.PW_LOSS]
    # A NaN row (its normalizers NaN) stays NaN: tvd's per-element selection (q > 0) would drop it.
    kd = torch.where(torch.isnan(loss.log_ratio), loss.log_ratio, kd)
    return loss._replace(kd=kd, e_qg=pointwise[:, layout.PW_QG], e_ph=pointwise[:, layout.PW_PH])


def _chain_sums(totals: torch.Tensor, pointwise: Optional[torch.Tensor], sums: layout.SumLayout,
                loss: RowLoss) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_k s_k u_k, sum_k t_k w_k) of the per-element terms s = q (g - E_q g), t = p (h - E_p h)
    (``divergence.h``): what the standardization's chain rule needs."""
    za, zb = totals[:, layout.ZA], totals[:, layout.ZB]
    qu, pw = totals[:, sums.std + layout.AU] / za, totals[:, sums.std + layout.BW] / zb
    if pointwise is not None:
        return (pointwise[:, layout.PW_QGU] - loss.e_qg * qu, pointwise[:, layout.PW_PHW] - loss.e_ph * pw)
    s_u = s_w = torch.zeros_like(za)
    if sums.forward >= 0:  # s = q - p, t = p (l - KL), l = d + L
        at = sums.forward
        s_u = s_u + (qu - totals[:, at + layout.KL_U] / zb)
        s_w = s_w + (totals[:, at + layout.KL_W] / zb + (loss.log_ratio - loss.kl) * pw)
    if sums.reverse >= 0:  # s = q (-l - RKL), t = p - q
        at = sums.reverse
        s_u = s_u - (totals[:, at + layout.KL_U] / za + (loss.log_ratio + loss.kl_r) * qu)
        s_w = s_w + (pw - totals[:, at + layout.KL_W] / za)
    return s_u, s_w


def grads_coefficients(coef: torch.Tensor, totals: torch.Tensor, pointwise: Optional[torch.Tensor],
                       scales: RowScales, loss: RowLoss, keep: torch.Tensor, config: DistillConfig,
                       sums: layout.SumLayout, num_classes: Union[int, torch.Tensor]) -> torch.Tensor:
    """Phase 3's (N, ``layout.GRADS_COLUMNS``) coefficients: phase 2's (``coef``: the sums' or the
    pointwise phase's), then 1/Za, 1/Zb and L where ``coef`` lacks them, and the chain rule's factors."""
    t2 = config.temperature * config.temperature
    factor_x = factor_y = torch.zeros_like(loss.kd)
    if config.standardize:
        s_u, s_w = _chain_sums(totals, pointwise, sums, loss)
        eps, dof = config.eps, scales.dof
        factor_x = (t2 * s_u) * scales.sigma_x / ((scales.sigma_x + eps) * dof)
        factor_y = (t2 * s_w) * scales.sigma_y / ((scales.sigma_y + eps) * dof)
    if coef.shape[1] == layout.SUMS_COLUMNS:
        coef = pointwise_coefficients(coef, totals, loss)
    smooth = torch.full_like(loss.kd, config.label_smoothing) / num_classes
    columns = {layout.FACTOR_X: factor_x, layout.FACTOR_Y: factor_y, layout.KL: loss.kl, layout.KL_R: loss.kl_r,
               layout.E_QG: loss.e_qg, layout.E_PH: loss.e_ph, layout.LSE: loss.lse,
               layout.SMOOTH_OVER_V: smooth, layout.KEEP: keep.double()}
    extra = torch.stack([columns[j] for j in range(layout.POINTWISE_COLUMNS, layout.GRADS_COLUMNS)], 1)
    return torch.cat((coef, extra.to(coef.dtype)), 1)
