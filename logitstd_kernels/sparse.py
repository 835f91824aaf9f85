"""Sparse teachers: the top-k of a stored teacher row, with the statistics of the full row.

A teacher run once and stored keeps ``k`` entries per position: the class ids and their values
(logits, or log-probabilities at a generation temperature). Logit standardization needs the teacher
row's mean and standard deviation over all V classes, and a tail class needs its log-partition: two or
three floats per position stored next to the top-k make the standardized loss exact
(docs/design.md, section 9). :class:`SparseTeacher` holds that data; the losses accept it wherever
they accept dense teacher logits.

Equivalent eager code of the loss of a sparse teacher: ``reference.sparse_row_divergence``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Union

import torch

__all__ = ["SparseTeacher", "SparseRows", "KINDS"]

#: What ``SparseTeacher.values`` hold: raw logits, or log-probabilities (``log_softmax(logits / T_gen)``).
KINDS = ("logits", "logprobs")
#: The kernels' codes of the kinds.
KIND_CODES = {name: code for code, name in enumerate(KINDS)}

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class SparseRows(NamedTuple):
    """A sparse teacher with its rows flattened, as the ops and kernels take it: ``ids`` (N, k) int64
    and ``values`` (N, k) contiguous, ``mask`` (N, k) bool or None, the per-row tensors (N,) or None."""

    ids: torch.Tensor
    values: torch.Tensor
    mask: Optional[torch.Tensor]
    row_mean: Optional[torch.Tensor]
    row_std: Optional[torch.Tensor]
    log_normalizer: Optional[torch.Tensor]
    kind: str

    @property
    def num_rows(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index) -> "SparseRows":  # type: ignore[override]
        """The rows ``index`` (a slice, an index tensor or a bool mask) of every tensor."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return SparseRows(self.ids[index], self.values[index], pick(self.mask), pick(self.row_mean),
                          pick(self.row_std), pick(self.log_normalizer), self.kind)

    def tensors(self) -> tuple:
        """``(ids, values, mask, row_mean, row_std, log_normalizer)``: the op's tensor arguments."""
        return self.ids, self.values, self.mask, self.row_mean, self.row_std, self.log_normalizer

    def valid(self) -> torch.Tensor:
        """The entries that belong to the support: not masked out and not ``-inf`` (NaN stays in: it
        makes its row NaN)."""
        valid = self.values != float("-inf")
        return valid if self.mask is None else valid & self.mask


def _check_tensor(name: str, t: object, lead: torch.Size, kind: str) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"SparseTeacher.{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if kind == "float" and t.dtype not in _FLOATS:
        raise TypeError(f"SparseTeacher.{name} must have a floating dtype, got {t.dtype}")
    if kind == "bool" and t.dtype != torch.bool:
        raise TypeError(f"SparseTeacher.{name} must be a bool tensor, got {t.dtype}")
    if tuple(t.shape) != tuple(lead):
        raise ValueError(f"SparseTeacher.{name} has shape {tuple(t.shape)} but must be {tuple(lead)}")
    return t


