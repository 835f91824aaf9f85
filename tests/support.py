"""Shared test helpers: which fused backends run here, loss/gradient comparison against the reference,
and requirements that skip by default but fail under ``LOGITSTD_REQUIRE_ALL=1`` (CI)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional, Sequence

import numpy as np
import pytest
import torch

import formula

from logitstd_kernels import reference
from logitstd_kernels._backends import unavailable_reason
from logitstd_kernels.testing import assert_within_eager_error


REQUIRE_ALL_ENV = "LOGITSTD_REQUIRE_ALL"
NEEDS_MARK = "logitstd_needs"


def require_all() -> bool:
    """True under ``LOGITSTD_REQUIRE_ALL=1`` (CI): optional pieces must be there, not skipped."""
    return os.environ.get(REQUIRE_ALL_ENV, "").strip() not in ("", "0")


def require_or_skip(available: bool, reason: str, required: bool = True) -> None:
    """The one place where tests skip for something missing in the environment.

    Does nothing when ``available``; otherwise skips the test with ``reason``, or, when ``required``
    and ``LOGITSTD_REQUIRE_ALL=1``, fails it. ``required=False`` is for what no environment
    setting can provide (a CPU instruction set, a CUDA device): those always skip.
    """
    if available:
        return
    if required and require_all():
        pytest.fail(f"{reason} ({REQUIRE_ALL_ENV}=1 makes this a failure instead of a skip)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def needs(available: bool, reason: str, required: bool = True) -> pytest.MarkDecorator:
    """Decorator form of :func:`require_or_skip`, applied when the test is set up (tests/conftest.py)."""
    return getattr(pytest.mark, NEEDS_MARK)(available, reason, required=required)


def require_module(name: str, extra: str = "examples") -> ModuleType:
    """Import ``name`` (an optional dependency of the ``extra``) or skip / fail via :func:`require_or_skip`."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        require_or_skip(False, f"needs the Python package {name!r} of the {extra!r} extra ({exc})")
        raise  # not reached


def require_modules(*names: str, extra: str = "examples") -> None:
    """:func:`require_module` for each of ``names``."""
    for name in names:
        require_module(name, extra)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str) -> ModuleType:
    """The script ``examples/<name>.py`` as a module, registered in ``sys.modules`` (so that its
    dataclasses resolve their module, and a second call returns the same module)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def spawn_ranks(target: Callable[..., None], world: int, folder: Path, *args: object, timeout_s: float) -> list[int]:
    """Run ``target(rank, world, str(folder), *args)`` in ``world`` spawned processes and wait for them;
    fails the test when one still runs after ``timeout_s`` (a hang; every process is killed then).
    Returns their exit codes. The processes report through files they write into ``folder``."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    procs = [context.Process(target=target, args=(rank, world, str(folder), *args)) for rank in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout_s)
    alive = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    assert not alive, f"ranks {alive} still running after {timeout_s} s (a hang)"
    return [proc.exitcode for proc in procs]


def fused_cases() -> list[tuple[str, str]]:
    """(backend, device) pairs for every fused backend that can run here.

    Under ``LOGITSTD_REQUIRE_ALL=1`` the C++ CPU kernel (and the CUDA kernel on a CUDA machine) is
    listed even when it is missing, so that every test of the matrix fails with the reason the
    forced backend gives, instead of the case silently disappearing.
    """
    required = {("cpu", "cpu")} | ({("cuda", "cuda")} if torch.cuda.is_available() else set())
    wanted = ([(b, "cuda") for b in ("triton", "cuda")] if torch.cuda.is_available() else []) + \
        [(b, "cpu") for b in ("triton", "cpu")]
    return [c for c in wanted if unavailable_reason(*c) is None or (require_all() and c in required)]


def case_id(case: tuple[str, str]) -> str:
    return f"{case[0]}-{case[1]}"


def interpreted(backend: str, device: str) -> bool:
    """The Triton kernels run by the interpreter on the CPU: one program at a time (slow, so the
    largest shapes are left to GPUs). Its float32 -> bfloat16 stores truncate (a Triton bug); the
    kernels round on the bits there (kd_kernels._round_bf16), so bf16 is tested under it too."""
    return backend == "triton" and device == "cpu"


