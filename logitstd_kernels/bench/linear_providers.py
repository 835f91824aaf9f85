"""What ``bench --fused-linear`` times: one step function per provider, each the loss of
``(h, W, ht, Wt, labels)`` (student and teacher hidden states and lm_head weights, token labels),
then ``loss.backward()`` into the student's hidden states and weight.

- ``fused``: ``fused_linear_distillation_loss`` (chunked; the backend ``"auto"`` picks), its weight
  gradient accumulated in float32 (the default for bf16/fp16 weights);
- ``fused_accum_bf16``: the same with ``accum_dtype=torch.bfloat16`` (half the accumulator's memory);
- ``gemms``: the fused step's four GEMMs alone: its chunk loop (``_ops/chunks.run_chunks``, the same
  chunk size and accumulator) with the objective ``0.5 * ||h @ W.T||^2``, whose logits gradient is
  the logits themselves, so no loss kernel runs: per chunk the student and teacher logits GEMMs, the
  hidden states' and the weight's gradient GEMMs and one dot product, then the backward's conversion
  of the gradients (as the fused op's). ``fused`` minus ``gemms`` is what the loss costs in the step;
- ``torch``: the eager composition, ``distillation_loss(F.linear(h, W), F.linear(ht, Wt), labels)``
  with the full logits (``backend="torch"``, the package's reference);
- ``torch_compile``: ``torch.compile`` of that composition;
- ``liger``: Liger-Kernel's ``LigerFusedLinearJSDLoss(beta=0)`` (forward KL, chunked, pure PyTorch:
  runs on the CPU too): ``weight_hard_loss = ce_weight``, ``weight_soft_loss = kd_weight * T**2``;
- ``orda``: orda-kernel's ``distillation_loss`` with a ``SeparateTeacher`` (chunked Triton on CUDA,
  its eager fallback elsewhere), forward KL: ``student_ce_weight = ce_weight``,
  ``kl_weight = kd_weight`` (it scales the KL by ``T**2`` as we do);
- ``trl``: TRL's ``DistillationTrainer`` loss, ``trl.trainer.distillation_trainer._chunked_divergence_loss``
  with ``beta=0`` (forward KL, tiled Triton on CUDA, computed in float32; mean over the tokens, no
  ``T**2``): our ``ce_weight=0, kd_weight=1 / T**2``. It has no cross-entropy term.

The peers have no logit standardization: they are timed on the plain objectives only.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .._ops.chunks import ChunkRows, LinearInputs, default_accum_dtype, run_chunks, scaled_gradient
from ..fused_linear import default_chunk_size, fused_linear_distillation_loss

StepLoss = Callable[..., torch.Tensor]
PROVIDERS = ("fused", "fused_accum_bf16", "gemms", "torch", "torch_compile", "liger", "orda", "trl")
NOT_THE_OBJECTIVE = ("gemms",)  # no speedup over eager: they compute another function
BF16_ACCUMULATOR = ("fused_accum_bf16",)  # their weight gradient is rounded to bf16 whatever the inputs
# Timed on the first objective only: what they measure does not depend on the objective.
FIRST_SWEEP_ONLY = ("fused_accum_bf16", "gemms")
# provider -> (the package, the module its step imports)
PEERS = {"liger": ("liger-kernel", "liger_kernel.chunked_loss"), "orda": ("orda-kernel", "orda_kernel"),
         "trl": ("trl", "trl.trainer.distillation_trainer")}


def unavailable(provider: str, sweep: str, first_sweep: str, options: dict) -> Optional[str]:
    """None if ``provider`` can be timed on the objective ``options`` (of the sweep ``sweep``), else why not."""
    if provider in FIRST_SWEEP_ONLY and sweep != first_sweep:
        return f"does not depend on the objective: timed on the {first_sweep} sweep"
    if provider in PEERS:
        package, module = PEERS[provider]
        if options["standardize"]:
            return f"{package} has no logit standardization (timed on the plain objectives)"
        if provider == "trl" and options["ce_weight"]:
            return "TRL's chunked divergence has no cross-entropy term (timed on the objective without one)"
        return _import_failure(package, module)
    return None


def _import_failure(package: str, module: str) -> Optional[str]:
    """None if ``module`` imports, else why not (not installed, or an error of its own or of its
    dependencies here, which leaves that peer out instead of failing the run)."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return f"{package} is not installed (pip install {package})"
    try:
        importlib.import_module(module)
    except Exception as exc:
        return f"{module} does not import here: {type(exc).__name__}: {exc}"
    return None


