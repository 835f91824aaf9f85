"""A model's loss computed inside the forward of the module that wraps it.

The fused lm_head loss needs a causal LM's last hidden states, not its logits, so code calls the
model's base model (``student.model(...)``) and passes ``student.lm_head.weight`` to the loss. Under
``torch.nn.parallel.DistributedDataParallel`` that skips the wrapper's forward, where DDP prepares
its reducer for the backward: the gradient hooks then do nothing and every rank keeps its own local
gradients. :func:`call_in_forward` runs such a function as the wrapped module's forward, called
through the wrapper, so that the wrapper does what it does around a forward (DDP: the gradient
all-reduce in the backward; FSDP and DeepSpeed: gathering the parameters). It is the
"forward redirection" of PyTorch Lightning's strategies and TRL's trainers.

Equivalent code, for a function ``fn(*args)`` of ``module`` (``wrapper = DDP(module)``)::

    module.forward = fn          # for this one call
    result = wrapper(*args)      # DDP's forward runs, then calls module(*args), i.e. fn(*args)
    del module.forward           # the module's own forward again
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from torch import nn

__all__ = ["call_in_forward"]

_R = TypeVar("_R")


def call_in_forward(wrapper: nn.Module, module: nn.Module, fn: Callable[..., _R], *args: Any, **kwargs: Any) -> _R:
    """``fn(*args, **kwargs)``, run as ``module``'s forward inside a call of ``wrapper``.

    ``wrapper`` is the module that wraps ``module`` (``DistributedDataParallel(module)``, an FSDP or
    DeepSpeed engine), or ``module`` itself, in which case ``fn`` is simply called. ``args`` and
    ``kwargs`` go through the wrapper's forward (DDP moves tensors to its device there); ``fn`` may
    use ``module``'s submodules and parameters freely. ``module``'s own forward is back in place
    when ``fn`` starts (so ``fn`` may call it) and after the call, also when it raises.
    """
    if wrapper is module:
        return fn(*args, **kwargs)
    own_forward = module.__dict__.get("forward")  # an instance attribute, if one was set

    def restore() -> None:
        if own_forward is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = own_forward

    def forward(*inner_args: Any, **inner_kwargs: Any) -> _R:
        restore()
        return fn(*inner_args, **inner_kwargs)

    module.forward = forward
    try:
        return wrapper(*args, **kwargs)
    finally:
        restore()
