"""TRL's ``DistillationTrainer`` with its loss computed by the fused lm_head, logits standardized.

TRL's ``DistillationTrainer`` (on-policy distillation: the student generates the completions) trains
the student on a generalized JSD between its and the teacher's next-token distributions, computed
from both models' last hidden states and lm_heads by
``trl.trainer.distillation_trainer._chunked_divergence_loss``. This module computes that loss with
:func:`logitstd_kernels.fused_linear_distillation_loss` instead:

- :func:`chunked_divergence_loss` takes TRL's function's arguments and returns its results, with
  logit standardization (on by default) and this package's options as extra keywords. With
  ``standardize=False`` it is TRL's loss: the same beta convention (0 forward KL, 1 reverse KL),
  temperature, logit scale and softcapping, and reduction, and no ``T**2`` factor.
- :class:`DistillationTrainer` is ``trl.DistillationTrainer`` with that function as its loss: change
  the import, and the config, generation, logging and distributed set-up stay TRL's.

Equivalent eager code of the loss (the rows where ``completion_mask`` is 0 left out)::

    xs = transform(hs @ Ws.T + bs, student_logit_scale, student_final_logit_softcapping)
    xt = transform(ht @ Wt.T + bt, teacher_logit_scale, teacher_final_logit_softcapping)
    # transform(x, s, c) = c * tanh(s * x / c), or s * x without softcapping
    rows = jsd_beta(softmax(Z(xt) / T), softmax(Z(xs) / T))    # Z: the z-score; the identity without standardize
    loss = rows.sum() / (num_items_in_batch if given else max(len(rows), 1))

Needs ``trl`` (the ``peers`` extra pins the tested 1.16.0); ``import logitstd_kernels`` does not
import this module.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterator, Optional, Union

import torch
import torch.nn.functional as F
import trl
from trl.trainer import distillation_trainer as _trl_distillation

from .. import config as cfg
from ..fused_linear import default_chunk_size, fused_linear_distillation_loss
from ..reference import accumulation_dtype, transform_logits

__all__ = ["DistillationTrainer", "chunked_divergence_loss", "student_entropy_sum"]

# The module global TRL's DistillationTrainer._compute_loss calls for its loss.
_TRL_LOSS_NAME = "_chunked_divergence_loss"
if not callable(getattr(_trl_distillation, _TRL_LOSS_NAME, None)):
    raise ImportError(f"trl {trl.__version__} has no trl.trainer.distillation_trainer.{_TRL_LOSS_NAME}; "
                      "logitstd_kernels.integrations.trl supports the DistillationTrainer of trl 1.16")


@torch.no_grad()
def student_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], keep: torch.Tensor,
                        temperature: float, logit_scale: float = 1.0, softcapping: Optional[float] = None,
                        chunk_size: Optional[int] = None) -> torch.Tensor:
    """The sum over the rows where ``keep`` of the entropy (nats) of the student's next-token
    distribution, ``softmax(transform(hidden @ weight.T + bias) / temperature)`` (not standardized:
    the distribution the student samples from), in float32 (float64 for float64 hidden states), a
    chunk of rows at a time.

    Equivalent eager code::

        logits = transform(F.linear(hidden[keep], weight, bias)) / temperature
        (-(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)).sum()
    """
    rows = hidden.reshape(-1, hidden.shape[-1])[keep.reshape(-1)]
    acc = accumulation_dtype(hidden)
    total = torch.zeros((), dtype=acc, device=hidden.device)
    step = chunk_size or default_chunk_size(rows.shape[0], weight.shape[0], rows.dtype, rows.device)
    for chunk in rows.split(step):
        logits = transform_logits(F.linear(chunk, weight, bias).to(acc), logit_scale, softcapping)
        log_q = F.log_softmax(logits / temperature, dim=-1)
        total += -(log_q.exp() * log_q).sum()
    return total


def chunked_divergence_loss(
    student_hidden_states: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    num_items_in_batch: Optional[Union[torch.Tensor, int, float]] = None,
    student_lm_head_bias: Optional[torch.Tensor] = None,
    teacher_lm_head_bias: Optional[torch.Tensor] = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: Optional[float] = None,
    teacher_final_logit_softcapping: Optional[float] = None,
    temperature: float = 1.0,
    *,
    standardize: bool = True,
    kd_temperature: Optional[float] = None,
    correction: int = 1,
    eps: float = 1e-7,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's ``_chunked_divergence_loss`` (same arguments, same results) through the fused lm_head.

    Returns ``(loss, entropy_sum, n_valid)``: the generalized JSD (``beta``: 0 forward KL, 1 reverse
    KL) summed over the rows where ``completion_mask`` is nonzero and divided by
    ``num_items_in_batch`` (or by their count, at least 1); the student's entropy summed over them
    (:func:`student_entropy_sum`, NaN with ``entropy=False``, which skips its extra lm_head pass); and
    their count. Gradients reach the student's hidden states, weight and bias; the teacher is constant.

    Args beyond TRL's:
        standardize: z-score both models' (scaled, softcapped) logits before the temperature; False
            is TRL's loss.
        kd_temperature: the temperature of the divergence (default: ``temperature``, TRL's, which is
            also its sampling temperature).
        correction, eps, chunk_size, backend: as in :func:`~logitstd_kernels.fused_linear_distillation_loss`.
        entropy: compute ``entropy_sum`` (one more student lm_head matmul per chunk, without gradient).
    """
    tau = temperature if kd_temperature is None else kd_temperature
    keep = completion_mask != 0
    total = fused_linear_distillation_loss(
        student_hidden_states, student_lm_head_weight, teacher_hidden_states.detach(), teacher_lm_head_weight.detach(),
        mask=keep, student_bias=student_lm_head_bias,
        teacher_bias=None if teacher_lm_head_bias is None else teacher_lm_head_bias.detach(),
        ce_weight=0.0, kd_weight=1.0 / (tau * tau), divergence="jsd", beta=beta, temperature=tau,
        standardize=standardize, correction=correction, eps=eps, reduction="sum", chunk_size=chunk_size,
        backend=backend, student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
        student_final_logit_softcapping=student_final_logit_softcapping,
        teacher_final_logit_softcapping=teacher_final_logit_softcapping)
    n_valid = keep.sum()
    if num_items_in_batch is None:
        loss = total / n_valid.clamp(min=1)
    else:
        divisor = num_items_in_batch
        loss = total / (divisor.to(total.device) if isinstance(divisor, torch.Tensor) else divisor)
    entropy_sum = (student_entropy_sum(student_hidden_states, student_lm_head_weight, student_lm_head_bias, keep,
                                       temperature, student_logit_scale, student_final_logit_softcapping, chunk_size)
                   if entropy else torch.full((), math.nan, device=total.device))
    return loss, entropy_sum, n_valid


