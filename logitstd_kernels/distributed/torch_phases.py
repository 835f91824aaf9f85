"""The three local phases of the vocabulary-parallel objective as PyTorch operations over chunks of
rows: the phase backend off CUDA, and the Triton kernels' reference in the tests (``phases.py`` has
the interface; the math is docs/tensor-parallel.md).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import layout

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
            self.u = (self.x - self.col(layout.SHIFT_X)) / self.col(layout.SIGMA_X).clamp_min(tiny)
            self.w = (self.y - self.col(layout.SHIFT_Y)) / self.col(layout.SIGMA_Y).clamp_min(tiny)

    def col(self, j: int) -> torch.Tensor:
        """Coefficient column ``j`` of the chunk's rows, as a column."""
        return self.coef[self.part, j].unsqueeze(1)


def _where_p(p: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """``term`` where the teacher's probability ``p`` is not 0, else 0: a class the teacher gives
    p = 0 (a -inf logit, b - a = -inf) contributes nothing, the limit of p log(p / q)."""
    return torch.where(p == 0, torch.zeros_like(term), term)


def _chunk_sums(t: _Terms, label_column: torch.Tensor, standardize: bool, has_labels: bool) -> torch.Tensor:
    eb_diff = _where_p(t.eb, t.eb * t.diff)
    sums = [t.ea.sum(-1), t.eb.sum(-1), eb_diff.sum(-1)]
    if standardize:
        sums += [(t.ea * t.u).sum(-1), (t.eb * t.u).sum(-1), (t.eb * t.w).sum(-1), (eb_diff * t.w).sum(-1)]
    if has_labels:
        owns = t.col(layout.OWNS).squeeze(1)
        picked = t.x.gather(1, label_column[t.part].unsqueeze(1)).squeeze(1)
        ex = torch.exp(t.x - t.col(layout.MAX_X))
        sums += [ex.sum(-1), torch.where(owns != 0, picked, torch.zeros_like(picked)), owns, t.x.sum(-1)]
    return torch.stack([v.double() for v in sums], -1)


def slice_sums(x: torch.Tensor, y: torch.Tensor, coef: torch.Tensor, label_column: torch.Tensor, standardize: bool,
               has_labels: bool) -> torch.Tensor:
    """Phase 2 (see the module docstring)."""
    parts = [_chunk_sums(_Terms(x, y, coef, part, standardize), label_column, standardize, has_labels)
             for part in _chunks(x.shape[0], x.shape[1], coef.dtype, x.device)]
    count = layout.sums_count(standardize, has_labels)
    return torch.cat(parts) if parts else torch.empty((0, count), dtype=torch.float64, device=x.device)


def _student_grad(t: _Terms, label_column: torch.Tensor, t2: float, kd_weight: float, ce_weight: float,
                  label_smoothing: float, standardize: bool, has_labels: bool) -> torch.Tensor:
    g = t2 * (t.ea * t.col(layout.INV_ZA) - t.eb * t.col(layout.INV_ZB))
    if standardize:
        g = g - t.u * t.col(layout.FACTOR_X)
    g = kd_weight * (g * t.col(layout.KA))
    if has_labels:
        soft = torch.exp(t.x - t.col(layout.LSE)) - t.col(layout.SMOOTH_OVER_V)
        onehot = torch.zeros_like(soft)
        onehot.scatter_(1, label_column[t.part].unsqueeze(1), (1 - label_smoothing) * t.col(layout.OWNS))
        g = g + ce_weight * (soft - onehot)
    return g


def _teacher_grad(t: _Terms, t2: float, kd_weight: float, standardize: bool) -> torch.Tensor:
    p = t.eb * t.col(layout.INV_ZB)
    h = _where_p(p, t2 * p * (t.diff + t.col(layout.LOG_RATIO) - t.col(layout.KL)))
    if standardize:
        h = h - t.w * t.col(layout.FACTOR_Y)
    return kd_weight * (h * t.col(layout.KB))


def slice_grads(x: torch.Tensor, y: torch.Tensor, coef: torch.Tensor, label_column: torch.Tensor,
                grad_x: Optional[torch.Tensor], grad_y: Optional[torch.Tensor], *, t2: float, kd_weight: float,
                ce_weight: float, label_smoothing: float, standardize: bool, has_labels: bool) -> None:
    """Phase 3 (see the module docstring): 0 in the rows whose ``KEEP`` column is 0."""
    for part in _chunks(x.shape[0], x.shape[1], coef.dtype, x.device):
        t = _Terms(x, y, coef, part, standardize)
        drop = t.col(layout.KEEP) == 0
        if grad_x is not None:
            g = _student_grad(t, label_column, t2, kd_weight, ce_weight, label_smoothing, standardize, has_labels)
            grad_x[part] = g.masked_fill(drop, 0.0)
        if grad_y is not None:
            grad_y[part] = _teacher_grad(t, t2, kd_weight, standardize).masked_fill(drop, 0.0)
