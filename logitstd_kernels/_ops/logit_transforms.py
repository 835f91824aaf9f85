"""The fused lm_head's logit transforms on one chunk, in place: TRL's logit scale and final softcap.

Per chunk of logits ``x`` (``reference.transform_logits`` is the eager code: the same operations in
the same dtype, so the transformed logits are bit-identical to it)::

    z = x * s;   z = c * tanh(z / c)                    # transform_: in x's buffer
    dL/dx = dL/dz * s * (1 - (z / c)^2)                 # chain_: in the gradient's buffer, z consumed

No buffer beyond the chunk's logits and gradient. Traffic: each operation reads and writes the
C x V block once, 2 x itemsize bytes per element (4 in bf16); at most four operations for the
transform, three for the chain rule, against the 2 H flops per element of the chunk's matmuls.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..reference import transform_logits


def is_identity(scale: float, softcap: Optional[float]) -> bool:
    return scale == 1.0 and softcap is None


def transform_(logits: torch.Tensor, scale: float, softcap: Optional[float], in_place: bool) -> torch.Tensor:
    """``reference.transform_logits(logits, scale, softcap)``, in ``logits``' buffer when ``in_place``
    (a buffer the chunk loop made; not the caller's ``teacher_logits``)."""
    if not in_place or is_identity(scale, softcap):
        return transform_logits(logits, scale, softcap)
    if scale != 1.0:
        logits.mul_(scale)
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits


def chain_(grad: torch.Tensor, transformed: torch.Tensor, scale: float, softcap: Optional[float]) -> torch.Tensor:
    """``grad`` (dL/dz) becomes dL/dx in place, from the transformed logits z (overwritten with z / c).

    ``1 - (z / c)^2`` is ``tanh``'s derivative from its output, as autograd computes it
    (``tanh_backward``: one rounding in the gradient's dtype)."""
    if softcap is not None:
        ratio = transformed.div_(softcap)
        torch.ops.aten.tanh_backward.grad_input(grad, ratio, grad_input=grad)
    if scale != 1.0:
        grad.mul_(scale)
    return grad
