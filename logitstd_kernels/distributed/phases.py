"""The local phases of the vocabulary-parallel objective, behind one interface.

A phase backend is a module with four functions over this rank's (N, W) slices (W = V_r classes);
``_triton/vocab_parallel.py`` implements them as one Triton launch each (the default on CUDA),
``torch_phases.py`` as PyTorch operations over chunks of rows (elsewhere; the kernels' reference in the
tests). ``divergence``: the kernels' code (``DistillConfig.kernel_divergence``).

- ``slice_stats(x, y, acc) -> (N, layout.STATS_COLUMNS)`` float64: mean, scale, scaled M2 and max of
  the slice of x, then of y;
- ``slice_sums(x, y, coef, label_column, sums) -> (N, sums.count)`` float64: the slice's partial sums
  under the global statistics in ``coef`` (``layout.SUMS_COLUMNS``), at the positions of ``sums``
  (``layout.sum_layout``);
- ``slice_pointwise(x, y, coef, *, standardize, divergence, beta) -> (N, layout.pointwise_count(...))``
  float64, jsd and tvd only: the sums of their per-element terms under the global normalizers
  (``coef``: ``layout.POINTWISE_COLUMNS``);
- ``slice_grads(x, y, coef, label_column, grad_x, grad_y, *, t2, kd_weight, ce_weight,
  label_smoothing, standardize, has_labels, divergence, beta)``: writes the slice's (N, W) gradients
  in the accumulation dtype (``coef``: ``layout.GRADS_COLUMNS``; a gradient buffer may be None).

``label_column``: (N,) int64, the label's index in this slice, clamped into it (any value where the
slice does not own the label; ``coef[:, layout.OWNS]`` says which).
"""

from __future__ import annotations

from types import ModuleType

import torch

from .._backends import unavailable_reason
from . import torch_phases

PHASE_BACKENDS = ("auto", "triton", "torch")


def phase_backend(backend: object, device: torch.device) -> ModuleType:
    """The phase module for ``backend``: "auto" is the Triton kernels on CUDA where they can run, else
    the PyTorch phases; a forced backend that cannot run here raises."""
    if backend not in PHASE_BACKENDS:
        raise ValueError(f"backend must be one of {PHASE_BACKENDS}, got {backend!r}")
    reason = unavailable_reason("triton", device.type)
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and reason is None else "torch"
    if backend == "triton":
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot run on {device.type} tensors here: {reason}")
        from .._triton import vocab_parallel

        return vocab_parallel
    return torch_phases
