"""The CUDA kernel's math on the host (CI has no GPU): tests/kernels/cuda_emulation.cpp runs the
kernel's per-pack bodies and per-row decisions (csrc/include/logitstd/phase_math.h, phase_grads.h,
phase_row.h: the same code the device compiles) in the kernel's order (packs, threads, warp
shuffle trees, CTAs of a cluster, streamed windows), with exp2 in place of ex2.approx. Checked
against the float64 reference with the accuracy criterion (logitstd_kernels/testing.py): every
divergence, standardized and plain, the objective with labels, the rows of extreme magnitude and
the short rows' terms form. What only a GPU can check (the loads, stores, shared memory, cluster
barriers, the launch plan) is in tests/kernels/test_cpp_kernel.py, marked ``gpu``.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from typing import Optional

import pytest
import torch

from logitstd_kernels import reference
from logitstd_kernels.config import DIVERGENCE_CODES
from logitstd_kernels.testing import assert_within_eager_error
from support import objective_term_magnitudes, require_or_skip, term_magnitudes

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    require_or_skip(compiler is not None, "no C++ compiler (for the host emulation of the CUDA kernel)")
    library = tmp_path_factory.mktemp("cuda_emulation") / "emulation.so"
    subprocess.run([compiler, "-O2", "-std=c++17", "-shared", "-fPIC", f"-I{os.path.join(ROOT, 'csrc', 'include')}",
                    os.path.join(HERE, "cuda_emulation.cpp"), "-o", str(library)], check=True, capture_output=True)
    return ctypes.CDLL(str(library))


def emulate(lib, x: torch.Tensor, y: torch.Tensor, options: dict, *, divergence: str = "forward_kl", beta: float = 0.5,
            pack: int = 1, cluster: int = 1, window_packs: int = 0, grad_scale: float = 0.37,
            labels: Optional[torch.Tensor] = None, objective: Optional[dict] = None):
    """(loss, grad_x, grad_y) per row of the emulated kernel for (rows, V) float32 / float64 inputs."""
    x, y = x.contiguous(), y.contiguous()
    rows, cols = x.shape
    loss, gx, gy = torch.empty(rows, dtype=x.dtype), torch.empty_like(x), torch.empty_like(y)
    scalar = ctypes.c_float if x.dtype == torch.float32 else ctypes.c_double
    ptr = lambda t: ctypes.cast(t.data_ptr(), ctypes.POINTER(scalar))  # noqa: E731
    weights = objective or dict(ce_weight=0.0, kd_weight=1.0, label_smoothing=0.0)
    fn = lib.emulate_f32 if x.dtype == torch.float32 else lib.emulate_f64
    code = DIVERGENCE_CODES[divergence] if not (divergence == "jsd" and beta in (0.0, 1.0)) else int(beta)
    fn(ctypes.c_int(code), ctypes.c_int(pack), ptr(x), ptr(y), ctypes.c_int64(rows), ctypes.c_int64(cols),
       ctypes.c_int(cluster), ctypes.c_int64(window_packs), ctypes.c_int(int(options["standardize"])),
       ctypes.c_int64(options["correction"]), ctypes.c_double(options["eps"]), ctypes.c_double(options["tau_s"]),
       ctypes.c_double(options["tau_t"]), ctypes.c_double(grad_scale), ctypes.c_int(1), ctypes.c_int(1),
       None if labels is None else ctypes.cast(labels.data_ptr(), ctypes.POINTER(ctypes.c_int64)),
       *(ctypes.c_double(weights[k]) for k in ("ce_weight", "kd_weight", "label_smoothing")), ctypes.c_double(beta),
       ptr(loss), ptr(gx), ptr(gy))
    return loss, gx, gy


def reference_rows(a, b, options, grad_scale, *, divergence="forward_kl", beta=0.5, labels=None, objective=None):
    """The reference's per-row loss and gradients (times grad_scale) of a and b."""
    a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    common = dict(temperature=options["tau_s"], teacher_temperature=options["tau_t"],
                  standardize=options["standardize"], correction=options["correction"], eps=options["eps"],
                  divergence=divergence, beta=beta)
    if labels is None:
        rows = reference.logitstd_kd_loss(a, b, reduction="none", **common)
    else:
        rows = reference.distillation_loss(a, b, labels, reduction="none", **objective, **common)
    ga, gb = torch.autograd.grad(rows.sum(), (a, b))
    return rows.detach(), ga * grad_scale, gb * grad_scale


