"""Vocabulary-parallel (tensor-parallel) distillation: the objective of logits sharded by class.

Each rank of a process group holds the classes ``[V_start, V_end)`` of every row (contiguous, in rank
order, ``V_r`` may differ between ranks), the same rows on every rank, and the global labels. Every
rank gets the same loss and the gradients of its own slice. Three phases per step, two collectives of
O(rows) bytes, none of O(rows x V) (docs/design.md, "vocabulary-parallel rows"):

1. local per-row statistics of the slice: count, mean, M2 (as a scale and a scaled sum of squares, so
   that rows of 1e18 do not overflow), max of the student and the teacher, and the student logit at
   the label where this rank owns it. **all_gather**, then Chan's merge in float64 in rank order, so
   every rank holds bitwise the same global mean, sigma and maxima:
   ``m = m_a + d n_b / n``, ``M2 = M2_a + M2_b + d^2 n_a n_b / n``, ``d = m_b - m_a``;
2. with the global statistics, the slice's partial sums: ``Za = sum e^(a - a_max)``, ``Zb``,
   ``sum e^(b - b_max)(b - a)``, ``sum e^(a - a_max) u``, ``sum e^(b - b_max) u``, ``sum e^(b - b_max) w``,
   ``sum e^(b - b_max)(b - a) w`` and the CE's ``sum e^(x - max x)``. **all_gather**, summed in float64
   in rank order;
3. loss and the local gradients: every term of the chain rule (docs/design.md section 1) is a
   per-element quantity times a per-row global sum.

Each phase runs as one Triton kernel launch over the local slice (``_triton/vocab_parallel.py``; the
default on CUDA, ``backend="triton"``), or as PyTorch operations over chunks of rows
(``_CHUNK_BYTES``, ``backend="torch"``, the default elsewhere and the kernels' reference). Either way
the only (N, V_r) buffers are the slice's gradients, in the accumulation dtype.

A constant-size header (the shapes, dtypes and class ranges of every rank) is exchanged first when
``check_shards=True`` (the default), so that mismatched shards raise the same error on every rank
instead of aborting the process group; ``check_shards=False`` leaves the two collectives.

Equivalent single-process code: ``distillation_loss(cat(student_shards, -1), cat(teacher_shards, -1),
labels, ...)``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.distributed as dist

from ._backends import unavailable_reason
from ._checks import (OBJECTIVE_REDUCTIONS, check_fused_linear_args, check_label_smoothing, check_labels, check_mask,
                      check_pair, check_std_args, check_temperature, check_weight)
from .fused_linear import LOW_PRECISION, _add_product, _gemm_writes_float32, default_chunk_size, grad_dtype
from .objective import included_rows
from .reference import DistillationParts, accumulation_dtype

__all__ = ["vocab_parallel_distillation_loss", "ShardedRows"]

_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
_HEADER = 8  # rows, V_r, V_start, V_end, student dtype, teacher dtype, labels given, mask given


class ShardedRows(NamedTuple):
    """Per-row results of the sharded objective and the local slice's unreduced gradients."""

    rows: torch.Tensor  # (N,) ce_weight * CE + kd_weight * KD (0 where excluded)
    ce: torch.Tensor
    kd: torch.Tensor
    grad_student: Optional[torch.Tensor]  # (N, V_r): d rows[r] / d x[r, local classes]
    grad_teacher: Optional[torch.Tensor]


