"""Launch configuration of the Triton kernels: ONE table, indexed by the class count V.

Every launch constant of the package lives in this file. ``kd_config(V, acc64)`` picks the path
(register or blocked), the tile width BLOCK and the warp count for the fused loss kernel;
``SCALE_BLOCK``/``SCALE_WARPS`` configure the row-scaling kernel.

Sizing rules (Hopper, H100/H200; 65536 32-bit registers and up to 2048 threads per SM):

- "elements per thread" (EPT) = BLOCK / (32 * num_warps). The register path keeps x, y and the
  derived u, w, e^a, e^b of the whole row live: about 6 * EPT registers in float32, so EPT <= 16 keeps
  the kernel under ptxas's cap (65536 / threads per block) without spills; 8 is comfortable. EPT 8 of
  a bf16 input is one 16-byte vector load per thread and tensor.
- The blocked path keeps up to 7 per-lane accumulators plus a tile of x and y: EPT 8 in float32.
- float64 (gradcheck, tests) needs twice the registers per element: half the EPT, and the register
  path stops at a smaller V. Its speed is not a goal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton


@dataclass(frozen=True)
class KernelConfig:
    """How to launch the fused loss kernel for one V.

    ``register``: the whole row in one BLOCK >= V (one read of each input) instead of the three-pass
    blocked loop over BLOCK-wide tiles.
    """

    register: bool
    block: int
    num_warps: int


# (largest V, path, BLOCK (0: next power of two >= V), num_warps) for float32 accumulation
# (float32/float16/bfloat16 inputs). First row whose largest V is >= V wins.
_TABLE_F32 = (
    # Tiny rows: one warp; more warps would only replicate lanes.
    (256, "register", 0, 1),
    # Up to 1024: 4 warps, EPT <= 8.
    (1024, "register", 0, 4),
    # 2048: 8 warps, EPT 8.
    (2048, "register", 0, 8),
    # 4096: 16 warps, EPT 8 (512 threads, 128-register cap: ample).
    (4096, "register", 0, 16),
    # 8192: 16 warps, EPT 16; one 32 KB (bf16) row pair in registers, several CTAs per SM.
    (8192, "register", 0, 16),
    # 16384: 32 warps (1024 threads, 64-register cap), EPT 16. The row pair (64 KB in bf16) is read
    # exactly once, which beats the blocked path's L2 re-reads at this size.
    (16384, "register", 0, 32),
    # Larger rows: blocked, 2048-wide tiles with 8 warps (EPT 8, 16-byte bf16 loads), 2-3 CTAs per
    # SM to overlap one CTA's arithmetic with another's loads. Re-reads of pass 2/3 hit L2 while
    # (rows in flight) x (row pair bytes) fits in it: ~400 rows x 128 KB at V = 32768.
    (1 << 62, "blocked", 2048, 8),
)

# float64 accumulation (any float64 input): half the EPT of the float32 table.
_TABLE_F64 = (
    (128, "register", 0, 1),
    (512, "register", 0, 4),
    (1024, "register", 0, 8),
    (2048, "register", 0, 16),
    # Larger float64 rows: blocked, EPT 4.
    (1 << 62, "blocked", 1024, 8),
)

# The smallest tile of the register path; tl.arange needs a power of two and tiny tiles only save
# lanes that idle anyway.
_MIN_BLOCK = 32

# Row scaling: 4096-element tiles (8 KB of bf16), 8 warps -> EPT 16, two 16-byte accesses per
# thread; a grid of (rows, tiles) keeps every SM busy for any shape.
SCALE_BLOCK = 4096
SCALE_WARPS = 8


def vector_width(*dtypes: torch.dtype) -> int:
    """VEC, the classes per contiguous run of a tile: one 16-byte access of the widest input dtype.

    Both inputs share the tile layout (a bf16 student with a float32 teacher uses 8-byte bf16
    accesses rather than converting layouts through shared memory).
    """
    return 16 // max(torch.empty((), dtype=d).element_size() for d in dtypes)


def kd_config(num_classes: int, acc64: bool) -> KernelConfig:
    """The table entry for ``num_classes`` classes (float64 accumulation if ``acc64``)."""
    table = _TABLE_F64 if acc64 else _TABLE_F32
    for largest, path, block, num_warps in table:
        if num_classes <= largest:
            register = path == "register"
            if register:
                block = max(triton.next_power_of_2(num_classes), _MIN_BLOCK)
            return KernelConfig(register=register, block=block, num_warps=num_warps)
    raise ValueError(f"no kernel configuration for {num_classes} classes")
