"""Triton kernels of the fused loss (one launch: loss and gradients) and the row scaling.

Implements the kernel contract of ``logitstd_kernels._backends``: ``fused_forward``,
``fused_regrad_`` and ``scale_rows_``. ``INTERPRETED`` records whether ``TRITON_INTERPRET=1`` was set when this package
(and with it triton) was imported: only then do the kernels run on CPU tensors.
"""

import os

INTERPRETED: bool = os.environ.get("TRITON_INTERPRET") == "1"

from .launch import fused_forward, fused_regrad_, scale_rows_  # noqa: E402  (INTERPRETED first)

__all__ = ["INTERPRETED", "fused_forward", "fused_regrad_", "scale_rows_"]