def _gather(tensor: torch.Tensor, group) -> torch.Tensor:
    """(world, *shape): every rank's ``tensor`` in rank order (one all_gather)."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.stack(parts)


class Layout(NamedTuple):
    """What the header exchange established, the same on every rank."""

    start: int  # this rank's first class
    num_classes: int  # V, the whole row's classes
    max_width: int  # the widest slice


def _describe(t: object) -> tuple[int, int, int]:
    """(rows, width, dtype code) of a 2-d tensor, -1s for anything else (it failed its local checks)."""
    if isinstance(t, torch.Tensor) and t.dim() >= 1:
        return int(t.numel() // max(t.shape[-1], 1)), int(t.shape[-1]), _DTYPE_CODES.get(t.dtype, 0)
    return -1, -1, 0


def agree_on_shards(student: object, teacher: object, labels: object, mask: object,
                    vocab_range: Optional[tuple[int, int]], local_error: Optional[Exception], group,
                    device: torch.device) -> Layout:
    """Exchange every rank's shapes, dtypes, class range and whether its arguments passed the local
    checks (one all_gather of 9 int64); then every rank raises, or none does.

    The rank whose arguments failed re-raises its own error; the others raise a ValueError naming the
    failed ranks; shards that do not fit together raise the same ValueError on every rank.
    """
    rows, width, student_code = _describe(student)
    _, _, teacher_code = _describe(teacher)
    start, end = (-1, -1) if vocab_range is None else (int(vocab_range[0]), int(vocab_range[1]))
    header = torch.tensor([rows, width, start, end, student_code, teacher_code, labels is not None, mask is not None,
                           local_error is not None], dtype=torch.int64, device=device)
    table = _gather(header, group).cpu().tolist()
    rank = dist.get_rank(group)
    failed = [r for r, entry in enumerate(table) if entry[8]]
    if local_error is not None:
        raise local_error
    if failed:
        raise ValueError(f"vocab-parallel loss: the arguments of rank(s) {failed} failed their checks (see the "
                         f"error on those ranks); rank {rank} stops too")
    problems = []
    for column, what in ((0, "rows"), (4, "student dtype"), (5, "teacher dtype"), (6, "labels given"),
                         (7, "mask given")):
        values = [entry[column] for entry in table]
        if len(set(values)) > 1:
            problems.append(f"ranks disagree on the {what}: {values}")
    widths = [entry[1] for entry in table]
    offsets = [sum(widths[:r]) for r in range(len(widths))]
    if all(entry[2] >= 0 for entry in table):
        ranges = [(entry[2], entry[3]) for entry in table]
        if any(ranges[r] != (offsets[r], offsets[r] + widths[r]) for r in range(len(ranges))):
            problems.append(f"the class ranges {ranges} (rank order) do not tile [0, {sum(widths)}) with the "
                            f"slice widths {widths}")
    elif any(entry[2] >= 0 for entry in table):
        problems.append("some ranks passed vocab_range and others did not")
    if problems:
        raise ValueError(f"vocab-parallel shards do not fit (rank {rank} of {len(table)}): " + "; ".join(problems))
    return Layout(offsets[rank], sum(widths), max(widths))


# Rows per local chunk of the three phases: each phase works on (rows_per_chunk, V_r) temporaries in
# the accumulation dtype (about ten of them live at once in phase 3), so a chunk of one temporary is
# kept to this many bytes: 256 MiB on CUDA (8192 x 131072 float32 logits make about 16 chunks, each
# launch still long), 16 MiB elsewhere (the CPU's caches; 2048 x 32000 float32 makes 16). Only the
# outputs, the gradients of the slice in the accumulation dtype, are (N, V_r).
_CHUNK_BYTES = {"cuda": 256 << 20, "cpu": 16 << 20}


def _row_chunks(rows: int, width: int, acc: torch.dtype, device: torch.device) -> list[slice]:
    budget = _CHUNK_BYTES.get(device.type, _CHUNK_BYTES["cpu"])
    per = max(1, budget // max(1, width * torch.empty((), dtype=acc).element_size()))
    return [slice(i, min(i + per, rows)) for i in range(0, rows, per)]


def _local_stats(v: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """(N, 4) float64: mean, scale s, scaled M2 (M2 = s^2 * m2s) and max of each row of the slice."""
    v = v.to(acc)
    mean = v.mean(-1, keepdim=True)
    dev = v - mean
    scale = dev.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(acc).tiny)
    m2s = (dev / scale).square().sum(-1, keepdim=True)
    return torch.cat((mean, scale, m2s, v.amax(-1, keepdim=True)), -1).double()


def _merge(stats: torch.Tensor, widths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chan's merge of (world, N, 4) slice statistics in rank order: (mean, M2, max) per row, float64."""
    n = widths[0]
    mean = stats[0, :, 0]
    m2 = stats[0, :, 1].square() * stats[0, :, 2]
    top = stats[0, :, 3]
    for r in range(1, stats.shape[0]):
        n_b = widths[r]
        mean_b, m2_b = stats[r, :, 0], stats[r, :, 1].square() * stats[r, :, 2]
        total = n + n_b
        d = mean_b - mean
        mean = mean + d * (n_b / total)
        m2 = m2 + m2_b + d.square() * (n * n_b / total)
        top = torch.maximum(top, stats[r, :, 3])
        n = total
    return mean, m2, top


class _RowScales(NamedTuple):
    """Per-row (N,) float64 quantities of the whole row, the same on every rank after phase 1."""

    shift_x: torch.Tensor  # the mean (standardized) or 0
    shift_y: torch.Tensor
    ka: torch.Tensor  # a = (x - shift_x) * ka: 1 / ((sigma + eps) tau) or 1 / tau
    kb: torch.Tensor
    a_max: torch.Tensor  # max of a over the whole row, rounded to the accumulation dtype (the exponentials' shift)
    b_max: torch.Tensor
    sigma_x: Optional[torch.Tensor]  # standardized only
    sigma_y: Optional[torch.Tensor]


