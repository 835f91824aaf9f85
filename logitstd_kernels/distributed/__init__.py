"""Vocabulary-parallel (tensor-parallel) distillation: the objective of logits sharded by class.

- ``losses``: the public functions, ``vocab_parallel_distillation_loss`` (logits sharded by class)
  and ``vocab_parallel_fused_linear_distillation_loss`` (lm_heads split by vocabulary);
- ``sharded``: the local phases around two collectives of O(rows) bytes (three for jsd and tvd),
  and their autograd;
- ``collectives``: the shard header exchange and the gathers; ``merge``: the math between them;
- ``phases``: the phase backends (``torch_phases`` with ``torch_terms``, and the Triton kernels of
  ``_triton/vocab_parallel.py``) behind one interface; ``layout``: the coefficient columns they read
  and the positions of the sums they write.

The algorithm and its communication cost: docs/tensor-parallel.md.
"""

from .losses import vocab_parallel_distillation_loss, vocab_parallel_fused_linear_distillation_loss
from .sharded import ShardedRows, sharded_rows

__all__ = ["vocab_parallel_distillation_loss", "vocab_parallel_fused_linear_distillation_loss", "ShardedRows",
           "sharded_rows"]