def check(got, x, y, options, *, magnitudes=None, **kwargs):
    """got within the criterion of the truth of x, y (the kernel's inputs), eager in their dtype."""
    grad_scale = kwargs.pop("grad_scale", 0.37)
    exact = reference_rows(x.double(), y.double(), options, grad_scale, **kwargs)
    eager = reference_rows(x, y, options, grad_scale, **kwargs)
    mags = magnitudes or (None, None, None)
    for name, g, e, w, m in zip(("loss", "grad_student", "grad_teacher"), got, eager, exact, mags):
        assert_within_eager_error(name, g, e, w, magnitude=m)


DEFAULT = dict(standardize=True, correction=1, eps=1e-7, tau_s=2.0, tau_t=1.5)
PLAIN = dict(standardize=False, correction=1, eps=1e-7, tau_s=1.0, tau_t=1.0)
ALGORITHM_1 = dict(standardize=True, correction=0, eps=0.0, tau_s=3.0, tau_t=3.0)
# (V, CTAs per row, pack): one CTA with the terms form, a chunked row, clusters of 2..16 CTAs.
SHAPES = [(2, 1, 1), (1271, 1, 1), (4099, 4, 1), (32768, 2, 8), (65536, 16, 8)]
KD_CASES = [pytest.param(v, c, p, o, id=f"{v}-{c}-{p}-{n}") for v, c, p in SHAPES
            for n, o in (("default", DEFAULT), ("plain-kd", PLAIN), ("algorithm-1", ALGORITHM_1))
            if not (v == 2 and o["eps"] == 0.0)]  # V = 2, eps = 0: u = +-1 whatever x, only rounding noise