def _eager(h, w, ht, wt, labels, **options) -> torch.Tensor:
    return fused_linear_distillation_loss(h, w, ht, wt, labels, backend="torch", **options)


@functools.lru_cache(maxsize=None)
def _compiled() -> StepLoss:
    return torch.compile(_eager)


def _half_square_rows(xs: torch.Tensor, xt: torch.Tensor, labels, mask) -> ChunkRows:
    """The row function of ``0.5 * ||logits||^2``: its gradient is the logits themselves (no kernel)."""
    flat = xs.reshape(-1)
    return ChunkRows(torch.stack([0.5 * torch.dot(flat, flat).float(), *xs.new_zeros(2, dtype=torch.float32)]), xs)


class _GemmsOnly(torch.autograd.Function):
    """``0.5 * ||h @ W.T||^2`` through the fused lm_head's chunk loop (the teacher's logits computed and
    dropped), its gradients computed in the forward and scaled in the backward, as the fused op does."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, ht: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
        inputs = LinearInputs(h, w, None, ht, wt, None, None, None, None)
        chunk = default_chunk_size(h.shape[0], w.shape[0], h.dtype, h.device)
        totals, grads = run_chunks(inputs, None, _half_square_rows, chunk, default_accum_dtype(w), (True, True, False),
                                   torch.float32)
        ctx.save_for_backward(grads.hidden, grads.weight)
        ctx.dtypes = (h.dtype, w.dtype)
        return totals[0]

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        return tuple(scaled_gradient(saved, grad_loss, dtype) for saved, dtype in zip(ctx.saved_tensors, ctx.dtypes)) \
            + (None, None)


def gemms_only(h, w, ht, wt, labels) -> torch.Tensor:
    """The ``gemms`` provider's step loss (``labels`` unused)."""
    return _GemmsOnly.apply(h, w, ht, wt)


def gemms_reference(h, w, ht, wt, labels) -> torch.Tensor:
    """Eager ``0.5 * ||h @ W.T||^2``, the ``gemms`` provider's reference."""
    return 0.5 * F.linear(h, w).pow(2).sum()


def _liger(options: dict) -> StepLoss:
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss = LigerFusedLinearJSDLoss(weight_hard_loss=options["ce_weight"],
                                   weight_soft_loss=options["kd_weight"] * options["temperature"] ** 2, beta=0.0,
                                   temperature=options["temperature"])
    return lambda h, w, ht, wt, labels: loss(h, w, ht, wt, labels)


def _orda(options: dict) -> StepLoss:
    from orda_kernel import SeparateTeacher, distillation_loss

    def loss(h, w, ht, wt, labels):
        return distillation_loss(h, w, labels, SeparateTeacher(hidden=ht, weight=wt),
                                 student_ce_weight=options["ce_weight"], kl_weight=options["kd_weight"],
                                 kl_temperature=options["temperature"], kl_divergence="forward").loss

    return loss


def _trl(options: dict) -> StepLoss:
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    def loss(h, w, ht, wt, labels):
        mask = torch.ones(1, h.shape[0], dtype=torch.long, device=h.device)
        return _chunked_divergence_loss(h.unsqueeze(0), ht.unsqueeze(0), w, wt, mask, 0.0,
                                        temperature=options["temperature"])[0]

    return loss


def make_step_loss(provider: str, options: dict) -> StepLoss:
    """The provider's loss of (h, W, ht, Wt, labels) for the objective ``options``."""
    if provider == "fused":
        return functools.partial(fused_linear_distillation_loss, **options)
    if provider == "fused_accum_bf16":
        return functools.partial(fused_linear_distillation_loss, accum_dtype=torch.bfloat16, **options)
    if provider == "gemms":
        return gemms_only
    if provider == "torch":
        return functools.partial(_eager, **options)
    if provider == "torch_compile":
        return functools.partial(_compiled(), **options)
    peers = {"liger": _liger, "orda": _orda, "trl": _trl}
    if provider in peers:
        return peers[provider](options)
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def reference_step(provider: str, options: dict) -> StepLoss:
    """The eager function the provider's loss and gradients are checked against (in float64)."""
    return gemms_reference if provider == "gemms" else functools.partial(_eager, **options)