@dataclasses.dataclass(frozen=True)
class SparseTeacher:
    """The top-k of a teacher's rows: ``ids`` and ``values`` of shape ``(..., k)`` (k per row fixed).

    Args:
        ids: integer class ids in ``[0, V)``, distinct within a row's valid entries.
        values: the teacher's values at ``ids``: ``kind="logits"`` raw logits (after the model's own
            logit transforms), ``kind="logprobs"`` log-probabilities stored at the generation
            temperature ``T_gen`` (``log_softmax(logits / T_gen)``; the loss's
            ``generation_temperature=T_gen`` turns them back into logits up to a constant per row).
        row_mean, row_std: ``(...)``, the mean and the standard deviation (with the loss's
            ``correction``) of the *full* row of the same quantity as ``values``, over all V classes.
            With them the standardized loss is exact; without them the teacher is standardized over
            its valid stored values, an approximation (docs/design.md, section 9). Both or neither.
        log_normalizer: ``(...)``, ``L = logsumexp_V(b)`` of the teacher's KD logits ``b`` over all V
            classes, as the loss forms them from the full row (standardized with ``row_mean``/``row_std``
            and divided by ``teacher_temperature``, or ``T_gen * values / teacher_temperature`` without
            standardization): the normalizer of ``support="tail"``. Tied to the temperature and the
            standardization settings it was computed with.
        mask: optional ``(..., k)`` bool, False for padding entries; entries equal to ``-inf`` are
            padding too.

    :meth:`from_logits` builds one from dense teacher logits, with the statistics and the normalizer.
    """

    ids: torch.Tensor
    values: torch.Tensor
    kind: str = "logits"
    row_mean: Optional[torch.Tensor] = None
    row_std: Optional[torch.Tensor] = None
    log_normalizer: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        ids, values = self.ids, self.values
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype.is_complex or \
                ids.dtype == torch.bool:
            raise TypeError(f"SparseTeacher.ids must be an integer torch.Tensor, got "
                            f"{ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__}")
        if not isinstance(values, torch.Tensor) or values.dtype not in _FLOATS:
            raise TypeError("SparseTeacher.values must be a floating torch.Tensor")
        if ids.dim() < 1 or ids.shape != values.shape or ids.shape[-1] < 1:
            raise ValueError(f"SparseTeacher.ids {tuple(ids.shape)} and values {tuple(values.shape)} must have the "
                             f"same shape (..., k) with k >= 1")
        if self.kind not in KINDS:
            raise ValueError(f"SparseTeacher.kind must be one of {KINDS}, got {self.kind!r}")
        lead = ids.shape[:-1]
        for name in ("row_mean", "row_std", "log_normalizer"):
            _check_tensor(name, getattr(self, name), lead, "float")
        _check_tensor("mask", self.mask, ids.shape, "bool")
        if (self.row_mean is None) != (self.row_std is None):
            raise ValueError("SparseTeacher.row_mean and row_std are the full row's statistics: give both or neither")
        for name in ("values", "row_mean", "row_std", "log_normalizer", "mask"):
            t = getattr(self, name)
            if t is not None and t.device != ids.device:
                raise ValueError(f"SparseTeacher.{name} is on {t.device} but ids are on {ids.device}")
            if t is not None and t.requires_grad:
                raise ValueError(f"SparseTeacher.{name} requires grad, but a sparse teacher is constant (the "
                                 f"gradient goes to the student only): pass it detached")

    @property
    def shape(self) -> torch.Size:
        """The leading (row) shape."""
        return self.ids.shape[:-1]

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.ids.device

    @property
    def has_stats(self) -> bool:
        return self.row_std is not None

    def to(self, device: Union[str, torch.device]) -> "SparseTeacher":
        """A copy on ``device``."""
        moved = {f.name: (v.to(device) if isinstance(v, torch.Tensor) else v)
                 for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}
        return SparseTeacher(**moved)

    def select(self, index: Union[torch.Tensor, slice]) -> "SparseTeacher":
        """The rows ``index`` of the first leading dim (e.g. a batch of stored blocks), every tensor alike."""
        pick = {f.name: (v[index] if isinstance(v, torch.Tensor) else v)
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}
        return SparseTeacher(**pick)

    def rows(self) -> SparseRows:
        """The flattened ``(N, k)`` form the ops take (ids as int64, contiguous)."""
        k = self.k
        flat = lambda t: None if t is None else t.reshape(-1).contiguous()  # noqa: E731
        return SparseRows(self.ids.reshape(-1, k).long().contiguous(), self.values.reshape(-1, k).contiguous(),
                          None if self.mask is None else self.mask.reshape(-1, k).contiguous(), flat(self.row_mean),
                          flat(self.row_std), flat(self.log_normalizer), self.kind)

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int, *, kind: str = "logits", generation_temperature: float = 1.0,
                    temperature: Optional[float] = 2.0, standardize: bool = True, correction: int = 1,
                    eps: float = 1e-7, stats: bool = True) -> "SparseTeacher":
        """The top-k of dense teacher ``logits`` (..., V), with the full rows' statistics and normalizer.

        Equivalent eager code (float64 for float64 logits, else float32)::

            full = logits if kind == "logits" else log_softmax(logits / generation_temperature)
            values, ids = full.topk(k)
            row_mean, row_std = full.mean(-1), full.std(-1, correction=correction)
            r = full * (generation_temperature if kind == "logprobs" else 1)
            b = zscore(r, temperature, correction=correction, eps=eps) if standardize else r / temperature
            log_normalizer = logsumexp(b, -1)

        ``temperature``: the loss's ``teacher_temperature`` the normalizer is for (None: no normalizer);
        ``stats=False`` leaves the statistics out (the teacher is then standardized over its k values).
        """
        from . import reference  # (reference.py imports this module)

        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        acc = reference.accumulation_dtype(logits)
        with torch.no_grad():
            x = logits.detach().to(acc)
            full = x if kind == "logits" else torch.log_softmax(x / generation_temperature, -1)
            values, ids = full.topk(k, dim=-1)
            mean = full.mean(-1) if stats else None
            std = full.std(-1, correction=correction) if stats else None
            normalizer = None
            if temperature is not None:
                r = full * (generation_temperature if kind == "logprobs" else 1.0)
                b = reference.zscore(r, temperature, correction=correction, eps=eps) if standardize else r / temperature
                normalizer = torch.logsumexp(b, -1)
        return cls(ids, values, kind, mean, std, normalizer)
