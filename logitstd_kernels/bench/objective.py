"""The benchmark of the distillation objective (``bench --objective``): CE + KD with token labels.

Providers (each computes ``0.1 * CE + 9 * LS-KD`` at the bench's temperature, or plain KD with
``--no-standardize``, averaged over the rows; no label is ``ignore_index``):

- ``torch``: the eager objective, ``F.cross_entropy`` plus the eager LS-KD (``reference.distillation_loss``);
- ``torch_compile``: ``torch.compile`` of that eager code;
- ``cpu``, ``cuda``, ``triton``: the fused objective, ``distillation_loss(..., backend=...)`` (one pass);
- ``<backend>_kd+torch_ce``: our fused KD kernel plus torch's ``F.cross_entropy`` (what a user of the
  KD loss alone writes: one more read of the logits and one more N x V gradient);
- ``<backend>_kd_only``: the KD term alone through our KD kernel (``9 * logitstd_kd_loss``), the
  yardstick of what the CE costs inside the fused pass (its gate: the reference with ``ce_weight=0``).

The correctness gate is the tests' criterion (``logitstd_kernels.testing``) on the loss and the
student gradient against the float64 reference objective, a chunk of rows at a time. Its eager
yardstick is the objective's math in float32 (one rounding to the input dtype allowed), except for
the providers in ``SUMMED_IN_INPUT_DTYPE``: their student gradient is torch's CE gradient plus a KD
gradient, each rounded to a bf16/fp16 input's dtype and then summed in it (three roundings where the
fused objective has one), so they are held to that same composition in the input dtype.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import reference
from .._backends import unavailable_reason
from ..functional import logitstd_kd_loss
from ..objective import distillation_loss
from ..testing import eager_error_violation

ObjectiveFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
FUSED = ("triton", "cuda", "cpu")
OBJECTIVE_PROVIDERS = ("torch", "torch_compile", *FUSED, *(f"{b}_kd+torch_ce" for b in FUSED),
                       *(f"{b}_kd_only" for b in FUSED))
WEIGHTS = dict(ce_weight=0.1, kd_weight=9.0)  # the paper's official code
SUMMED_IN_INPUT_DTYPE = ("torch", *(f"{b}_kd+torch_ce" for b in FUSED))


def labels_for(rows: int, vocab: int, device: torch.device) -> torch.Tensor:
    """The case's token labels (fixed seed, none ignored)."""
    generator = torch.Generator(device=device).manual_seed(rows * 7919 + vocab)
    return torch.randint(0, vocab, (rows,), generator=generator, device=device)


def unavailable(provider: str, device: torch.device) -> Optional[str]:
    """None if ``provider`` (a label: ``providers.split_provider``) can be timed on ``device``, else why not."""
    backend = provider.partition("@")[0].split("_kd")[0]
    if backend in ("torch", "torch_compile"):
        return None
    if backend == "triton" and device.type != "cuda":
        return "the Triton interpreter is for testing, not timing: Triton is timed on CUDA only"
    return unavailable_reason(backend, device.type)


def _eager(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, ce_weight: float = WEIGHTS["ce_weight"],
           **options) -> torch.Tensor:
    """The eager objective as a user writes it (no ignored labels here): CE plus the eager LS-KD."""
    ce = F.cross_entropy(student.to(reference.accumulation_dtype(student, teacher)), labels)
    return ce_weight * ce + WEIGHTS["kd_weight"] * reference.logitstd_kd_loss(student, teacher, **options)


@functools.lru_cache(maxsize=None)
def _compiled() -> Callable[..., torch.Tensor]:
    return torch.compile(_eager)


def make_objective(provider: str, temperature: float, standardize: bool, divergence: str = "forward_kl",
                   beta: float = 0.5) -> ObjectiveFn:
    """The objective of ``provider`` (a bare name): ``fn(student, teacher, labels)``."""
    options = dict(temperature=temperature, standardize=standardize, divergence=divergence, beta=beta)
    if provider == "torch":
        return functools.partial(_eager, **options)
    if provider == "torch_compile":
        return functools.partial(_compiled(), **options)
    if provider in FUSED:
        return functools.partial(distillation_loss, backend=provider, **WEIGHTS, **options)
    backend = provider.split("_kd")[0]
    if provider.endswith("_kd_only"):
        def kd_only(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return WEIGHTS["kd_weight"] * logitstd_kd_loss(student, teacher, backend=backend, **options)

        return kd_only

    def kd_plus_torch_ce(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        kd = logitstd_kd_loss(student, teacher, backend=backend, **options)
        return WEIGHTS["ce_weight"] * F.cross_entropy(student.float(), labels) + WEIGHTS["kd_weight"] * kd

    return kd_plus_torch_ce


def objective_violation(fn: ObjectiveFn, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                        temperature: float, standardize: bool, ce_weight: float = WEIGHTS["ce_weight"],
                        eager_in_input_dtype: bool = False, divergence: str = "forward_kl",
                        beta: float = 0.5, no_grad: bool = False) -> Optional[str]:
    """None if ``fn`` matches the reference objective (loss and student gradient, every row), else why not.

    The eager yardstick is the reference objective in float32 (``reduction="sum"``), or with
    ``eager_in_input_dtype`` the eager composition ``_eager`` on the inputs as given (its CE and KD
    gradients rounded to their dtype before they are summed). ``no_grad=True`` also checks the loss of
    a call in which no input requires grad."""
    x = student.detach().requires_grad_(True)
    loss = fn(x, teacher, labels)
    (grad_x,) = torch.autograd.grad(loss, (x,))
    rows, vocab = student.shape
    chunk = max(1, (2**24 if student.device.type == "cuda" else 2**22) // vocab)
    kd_options = dict(temperature=temperature, standardize=standardize, divergence=divergence, beta=beta)
    options = dict(kd_options, reduction="sum", ce_weight=ce_weight, kd_weight=WEIGHTS["kd_weight"])
    exact_sum = torch.zeros((), dtype=torch.float64, device=student.device)
    eager_sum = torch.zeros((), dtype=torch.float64, device=student.device)
    for start in range(0, rows, chunk):
        part = slice(start, start + chunk)
        xs, ys, ls = student[part], teacher[part], labels[part]
        exact_x = xs.double().requires_grad_(True)
        exact = reference.distillation_loss(exact_x, ys.double(), ls, **options)
        (want,) = torch.autograd.grad(exact / rows, (exact_x,))
        if eager_in_input_dtype:
            eager_x = xs.detach().requires_grad_(True)
            eager = _eager(eager_x, ys, ls, ce_weight=ce_weight, **kd_options) * xs.shape[0]
        else:
            eager_x = xs.float().requires_grad_(True)
            eager = reference.distillation_loss(eager_x, ys.float(), ls, **options)
        (got_eager,) = torch.autograd.grad(eager / rows, (eager_x,))
        exact_sum += exact.detach()
        eager_sum += eager.detach().double()
        violation = eager_error_violation("grad_student", grad_x[part], got_eager, want)
        if violation:
            return f"rows {start}..{min(start + chunk, rows) - 1}: {violation}"
    violation = eager_error_violation("loss", loss.detach(), eager_sum / rows, exact_sum / rows)
    if not violation and no_grad:
        violation = eager_error_violation("loss (no input requires grad)", fn(student.detach(), teacher, labels),
                                          eager_sum / rows, exact_sum / rows)
    return violation


def gate_ce_weight(provider: str) -> float:
    """The CE weight of the objective ``provider`` computes (0 for the KD-only yardstick)."""
    return 0.0 if provider.endswith("_kd_only") else WEIGHTS["ce_weight"]
