"""Readers of other frameworks' stored top-k teachers into :class:`~logitstd_kernels.SparseTeacher`.

Each reader takes the framework's tensors (or, for dataset columns, nested Python lists, ragged rows
padded here) and returns a ``SparseTeacher``; the settings under which ``distillation_loss`` then
computes that framework's loss are in each reader's docstring and in docs/sparse-teachers.md, which
also names the source files the layouts come from.

None of these formats stores the full rows' statistics: standardization (``standardize=True``) is then
over the k stored values, an approximation (docs/design.md section 9); the frameworks' own losses are
unstandardized (``standardize=False``).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .sparse import SparseTeacher

__all__ = ["from_axolotl", "from_distillkit", "from_nemo_rl", "padded_rows"]

Rows = Union[torch.Tensor, Sequence]


def padded_rows(ids: Rows, values: Rows, mask: Optional[Rows] = None,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(ids, values, mask)`` as tensors: tensors pass through; nested lists of rows (positions) of
    possibly different lengths (``None`` or ``[]`` for a position without data) are padded to the
    longest row with id 0, value ``-inf`` and mask False. The leading dims of a list are ``(T,)``."""
    if isinstance(ids, torch.Tensor) and isinstance(values, torch.Tensor):
        as_mask = None if mask is None else torch.as_tensor(mask, device=ids.device).bool()
        return ids, values, as_mask
    id_rows = [list(r or []) for r in ids]
    value_rows = [list(r or []) for r in values]
    if len(id_rows) != len(value_rows):
        raise ValueError(f"ids has {len(id_rows)} positions but values has {len(value_rows)}")
    k = max([len(r) for r in id_rows] + [1])
    out_ids = torch.zeros(len(id_rows), k, dtype=torch.long)
    out_values = torch.full((len(id_rows), k), float("-inf"), dtype=dtype)
    out_mask = torch.zeros(len(id_rows), k, dtype=torch.bool)
    for row, (r_ids, r_values) in enumerate(zip(id_rows, value_rows)):
        if len(r_ids) != len(r_values):
            raise ValueError(f"position {row}: {len(r_ids)} ids but {len(r_values)} values")
        n = len(r_ids)
        out_ids[row, :n] = torch.tensor(r_ids, dtype=torch.long)
        out_values[row, :n] = torch.tensor(r_values, dtype=dtype)
        out_mask[row, :n] = True
    if mask is not None:
        given = torch.zeros_like(out_mask)
        for row, r in enumerate(mask):
            given[row, :len(r)] = torch.tensor(list(r), dtype=torch.bool)
        out_mask &= given
    return out_ids, out_values, out_mask


def from_axolotl(target_token_ids: Rows, target_logprobs: Rows, target_mask: Optional[Rows] = None) -> SparseTeacher:
    """axolotl's KD columns: ``target_token_ids`` and ``target_logprobs`` ``(..., k)`` (or per-position
    lists), ``target_mask`` (0 for padding and prompt positions).

    ``target_logprobs`` as axolotl's dataset step writes them are log-probabilities renormalized over
    the k entries at the KD temperature T; the raw v2 ``logprobs`` column holds them at the generation
    temperature T_gen. Either is a ``kind="logprobs"`` teacher; axolotl's losses are then::

        # topk_logprob/forward_kl.py (student normalized over the full vocabulary, no T**2):
        distillation_loss(z, teacher, support="renormalize_teacher", standardize=False, temperature=T,
                          generation_temperature=T (T_gen for the raw column), kd_weight=1 / T**2,
                          ce_weight=0, reduction="sum") / (number of valid entries)
        # the Liger path with normalize_topk (student renormalized over the k ids), times T**2:
        ... support="renormalize", kd_weight=1 ...
    """
    ids, values, mask = padded_rows(target_token_ids, target_logprobs, target_mask)
    return SparseTeacher(ids.long(), values, "logprobs", mask=mask)


def from_distillkit(target_ids: Rows, target_values: Rows, *, log_target: bool = True) -> SparseTeacher:
    """DistillKit's sparse signal: ``target_ids`` and ``target_values`` ``(..., k)``, the values
    log-probabilities at the target generation temperature (``log_target=True``; missing ranks
    ``-inf``) or logits (``log_target=False``). Its sparse KL loss is::

        # missing="zero": the teacher renormalized over its k entries, the student over the vocabulary
        distillation_loss(z, teacher, support="renormalize_teacher", standardize=False, temperature=T,
                          generation_temperature=T_gen, kd_weight=1, ce_weight=0)   # "mean" over positions
        # missing="symmetric_uniform" at T == T_gen: the k entries plus one class holding the rest
        ... support="tail" ...
    """
    ids, values, mask = padded_rows(target_ids, target_values)
    return SparseTeacher(ids.long(), values, "logprobs" if log_target else "logits", mask=mask)


def from_nemo_rl(teacher_topk_logits: torch.Tensor, teacher_topk_indices: torch.Tensor) -> SparseTeacher:
    """NeMo RL's distillation inputs: ``teacher_topk_logits`` ``[B, S, k]`` (raw float32 logits) and
    ``teacher_topk_indices`` ``[B, S, k]`` (int64). Its forward KL (teacher and student both
    renormalized over the k indices, the default ``zero_outside_topk=False``) is::

        distillation_loss(z, teacher, support="renormalize", standardize=False, temperature=1,
                          kd_weight=1, ce_weight=0)      # NeMo also drops each sequence's last position
    """
    return SparseTeacher(teacher_topk_indices.long(), teacher_topk_logits, "logits")