def loss_and_grads(fn: Callable[..., torch.Tensor], student: torch.Tensor, teacher: torch.Tensor,
                   upstream: torch.Tensor, grad_teacher: bool = True,
                   **kwargs) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Run ``fn`` on leaf copies and return (loss, d/d student, d/d teacher) for an upstream gradient."""
    x = student.detach().clone().requires_grad_(True)
    y = teacher.detach().clone().requires_grad_(grad_teacher)
    loss = fn(x, y, **kwargs)
    inputs: Sequence[torch.Tensor] = (x, y) if grad_teacher else (x,)
    grads = torch.autograd.grad(loss, inputs, grad_outputs=upstream.to(loss.dtype))
    return loss.detach(), grads[0], (grads[1] if grad_teacher else None)


EXTENDED = np.longdouble if np.finfo(np.longdouble).eps < 2.0**-60 else None  # 80-bit x86 / quad aarch64


def exact_loss_and_grads(student: torch.Tensor, teacher: torch.Tensor, upstream: torch.Tensor,
                         grad_teacher: bool = True,
                         **kwargs) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The truth the fast and eager results are measured against, as float64 tensors.

    float32 math (any input that is not float64): the reference run in float64, 2^29 times more
    precise. float64 math: the eager reference in float64 *is* the reference run in float64, so its
    error would be measured as 0; the truth then comes from the independent NumPy transcription
    (formula.py) in extended precision (``np.longdouble``, >= 64-bit mantissa), so that the eager
    float64 error is real and the criterion's "2 x eager error" means the same as for float32.
    """
    if reference.accumulation_dtype(student, teacher) != torch.float64 or EXTENDED is None:
        return loss_and_grads(reference.logitstd_kd_loss, student.double(), teacher.double(), upstream,
                              grad_teacher, **kwargs)
    mask = kwargs.pop("mask", None)
    loss, gx, gy = formula.loss_and_grads(
        student.detach().double().cpu().numpy(), teacher.detach().double().cpu().numpy(),
        mask=None if mask is None else mask.cpu().numpy(), upstream=upstream.double().cpu().numpy(),
        dtype=EXTENDED, **kwargs)
    as_tensor = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64)).to(student.device)  # noqa: E731
    return as_tensor(loss), as_tensor(gx), (as_tensor(gy) if grad_teacher else None)


def _numpy(t):
    return None if t is None else (t.detach().double().cpu().numpy() if isinstance(t, torch.Tensor)
                                   else np.asarray(t, dtype=np.float64))


def term_magnitudes(student: torch.Tensor, teacher: torch.Tensor, upstream, grad_teacher: bool = True,
                    **kwargs) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The magnitudes of the terms the loss and each gradient element are sums / differences of
    (tests/formula.py, ``magnitudes=True``), for the same inputs, options, reduction, mask and
    ``upstream`` as :func:`exact_loss_and_grads`; float64 tensors of the results' shapes.

    The criterion's allowance is ``ULPS x u x`` these (logitstd_kernels/testing.py): the error a
    float32 (float64) evaluation of the formula's own terms makes by rounding them, which is what
    no such evaluation can resolve a result that cancels far below its terms to better than.
    """
    mask = kwargs.pop("mask", None)
    with np.errstate(all="ignore"):  # rows with NaN / Inf logits: their magnitudes are not used
        _, mags = formula.loss_and_grads(_numpy(student), _numpy(teacher), mask=None if mask is None else
                                         mask.cpu().numpy(), upstream=_numpy(upstream), magnitudes=True, **kwargs)
    as_tensor = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64)).to(student.device)  # noqa: E731
    return as_tensor(mags[0]), as_tensor(mags[1]), (as_tensor(mags[2]) if grad_teacher else None)


def objective_term_magnitudes(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                              upstream, *, ce_weight: float = 0.1, kd_weight: float = 9.0,
                              label_smoothing: float = 0.0, ignore_index: int = -100,
                              mask: Optional[torch.Tensor] = None, reduction: str = "mean",
                              **kd_options) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`term_magnitudes` of the distillation objective ``ce_weight * CE + kd_weight * KD``
    (reference.distillation_loss: rows with a False mask or an ignored label are left out, "mean"
    divides by the included rows): the KD terms from tests/formula.py, the cross entropy's written
    out (its loss ``-sum t log softmax(x)``, terms ``t |log softmax(x)|``; its gradient
    ``softmax(x) - t``, terms ``softmax(x) + t``, with ``t`` the smoothed one-hot target)."""
    x, y = _numpy(student), _numpy(teacher)
    num_classes = x.shape[-1]
    xs = x.reshape(-1, num_classes)
    keep = np.ones(xs.shape[0], bool) if mask is None else mask.cpu().numpy().reshape(-1).copy()
    lab = None if labels is None else labels.cpu().numpy().reshape(-1)
    if lab is not None:
        keep &= lab != ignore_index
    if kd_options.get("divergence") == "dkd":  # (decoupled KD reads the labels)
        kd_options = dict(kd_options, labels=lab)
    with np.errstate(all="ignore"):
        _, (kd_rows, kd_gx, kd_gy) = formula.loss_and_grads(x, y, mask=keep.reshape(x.shape[:-1]), reduction="none",
                                                            magnitudes=True, **kd_options)
    rows = abs(kd_weight) * kd_rows.reshape(-1)
    gx = abs(kd_weight) * kd_gx.reshape(xs.shape)
    gy = abs(kd_weight) * kd_gy.reshape(xs.shape)
    if lab is not None and keep.any():
        z = xs[keep] - xs[keep].max(axis=-1, keepdims=True)
        log_softmax = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        target = np.full(log_softmax.shape, label_smoothing / num_classes)
        target[np.arange(target.shape[0]), lab[keep]] += 1.0 - label_smoothing
        rows[keep] += abs(ce_weight) * (target * np.abs(log_softmax)).sum(axis=-1)
        gx[keep] += abs(ce_weight) * (np.exp(log_softmax) + target)
    weight = np.abs(_numpy(upstream))
    if reduction == "none":
        loss, weight = rows.reshape(x.shape[:-1]), weight.reshape(-1, 1) * np.ones((xs.shape[0], 1))
    else:
        divisor = 1.0 if reduction == "sum" else float(max(int(keep.sum()), 1))
        loss, weight = np.asarray(rows.sum() / divisor), weight / divisor
    as_tensor = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64)).to(student.device)  # noqa: E731
    return as_tensor(loss), as_tensor((gx * weight).reshape(x.shape)), as_tensor((gy * weight).reshape(y.shape))


