"""The divergences' per-element terms as PyTorch operations, for the PyTorch phases
(``torch_phases.py``): the formulas of ``csrc/include/logitstd/divergence.h`` and
``_triton/divergence.py`` (their header comments have the math), on tensors in the accumulation dtype.

With q = ea / Za, p = eb / Zb and l = ln p - ln q, a divergence's gradients are
``dD/da = q (g - E_q g)`` and ``dD/db = p (h - E_p h)``; ``student_term`` and ``teacher_term`` are
those per-element terms. A class with p = 0 or q = 0 contributes the limit of its terms, never NaN.
"""

from __future__ import annotations

import math

import torch

from . import layout
from ..config import DIVERGENCE_CODES

_TVD = DIVERGENCE_CODES["tvd"]
# Taylor coefficients, highest order first: phi(t) = e^t - 1 - t = sum_{n=2}^{17} t^n / n! and
# psi(t) = t e^t - e^t + 1 = sum_{n=2}^{16} (n - 1) t^n / n!; both to float64 accuracy for |t| <= 1/2.
_PHI = [1.0 / math.factorial(n) for n in range(17, 1, -1)]
_PSI = [(n - 1) / math.factorial(n) for n in range(16, 1, -1)]


def _series(t: torch.Tensor, coefficients: list[float]) -> torch.Tensor:
    """t^2 (c_0 t^k + ... + c_k) by Horner's rule."""
    r = torch.full_like(t, coefficients[0])
    for c in coefficients[1:]:
        r = r * t + c
    return r * t * t


def bregman_terms(e_p: torch.Tensor, e_q: torch.Tensor, t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """e_p phi(t), phi(t) = e^t - 1 - t, where ``e_q k = e_p e^t`` (row_math.bregman_terms): the series
    where |t| <= 1/2, else e_q k - e_p (1 + t) (no overflow of e^t where e_p is tiny); e_q k where e_p = 0."""
    term = torch.where(t.abs() <= 0.5, e_p * _series(t, _PHI), e_q * k - (e_p * t + e_p))
    return torch.where(e_p > 0, term, e_q * k)


def _jsd_side(v: torch.Tensor, m: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
    """m psi(ln(v/m)) for one side of the JSD, v = m e^lv: the series where |lv| <= 1/2, else
    m - v + v lv; v = 0: its limit m."""
    direct = v * lv + (m - v)
    return torch.where(v > 0, torch.where(lv.abs() <= 0.5, m * _series(lv, _PSI), direct), m)


def pointwise_terms(q: torch.Tensor, p: torch.Tensor, l: torch.Tensor, beta: float,
                    divergence: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, g, h) per element of jsd or tvd; the loss non-negative (no cancellation)."""
    if divergence == _TVD:
        diff = torch.where(q > 0, q * torch.expm1(l), p)  # p - q without cancellation
        half = 0.5 * torch.sign(diff)
        return 0.5 * diff.abs(), -half, half
    # the larger side's ln(side / m) from expm1(-|l|) (no overflow, whatever l), the other's from it
    one_minus = 1.0 - beta
    teacher_larger = l > 0
    weight = torch.where(teacher_larger, l.new_tensor(one_minus), l.new_tensor(beta))  # l's dtype
    larger = -torch.log1p(torch.expm1(-l.abs()) * weight)
    lq = torch.where(teacher_larger, larger - l, larger)  # ln(q / m)
    lp = torch.where(teacher_larger, larger, l + larger)  # ln(p / m)
    m = p * beta + q * one_minus
    loss = _jsd_side(p, m, lp) * beta + _jsd_side(q, m, lq) * one_minus
    zero = torch.zeros_like(l)
    return loss, torch.where(q > 0, lq * one_minus, zero), torch.where(p > 0, lp * beta, zero)


def student_term(ea: torch.Tensor, eb: torch.Tensor, l: torch.Tensor, col, g: torch.Tensor,
                 divergence: int) -> torch.Tensor:
    """q (g - E_q g) per element; ``col(j)``: coefficient column j (``layout``); ``g``: jsd's, tvd's."""
    q = ea * col(layout.INV_ZA)
    if layout.is_pointwise(divergence):
        return q * (g - col(layout.E_QG))
    term = torch.zeros_like(q)
    if layout.has_forward(divergence):
        term = term + (q - eb * col(layout.INV_ZB))
    if layout.has_reverse(divergence):
        term = term + torch.where(ea > 0, q * (-l - col(layout.KL_R)), torch.zeros_like(q))
    return term


def teacher_term(ea: torch.Tensor, eb: torch.Tensor, l: torch.Tensor, col, h: torch.Tensor,
                 divergence: int) -> torch.Tensor:
    """p (h - E_p h) per element (as ``student_term``)."""
    p = eb * col(layout.INV_ZB)
    if layout.is_pointwise(divergence):
        return p * (h - col(layout.E_PH))
    term = torch.zeros_like(p)
    if layout.has_forward(divergence):
        term = term + torch.where(eb > 0, p * (l - col(layout.KL)), torch.zeros_like(p))
    if layout.has_reverse(divergence):
        term = term + (p - ea * col(layout.INV_ZA))
    return term
