"""Integrations with training libraries, each an optional module that imports its library itself:

- :mod:`logitstd_kernels.integrations.trl`: TRL's ``DistillationTrainer`` with its loss computed by
  the fused lm_head (logit standardization on by default); needs ``trl``.
- :mod:`logitstd_kernels.integrations.wrapped`: a model's loss computed inside the forward of its
  ``DistributedDataParallel`` (or other) wrapper, so that the wrapper's gradient hooks run; torch only.

Importing :mod:`logitstd_kernels` imports none of them.
"""
