"""The paper's other logit-based methods, fused: decoupled KD (DKD) as a loss function and module.

DKD (Zhao et al., CVPR 2022) splits the KD term into the target class against the rest (TCKD) and the
distribution over the non-target classes (NCKD): ``tau_s**2 * (alpha TCKD + beta NCKD)``. The fused
kernels compute it as the ``"dkd"`` divergence of the objective (docs/design.md section 8): one pass
for p_g, q_g, the non-target normalizers and both KLs, with both gradients.

Equivalent eager code: ``reference.dkd_loss``.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import config as cfg
from ._checks import check_inputs
from .functional import fused_loss
from .modules import ConfiguredLoss

__all__ = ["dkd_loss", "DKDLoss"]


@cfg.settings_keywords(cfg.DKD_SETTINGS, docs=("labels", "mask", "reduction", "backend"))
def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
             alpha: float = 1.0, beta: float = 8.0, mask: Optional[torch.Tensor] = None, reduction: str = "mean",
             backend: str = "auto", **settings) -> torch.Tensor:
    """Logit-standardized decoupled KD, fused: ``alpha * TCKD + beta * NCKD`` (each times ``tau_s**2``).

    Equivalent eager code (``reference.dkd_loss``)::

        p, q = softmax(Z(y) / tau_t), softmax(Z(x) / tau_s)      # g = labels; Z: the z-score
        tckd = KL([p_g, 1 - p_g] || [q_g, 1 - q_g])
        nckd = KL(softmax over the classes but g of Z(y) / tau_t || the same of the student)
        loss = mean over the included rows of tau_s**2 * (alpha * tckd + beta * nckd)

    The official code's defaults under logit standardization: ``temperature=2``, ``alpha=9``,
    ``beta=72`` (its 1 and 8 times its KD weight 9), plus ``0.1 * CE`` and a warm-up factor
    ``min(epoch / 20, 1)`` on this term, which belong to the caller.

    Args:
        alpha: the weight of TCKD (finite, >= 0).
        beta: the weight of NCKD (finite, >= 0).
        {keywords}
    """
    settings, tau = cfg.split_temperature(settings, "dkd_loss")
    config = cfg.dkd_config(settings, "dkd_loss", alpha, beta, reduction)
    student, teacher, labels, mask = check_inputs(student_logits, teacher_logits, labels, mask, config)
    return fused_loss(student, teacher, labels, mask, config, backend, False, tau)


class DKDLoss(ConfiguredLoss):
    """Decoupled KD module; ``forward(student, teacher, labels, mask=None)``: :func:`dkd_loss` with
    this module's settings (``alpha`` and ``beta`` are ``config.dkd_alpha`` and ``config.dkd_beta``)."""

    _shown = cfg.DKD_SETTINGS + ("dkd_alpha", "dkd_beta")

    @cfg.settings_keywords(cfg.DKD_SETTINGS)
    def __init__(self, *, alpha: float = 1.0, beta: float = 8.0, reduction: str = "mean", backend: str = "auto",
                 **settings) -> None:
        super().__init__()
        self.config = cfg.dkd_config(settings, "DKDLoss", alpha, beta, reduction)
        self.backend = cfg.check_backend(backend)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        student, teacher, labels, mask = check_inputs(student_logits, teacher_logits, labels, mask, self.config)
        return fused_loss(student, teacher, labels, mask, self.config, self.backend, False)
