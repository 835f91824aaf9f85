"""Dumping a teacher's top-k once, for offline distillation: the rows of a teacher model over token
blocks as a :class:`~logitstd_kernels.SparseTeacher` with the full rows' statistics and normalizer
(``SparseTeacher.from_logits`` per batch), saved to and loaded from one ``torch.save`` file.

The file is a dict: ``ids`` and ``values`` (N, T, k), ``mask`` (N, T, k) (False at the blocks'
padding positions), ``row_mean``, ``row_std``, ``log_normalizer`` (N, T) or None, and ``settings``,
what the statistics and the normalizer are tied to (``kind``, ``k``, ``temperature`` (the loss's
``teacher_temperature``), ``generation_temperature``, ``standardize``, ``correction``, ``eps``) with
``format`` and ``version``. Everything is held in memory: shard large datasets into several files.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .sparse import SparseTeacher

__all__ = ["dump_teacher", "save_teacher", "load_teacher", "FORMAT", "VERSION"]

FORMAT = "logitstd-sparse-teacher"
VERSION = 1
_FIELDS = ("ids", "values", "mask", "row_mean", "row_std", "log_normalizer")


def dump_teacher(logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], input_ids: torch.Tensor,
                 attention_mask: Optional[torch.Tensor] = None, *, k: int, batch_size: int = 8,
                 **from_logits) -> SparseTeacher:
    """The top-k of ``logits_fn(input_ids[b], attention_mask[b])`` ((B, T, V) logits) over the (N, T)
    blocks, batch by batch, as one SparseTeacher on the CPU (``from_logits``: the keywords of
    :meth:`SparseTeacher.from_logits`). Equivalent eager code::

        SparseTeacher.from_logits(logits_fn(input_ids, attention_mask), k, **from_logits)
        # with mask = attention_mask[..., None] expanded to (N, T, k)
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (N, T), got shape {tuple(input_ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    parts = []
    for start in range(0, input_ids.shape[0], batch_size):
        ids, keep = input_ids[start:start + batch_size], mask[start:start + batch_size]
        with torch.no_grad():
            logits = logits_fn(ids, keep.long())
        part = SparseTeacher.from_logits(logits, k, **from_logits)
        parts.append([None if t is None else t.cpu() for t in (part.ids, part.values, None, part.row_mean,
                                                               part.row_std, part.log_normalizer)])
        parts[-1][2] = keep.cpu()[..., None].expand(part.ids.shape)
    joined = [None if column[0] is None else torch.cat(column) for column in zip(*parts)]
    return SparseTeacher(joined[0], joined[1], from_logits.get("kind", "logits"), *joined[3:], mask=joined[2])


def save_teacher(path: str, teacher: SparseTeacher, settings: dict) -> None:
    """``teacher``'s tensors and the ``settings`` they were computed with, in one ``torch.save`` file."""
    data = {name: getattr(teacher, name) for name in _FIELDS}
    data["settings"] = dict(settings, kind=teacher.kind, k=teacher.k, format=FORMAT, version=VERSION)
    torch.save(data, path)


def load_teacher(path: str, map_location: str = "cpu") -> tuple[SparseTeacher, dict]:
    """``(teacher, settings)`` of a file :func:`save_teacher` wrote."""
    data = torch.load(path, map_location=map_location, weights_only=True)
    settings = data.get("settings", {}) if isinstance(data, dict) else {}
    if settings.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file")
    if settings.get("version") != VERSION:
        raise ValueError(f"{path} has {FORMAT} version {settings.get('version')}; this package reads {VERSION}")
    return SparseTeacher(data["ids"], data["values"], settings["kind"], data["row_mean"], data["row_std"],
                         data["log_normalizer"], data["mask"]), settings
