"""The local phases of the vocabulary-parallel objective as PyTorch operations over chunks of rows:
the phase backend off CUDA, and the Triton kernels' reference in the tests (``phases.py`` has the
interface; the math is docs/tensor-parallel.md; the divergences' per-element terms ``torch_terms.py``).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import layout, torch_terms

# Rows per chunk of the PyTorch phases: each works on (rows_per_chunk, W) temporaries in the
# accumulation dtype (about ten of them live at once in phase 3), so a chunk of one temporary is
# kept to this many bytes: 256 MiB on CUDA, 16 MiB elsewhere (the CPU's caches; 2048 x 32000 float32
# makes 16). Only the outputs, the gradients of the slice, are (N, W).
_CHUNK_BYTES = {"cuda": 256 << 20, "cpu": 16 << 20}


def _chunks(rows: int, width: int, acc: torch.dtype, device: torch.device) -> list[slice]:
    budget = _CHUNK_BYTES.get(device.type, _CHUNK_BYTES["cpu"])
    per = max(1, budget // max(1, width * torch.empty((), dtype=acc).element_size()))
    return [slice(i, min(i + per, rows)) for i in range(0, rows, per)]


def _moments(v: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """(N, 4) float64: mean, scale s, scaled M2 (M2 = s^2 * m2s) and max of each row of the slice."""
    v = v.to(acc)
    mean = v.mean(-1, keepdim=True)
    dev = v - mean
    scale = dev.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(acc).tiny)
    m2s = (dev / scale).square().sum(-1, keepdim=True)
    return torch.cat((mean, scale, m2s, v.amax(-1, keepdim=True)), -1).double()


def slice_stats(x: torch.Tensor, y: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Phase 1 (see the module docstring)."""
    parts = [torch.cat((_moments(x[part], acc), _moments(y[part], acc)), -1)
             for part in _chunks(x.shape[0], x.shape[1], acc, x.device)]
    return torch.cat(parts) if parts else torch.empty((0, layout.STATS_COLUMNS), dtype=torch.float64, device=x.device)


class _Terms:
    """The per-element terms of one chunk of rows of the slice, in the accumulation dtype."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, coef: torch.Tensor, part: slice, standardize: bool):
        self.coef, self.part = coef, part
        self.x, self.y = x[part].to(coef.dtype), y[part].to(coef.dtype)
        a = (self.x - self.col(layout.SHIFT_X)) * self.col(layout.KA)
        b = (self.y - self.col(layout.SHIFT_Y)) * self.col(layout.KB)
        self.ea, self.eb, self.diff = torch.exp(a - self.col(layout.A_MAX)), torch.exp(b - self.col(layout.B_MAX)), b - a
        self.u = self.w = None
        if standardize:
            tiny = torch.finfo(coef.dtype).tiny
            # times 1 / sigma, as the Triton phases (one division per row)
            self.u = (self.x - self.col(layout.SHIFT_X)) * (1 / self.col(layout.SIGMA_X).clamp_min(tiny))
            self.w = (self.y - self.col(layout.SHIFT_Y)) * (1 / self.col(layout.SIGMA_Y).clamp_min(tiny))

    def col(self, j: int) -> torch.Tensor:
        """Coefficient column ``j`` of the chunk's rows, as a column."""
        return self.coef[self.part, j].unsqueeze(1)


