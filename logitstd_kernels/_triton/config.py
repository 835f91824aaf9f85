"""Launch configuration of the Triton kernels: ONE table, indexed by the class count V.

Every launch constant of the Triton kernels lives in this file, each with the reason for its value.
``kd_config(V, acc64, full_vectors)`` picks the path (register or blocked), the tile width BLOCK, the
warp count and the eviction hints of the fused loss kernel; ``vector_width`` the run length VEC of
the tiles; ``SCALE_BLOCK``/``SCALE_WARPS`` configure the row-scaling kernel, ``VP_BLOCK``/``VP_WARPS``
the vocabulary-parallel phases. Registers, spills and instruction counts of every entry:
``scripts/triton_aot_check.py`` and docs/performance.md.

The sizing (Hopper: 65536 32-bit registers, at most 2048 threads and 32 CTAs per SM; 50 MB of L2):

- EPT, elements per thread and tensor = BLOCK / (32 * num_warps). The register path keeps the row's
  x, y and the derived u, w, e^a, e^b live; at EPT 8 and 16 warps a program takes 63-88 registers,
  one program per SM. At V = 8192 (EPT 16) only one program fits and its phases (load, reductions
  with barriers, exponentials, store) run one after the other with nothing to overlap them; V = 16384
  in registers spills at any warp count. So the register path stops at 4096 and the blocked path
  takes over.
- The blocked path streams BLOCK-wide tiles with one tile prefetched. A 2048-wide, 8-warp program
  fits twice per SM (16 warps, ~32 KB of loads in flight per SM) up to 128 registers (true with bf16
  inputs). Its passes 2 and 3 re-read the row; they hit L2 while (rows in flight) x (row pair bytes)
  stays well below L2: 264 rows x 64 KB = 17 MB at V = 16384 in bf16. Longer rows use one 4096-wide
  16-warp program per SM (same EPT and bytes in flight, half the rows in flight): 132 x 128 KB =
  17 MB at V = 32768; at V = 131072 (67 MB in flight) the re-reads partly miss L2, so this entry
  loads with eviction hints (``evict_last`` while the row is read again, ``evict_first`` on its last
  read, streaming gradient stores).
- Rows that are not 16-byte aligned (V or a row stride not a multiple of the run) get scalar,
  per-class accesses and one accumulator per class instead of per run: the blocked tiles are
  halved (EPT 4) by ``kd_config(..., full_vectors=False)``, which keeps the registers under 128.
- float64 (gradcheck, tests; speed is not a goal) has twice the registers per element: EPT 4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton


@dataclass(frozen=True)
class KernelConfig:
    """How to launch the fused loss kernel for one V.

    ``register``: the whole row in one tile, BLOCK >= V (one read of each input), instead of the
    three-pass blocked loop over BLOCK-wide tiles. ``evict_hints``: the blocked path's L2 eviction
    hints (the register path reads each input once and takes none).
    """

    register: bool
    block: int
    num_warps: int
    evict_hints: bool = False

    def __post_init__(self) -> None:
        if self.register and self.evict_hints:
            raise ValueError("evict_hints is a switch of the blocked path; the register path reads each input once")


# (largest V, path, BLOCK (0: next power of two >= V), num_warps, eviction hints) for float32
# accumulation (float32/float16/bfloat16 inputs). The first row whose largest V is >= V is used.
_TABLE_F32 = (
    # Register path at EPT <= 8 (one 16-byte bf16 vector per thread and tensor).
    # Tiny rows: one warp (more would only replicate lanes).
    (256, "register", 0, 1, False),
    (512, "register", 0, 2, False),
    # 4 warps: 8+ programs per SM.
    (1024, "register", 0, 4, False),
    # 8 warps: 2-4 programs per SM.
    (2048, "register", 0, 8, False),
    # 16 warps: 1-2 programs per SM.
    (4096, "register", 0, 16, False),
    # Blocked, 2048-wide tiles, 8 warps (EPT 8): 2 programs per SM at <= 128 registers; re-reads
    # served by L2.
    (16384, "blocked", 2048, 8, False),
    # Blocked, 4096-wide tiles, 16 warps (EPT 8): 1 program per SM, half the rows in flight, so that
    # the re-read rows still fit in L2 (V = 32768) or their last tiles do (V >= 65536), with hints.
    (1 << 62, "blocked", 4096, 16, True),
)

# float64 accumulation (any float64 input): EPT <= 4 on the register path, 4 on the blocked path.
_TABLE_F64 = (
    (128, "register", 0, 1, False),
    (256, "register", 0, 2, False),
    (512, "register", 0, 4, False),
    (1024, "register", 0, 8, False),
    (1 << 62, "blocked", 1024, 8, False),
)

# The smallest tile of the register path (a power of two for tl.arange; tiny rows waste idle lanes).
_MIN_BLOCK = 32

# Row scaling: 4096-element tiles (8 KB of bf16), 8 warps -> 16 elements per thread, two 16-byte
# accesses; a (rows, tiles) grid keeps every SM busy for any shape.
SCALE_BLOCK = 4096
SCALE_WARPS = 8

# The vocabulary-parallel phases (vocab_parallel.py): one program per row over its slice, in
# 1024-wide tiles, 4 warps -> 8 elements per thread (one 16-byte access of bf16); phase 2 keeps one
# accumulator per partial sum and element: 13 (forward KL, standardized, with labels) take 128
# registers in float32, Jeffreys' 18 take 168, no spills; slices of 32k-128k classes make 32-128
# tiles per row. float64 accumulation takes 512-wide tiles: at 1024 its phase 2 spills; and phase 2
# with more than VP_F64_MAX_SUMS partial sums (Jeffreys standardized) 256-wide ones: at 512 it
# spills (255 registers, 152 bytes of spills with 18 sums), 13 take 232 registers without.
VP_BLOCK = 1024
VP_BLOCK_F64 = 512
VP_BLOCK_F64_MANY_SUMS = 256
VP_F64_MAX_SUMS = 13
VP_WARPS = 4


def vp_block(acc64: bool, sums: int = 0) -> int:
    """The tile width of a vocabulary-parallel phase; ``sums``: phase 2's partial sums per row (0 for
    the other phases)."""
    if not acc64:
        return VP_BLOCK
    return VP_BLOCK_F64_MANY_SUMS if sums > VP_F64_MAX_SUMS else VP_BLOCK_F64


def vector_width(*dtypes: torch.dtype) -> int:
    """VEC, the classes per contiguous run of a tile: one 16-byte access of the widest input dtype.

    Both inputs share the tile layout (a bf16 student with a float32 teacher uses 8-byte bf16
    accesses rather than converting layouts through shared memory).
    """
    return 16 // max(torch.empty((), dtype=d).element_size() for d in dtypes)


def kd_config(num_classes: int, acc64: bool, full_vectors: bool = True) -> KernelConfig:
    """The table entry for ``num_classes`` classes (float64 accumulation if ``acc64``).

    ``full_vectors``: the rows allow 16-byte runs (VEC = ``vector_width``). When they do not (V or a
    row stride not a multiple of it), the blocked path holds one accumulator per class instead of
    one per run and uses scalar loads: its tiles are halved (EPT 4).
    """
    table = _TABLE_F64 if acc64 else _TABLE_F32
    for largest, path, block, num_warps, evict_hints in table:
        if num_classes <= largest:
            if path == "register":
                return KernelConfig(register=True, block=max(triton.next_power_of_2(num_classes), _MIN_BLOCK),
                                    num_warps=num_warps)
            return KernelConfig(register=False, block=block if full_vectors else block // 2, num_warps=num_warps,
                                evict_hints=evict_hints)
    raise ValueError(f"no kernel configuration for {num_classes} classes")


def tuning_constexprs(cfg: KernelConfig, smoothing: bool = True) -> dict[str, object]:
    """The blocked kernel's constexprs for ``cfg``'s switches (and ``SMOOTH``: label smoothing on);
    none for the register path."""
    return {} if cfg.register else {"EVICT_HINTS": cfg.evict_hints, "SMOOTH": smoothing}

# The sparse-teacher kernel (sparse_kernel.py): one program per row streams the student row in tiles of
# at most SPARSE_BLOCK classes (2048 x 4 bytes per tile per pass: 8 elements per thread at 8 warps,
# the blocked path's tile of float32 rows); the teacher's k entries are one tile of next_pow2(k).
SPARSE_BLOCK = 2048
SPARSE_WARPS = 8
# The exact tail sum (rows whose Z - Z_S cancels) compares a tile of classes with the k ids: tiles of
# SPARSE_TAIL_COMPARES / next_pow2(k) classes (at least 16), 32 compares per thread at 8 warps.
SPARSE_TAIL_COMPARES = 8192