class _ChunkTerms(NamedTuple):
    """The per-element terms of one chunk of rows of the slice, in the accumulation dtype."""

    x: torch.Tensor
    ea: torch.Tensor  # e^(a - a_max)
    eb: torch.Tensor
    diff: torch.Tensor  # b - a
    u: Optional[torch.Tensor]  # (x - mean) / sigma, standardized only
    w: Optional[torch.Tensor]


def _where_p(p: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """``term`` where the teacher's probability ``p`` is not 0, else 0: a class the teacher gives
    p = 0 (a -inf logit, b - a = -inf) contributes nothing, the limit of p log(p / q), as in the
    single-device kernels (0 * inf would make the row NaN)."""
    return torch.where(p == 0, torch.zeros_like(term), term)


def _chunk_terms(student: torch.Tensor, teacher: torch.Tensor, scales: _RowScales, part: slice,
                 acc: torch.dtype) -> _ChunkTerms:
    """Phases 2 and 3 both need these (phase 3 recomputes them rather than keeping (N, V_r) of them)."""
    col = lambda v: v[part].to(acc).unsqueeze(1)  # noqa: E731  (a per-row statistic as an acc column)
    x, y = student[part].to(acc), teacher[part].to(acc)
    a = (x - col(scales.shift_x)) * col(scales.ka)
    b = (y - col(scales.shift_y)) * col(scales.kb)
    ea, eb = torch.exp(a - col(scales.a_max)), torch.exp(b - col(scales.b_max))
    u = w = None
    if scales.sigma_x is not None:
        tiny = torch.finfo(acc).tiny
        u = (x - col(scales.shift_x)) / col(scales.sigma_x).clamp_min(tiny)
        w = (y - col(scales.shift_y)) / col(scales.sigma_y).clamp_min(tiny)
    return _ChunkTerms(x, ea, eb, b - a, u, w)


def sharded_rows(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                 mask: Optional[torch.Tensor], group, *, temperature: float, teacher_temperature: float,
                 standardize: bool, correction: int, eps: float, ignore_index: int, label_smoothing: float,
                 ce_weight: float, kd_weight: float, grad_student: bool, grad_teacher: bool,
                 layout: Optional[Layout] = None, backend: str = "torch") -> ShardedRows:
    """The three phases on (N, V_r) slices; see the module docstring. Excluded rows (mask, labels at
    ``ignore_index``) get 0 and a zero gradient. ``layout``: from :func:`agree_on_shards` (the class
    offsets on the host); None derives them from phase 1's gather on the device (no host sync).
    ``backend``: "triton", one kernel launch per phase (``_triton/vocab_parallel.py``), or "torch",
    PyTorch operations over chunks of rows (``_CHUNK_BYTES``); the two collectives cover all rows."""
    acc = accumulation_dtype(student, teacher)
    rows, width = student.shape
    zeros = torch.zeros(rows, dtype=acc, device=student.device)
    if rows == 0:  # every rank has no rows (the header said so, or the caller guarantees it)
        empty = student.new_zeros(student.shape) if grad_student else None
        return ShardedRows(zeros, zeros, zeros, empty, teacher.new_zeros(teacher.shape) if grad_teacher else None)
    chunks = _row_chunks(rows, width, acc, student.device)
    if backend == "triton":
        from ._triton import vocab_parallel as kernels

        # the kernels' layout: unit stride along the classes (any row stride)
        student, teacher = (t if t.stride(-1) == 1 else t.contiguous() for t in (student, teacher))

    # Phase 1: the slice's statistics (and its width), merged in rank order.
    if backend == "triton":
        local = kernels.slice_stats(student, teacher, acc)
    else:
        local = torch.cat([torch.cat((_local_stats(student[part], acc), _local_stats(teacher[part], acc)), -1)
                           for part in chunks])
    width_column = torch.full((rows, 1), float(width), dtype=torch.float64, device=student.device)
    gathered = _gather(torch.cat((local, width_column), -1), group)
    widths = gathered[:, 0, -1]
    if layout is not None:
        start, num_classes = layout.start, layout.num_classes
    else:  # device tensors: no host synchronization
        start, num_classes = widths[:dist.get_rank(group)].sum().long(), widths.sum()
    if standardize and layout is not None and num_classes - correction <= 0:
        raise ValueError(f"correction={correction} leaves no degrees of freedom for the {num_classes} classes of "
                         f"the whole row")
    mean_x, m2_x, max_x = _merge(gathered[..., 0:4], widths)
    mean_y, m2_y, max_y = _merge(gathered[..., 4:8], widths)

    keep = included_rows(labels, mask, ignore_index)
    if keep is None:
        keep = torch.ones(rows, dtype=torch.bool, device=student.device)
    tau_s, tau_t = temperature, teacher_temperature
    if standardize:
        dof = num_classes - correction  # a host int with a layout, else a device tensor
        sigma_x, sigma_y = (m2_x / dof).sqrt(), (m2_y / dof).sqrt()
        ka, kb = 1.0 / ((sigma_x + eps) * tau_s), 1.0 / ((sigma_y + eps) * tau_t)
        scales = _RowScales(mean_x, mean_y, ka, kb, ((max_x - mean_x) * ka).to(acc), ((max_y - mean_y) * kb).to(acc),
                            sigma_x, sigma_y)
    else:
        ka, kb = torch.full_like(mean_x, 1.0 / tau_s), torch.full_like(mean_y, 1.0 / tau_t)
        scales = _RowScales(torch.zeros_like(mean_x), torch.zeros_like(mean_y), ka, kb, (max_x * ka).to(acc),
                            (max_y * kb).to(acc), None, None)
    if labels is not None:
        local_label = labels - start
        owns = (local_label >= 0) & (local_label < width) & keep
        label_column = local_label.clamp(0, width - 1).unsqueeze(1)
    else:
        owns = torch.zeros(rows, dtype=torch.bool, device=student.device)
        label_column = torch.zeros((rows, 1), dtype=torch.long, device=student.device)

    # Phase 2: the slice's partial sums under the global statistics, summed in rank order.
    def partial_sums(part: slice) -> torch.Tensor:
        t = _chunk_terms(student, teacher, scales, part, acc)
        eb_diff = _where_p(t.eb, t.eb * t.diff)
        sums = [t.ea.sum(-1), t.eb.sum(-1), eb_diff.sum(-1)]
        if standardize:
            sums += [(t.ea * t.u).sum(-1), (t.eb * t.u).sum(-1), (t.eb * t.w).sum(-1), (eb_diff * t.w).sum(-1)]
        if labels is not None:
            picked = t.x.gather(1, label_column[part]).squeeze(1)
            ex = torch.exp(t.x - max_x[part].to(acc).unsqueeze(1))
            sums += [ex.sum(-1), torch.where(owns[part], picked, torch.zeros_like(picked)), owns[part].to(acc),
                     t.x.sum(-1)]
        return torch.stack([v.double() for v in sums], -1)

    if backend == "triton":
        ones = torch.ones_like(mean_x)
        coef = torch.stack((scales.shift_x, scales.shift_y, ka, kb, scales.a_max.double(), scales.b_max.double(),
                            sigma_x if standardize else ones, sigma_y if standardize else ones, max_x, owns.double()),
                           1).to(acc)
        partial = kernels.slice_sums(student, teacher, coef, label_column.squeeze(1).contiguous(), standardize,
                                     labels is not None)
    else:
        partial = torch.cat([partial_sums(part) for part in chunks])
    totals = _gather(partial, group).sum(0)  # rank order: deterministic
    za, zb, s_pd = totals[:, 0], totals[:, 1], totals[:, 2]

    # Phase 3: loss and the local gradients, per row then per chunk of elements.
    # log(Za e^a_max / (Zb e^b_max))
    log_ratio = (scales.a_max.double() + za.log()) - (scales.b_max.double() + zb.log())
    kl = s_pd / zb + log_ratio
    kd = (tau_s * tau_s) * kl
    ce = torch.zeros_like(kd)
    lse = torch.zeros_like(kd)
    if labels is not None:
        zc, x_label, owners, sum_x = totals[:, -4], totals[:, -3], totals[:, -2], totals[:, -1]
        lse = max_x + zc.log()
        nll = lse - x_label
        ce = (1 - label_smoothing) * nll + label_smoothing * (lse - sum_x / num_classes)
        # A label no rank owns (outside [0, V)) raises on the CPU (every rank sees the same totals, so
        # every rank raises); elsewhere it makes its row NaN, as the CUDA kernels do (no host sync).
        unowned = (owners != 1) & keep
        if student.device.type == "cpu" and bool(unowned.any()):
            row = int(unowned.nonzero()[0])
            raise IndexError(f"labels[{row}] = {int(labels[row])} is outside [0, {int(num_classes)}) (the whole "
                             f"row's classes) and is not ignore_index ({ignore_index})")
        ce = torch.where((owners == 1) | ~keep, ce, torch.full_like(ce, float("nan")))
    grad_x = torch.empty((rows, width), dtype=acc, device=student.device) if grad_student else None
    grad_y = torch.empty((rows, width), dtype=acc, device=student.device) if grad_teacher else None
    if grad_student or grad_teacher:
        t2 = tau_s * tau_s
        factor_x = factor_y = torch.zeros_like(kd)
        if standardize:
            factor_x = (t2 * (totals[:, 3] / za - totals[:, 4] / zb)) * sigma_x / ((sigma_x + eps) * dof)
            s_pw, s_pdw = totals[:, 5] / zb, totals[:, 6] / zb
            factor_y = (t2 * (s_pdw + log_ratio * s_pw - kl * s_pw)) * sigma_y / ((sigma_y + eps) * dof)
    if (grad_student or grad_teacher) and backend == "triton":
        smooth = torch.full_like(kd, label_smoothing) / num_classes
        coef = torch.cat((coef, torch.stack((1 / za, 1 / zb, factor_x, factor_y, log_ratio, kl, lse, smooth,
                                             keep.double()), 1).to(acc)), 1)
        kernels.slice_grads(student, teacher, coef, label_column.squeeze(1).contiguous(), grad_x, grad_y, t2=t2,
                            kd_weight=kd_weight, ce_weight=ce_weight, label_smoothing=label_smoothing,
                            standardize=standardize, has_labels=labels is not None)
    elif grad_student or grad_teacher:
        for part in chunks:
            col = lambda v: v[part].to(acc).unsqueeze(1)  # noqa: E731
            t = _chunk_terms(student, teacher, scales, part, acc)
            drop = ~keep[part].unsqueeze(1)
            p = t.eb / col(zb)
            if grad_student:
                g = t2 * (t.ea / col(za) - p)
                g = (g - t.u * col(factor_x)) * col(ka) if standardize else g * col(ka)
                g = kd_weight * g
                if labels is not None:
                    soft = torch.exp(t.x - col(lse)) - label_smoothing / num_classes
                    onehot = torch.zeros_like(soft)
                    onehot.scatter_(1, label_column[part], (1 - label_smoothing) * owns[part].to(acc).unsqueeze(1))
                    g = g + ce_weight * (soft - onehot)
                grad_x[part] = g.masked_fill(drop, 0.0)
            if grad_teacher:
                h = _where_p(p, t2 * p * (t.diff + col(log_ratio) - col(kl)))
                h = (h - t.w * col(factor_y)) * col(kb) if standardize else h * col(kb)
                grad_y[part] = (kd_weight * h).masked_fill(drop, 0.0)
    rows_out = torch.where(keep, (ce_weight * ce + kd_weight * kd) if labels is not None else kd_weight * kd,
                           torch.zeros_like(kd)).to(acc)
    ce, kd = (torch.where(keep, v, torch.zeros_like(v)).to(acc) for v in (ce, kd))
    return ShardedRows(rows_out, ce, kd, grad_x, grad_y)


def _check_shard_args(student, teacher, labels, mask, *, ce_weight, kd_weight, temperature, teacher_temperature,
                      standardize, correction, eps, ignore_index, label_smoothing, reduction):
    """The checks that need no other rank: like ``distillation_loss``'s, except that the class count
    (for ``correction`` and the labels' upper bound) is the global V, checked after phase 1."""
    student, teacher = check_pair(student, teacher)
    tau_s = check_temperature("temperature", temperature)
    tau_t = tau_s if teacher_temperature is None else check_temperature("teacher_temperature", teacher_temperature)
    if reduction not in OBJECTIVE_REDUCTIONS:
        raise ValueError(f"reduction must be one of {OBJECTIVE_REDUCTIONS}, got {reduction!r}")
    if standardize:  # the types and signs here; correction against the whole row's V after phase 1
        check_std_args(1 << 62, correction, eps, name="the whole row")
    labels = check_labels(labels, student, ignore_index, num_classes=None)
    return (student, teacher, labels, check_mask(mask, student), tau_s, tau_t, check_weight("ce_weight", ce_weight),
            check_weight("kd_weight", kd_weight), check_label_smoothing(label_smoothing))


def _no_double_backward() -> None:
    if torch.is_grad_enabled():
        raise RuntimeError("the vocab-parallel losses do not support double backward (create_graph=True): their "
                           "gradients are computed in the forward")


class _ShardedLoss(torch.autograd.Function):
    """Loss from :func:`sharded_rows`; the gradients, computed in the forward, scaled in the backward."""

    @staticmethod
    def forward(ctx, student, teacher, labels, mask, group, options, reduction):
        out = sharded_rows(student, teacher, labels, mask, group, **options)
        keep = included_rows(labels, mask, options["ignore_index"])
        count = (out.rows.new_ones(()) if reduction != "mean" else
                 out.rows.new_tensor(float(max(out.rows.shape[0], 1))) if keep is None else keep.sum().clamp_min(1))
        ctx.save_for_backward(out.grad_student, out.grad_teacher, count.to(out.rows.dtype))
        ctx.reduction = reduction
        ctx.dtypes = (student.dtype, teacher.dtype)
        parts = (out.rows, out.ce, out.kd)
        if reduction == "none":
            reduced = parts
        else:
            reduced = tuple(v.sum() / count if reduction == "mean" else v.sum() for v in parts)
        ctx.mark_non_differentiable(reduced[1], reduced[2])
        return reduced

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        _no_double_backward()
        grad_x, grad_y, count = ctx.saved_tensors
        scale = grad_loss.unsqueeze(-1) if ctx.reduction == "none" else grad_loss
        if ctx.reduction == "mean":
            scale = scale / count
        grads = [None if g is None else (g * scale).to(dtype) for g, dtype in zip((grad_x, grad_y), ctx.dtypes)]
        return grads[0], grads[1], None, None, None, None, None


PHASE_BACKENDS = ("auto", "triton", "torch")


def _phase_backend(backend: object, device: torch.device) -> str:
    """The backend of the three local phases: "auto" is the Triton kernels on CUDA where they can
    run, else the PyTorch operations; a forced backend that cannot run here raises."""
    if backend not in PHASE_BACKENDS:
        raise ValueError(f"backend must be one of {PHASE_BACKENDS}, got {backend!r}")
    reason = unavailable_reason("triton", device.type)
    if backend == "auto":
        return "triton" if device.type == "cuda" and reason is None else "torch"
    if backend == "triton" and reason is not None:
        raise RuntimeError(f"backend='triton' cannot run on {device.type} tensors here: {reason}")
    return str(backend)


def _local_shards(student, teacher, process_group):
    """(student, teacher, group): DTensors sharded on the class dimension become their local slices."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch without DTensor
        return student, teacher, process_group
    is_dtensor = [isinstance(t, DTensor) for t in (student, teacher)]
    if not any(is_dtensor):
        return student, teacher, process_group
    if not all(is_dtensor):
        raise TypeError("student_logits and teacher_logits must both be DTensors or both plain tensors")
    for name, t in (("student_logits", student), ("teacher_logits", teacher)):
        placements = t.placements
        if t.device_mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard) or \
                placements[0].dim not in (-1, t.dim() - 1):
            raise ValueError(f"{name} must be a DTensor sharded on its last (class) dimension on a 1-D mesh "
                             f"(placements=[Shard(-1)]), got {placements} on a {t.device_mesh.ndim}-D mesh")
    if process_group is not None and process_group != student.device_mesh.get_group():
        raise ValueError("process_group differs from the DTensors' mesh group; pass one or the other")
    return student.to_local(), teacher.to_local(), student.device_mesh.get_group()


def vocab_parallel_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    process_group: Optional[dist.ProcessGroup] = None,
    vocab_range: Optional[tuple[int, int]] = None,
    check_shards: bool = True,
    ce_weight: float = 0.1,
    kd_weight: float = 9.0,
    temperature: float = 2.0,
    teacher_temperature: Optional[float] = None,
    standardize: bool = True,
    correction: int = 1,
    eps: float = 1e-7,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    mask: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    return_components: bool = False,
    backend: str = "auto",
) -> Union[torch.Tensor, DistillationParts]:
    """:func:`logitstd_kernels.distillation_loss` of logits sharded by class across ``process_group``.

    Equivalent single-process code::

        distillation_loss(torch.cat(all student shards, -1), torch.cat(all teacher shards, -1), labels, ...)

    Args:
        student_logits, teacher_logits: this rank's ``(..., V_r)`` slices (the same rows on every
            rank; classes contiguous and in rank order), or DTensors with ``placements=[Shard(-1)]``
            on a 1-D mesh (then ``process_group`` is the mesh's). Gradients flow to both.
        labels: the global labels (the same on every rank), class indices in ``[0, V)``.
        process_group: the tensor-parallel group (default: the default group).
        vocab_range: this rank's ``(V_start, V_end)``, checked against the others' (optional).
        check_shards: exchange a constant-size header first so that mismatched shards (rows, dtypes,
            ranges) raise a ValueError naming the problem on every rank; False saves that collective.
        backend: the three local phases as Triton kernels (``"triton"``, one launch each) or PyTorch
            operations over chunks of rows (``"torch"``); ``"auto"``: Triton on CUDA, else PyTorch.
            Every rank must resolve to the same one (the results differ in rounding).
        The other keywords are those of ``distillation_loss``.
    """
    student_logits, teacher_logits, group = _local_shards(student_logits, teacher_logits, process_group)
    local_error = None
    try:
        (student, teacher, labels, mask, tau_s, tau_t, ce_weight, kd_weight, label_smoothing) = _check_shard_args(
            student_logits, teacher_logits, labels, mask, ce_weight=ce_weight, kd_weight=kd_weight,
            temperature=temperature, teacher_temperature=teacher_temperature, standardize=standardize,
            correction=correction, eps=eps, ignore_index=ignore_index, label_smoothing=label_smoothing,
            reduction=reduction)
        phases = _phase_backend(backend, student.device)
    except (TypeError, ValueError, IndexError, RuntimeError) as exc:
        if not check_shards:
            raise
        local_error = exc
    layout = None
    if check_shards:  # every rank raises, or none does
        device = student_logits.device if isinstance(student_logits, torch.Tensor) else torch.device("cpu")
        layout = agree_on_shards(student_logits, teacher_logits, labels, mask, vocab_range, local_error, group, device)
    lead = student.shape[:-1]
    options = dict(temperature=tau_s, teacher_temperature=tau_t, standardize=bool(standardize),
                   correction=int(correction), eps=float(eps), ignore_index=int(ignore_index),
                   label_smoothing=label_smoothing, ce_weight=ce_weight, kd_weight=kd_weight,
                   grad_student=torch.is_grad_enabled() and student.requires_grad,
                   grad_teacher=torch.is_grad_enabled() and teacher.requires_grad, layout=layout, backend=phases)
    width = student.shape[-1]
    loss, ce, kd = _ShardedLoss.apply(
        student.reshape(-1, width), teacher.reshape(-1, width), None if labels is None else labels.reshape(-1).long(),
        None if mask is None else mask.reshape(-1), group, options, reduction)
    if reduction == "none":
        loss, ce, kd = loss.reshape(lead), ce.reshape(lead), kd.reshape(lead)
    return DistillationParts(loss, ce, kd) if return_components else loss


class _ShardedFusedLinear(torch.autograd.Function):
    """The chunked lm_head + sharded objective; gradients computed in the forward (see fused_linear.py)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, labels, mask,
                group, options, reduction, chunk_size, accum_dtype, wants):
        num_rows = hidden.shape[0]
        acc = accumulation_dtype(hidden, weight)
        g_hidden = (torch.zeros(hidden.shape, dtype=grad_dtype(hidden.dtype, accum_dtype), device=hidden.device)
                    if wants[0] else None)
        g_weight = torch.zeros(weight.shape, dtype=accum_dtype, device=weight.device) if wants[1] else None
        g_bias = torch.zeros(weight.shape[0], dtype=accum_dtype, device=weight.device) if wants[2] else None
        totals = torch.zeros(3, dtype=torch.float64, device=hidden.device)
        keep = included_rows(labels, mask, options["ignore_index"])
        if keep is None:
            keep = torch.ones(num_rows, dtype=torch.bool, device=hidden.device)
        chunk_options = dict(options, grad_student=any(wants), grad_teacher=False)
        hidden_weight = weight  # converted once where the GEMM cannot write float32 from bf16/fp16 itself
        if g_hidden is not None and weight.dtype in LOW_PRECISION and not _gemm_writes_float32(hidden.device):
            hidden_weight = weight.to(g_hidden.dtype)
        for start in range(0, num_rows, chunk_size):
            pick = slice(start, min(start + chunk_size, num_rows))
            h = hidden[pick].masked_fill(~keep[pick].unsqueeze(1), 0)  # no 0 * NaN from excluded rows
            xs = torch.nn.functional.linear(h, weight, bias)
            xt = (teacher_logits[pick] if teacher_logits is not None
                  else torch.nn.functional.linear(teacher_hidden[pick], teacher_weight, teacher_bias))
            out = sharded_rows(xs, xt, None if labels is None else labels[pick], None if mask is None else mask[pick],
                               group, **chunk_options)
            del xs, xt
            totals += torch.stack([v.double().sum() for v in (out.rows, out.ce, out.kd)])
            if out.grad_student is not None:
                g = out.grad_student.to(weight.dtype)  # the logits' gradient in their dtype, as eager's
                if g_hidden is not None:
                    _add_product(g_hidden[pick], g, hidden_weight)
                if g_weight is not None:
                    _add_product(g_weight, g.t(), h)
                if g_bias is not None:
                    g_bias += g.sum(0, dtype=accum_dtype)
        count = keep.sum().clamp_min(1).double() if reduction == "mean" else totals.new_ones(())
        loss, ce, kd = (part.to(acc).clone() for part in (totals / count).unbind())
        ctx.save_for_backward(*(g if g is None else g / count.to(g.dtype) for g in (g_hidden, g_weight, g_bias)))
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(ce, kd)
        return loss, ce, kd

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        _no_double_backward()
        grads = [None if g is None else (g * grad_loss).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return tuple(grads) + (None,) * 12


def vocab_parallel_fused_linear_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    *,
    teacher_logits: Optional[torch.Tensor] = None,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    process_group: Optional[dist.ProcessGroup] = None,
    vocab_range: Optional[tuple[int, int]] = None,
    check_shards: bool = True,
    chunk_size: Optional[int] = None,
    accum_dtype: Optional[torch.dtype] = None,
    mask: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    return_components: bool = False,
    backend: str = "auto",
    **objective,
) -> Union[torch.Tensor, DistillationParts]:
    """:func:`logitstd_kernels.fused_linear_distillation_loss` with lm_heads split by vocabulary.

    Each rank passes the full (replicated) hidden states and its rows ``[V_start, V_end)`` of the
    lm_head weights (Megatron's ``ColumnParallelLinear(gather_output=False)`` layout), or its
    ``(..., V_r)`` slice of ``teacher_logits``. Equivalent single-process code::

        fused_linear_distillation_loss(student_hidden, cat(all student_weight shards), teacher_hidden,
                                       cat(all teacher_weight shards), labels, ...)

    The gradient of ``student_weight`` (and bias) is this rank's shard of the full gradient. The
    gradient of ``student_hidden`` is this rank's *partial* sum ``G_r @ W_r``: the full gradient is
    the sum over the ranks, an all-reduce that belongs to the tensor-parallel layer's backward (in
    Megatron, the input of a column-parallel layer is all-reduced there). Two collectives of O(rows)
    per chunk of rows, plus the header exchange once per call with ``check_shards``. ``chunk_size``:
    the same on every rank; None: :func:`~logitstd_kernels.default_chunk_size` of the widest slice
    (from the header, so ``check_shards=False`` needs an explicit ``chunk_size``). ``objective``: the
    keywords of ``distillation_loss`` (``ce_weight``, ``kd_weight``, ``temperature``, ...);
    ``reduction`` is ``"mean"`` or ``"sum"``; ``backend``: the local phases', as in
    :func:`vocab_parallel_distillation_loss`.
    """
    unknown = set(objective) - {"ce_weight", "kd_weight", "temperature", "teacher_temperature", "standardize",
                                "correction", "eps", "ignore_index", "label_smoothing"}
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {sorted(unknown)}")
    if not check_shards and chunk_size is None:
        raise ValueError("pass chunk_size with check_shards=False: every rank must use the same chunks, and the "
                         "default is derived from the widest slice, which only the header exchange reveals")
    group = process_group
    defaults = dict(ce_weight=0.1, kd_weight=9.0, temperature=2.0, teacher_temperature=None, standardize=True,
                    correction=1, eps=1e-7, ignore_index=-100, label_smoothing=0.0)
    kw = dict(defaults, **objective)
    local_error, rows_view, checked = None, None, None
    try:
        # the tensors, shapes, devices and the constant teacher, against this rank's slice (the labels
        # against the whole row below: they are global)
        tensors = check_fused_linear_args(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
            teacher_logits, None, None, chunk_size=chunk_size, accum_dtype=accum_dtype, reduction=reduction,
            **dict(kw, standardize=False))
        hidden = tensors[0].reshape(-1, tensors[0].shape[-1])
        rows_view = hidden.new_empty(()).expand(hidden.shape[0], tensors[1].shape[0])
        checked = _check_shard_args(
            rows_view, rows_view, None if labels is None else labels.reshape(-1),
            None if mask is None else mask.reshape(-1), ce_weight=kw["ce_weight"], kd_weight=kw["kd_weight"],
            temperature=kw["temperature"], teacher_temperature=kw["teacher_temperature"],
            standardize=kw["standardize"], correction=kw["correction"], eps=kw["eps"],
            ignore_index=kw["ignore_index"], label_smoothing=kw["label_smoothing"], reduction=reduction)
        phases = _phase_backend(backend, hidden.device)
    except (TypeError, ValueError, IndexError, RuntimeError) as exc:
        if not check_shards:
            raise
        local_error = exc
    layout = None
    if check_shards:  # once per call, for every chunk: every rank raises, or none does
        device = student_hidden.device if isinstance(student_hidden, torch.Tensor) else torch.device("cpu")
        layout = agree_on_shards(rows_view, rows_view, labels, mask, vocab_range, local_error, group, device)
    (_, weight, bias, t_hidden, t_weight, t_bias, t_logits, _, _, _) = tensors
    (_, _, labels, mask, tau_s, tau_t, ce_weight, kd_weight, label_smoothing) = checked
    labels = None if labels is None else labels.long()
    width = weight.shape[0]
    options = dict(temperature=tau_s, teacher_temperature=tau_t, standardize=bool(kw["standardize"]),
                   correction=int(kw["correction"]), eps=float(kw["eps"]), ignore_index=int(kw["ignore_index"]),
                   label_smoothing=label_smoothing, ce_weight=ce_weight, kd_weight=kd_weight, layout=layout,
                   backend=phases)
    if accum_dtype is None:
        accum_dtype = torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.shape[0], layout.max_width, hidden.dtype, hidden.device)
    grad_on = torch.is_grad_enabled()
    wants = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    loss, ce, kd = _ShardedFusedLinear.apply(
        hidden, weight, bias, None if t_hidden is None else t_hidden.reshape(-1, t_hidden.shape[-1]), t_weight,
        t_bias, None if t_logits is None else t_logits.reshape(-1, width), labels, mask, group, options, reduction,
        int(chunk_size), accum_dtype, wants)
    return DistillationParts(loss, ce, kd) if return_components else loss