def draw(rows: int, num_classes: int, dtype: torch.dtype, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = 3 * torch.randn(rows, num_classes, dtype=torch.float64)
    y = 5 * torch.randn(rows, num_classes, dtype=torch.float64)
    if num_classes > 2 and dtype == torch.float32:
        x[0] = 1000.0 + 0.01 * torch.randn(num_classes)  # a large offset: the statistics must be stable
        if eps > 0:
            y[1] = 4.0  # a constant row
    return x.to(dtype), y.to(dtype)


@pytest.mark.parametrize("objective", [False, True], ids=["kd", "objective"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_classes,cluster,pack,options", KD_CASES)
def test_forward_kl_emulated(emulation, dtype, num_classes, cluster, pack, options, objective):
    """Forward KL and the objective against the float64 reference: both forms of the chain rule, the
    packs, the clusters, the reduction order."""
    x, y = draw(3, num_classes, dtype, options["eps"])
    labels = torch.randint(0, num_classes, (3,)) if objective else None
    weights = dict(ce_weight=0.3, kd_weight=2.0, label_smoothing=0.1) if objective else None
    got = emulate(emulation, x, y, options, pack=pack, cluster=cluster, labels=labels, objective=weights)
    kd = dict(temperature=options["tau_s"], teacher_temperature=options["tau_t"], standardize=options["standardize"],
              correction=options["correction"], eps=options["eps"], reduction="none")
    upstream = torch.full((3,), 0.37, dtype=torch.float64)
    mags = (term_magnitudes(x, y, upstream, **kd) if labels is None
            else objective_term_magnitudes(x, y, labels, upstream, **weights, **kd))
    check(got, x, y, options, magnitudes=mags, labels=labels, objective=weights)


DIVERGENCES = [("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 1.0), ("jeffreys", 0.5), ("tvd", 0.5)]


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=lambda v: str(v))
@pytest.mark.parametrize("options", [DEFAULT, PLAIN], ids=["default", "plain-kd"])
@pytest.mark.parametrize("num_classes,cluster,pack", [(17, 1, 1), (1271, 1, 1), (8192, 2, 8)])
def test_divergences_emulated(emulation, divergence, beta, options, num_classes, cluster, pack):
    """Every divergence with the CPU kernel's semantics (divergence.h), short rows (terms form) and
    long ones (sums form), float32."""
    x, y = draw(3, num_classes, torch.float32, options["eps"])
    got = emulate(emulation, x, y, options, divergence=divergence, beta=beta, pack=pack, cluster=cluster)
    check(got, x, y, options, divergence=divergence, beta=beta)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jeffreys"])
def test_refinement_at_high_temperature_emulated(emulation, divergence):
    """At T = 100 the KLs from the sums cancel: the rows take the Bregman pass, and the loss keeps
    its digits (the reference's float32 loss keeps ~1e-3 of them)."""
    options = dict(DEFAULT, tau_s=100.0, tau_t=100.0)
    x, y = (s * torch.randn(3, 5000, dtype=torch.float64) for s in (3.0, 5.0))
    x, y = x.float(), y.float()
    loss = emulate(emulation, x, y, options, divergence=divergence, pack=8, cluster=2)[0]
    exact = reference_rows(x.double(), y.double(), options, 1.0, divergence=divergence)[0]
    torch.testing.assert_close(loss.double(), exact, rtol=2e-6, atol=0)


def test_streamed_windows_emulated(emulation):
    """A streamed row (windows restaged in every pass; packs assigned to threads per window)."""
    x, y = draw(2, 4000, torch.float32, 1e-7)
    resident = emulate(emulation, x, y, DEFAULT, pack=8, cluster=2)
    streamed = emulate(emulation, x, y, DEFAULT, pack=8, cluster=2, window_packs=40)
    check(streamed, x, y, DEFAULT)
    torch.testing.assert_close(streamed[0], resident[0], rtol=1e-5, atol=0)


@pytest.mark.parametrize("standardize", [True, False], ids=["standardized", "plain"])
def test_extreme_magnitudes_emulated(emulation, standardize):
    """Rows of 1e30 and up to 3e38 (magnitude scaling), a row of 1e-30, and -inf teacher logits
    without standardization, including a class -inf in both rows (which contributes 0)."""
    options = DEFAULT if standardize else PLAIN
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 300, generator=gen, dtype=torch.float64)
    y = torch.randn(4, 300, generator=gen, dtype=torch.float64)
    x[0], y[0] = 1e30 * x[0], 3e38 * y[0].clamp(-1, 1)
    x[1], y[1] = 1e-30 * x[1], 1e-30 * y[1]
    x[2] = 2e38 + 1e37 * x[2].clamp(-1, 1)
    if not standardize:  # classes 0..19 -inf in both rows, 20..39 in the teacher's only
        y[3, :40] = float("-inf")
        x[3, :20] = float("-inf")
    x, y = x.float(), y.float()
    for divergence in ("forward_kl", "reverse_kl", "jsd", "tvd"):
        loss, gx, gy = emulate(emulation, x, y, options, divergence=divergence, pack=4)
        # rows 0 and 2 (row 1 standardized with eps = 1e-7 is uniform up to 1e-23, below the float64
        # truth's resolution of 1 + 1e-23)
        big = torch.tensor([0, 2])
        exact = reference_rows(x[big].double(), y[big].double(), options, 0.37, divergence=divergence)[0]
        eager = reference_rows(x[big], y[big], options, 0.37, divergence=divergence)[0]
        assert_within_eager_error("loss", loss[big], eager, exact)  # (non-finite only where eager is)
        if divergence != "forward_kl":
            continue
        # The reference's autograd gives NaN teacher gradients where p underflows to 0 (0 * log 0),
        # and a NaN loss where a class is -inf in both rows; such a class contributes 0: the row
        # without it is the truth.
        keep = [slice(None)] * 3 + [slice(20, None) if not standardize else slice(None)]
        for r in range(4):
            k = keep[r]
            exact = reference_rows(x[r:r + 1, k].double(), y[r:r + 1, k].double(), options, 0.37)
            eager = reference_rows(x[r:r + 1, k], y[r:r + 1, k], options, 0.37)
            assert_within_eager_error("loss", loss[r:r + 1], eager[0], exact[0])
            assert_within_eager_error("grad_student", gx[r:r + 1, k], eager[1], exact[1])
        assert torch.isfinite(gy).all()
        if not standardize:
            assert (gx[3, :20] == 0).all() and (gy[3, :40] == 0).all()
