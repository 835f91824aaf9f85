"""Reading and writing the saved logits that ``analyze`` works on.

Formats:

- a **bundle**, one ``.npz`` (``np.savez``) or ``.pt`` (``torch.save`` of a dict) file holding, for
  each split, four arrays under the keys ``<split>_teacher``, ``<split>_student_a``,
  ``<split>_student_b`` and ``<split>_labels`` (for one unnamed split: ``teacher``, ``student_a``,
  ``student_b``, ``labels``; a ``.pt`` file may also nest them: ``{split: {"teacher": ..., ...}}``);
- **one file per array** (``.npy`` or a ``.pt`` holding one tensor), for logits larger than memory:
  ``.npy`` files are read a chunk of rows at a time (:class:`NpyRows`) and ``.pt`` files are loaded
  with ``mmap=True``, so only the rows being analysed are in memory. (Arrays inside an ``.npz`` are
  read whole.)

Logits are ``(N, V)`` floating arrays (any float dtype; float16/bfloat16 are analysed in float32);
labels are ``(N,)`` integers. Student A is the reference student (e.g. trained independently),
student B the one under test (e.g. the KD student).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Union

import numpy as np
import torch

from ..analysis import ArrayLike, LogitSet

__all__ = ["ROLES", "NpyRows", "load_bundle", "load_array", "load_arrays", "save_bundle"]

ROLES = ("teacher", "student_a", "student_b", "labels")


class NpyRows:
    """Row slices of a C-ordered ``.npy`` file, read from disk on demand.

    ``rows[start:stop]`` reads just those rows with ``np.fromfile``; unlike a memory map, nothing of
    the file stays mapped into the process, so the resident memory is one chunk however large the
    file. Equivalent to ``np.load(path, mmap_mode="r")[start:stop].copy()``.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        header = np.load(self.path, mmap_mode="r")  # parses the header; the map is dropped right away
        if not isinstance(header, np.memmap):
            raise ValueError(f"{self.path}: cannot be read in chunks (an object array?)")
        if header.ndim > 1 and not header.flags.c_contiguous:
            raise ValueError(f"{self.path}: Fortran-ordered arrays are not supported; save a C-ordered array")
        self.shape: tuple[int, ...] = tuple(header.shape)
        self.dtype = header.dtype
        self.offset = int(header.offset)
        del header
        self._row_items = int(np.prod(self.shape[1:], dtype=np.int64))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("NpyRows supports contiguous row slices only, e.g. rows[start:stop]")
        start, stop, _ = rows.indices(self.shape[0])
        count = max(0, stop - start)
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * self._row_items * self.dtype.itemsize)
            data = np.fromfile(f, dtype=self.dtype, count=count * self._row_items)
        return data.reshape((count, *self.shape[1:]))


def _load_pt(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # saved in the legacy (non-zip) format, which cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def _group(arrays: Mapping[str, Any], source: Path) -> dict[str, LogitSet]:
    found: dict[str, dict[str, Any]] = {}
    for key, value in arrays.items():
        if isinstance(value, Mapping):
            for role, array in value.items():
                found.setdefault(str(key), {})[str(role)] = array
            continue
        for role in ROLES:
            if key == role:
                found.setdefault("data", {})[role] = value
                break
            if key.endswith("_" + role):
                found.setdefault(key[: -len(role) - 1], {})[role] = value
                break
    if not found:
        raise ValueError(f"{source}: no arrays named like 'teacher', 'student_a', 'student_b', 'labels' or "
                         f"'<split>_teacher', ... (found keys: {sorted(arrays)})")
    splits = {}
    for split, roles in found.items():
        missing = [r for r in ROLES if r not in roles]
        if missing:
            raise ValueError(f"{source}: split {split!r} lacks {missing} (it has {sorted(roles)})")
        splits[split] = LogitSet(*(roles[r] for r in ROLES))
    return splits


def load_bundle(path: Path) -> dict[str, LogitSet]:
    """The splits stored in one ``.npz`` or ``.pt`` bundle, in the file's order."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as archive:
            return _group({key: archive[key] for key in archive.files}, path)
    if path.suffix in (".pt", ".pth"):
        payload = _load_pt(path)
        if not isinstance(payload, Mapping):
            raise ValueError(f"{path}: expected a dict of tensors, got {type(payload).__name__}")
        return _group(payload, path)
    raise ValueError(f"{path}: a bundle must be .npz or .pt (use --teacher/--student-a/... for .npy files)")


def load_array(path: Path) -> Union[ArrayLike, NpyRows]:
    """One array from ``.npy`` (:class:`NpyRows`) or ``.pt`` (one tensor, memory-mapped when possible)."""
    path = Path(path)
    if path.suffix == ".npy":
        return NpyRows(path)
    if path.suffix in (".pt", ".pth"):
        tensor = _load_pt(path)
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{path}: expected one tensor, got {type(tensor).__name__}")
        return tensor
    raise ValueError(f"{path}: expected a .npy or .pt file")


def load_arrays(teacher: Path, student_a: Path, student_b: Path, labels: Path) -> LogitSet:
    """A :class:`~logitstd_kernels.analysis.LogitSet` from one file per array (see :func:`load_array`)."""
    return LogitSet(*(load_array(p) for p in (teacher, student_a, student_b, labels)))


def _numpy(array: ArrayLike) -> np.ndarray:
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


def save_bundle(path: Path, splits: Mapping[str, LogitSet]) -> Path:
    """Write ``splits`` to an uncompressed ``.npz`` bundle with ``<split>_<role>`` keys; returns the path
    written (``np.savez`` appends ``.npz`` to a name without it)."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"{split}_{role}": _numpy(array) for split, logits in splits.items()
              for role, array in zip(ROLES, logits)}
    np.savez(path, **arrays)
    return path
