"""The collectives of the vocabulary-parallel losses: the shard header exchange and the row gathers.

A constant-size header (the shapes, dtypes and class ranges of every rank, and whether its arguments
passed their local checks) is exchanged first when ``check_shards=True``, so that mismatched shards
or a bad argument on one rank raise on every rank instead of aborting the process group.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


def gather(tensor: torch.Tensor, group) -> torch.Tensor:
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
    """(rows, width, dtype code) of a tensor, -1s for anything else (it failed its local checks)."""
    if isinstance(t, torch.Tensor) and t.dim() >= 1:
        return int(t.numel() // max(t.shape[-1], 1)), int(t.shape[-1]), _DTYPE_CODES.get(t.dtype, 0)
    return -1, -1, 0


def _problems(table: list[list[int]]) -> tuple[list[str], list[int]]:
    """What does not fit together in the gathered headers, and each rank's slice width."""
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
    return problems, widths


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
    table = gather(header, group).cpu().tolist()
    rank = dist.get_rank(group)
    failed = [r for r, entry in enumerate(table) if entry[8]]
    if local_error is not None:
        raise local_error
    if failed:
        raise ValueError(f"vocab-parallel loss: the arguments of rank(s) {failed} failed their checks (see the "
                         f"error on those ranks); rank {rank} stops too")
    problems, widths = _problems(table)
    if problems:
        raise ValueError(f"vocab-parallel shards do not fit (rank {rank} of {len(table)}): " + "; ".join(problems))
    return Layout(sum(widths[:rank]), sum(widths), max(widths))


def local_shards(student, teacher, process_group):
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
