"""The public contract: argument checks, backend choice, the module, torch.compile."""

from __future__ import annotations

import pytest
import torch

import logitstd_kernels as lsk
from support import case_id, fused_cases

CASES = fused_cases()


def good(shape=(4, 10), **kw):
    return torch.randn(*shape, **kw)


@pytest.mark.parametrize("fn", [lsk.logitstd_kd_loss, lsk.reference.logitstd_kd_loss], ids=["fused", "reference"])
@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((good(), good((4, 9))), {}, ValueError, "teacher_logits has shape"),
        ((good(), good(device="meta")), {}, ValueError, "teacher_logits is on meta"),
        ((torch.ones(4, 10, dtype=torch.long), good()), {}, TypeError, "student_logits must have a floating dtype"),
        ((good(), torch.ones(4, 10, dtype=torch.int32)), {}, TypeError, "teacher_logits must have a floating dtype"),
        (([1.0, 2.0], good((2,))), {}, TypeError, "student_logits must be a torch.Tensor"),
        ((torch.tensor(1.0), torch.tensor(1.0)), {}, ValueError, "student_logits must have at least one dimension"),
        ((good((4, 1)), good((4, 1))), {}, ValueError, "student_logits has 1 class"),
        ((good(), good()), {"temperature": 0.0}, ValueError, "temperature must be finite and > 0"),
        ((good(), good()), {"temperature": -1.0}, ValueError, "temperature must be finite and > 0"),
        ((good(), good()), {"teacher_temperature": float("inf")}, ValueError, "teacher_temperature must be finite"),
        ((good(), good()), {"temperature": "2"}, TypeError, "temperature must be a positive number"),
        ((good(), good()), {"reduction": "avg"}, ValueError, "reduction must be one of"),
        ((good(), good()), {"correction": 1.5}, TypeError, "correction must be an int"),
        ((good(), good()), {"correction": 10}, ValueError, "correction=10 leaves no degrees of freedom"),
        ((good(), good()), {"eps": -1e-3}, ValueError, "eps must be a finite number >= 0"),
        ((good(), good()), {"mask": torch.ones(4)}, TypeError, "mask must have dtype torch.bool"),
        ((good(), good()), {"mask": torch.ones(5, dtype=torch.bool)}, ValueError, "mask has shape"),
        ((good(), good()), {"mask": [True] * 4}, TypeError, "mask must be a bool torch.Tensor"),
    ],
)
def test_bad_input_names_the_argument(fn, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        fn(*args, **kwargs)


def test_single_class_is_fine_without_standardization():
    assert lsk.kd_loss(good((3, 1)), good((3, 1))) == 0


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        lsk.logitstd_kd_loss(good(), good(), backend="tpu")


def test_forced_backend_that_cannot_run_says_why():
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run on cpu tensors here"):
        lsk.logitstd_kd_loss(good(), good(), backend="cuda")


def test_available_backends():
    backends = lsk.available_backends()
    assert "torch" in backends
    status = lsk.backend_status()
    assert set(status) == {"torch", "triton", "cuda", "cpu"}
    assert all(status[b] is None for b in backends)
    assert all(isinstance(status[b], str) and status[b] for b in status if b not in backends)


def test_auto_uses_a_fused_kernel_on_cpu_when_built():
    from logitstd_kernels._backends import resolve_backend, unavailable_reason

    expected = "cpu" if unavailable_reason("cpu", "cpu") is None else "torch"
    assert resolve_backend("auto", torch.device("cpu")) == expected


def test_module_matches_functional():
    module = lsk.LogitStdKDLoss(temperature=3.0, teacher_temperature=2.0, correction=0, reduction="sum")
    x, y = good(), good()
    mask = torch.tensor([True, False, True, True])
    torch.testing.assert_close(
        module(x, y, mask=mask),
        lsk.logitstd_kd_loss(x, y, temperature=3.0, teacher_temperature=2.0, correction=0, reduction="sum", mask=mask),
    )
    assert "temperature=3.0" in repr(module)
    with pytest.raises(ValueError, match="reduction must be one of"):
        lsk.LogitStdKDLoss(reduction="avg")


def test_gradients_have_input_dtype_and_shape():
    x = good((2, 3, 8)).to(torch.float16).requires_grad_(True)
    y = good((2, 3, 8), dtype=torch.float64).requires_grad_(True)
    loss = lsk.logitstd_kd_loss(x, y, backend="torch")
    assert loss.dtype == torch.float64
    loss.backward()
    assert x.grad.dtype == torch.float16 and y.grad.dtype == torch.float64 and x.grad.shape == (2, 3, 8)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_torch_compile_fullgraph(case):
    """No graph breaks: the loss is one opaque op to dynamo, with a fake kernel and an autograd formula."""
    backend, device = case
    x = torch.randn(6, 50, device=device, requires_grad=True)
    y = torch.randn(6, 50, device=device, requires_grad=True)
    mask = torch.tensor([True, True, False, True, True, True], device=device)

    def step(a, b, m):
        return lsk.logitstd_kd_loss(a, b, temperature=2.0, mask=m, backend=backend) * 3.0

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(x, y, mask)
    gx, gy = torch.autograd.grad(loss, (x, y))
    eager_loss = step(x, y, mask)
    ex, ey = torch.autograd.grad(eager_loss, (x, y))
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gy, ey)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize(
    "args,error,match",
    [
        ((good((4, 10)), good((4, 5))), ValueError, "teacher_logits has shape"),
        ((good((4, 10)), good((4, 10)), torch.ones(2, dtype=torch.bool)), ValueError, "mask has shape"),
        ((good((4, 10)), good((4, 10)), None, -2.0), ValueError, "temperature must be finite and > 0"),
        ((good((2, 4, 10)), good((2, 4, 10))), ValueError, "student must be a 2-d"),
    ],
)
def test_the_op_checks_its_own_arguments(case, args, error, match):
    """Called directly, the op refuses what would make a kernel read out of bounds."""
    backend, device = case
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    full = args + (None, 2.0, 2.0, True, 1, 1e-7, "none", False, False, backend)[len(args) - 2:]
    with pytest.raises(error, match=match):
        torch.ops.logitstd.kd_loss(*full)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_backward_allocates_no_zeros_for_the_saved_outputs(case):
    """Autograd must not materialize N x V zero gradients for the op's non-differentiable outputs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    backend, device = case
    x = torch.randn(8, 300, device=device, requires_grad=True)
    loss = lsk.logitstd_kd_loss(x, torch.randn(8, 300, device=device), backend=backend)

    class Allocations(TorchDispatchMode):
        big: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.numel() >= x.numel() and func._schema.name != "logitstd::kd_loss":
                self.big.append(str(func))
            return out

    with Allocations() as spy:
        loss.backward()
    assert not [f for f in spy.big if "zeros" in f or "empty" in f or "full" in f], spy.big


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_double_backward_raises(case):
    backend, device = case
    x = torch.randn(3, 20, device=device, requires_grad=True)
    loss = lsk.logitstd_kd_loss(x, torch.randn(3, 20, device=device), backend=backend)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_torch_compile_with_a_changing_temperature(case):
    """A temperature schedule must not break fullgraph compilation (floats may become symbolic)."""
    backend, device = case
    x = torch.randn(4, 30, device=device, requires_grad=True)
    y = torch.randn(4, 30, device=device)
    compiled = torch.compile(lambda a, b, t: lsk.logitstd_kd_loss(a, b, temperature=t, backend=backend),
                             fullgraph=True)
    for temperature in (2.0, 3.0, 4.5):
        torch.testing.assert_close(compiled(x, y, temperature),
                                   lsk.reference.logitstd_kd_loss(x, y, temperature=temperature))
