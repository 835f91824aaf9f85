"""``logitstd_kernels.integrations.wrapped.call_in_forward``: a function of a module run as its forward
through the module's wrapper (the DDP case is tests/distributed/test_hf_recipe_ddp.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from logitstd_kernels.integrations.wrapped import call_in_forward


class Wrapper(nn.Module):
    """Records what its forward saw, then calls the wrapped module, as DDP does."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.calls: list[tuple] = []

    def forward(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.module(*args, **kwargs) * 2


def test_runs_the_function_inside_the_wrappers_forward():
    """The arguments pass through the wrapper's forward; the function's result comes back through it
    (here doubled); the function may call the module's own forward, which is back afterwards."""
    module = nn.Linear(3, 2)
    wrapper = Wrapper(module)
    x = torch.randn(4, 3)

    def fn(inputs, *, scale):
        return module(inputs).sum() * scale  # the module's own forward, restored before fn runs

    out = call_in_forward(wrapper, module, fn, x, scale=3.0)
    torch.testing.assert_close(out, module(x).sum() * 6.0)
    assert len(wrapper.calls) == 1 and wrapper.calls[0][1] == {"scale": 3.0}
    assert "forward" not in module.__dict__
    torch.testing.assert_close(wrapper(x), module(x) * 2)


def test_restores_the_forward_when_the_function_raises_and_keeps_an_instance_forward():
    module = nn.Identity()
    own = module.forward = lambda t: t + 1  # an instance-level forward (as some patching libraries set)
    wrapper = Wrapper(module)

    def fails(t):
        raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        call_in_forward(wrapper, module, fails, torch.zeros(1))
    assert module.forward is own
    assert float(module(torch.zeros(1))) == 1.0


def test_without_a_wrapper_calls_the_function():
    module = nn.Identity()
    assert call_in_forward(module, module, lambda a, b=0: a + b, 1, b=2) == 3
    assert "forward" not in module.__dict__