def eager_loss_and_grads(student: torch.Tensor, teacher: torch.Tensor, upstream: torch.Tensor,
                         grad_teacher: bool = True,
                         **kwargs) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The eager reference's loss and gradients, the gradients *before* their final rounding to a
    bfloat16/float16 input's dtype (the reference converts its inputs to the accumulation dtype first,
    so running it on converted inputs is the same math): the criterion then allows each element
    exactly one rounding to the output dtype (logitstd_kernels/testing.py)."""
    acc = reference.accumulation_dtype(student, teacher)
    return loss_and_grads(reference.logitstd_kd_loss, student.to(acc), teacher.to(acc), upstream, grad_teacher,
                          **kwargs)


def check_against_reference(student: torch.Tensor, teacher: torch.Tensor, backend: str,
                            grad_teacher: bool = True, **kwargs) -> None:
    """Loss and gradients of ``backend`` vs the exact values, within 2x the eager reference's error
    plus ULPS x u x the terms' magnitude (logitstd_kernels/testing.py); the exact values:
    :func:`exact_loss_and_grads`, the eager ones: :func:`eager_loss_and_grads`, the magnitudes:
    :func:`term_magnitudes`."""
    import logitstd_kernels as lsk

    lead = student.shape[:-1] if kwargs.get("reduction", "batchmean") == "none" else ()
    upstream = torch.rand(lead, dtype=torch.float64, device=student.device) + 0.25  # not 1
    loss, gx, gy = loss_and_grads(lsk.logitstd_kd_loss, student, teacher, upstream, grad_teacher,
                                  backend=backend, **kwargs)
    eager = eager_loss_and_grads(student, teacher, upstream, grad_teacher, **kwargs)
    exact = exact_loss_and_grads(student, teacher, upstream, grad_teacher, **kwargs)
    mags = term_magnitudes(student, teacher, upstream, grad_teacher, **kwargs)
    assert loss.dtype == reference.accumulation_dtype(student, teacher), f"loss dtype {loss.dtype}"
    assert gx.dtype == student.dtype, f"student grad dtype {gx.dtype} != {student.dtype}"
    assert_within_eager_error("loss", loss, eager[0], exact[0], magnitude=mags[0])
    assert_within_eager_error("grad_student", gx, eager[1], exact[1], magnitude=mags[1])
    if grad_teacher:
        assert gy.dtype == teacher.dtype, f"teacher grad dtype {gy.dtype} != {teacher.dtype}"
        assert_within_eager_error("grad_teacher", gy, eager[2], exact[2], magnitude=mags[2])


def capture_cuda_graph(x: torch.Tensor,
                       loss_fn: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Warm ``loss_fn().sum().backward()`` up on a side stream (3 steps), then capture one step in a
    CUDA graph; returns the graph and the captured loss (``x.grad`` is the captured gradient)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            x.grad = None
            loss_fn().sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        static = loss_fn()
        static.sum().backward()
    return graph, static


# The fused lm_head: random problems, their float64 truth from the full logits, and comparisons.

def make_problem(rows, hidden, teacher_hidden, classes, device, dtype=torch.float64, biases=True, lead=None):
    """Student (h, W, b) and teacher (ht, Wt, bt) of a random lm_head problem."""
    shape = (rows,) if lead is None else lead
    h = torch.randn(*shape, hidden, dtype=dtype, device=device)
    w = torch.randn(classes, hidden, dtype=dtype, device=device) / hidden**0.5
    b = torch.randn(classes, dtype=dtype, device=device) if biases else None
    ht = torch.randn(*shape, teacher_hidden, dtype=dtype, device=device)
    wt = 2 * torch.randn(classes, teacher_hidden, dtype=dtype, device=device) / teacher_hidden**0.5
    bt = torch.randn(classes, dtype=dtype, device=device) if biases else None
    return h, w, b, ht, wt, bt


def labels_for(shape, classes, pattern, device):
    if pattern == "no-labels":
        return None
    labels = torch.randint(0, classes, shape, device=device)
    if pattern == "some-ignored":
        labels.view(-1)[::3] = -100
    elif pattern == "all-ignored":
        labels.fill_(-100)
    return labels


def _logits_gradient(z, zt, labels, mask, reduction, upstream, divergence, beta, **options):
    """(loss, d/dz) of the objective of (transformed) logits: tests/formula.py's for forward KL; for
    another divergence the eager reference's autograd in float64 (formula.py has no divergences)."""
    if divergence == "forward_kl":
        loss, gz, _, _, _ = formula.objective_numpy(z, zt, labels, mask=mask, reduction=reduction, upstream=upstream,
                                                    **options)
        return loss, gz
    zs = torch.from_numpy(z).requires_grad_(True)
    loss = reference.distillation_loss(zs, torch.from_numpy(zt), None if labels is None else torch.from_numpy(labels),
                                       mask=None if mask is None else torch.from_numpy(mask), reduction=reduction,
                                       divergence=divergence, beta=beta, **options)
    loss.backward(torch.as_tensor(upstream, dtype=torch.float64))
    return loss.item(), zs.grad.numpy()


