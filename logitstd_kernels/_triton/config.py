"""Launch configuration of the Triton kernels: ONE table, indexed by the class count V.

Every launch constant of the package lives in this file. ``kd_config(V, acc64, full_vectors)``
picks the path (register or blocked), the tile width BLOCK and the warp count of the fused loss
kernel, and the blocked path's tuning switches (``BLOCKED_EVICT_HINTS``, ``BLOCKED_PREFETCH_DEPTH``:
off until a GPU run decides them); ``vector_width`` the run length VEC of the tiles;
``SCALE_BLOCK``/``SCALE_WARPS`` configure the row-scaling kernel, ``VP_BLOCK``/``VP_WARPS`` the
vocabulary-parallel phases.

How the entries were sized (Hopper: 65536 32-bit registers, at most 2048 threads and 32 CTAs per
SM; about 3 TB/s of HBM on H100 and 50 MB of L2). The reasoning below was made before the kernels
had run anywhere but the interpreter; the first H200 run (2026-11-28) timed the table's defaults
and the tuning switches (below), not alternative tables.

Registers and spills as ``scripts/triton_aot_check.py`` measures them (triton 3.9.0, ptxas for
sm_90, no GPU; every entry x bf16/bf16, bf16/fp32, fp32/fp32, fp64/fp64 x the heaviest switch sets,
134 variants with the table's tuning switches, all compile; the 24 tuning alternatives below make
158). No KD variant of the table spills; three with the fused CE (HAS_LABELS) do, 4-44 bytes per
thread:

- blocked 4096-wide, 16 warps (capped at 128 registers: 65536 / 512 threads), standardized with
  both gradients: bf16/fp32 (8 B) and fp32/fp32 (36 B stored, 44 loaded);
- float64 blocked, 1024-wide, the same switches (4 B at 255 registers).

Per entry (KD alone; with the fused CE in brackets): register path 63-93 [100-117]; blocked
2048-wide 8 warps 93-165 [171-198]; blocked 4096-wide 16 warps 84-128 [128]; scalar-run blocked
tiles 74-124 [101-128]; float64 register path 72-102 [136-143], float64 blocked 116-216 [193-255];
row scaling 24-32. The check prints every variant; ``--all`` compiles the full cross product.

The blocked path's tuning alternatives (``BLOCKED_EVICT_HINTS``, ``BLOCKED_PREFETCH_DEPTH`` below;
off in the table, so the table's code is the same as before they existed: the check's PTX of all
134 variants is unchanged but for line numbers), compiled for the float32 table's blocked entries
with 16-byte runs x bf16/bf16, bf16/fp32, fp32/fp32 x the KD forward and the fused CE:

- eviction hints: the registers of the default within a few (2048-wide 124-190, 4096-wide 124-128),
  the same two CE variants spill (8 B; 36 B stored, 60 loaded); the loads become
  ``ld.global.L1::evict_last.L2::cache_hint`` (passes 1-2) and ``...evict_first...`` (pass 3)
  with ``createpolicy`` L2 policies, the gradient stores ``st.global.cs``.
- prefetch depth 2: 4096-wide, 16 warps, bf16/bf16 (the long-row bf16 case it is meant for): 128
  registers, no spill, with and without the CE; bf16/fp32 spills 28 B (132 B with the CE) and
  fp32/fp32 200 B (348 B): there it is predicted slower. 2048-wide, 8 warps: 166-212 registers
  (126-198 by default), no spill, but above 128 for every dtype pair, so one program per SM
  instead of two for bf16/bf16 and bf16/fp32 (V <= 16384): predicted slower there too.

- EPT, elements per thread and tensor = BLOCK / (32 * num_warps). The register path keeps the row's
  x, y and the derived u, w, e^a, e^b live. It was sized for 40-64 registers at EPT 8, so that a
  16-warp program fits twice per SM (one overlaps the other's barriers); the kernels as they are
  now take 63-88 registers at V <= 4096 (16 warps): one program per SM, not two (two need <= 64).
  At V = 8192 (EPT 8 with 32 warps, or 16 with 16 warps: 89-128 registers when the table was
  sized) only one program fits per SM, and its phases (load, reductions with barriers,
  exponentials, store) run one after the other with nothing to overlap them; V = 16384 in
  registers spilled (64-360 bytes of stack) at any warp count. So the register path stops at 4096
  and the blocked path takes over.
- The blocked path streams BLOCK-wide tiles with one tile prefetched. A 2048-wide, 8-warp program
  fits twice per SM (16 warps, ~32 KB of loads in flight per SM) up to 128 registers: true with bf16
  inputs (93-128 measured), not for fp32/fp32 standardized with both gradients (161-165) nor with
  the fused CE (171-198). Its passes 2 and 3 re-read the row; they hit L2 while (rows in
  flight) x (row pair bytes) stays well below L2: 264 rows x 64 KB = 17 MB at V = 16384 in bf16.
  Longer rows use one 4096-wide 16-warp program per SM (same EPT and bytes in flight, half the rows
  in flight): 132 x 128 KB = 17 MB at V = 32768, and at V = 131072 (67 MB in flight) the backward
  pass 2 still finds the tail of each row in L2.
- Rows that are not 16-byte aligned (V or a row stride not a multiple of the run) get scalar,
  per-class accesses and one accumulator per class instead of per run: the blocked tiles are
  halved (EPT 4, 74-128 registers, no spills) by ``kd_config(..., full_vectors=False)``.
- float64 (gradcheck, tests; speed is not a goal) has twice the registers per element: EPT 4.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, replace
from typing import Iterator, Optional

import torch
import triton


@dataclass(frozen=True)
class KernelConfig:
    """How to launch the fused loss kernel for one V.

    ``register``: the whole row in one tile, BLOCK >= V (one read of each input), instead of the
    three-pass blocked loop over BLOCK-wide tiles.

    The blocked path's tuning switches (see ``BLOCKED_EVICT_HINTS``; the defaults are the kernel as
    it was before they existed, the register path takes neither):

    - ``evict_hints``: L2 eviction hints, ``evict_last`` on the loads of passes 1 and 2 (the row is
      read again), ``evict_first`` on pass 3's loads (their last use) and streaming stores
      (``.cs``) of the gradients;
    - ``prefetch_depth``: tiles loaded ahead of the one being worked on, 1 or 2.
    """

    register: bool
    block: int
    num_warps: int
    evict_hints: bool = False
    prefetch_depth: int = 1

    def __post_init__(self) -> None:
        if self.prefetch_depth not in (1, 2):
            raise ValueError(f"prefetch_depth must be 1 or 2, got {self.prefetch_depth}")
        if self.register and (self.evict_hints or self.prefetch_depth != 1):
            raise ValueError("evict_hints and prefetch_depth are switches of the blocked path; the register "
                             "path reads each input once and prefetches nothing")


# (largest V, path, BLOCK (0: next power of two >= V), num_warps) for float32 accumulation
# (float32/float16/bfloat16 inputs). The first row whose largest V is >= V is used.
_TABLE_F32 = (
    # Register path at EPT <= 8 (one 16-byte bf16 vector per thread and tensor); 63-93 registers
    # measured (KD; 100-117 with the fused CE).
    # Tiny rows: one warp (more would only replicate lanes).
    (256, "register", 0, 1),
    (512, "register", 0, 2),
    # 4 warps: 8+ programs per SM.
    (1024, "register", 0, 4),
    # 8 warps: 4 programs (32 warps) per SM at <= 64 registers; 70-91 measured: 2 programs.
    (2048, "register", 0, 8),
    # 16 warps: 2 programs (32 warps) per SM at <= 64 registers, one overlapping the other's
    # barriers; 63-88 measured: 1 program.
    (4096, "register", 0, 16),
    # Blocked, 2048-wide tiles, 8 warps (EPT 8; 93-165 registers measured, 198 with the fused CE):
    # 2 programs per SM at <= 128 registers; re-reads served by L2.
    (16384, "blocked", 2048, 8),
    # Blocked, 4096-wide tiles, 16 warps (EPT 8; 84-128 registers measured, at the 128 cap; two
    # variants with the fused CE spill 8-36 bytes): 1 program per SM, half the
    # rows in flight, so that the re-read rows still fit in L2 (V = 32768) or their last tiles do
    # (V >= 65536).
    (1 << 62, "blocked", 4096, 16),
)

# float64 accumulation (any float64 input): EPT <= 4 on the register path, 4 on the blocked path.
_TABLE_F64 = (
    (128, "register", 0, 1),
    (256, "register", 0, 2),
    (512, "register", 0, 4),
    (1024, "register", 0, 8),
    (1 << 62, "blocked", 1024, 8),
)

# The smallest tile of the register path (a power of two for tl.arange; tiny rows waste idle lanes).
_MIN_BLOCK = 32

# The blocked path's tuning switches, applied to every blocked entry of both tables. A cache model
# of the blocked path (docs/design.md section 4) predicted each to be faster than the default at
# long rows. ``scripts/gpu-check.sh`` times the default against each switch forced on (benchmark
# providers ``triton_evict`` and ``triton_prefetch``, through ``forced_tuning``); a switch that wins
# is turned on here (or for the V range where it wins, as a column of the table). Registers and
# spills of the switched variants: the module docstring.
#
# Measured on an H200 (2026-11-28, 8192 rows, bf16, forward + backward; README Performance): at
# V = 131072 the default 5.88 ms, eviction hints 5.69 ms (-3.2%), prefetch depth 2 6.24 ms (+6%);
# at V = 262144 10.99, 10.85 (-1.2%) and 11.76 ms (+7%); repeats within 0.1%; bit-identical results
# on the GPU. Both stay off: the hints' gain is small next to the kernel's distance from the floor
# (3.8x: per-element work, not bytes, design section 4), and the default they would give has not
# been timed itself. Depth 2 is slower: the loads in flight were not the limit.
#
# - Eviction hints (``KernelConfig.evict_hints``). Pass 1 and pass 2 read the row pair, pass 3 reads
#   it again: at V = 131072 in bf16 the 132 row pairs in flight (67 MB) exceed the 50 MB L2, so
#   some re-reads go to HBM (a predicted 11-12 of the 14 bytes per element issued, against the
#   floor of 6). ``evict_last`` on the loads of passes 1 and 2 asks L2 to keep the row until pass 3,
#   ``evict_first`` on pass 3's loads releases it after its last use, and the gradient is stored
#   streaming (``.cs``: written once, not read by this kernel), so it does not push rows out.
# - Prefetch depth (``KernelConfig.prefetch_depth``). Occupancy is set by registers: the 4096-wide,
#   16-warp entry runs one program per SM (84-128 registers of a 128 cap), so its loads in flight
#   are one prefetched tile, 16 KB per SM in bf16, below the ~20-25 KB per SM that Little's law asks
#   of HBM (3 TB/s x ~1 us latency / 132 SMs). A second prefetched tile doubles that, for one more
#   tile of x and y in registers: it fits the 128-register cap without spilling only for bf16/bf16
#   (the module docstring), so the GPU run times it there (bf16, V >= 32768); where it spills or
#   costs the 2048-wide entry its second program per SM it is predicted slower, and a win would turn
#   it on for the 4096-wide bf16 entry alone. Two programs per SM was the other way to double it and
#   is not a switch: at 16 warps a second program needs <= 64 registers per thread, half of what the
#   kernel takes, and the 2048-wide, 8-warp entry (two per SM where it fits in 128 registers) is
#   already in the table for V <= 16384; a persistent grid changes the rows' order, not the bytes
#   in flight.
# - The third candidate, rows of V >= 32768 on the CUDA cluster kernel (6 bytes per element from
#   HBM at any V, its row in shared memory), is a choice of backend, not of this table: the
#   benchmark's ``cuda`` provider times it beside ``triton``.
BLOCKED_EVICT_HINTS = False
BLOCKED_PREFETCH_DEPTH = 1

# Switches forced by ``forced_tuning`` (benchmarks), over the two above.
_FORCED: contextvars.ContextVar[dict] = contextvars.ContextVar("logitstd_forced_tuning", default={})

# Row scaling: 4096-element tiles (8 KB of bf16), 8 warps -> 16 elements per thread, two 16-byte
# accesses; a (rows, tiles) grid keeps every SM busy for any shape.
SCALE_BLOCK = 4096
SCALE_WARPS = 8

# The vocabulary-parallel phases (vocab_parallel.py): one program per row over its slice, in
# 1024-wide tiles, 4 warps -> 8 elements per thread (one 16-byte access of bf16), up to nine float32
# accumulators per element in phase 2: 128 registers, no spills (scripts/triton_aot_check.py,
# sm_90); slices of 32k-128k classes make 32-128 tiles per row. float64 accumulation takes 512-wide
# tiles: at 1024 its phase 2 needs 255 registers and spills 504 bytes; at 512 the checked (heaviest)
# variants take 74-172 registers without spilling, while phase 2 with standardization but no labels
# spills 8 bytes (not in the default check). Not timed on a GPU.
VP_BLOCK = 1024
VP_BLOCK_F64 = 512
VP_WARPS = 4


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
    one per run and uses scalar loads: its tiles are halved (EPT 4), which keeps ptxas at 74-128
    registers (scripts/triton_aot_check.py) instead of 150-215 at full width.
    """
    table = _TABLE_F64 if acc64 else _TABLE_F32
    for largest, path, block, num_warps in table:
        if num_classes <= largest:
            if path == "register":
                return KernelConfig(register=True, block=max(triton.next_power_of_2(num_classes), _MIN_BLOCK),
                                    num_warps=num_warps)
            cfg = KernelConfig(register=False, block=block if full_vectors else block // 2, num_warps=num_warps,
                               evict_hints=BLOCKED_EVICT_HINTS, prefetch_depth=BLOCKED_PREFETCH_DEPTH)
            return replace(cfg, **_FORCED.get())
    raise ValueError(f"no kernel configuration for {num_classes} classes")


def tuning_constexprs(cfg: KernelConfig) -> dict[str, object]:
    """The blocked kernel's constexprs for ``cfg``'s tuning switches; none for the register path."""
    return {} if cfg.register else {"EVICT_HINTS": cfg.evict_hints, "PREFETCH": cfg.prefetch_depth}


@contextlib.contextmanager
def forced_tuning(evict_hints: Optional[bool] = None, prefetch_depth: Optional[int] = None) -> Iterator[None]:
    """Within the block, ``kd_config`` gives every blocked entry these tuning switches (None: the
    table's); the register path is unchanged. For the benchmark, which times each switch against
    the default; it applies to the launches made inside the block (a loss's forward computes its
    gradients there; a backward run after the block launches with the table's switches).
    """
    forced = {k: v for k, v in (("evict_hints", evict_hints), ("prefetch_depth", prefetch_depth)) if v is not None}
    KernelConfig(register=False, block=_MIN_BLOCK, num_warps=1, **forced)  # rejects bad values before any launch
    token = _FORCED.set({**_FORCED.get(), **forced})
    try:
        yield
    finally:
        _FORCED.reset(token)
