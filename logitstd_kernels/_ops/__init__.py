"""The ``torch.library`` ops of the package and what runs inside them.

- ``loss_op``: ``torch.ops.logitstd.distillation_loss``, the fused objective of (N, V) logits (KD is the
  objective without labels; ``torch.ops.logitstd.kd_loss`` is its composite alias), with a fake kernel
  and the saved-gradient autograd of ``autograd``;
- ``chunks``: the chunk loop of the fused lm_head, shared by the single-device op
  (``fused_linear_op``: ``torch.ops.logitstd.fused_linear_distillation_loss``) and the
  vocabulary-parallel loss (``logitstd_kernels.distributed``).
"""
