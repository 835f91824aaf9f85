"""Shared test helpers: which fused backends run here, and loss/gradient comparison against the reference."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from logitstd_kernels import reference
from logitstd_kernels._backends import unavailable_reason
from logitstd_kernels.testing import assert_within_eager_error


def fused_cases() -> list[tuple[str, str]]:
    """(backend, device) pairs for every fused backend that can run here."""
    cases = []
    if torch.cuda.is_available():
        cases += [(b, "cuda") for b in ("triton", "cuda") if unavailable_reason(b, "cuda") is None]
    cases += [(b, "cpu") for b in ("triton", "cpu") if unavailable_reason(b, "cpu") is None]
    return cases


def case_id(case: tuple[str, str]) -> str:
    return f"{case[0]}-{case[1]}"


def interpreted(backend: str, device: str) -> bool:
    """The Triton interpreter runs programs one at a time, and its bf16 stores do not round like a GPU's
    (measured: up to ~5x eager's error in bf16 gradients), so bf16 is tested on GPUs only."""
    return backend == "triton" and device == "cpu"


def loss_and_grads(fn: Callable[..., torch.Tensor], student: torch.Tensor, teacher: torch.Tensor,
                   upstream: torch.Tensor, grad_teacher: bool = True,
                   **kwargs) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Run ``fn`` on leaf copies and return (loss, d/d student, d/d teacher) for an upstream gradient."""
    x = student.detach().clone().requires_grad_(True)
    y = teacher.detach().clone().requires_grad_(grad_teacher)
    loss = fn(x, y, **kwargs)
    inputs: Sequence[torch.Tensor] = (x, y) if grad_teacher else (x,)
    grads = torch.autograd.grad(loss, inputs, grad_outputs=upstream.to(loss.dtype))
    return loss.detach(), grads[0], (grads[1] if grad_teacher else None)


def check_against_reference(student: torch.Tensor, teacher: torch.Tensor, backend: str,
                            grad_teacher: bool = True, **kwargs) -> None:
    """Loss and gradients of ``backend`` vs the reference in float64, within 2x the eager error."""
    import logitstd_kernels as lsk

    lead = student.shape[:-1] if kwargs.get("reduction", "batchmean") == "none" else ()
    upstream = torch.rand(lead, dtype=torch.float64, device=student.device) + 0.25  # not 1
    loss, gx, gy = loss_and_grads(lsk.logitstd_kd_loss, student, teacher, upstream, grad_teacher,
                                  backend=backend, **kwargs)
    eager = loss_and_grads(reference.logitstd_kd_loss, student, teacher, upstream, grad_teacher, **kwargs)
    exact = loss_and_grads(reference.logitstd_kd_loss, student.double(), teacher.double(), upstream,
                           grad_teacher, **kwargs)
    assert loss.dtype == reference.accumulation_dtype(student, teacher), f"loss dtype {loss.dtype}"
    assert gx.dtype == student.dtype, f"student grad dtype {gx.dtype} != {student.dtype}"
    assert_within_eager_error("loss", loss, eager[0], exact[0])
    assert_within_eager_error("grad_student", gx, eager[1], exact[1])
    if grad_teacher:
        assert gy.dtype == teacher.dtype, f"teacher grad dtype {gy.dtype} != {teacher.dtype}"
        assert_within_eager_error("grad_teacher", gy, eager[2], exact[2])