def numpy_truth(h, w, b, teacher_logits, labels, mask=None, reduction="mean", upstream=1.0, transforms=None,
                divergence="forward_kl", beta=0.5, **options):
    """(loss, d/dh, d/dW, d/db) in float64 from the full logits x = h W^T + b, in NumPy but for the
    divergence of :func:`_logits_gradient`. ``transforms``: the logit transforms' keywords (tests/formula.py's
    ``logit_transform`` and its derivative, the chain rule in NumPy)."""
    t = dict(transforms or {})
    hn = h.detach().double().cpu().numpy().reshape(-1, h.shape[-1])
    wn = w.detach().double().cpu().numpy()
    x = hn @ wn.T + (0 if b is None else b.detach().double().cpu().numpy())
    z, dz = formula.logit_transform(x, t.get("student_logit_scale", 1.0), t.get("student_final_logit_softcapping"))
    zt, _ = formula.logit_transform(teacher_logits.detach().double().cpu().numpy().reshape(x.shape),
                                    t.get("teacher_logit_scale", 1.0), t.get("teacher_final_logit_softcapping"))
    loss, gz = _logits_gradient(z, zt, None if labels is None else labels.cpu().numpy().reshape(-1),
                                None if mask is None else mask.cpu().numpy().reshape(-1), reduction, upstream,
                                divergence, beta, **options)
    gx = gz.reshape(x.shape) * dz
    return loss, (gx @ wn).reshape(h.shape), gx.T @ hn, gx.sum(0)


def run(h, w, b, upstream=1.0, **kwargs):
    """(loss, d/dh, d/dW, d/db) of the fused linear loss on leaf copies."""
    import logitstd_kernels as lsk

    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (h, w, b)]
    loss = lsk.fused_linear_distillation_loss(leaves[0], leaves[1], student_bias=leaves[2], **kwargs)
    loss.backward(torch.as_tensor(upstream, dtype=loss.dtype, device=loss.device))
    return (loss.detach(),) + tuple(None if t is None else t.grad for t in leaves)


def assert_close(name, got, want, rtol):
    want = torch.as_tensor(np.asarray(want), dtype=torch.float64)
    got = got.detach().double().cpu().reshape(want.shape)
    scale = want.abs().max().clamp_min(1e-300) if want.numel() else 1.0
    err = float((got - want).abs().max() / scale) if want.numel() else 0.0
    assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:.0e}"


def assert_matches(got, want, rtol):
    for name, g, t in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, want):
        if g is not None:
            assert_close(name, g, t, rtol)
