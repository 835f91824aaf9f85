"""What is timed: one callable per provider, computing the KD loss of (student, teacher).

- ``torch``: the eager reference (``logitstd_kernels.reference``), the baseline.
- ``torch_compile``: ``torch.compile`` of the same reference function (inductor fuses it well).
- ``triton``, ``cuda``, ``cpu``: the fused kernels through ``logitstd_kd_loss(..., backend=...)``.
- ``liger``: Liger-Kernel's KL-divergence loss fed by ``log_softmax``/``softmax``, the closest
  published peer; plain forward KL only (it has no standardization), CUDA only, when installed.

``bench --divergences a,b`` times each provider for each divergence: the providers of a divergence
other than forward KL are named ``provider@divergence`` (``split_provider``).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import reference
from .._backends import unavailable_reason
from ..functional import logitstd_kd_loss

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PROVIDERS = ("torch", "torch_compile", "triton", "cuda", "cpu", "liger")


def split_provider(provider: str) -> tuple[str, str]:
    """(provider, divergence) of a provider label: ``cpu@jsd`` is ("cpu", "jsd"); no suffix: forward KL."""
    base, _, divergence = provider.partition("@")
    return base, divergence or "forward_kl"


def with_divergence(provider: str, divergence: str) -> str:
    """The label of ``provider`` timed with ``divergence`` (the bare name for forward KL)."""
    return provider if divergence == "forward_kl" else f"{provider}@{divergence}"


def unavailable(provider: str, device: torch.device, standardize: bool) -> Optional[str]:
    """None if ``provider`` (a label, see ``split_provider``) can be timed on ``device``, else why not."""
    provider, divergence = split_provider(provider)
    if provider in ("torch", "torch_compile"):
        return None
    if provider == "liger":
        if divergence != "forward_kl":
            return "the Liger provider is its KL-divergence loss (forward KL)"
        if standardize:
            return "Liger-Kernel has no logit standardization (use --no-standardize)"
        if device.type != "cuda":
            return "Liger-Kernel runs on CUDA only"
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel is not installed (pip install liger-kernel)"
        return None
    if provider == "triton":
        if device.type != "cuda":
            return "the Triton interpreter is for testing, not timing: Triton is timed on CUDA only"
        return unavailable_reason("triton", device.type)
    return unavailable_reason(provider, device.type)


@functools.lru_cache(maxsize=None)
def _compiled_reference() -> Callable[..., torch.Tensor]:
    return torch.compile(reference.logitstd_kd_loss)


def _liger_loss(temperature: float) -> LossFn:
    from liger_kernel.transformers import LigerKLDIVLoss

    kl = LigerKLDIVLoss(reduction="batchmean")

    def loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        log_q = F.log_softmax(student.float() / temperature, dim=-1)
        p = F.softmax(teacher.float() / temperature, dim=-1)
        return kl(log_q, p) * temperature**2

    return loss


def make_loss(provider: str, temperature: float, standardize: bool, divergence: str = "forward_kl",
              beta: float = 0.5) -> LossFn:
    """The loss function of ``provider`` (a bare name) with the benchmark's fixed options."""
    options = dict(temperature=temperature, standardize=standardize, divergence=divergence, beta=beta)
    if provider == "torch":
        return functools.partial(reference.logitstd_kd_loss, **options)
    if provider == "torch_compile":
        return functools.partial(_compiled_reference(), **options)
    if provider == "liger":
        return _liger_loss(temperature)
    return functools.partial(logitstd_kd_loss, backend=provider, **options)