@contextlib.contextmanager
def _trl_loss_replaced_by(loss_fn) -> Iterator[None]:
    """TRL's ``_chunked_divergence_loss`` is ``loss_fn`` inside the block (restored on exit)."""
    original = getattr(_trl_distillation, _TRL_LOSS_NAME)
    setattr(_trl_distillation, _TRL_LOSS_NAME, loss_fn)
    try:
        yield
    finally:
        setattr(_trl_distillation, _TRL_LOSS_NAME, original)


class DistillationTrainer(trl.DistillationTrainer):
    """``trl.DistillationTrainer`` computing its loss with :func:`chunked_divergence_loss`.

    Takes TRL's arguments (``beta`` and ``temperature`` come from its ``DistillationConfig``) and
    these keywords: ``standardize`` (default True; False reproduces TRL's loss), ``kd_temperature``
    (the divergence's temperature; default TRL's ``temperature``, which also samples the
    completions), ``correction``, ``eps``, ``chunk_size``, ``backend`` and ``entropy`` (the logged
    student entropy; False skips its extra lm_head pass and logs none). Everything else, the hidden
    states, the models' logit scale and softcapping, the masks and the reduction, is TRL's own
    ``_compute_loss``, which this class runs with :func:`chunked_divergence_loss` in the place of
    TRL's chunked divergence.
    """

    def __init__(self, *args, standardize: bool = True, kd_temperature: Optional[float] = None, correction: int = 1,
                 eps: float = 1e-7, chunk_size: Optional[int] = None, backend: str = "auto", entropy: bool = True,
                 **kwargs) -> None:
        options = dict(standardize=standardize, kd_temperature=kd_temperature, correction=correction, eps=eps,
                       chunk_size=cfg.check_chunk_size(chunk_size), backend=cfg.check_backend(backend),
                       entropy=bool(entropy))
        if kd_temperature is not None:
            cfg.check_temperature("kd_temperature", kd_temperature)
        cfg.DistillConfig(standardize=standardize, correction=correction, eps=eps)  # checks them, naming each
        super().__init__(*args, **kwargs)
        self.logitstd_options = options

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        with _trl_loss_replaced_by(functools.partial(chunked_divergence_loss, **self.logitstd_options)):
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
