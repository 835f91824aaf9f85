"""The distillation objective in one fused pass: hard-label cross-entropy plus (LS-)KD.

``distillation_loss`` computes the paper's Algorithm 2 objective with token labels::

    ce_weight * CE(labels, softmax(x)) + kd_weight * tau_s**2 * KL(softmax(Z(y)/tau_t) || softmax(Z(x)/tau_s))

averaged over the included rows (``mask`` and ``labels != ignore_index``). The CE term costs the
fused kernels one more exponential per element of the student row they already hold; the two
gradients are summed in registers and written once, already weighted and normalized (docs/design.md,
"the distillation objective").

Equivalent eager code: ``reference.distillation_loss``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from . import config as cfg
from ._checks import check_inputs
from .functional import fused_loss
from .reference import DistillationParts
from .sparse import SparseTeacher

__all__ = ["distillation_loss", "DistillationParts"]


@cfg.settings_keywords(cfg.OBJECTIVE_SETTINGS, docs=("labels", "mask", "reduction", "return_components", "backend"))
def distillation_loss(student_logits: torch.Tensor, teacher_logits: Union[torch.Tensor, SparseTeacher],
                      labels: Optional[torch.Tensor] = None, *, mask: Optional[torch.Tensor] = None,
                      reduction: str = "mean", return_components: bool = False, backend: str = "auto",
                      **settings) -> Union[torch.Tensor, DistillationParts]:
    """Hard-label CE and (logit-standardized) KD in one fused pass.

    Equivalent eager code (``reference.distillation_loss``)::

        included = mask & (labels != ignore_index)
        ce = F.cross_entropy(x[included], labels[included], label_smoothing=label_smoothing, reduction="none")
        kd = logitstd_kd_loss(x, y, ..., reduction="none")[included]          # tau_s**2 * KL per row
        loss = (ce_weight * ce + kd_weight * kd).sum() / max(included.sum(), 1)

    Defaults are the paper's official code (``CE_WEIGHT = 0.1``, ``KD_WEIGHT = 9``, base temperature 2,
    ``correction=1``, ``eps=1e-7``). Liger-Kernel's distillation losses default to
    ``weight_hard_loss = weight_soft_loss = 0.5``, with no standardization and no ``tau**2``: pass
    ``ce_weight=0.5, kd_weight=0.5 / temperature**2, standardize=False`` to match its forward-KL loss
    (Liger 0.8.5 leaves ignored rows out of both terms and divides by the valid rows, as here).

    A :class:`~logitstd_kernels.SparseTeacher` (the teacher's stored top-k, with its rows' statistics)
    may stand for ``teacher_logits``: the KD term is then the forward KL between the teacher over its
    support and the dense student (``support``; docs/design.md section 9; equivalent eager code
    ``reference.sparse_row_divergence``), the kernels read the student row dense and gather the
    teacher's k entries into the same pass, and the gradient goes to the student only.

    Args:
        student_logits: ``(..., V)``; the last dim holds the classes.
        teacher_logits: ``(..., V)``, or a ``SparseTeacher`` of the rows ``(...)``.
        {keywords}
    """
    settings, tau = cfg.split_temperature(settings, "distillation_loss")
    config = cfg.config_from(settings, cfg.OBJECTIVE_SETTINGS, "distillation_loss",
                             reduction=cfg.objective_reduction(reduction))
    student, teacher, labels, mask = check_inputs(student_logits, teacher_logits, labels, mask, config)
    return fused_loss(student, teacher, labels, mask, config, backend, return_components, tau)
