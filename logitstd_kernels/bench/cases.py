"""The benchmark's cases: shapes, dtypes and modes, with defaults per device.

A case is one (rows, vocab, dtype) problem; every provider is timed on it in every mode:
``forward`` (the loss of a training step: the student requires grad), ``backward`` (only the
backward of that step) and ``full`` (both); on request (``--modes``) also ``no_grad``, the loss
alone with no input requiring grad (an evaluation step: no gradient is computed or written).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("forward", "backward", "full", "no_grad")
DEFAULT_MODES = ("forward", "backward", "full")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Case:
    sweep: str  # "vocab" (V varies at fixed rows) or "rows" (rows vary at fixed V)
    rows: int
    vocab: int
    dtype: str

    @property
    def elements(self) -> int:
        return self.rows * self.vocab


@dataclass(frozen=True)
class Defaults:
    vocab_sweep: tuple[int, ...]
    rows_for_vocab_sweep: int
    rows_sweep: tuple[int, ...]
    vocab_for_rows_sweep: int
    dtypes: tuple[str, ...]


# GPU: the LLM regime of the targets (8192 rows, V up to 256k) in bf16 and float32.
# CPU: the same V range at fewer rows so that eager PyTorch and torch.compile (~8 s of compilation
# per shape) finish in under 5 minutes on 2 cores; the rows sweep reaches the 1024 x 32000 target.
GPU_DEFAULTS = Defaults((1024, 4096, 16384, 32768, 65536, 131072, 262144), 8192,
                        (1024, 2048, 4096, 8192, 16384), 32768, ("bfloat16", "float32"))
CPU_DEFAULTS = Defaults((1024, 4096, 16384, 65536, 262144), 64, (64, 256, 1024), 32000, ("float32",))


def default_cases(device: torch.device) -> Defaults:
    return GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS


def build_cases(vocab_sweep: tuple[int, ...], rows_for_vocab_sweep: int, rows_sweep: tuple[int, ...],
                vocab_for_rows_sweep: int, dtypes: tuple[str, ...]) -> list[Case]:
    """The V sweep at fixed rows, then the rows sweep at fixed V, for each dtype (no duplicates)."""
    cases: list[Case] = []
    seen: set[tuple[int, int, str]] = set()
    for dtype in dtypes:
        shapes = [("vocab", rows_for_vocab_sweep, v) for v in vocab_sweep]
        shapes += [("rows", r, vocab_for_rows_sweep) for r in rows_sweep]
        for sweep, rows, vocab in shapes:
            if (rows, vocab, dtype) not in seen:
                seen.add((rows, vocab, dtype))
                cases.append(Case(sweep, rows, vocab, dtype))
    return cases
