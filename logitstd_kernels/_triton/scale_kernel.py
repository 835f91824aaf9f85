"""In-place row scaling of a saved gradient, ``grad[r] *= scale[r]`` (the backward's incoming gradient)."""

import triton
import triton.language as tl

from .row_math import to_acc


# ------------------------------------------------------------------------------------------------
# In-place row scaling of a saved gradient: grad[r] *= scale[r].
#
# Each program owns one BLOCK-wide tile of one row and loads the row's scale first; a scale of
# exactly 1.0 (the common scalar ``loss.backward()``) returns without touching the gradient.
# Memory per element: 0 bytes when the scale is 1, else read + write of the gradient (2 * 4 bytes
# in float32; low-precision gradients are recomputed instead, see _ops/autograd.py).
# ------------------------------------------------------------------------------------------------
@triton.jit
def scale_rows_kernel(g_ptr, s_ptr, V, stride_g, stride_s, BLOCK: tl.constexpr, ACC64: tl.constexpr):
    """``grad[row, tile] *= scale[row]``, skipped on the device when the scale is exactly 1."""
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    s = to_acc(tl.load(s_ptr + row * stride_s), ACC64)
    if s != 1.0:
        offs = tile * BLOCK + tl.arange(0, BLOCK)
        m = offs < V
        ptrs = g_ptr + row * stride_g + offs
        g = to_acc(tl.load(ptrs, mask=m, other=0.0), ACC64)
        tl.store(ptrs, (g * s).to(g_ptr.dtype.element_ty), mask=m)