def _guarded(e: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """``term`` where the exponential ``e`` is not 0, else 0: a class with p = 0 (q = 0 for the
    reverse KL), a -inf logit, contributes nothing, the limit of p log(p / q), not 0 * inf."""
    return torch.where(e == 0, torch.zeros_like(term), term)


def _kl_sums(t: _Terms, forward: bool, standardize: bool) -> list[torch.Tensor]:
    """One KL direction's group of phase 2 (``layout.KL_D`` ...): forward with (e, t) = (eb, -(d + c)),
    reverse with (ea, d + c)."""
    e, other = (t.eb, t.ea) if forward else (t.ea, t.eb)
    ed = _guarded(e, e * t.diff)
    shifted = t.diff + t.col(layout.SHIFT_D)
    breg = torch_terms.bregman_terms(e, other, -shifted if forward else shifted,
                                     t.col(layout.K_F if forward else layout.K_R))
    sums = [ed, ed.abs(), breg]
    if standardize:
        sums += [t.eb * t.u, ed * t.w] if forward else [ed * t.u, t.ea * t.w]
    return sums


def _label_sums(t: _Terms, label_column: torch.Tensor) -> list[torch.Tensor]:
    """The CE's group of phase 2: sum e^(x - max x), the owned label's logit, the owner flag, sum x."""
    owns = t.col(layout.OWNS).squeeze(1)
    picked = t.x.gather(1, label_column[t.part].unsqueeze(1)).squeeze(1)
    ex = torch.exp(t.x - t.col(layout.MAX_X))
    return [ex.sum(-1), torch.where(owns != 0, picked, torch.zeros_like(picked)), owns, t.x.sum(-1)]


def _chunk_sums(t: _Terms, label_column: torch.Tensor, sums: layout.SumLayout) -> torch.Tensor:
    standardize = sums.std >= 0
    columns = [t.ea, t.eb]
    if standardize:
        columns += [t.ea * t.u, t.eb * t.w]
    for at, forward in ((sums.forward, True), (sums.reverse, False)):
        if at >= 0:
            columns += _kl_sums(t, forward, standardize)
    out = [v.sum(-1) for v in columns]
    if sums.labels >= 0:
        out += _label_sums(t, label_column)
    return torch.stack([v.double() for v in out], -1)


def slice_sums(x: torch.Tensor, y: torch.Tensor, coef: torch.Tensor, label_column: torch.Tensor,
               sums: layout.SumLayout) -> torch.Tensor:
    """Phase 2 (see the module docstring)."""
    parts = [_chunk_sums(_Terms(x, y, coef, part, sums.std >= 0), label_column, sums)
             for part in _chunks(x.shape[0], x.shape[1], coef.dtype, x.device)]
    return torch.cat(parts) if parts else torch.empty((0, sums.count), dtype=torch.float64, device=x.device)


def _pointwise_values(t: _Terms, beta: float, divergence: int):
    """(q, p, l, loss, g, h) of one chunk: the pointwise divergences' per-element values."""
    q, p = t.ea * t.col(layout.INV_ZA), t.eb * t.col(layout.INV_ZB)
    l = t.diff + t.col(layout.LOG_RATIO)
    return (q, p, l) + torch_terms.pointwise_terms(q, p, l, beta, divergence)


def slice_pointwise(x: torch.Tensor, y: torch.Tensor, coef: torch.Tensor, *, standardize: bool, divergence: int,
                    beta: float) -> torch.Tensor:
    """The pointwise phase of jsd and tvd (see the module docstring)."""
    parts = []
    for part in _chunks(x.shape[0], x.shape[1], coef.dtype, x.device):
        t = _Terms(x, y, coef, part, standardize)
        q, p, _, loss, g, h = _pointwise_values(t, beta, divergence)
        columns = [loss, q * g, p * h] + ([q * g * t.u, p * h * t.w] if standardize else [])
        parts.append(torch.stack([v.sum(-1).double() for v in columns], -1))
    count = layout.pointwise_count(standardize)
    return torch.cat(parts) if parts else torch.empty((0, count), dtype=torch.float64, device=x.device)


def _student_grad(t: _Terms, label_column: torch.Tensor, g: torch.Tensor, t2: float, kd_weight: float,
                  ce_weight: float, label_smoothing: float, standardize: bool, has_labels: bool,
                  divergence: int) -> torch.Tensor:
    l = t.diff + t.col(layout.LOG_RATIO)
    grad = t2 * torch_terms.student_term(t.ea, t.eb, l, t.col, g, divergence)
    if standardize:
        grad = grad - t.u * t.col(layout.FACTOR_X)
    grad = kd_weight * (grad * t.col(layout.KA))
    if has_labels:
        soft = torch.exp(t.x - t.col(layout.LSE)) - t.col(layout.SMOOTH_OVER_V)
        onehot = torch.zeros_like(soft)
        onehot.scatter_(1, label_column[t.part].unsqueeze(1), (1 - label_smoothing) * t.col(layout.OWNS))
        grad = grad + ce_weight * (soft - onehot)
    return grad


def _teacher_grad(t: _Terms, h: torch.Tensor, t2: float, kd_weight: float, standardize: bool,
                  divergence: int) -> torch.Tensor:
    l = t.diff + t.col(layout.LOG_RATIO)
    grad = t2 * torch_terms.teacher_term(t.ea, t.eb, l, t.col, h, divergence)
    if standardize:
        grad = grad - t.w * t.col(layout.FACTOR_Y)
    return kd_weight * (grad * t.col(layout.KB))


def slice_grads(x: torch.Tensor, y: torch.Tensor, coef: torch.Tensor, label_column: torch.Tensor,
                grad_x: Optional[torch.Tensor], grad_y: Optional[torch.Tensor], *, t2: float, kd_weight: float,
                ce_weight: float, label_smoothing: float, standardize: bool, has_labels: bool, divergence: int,
                beta: float) -> None:
    """Phase 3 (see the module docstring): 0 in the rows whose ``KEEP`` column is 0."""
    for part in _chunks(x.shape[0], x.shape[1], coef.dtype, x.device):
        t = _Terms(x, y, coef, part, standardize)
        drop = t.col(layout.KEEP) == 0
        g = h = None
        if layout.is_pointwise(divergence):
            g, h = _pointwise_values(t, beta, divergence)[4:]
        if grad_x is not None:
            grad = _student_grad(t, label_column, g, t2, kd_weight, ce_weight, label_smoothing, standardize,
                                 has_labels, divergence)
            grad_x[part] = grad.masked_fill(drop, 0.0)
        if grad_y is not None:
            grad_y[part] = _teacher_grad(t, h, t2, kd_weight, standardize, divergence).masked_fill(drop, 0.0)
