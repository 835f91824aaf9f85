"""Sparse teachers (``SparseTeacher``: a teacher's stored top-k with its rows' statistics) on every
backend that has the sparse kernel, in float64:

- with k = V and the exact statistics the loss and the student gradient equal the dense objective's
  (1e-10), for both kinds of values, every support and standardization on and off;
- every support against the independent NumPy formula (tests/formula.py, ``sparse_objective``), with
  padding entries, masked rows, ignored labels, the CE term and every reduction;
- axolotl's top-k forward KL (its loss restated here from its source, ``topk_logprob/forward_kl.py``
  and the Liger path's ``normalize_topk``) to 1e-6;
- edge cases and bad input (errors name the argument).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import formula
import logitstd_kernels as lsk
from logitstd_kernels.config import DistillConfig
from logitstd_kernels._backends import unavailable_reason
from support import needs, require_all

F64 = torch.float64
SUPPORTS = ("renormalize", "renormalize_teacher", "tail")


def sparse_backends() -> list[str]:
    """The eager reference and every sparse kernel that runs on the CPU here (the C++ kernel listed
    under ``LOGITSTD_REQUIRE_ALL=1`` even when missing, so that its cases fail instead of vanishing)."""
    found = [b for b in ("cpu", "triton") if unavailable_reason(b, "cpu") is None and _has_sparse(b)]
    return ["torch"] + (found if "cpu" in found or not require_all() else ["cpu"] + found)


def _has_sparse(backend: str) -> bool:
    try:
        from logitstd_kernels._backends import sparse_backend_module
        sparse_backend_module(backend)
    except (ImportError, ValueError, RuntimeError):
        return False
    return True


BACKENDS = sparse_backends()


def matrix(names: str, values: list, triton=lambda *v: True) -> pytest.MarkDecorator:
    """``parametrize("backend," + names)`` over every backend and ``values`` (tuples); Triton (in the
    interpreter: ~1 s a case) runs the cases where ``triton(*value)`` holds, enough to cover each path."""
    params = [(b, *v) for b in BACKENDS for v in values if b != "triton" or triton(*v)]
    return pytest.mark.parametrize("backend," + names, params)


def _loss_grad(x: torch.Tensor, teacher, labels=None, upstream=None, **options):
    """(loss, d loss / d x) of distillation_loss, with ``upstream`` the incoming gradient."""
    leaf = x.detach().clone().requires_grad_(True)
    loss = lsk.distillation_loss(leaf, teacher, labels, **options)
    (grad,) = torch.autograd.grad(loss, leaf, torch.ones_like(loss) if upstream is None else upstream)
    return loss.detach(), grad


def _numpy(t):
    return None if t is None else t.detach().double().cpu().numpy()


def _formula(x, teacher: lsk.SparseTeacher, labels=None, mask=None, *, options: dict):
    """``formula.sparse_objective`` of the public keywords ``options`` (the API's defaults: DistillConfig's)."""
    c = DistillConfig(**options)
    rows = teacher.rows()
    valid = _numpy(rows.valid()).astype(bool)
    stats = None if rows.row_std is None else (_numpy(rows.row_mean), _numpy(rows.row_std))
    return formula.sparse_objective(
        _numpy(x).reshape(-1, x.shape[-1]), _numpy(rows.ids).astype(np.int64), np.nan_to_num(_numpy(rows.values)),
        valid, None if labels is None else _numpy(labels).astype(np.int64).reshape(-1),
        None if mask is None else _numpy(mask).astype(bool).reshape(-1), stats=stats,
        log_normalizer=_numpy(rows.log_normalizer), support=c.support,
        scale=c.generation_temperature if teacher.kind == "logprobs" else 1.0, tau_s=c.temperature,
        tau_t=c.teacher_temperature, standardize=c.standardize, correction=c.correction, eps=c.eps,
        ce_weight=c.ce_weight if labels is not None else 0.0, kd_weight=c.kd_weight, ignore_index=c.ignore_index,
        reduction="mean" if c.reduction == "batchmean" else c.reduction)


def _close(name, got, want, tol):
    want = torch.as_tensor(want, dtype=F64)
    torch.testing.assert_close(got.double().reshape(want.shape), want, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


@matrix("kind,standardize,support", [(kind, std, s) for kind in ("logits", "logprobs") for std in (True, False)
                                     for s in SUPPORTS], triton=lambda kind, std, s: std)
def test_full_support_equals_the_dense_loss(backend, kind, standardize, support):
    n, v = 5, 37
    x = torch.randn(n, v, dtype=F64) * 3
    y = torch.randn(n, v, dtype=F64) * 4 + 2
    labels = torch.randint(0, v, (n,))
    labels[1] = -100
    t_gen = 1.7 if kind == "logprobs" else 1.0
    options = dict(temperature=2.0, teacher_temperature=1.5, standardize=standardize, ce_weight=0.3, kd_weight=0.9)
    teacher = lsk.SparseTeacher.from_logits(y, v, kind=kind, generation_temperature=t_gen, temperature=1.5,
                                            standardize=standardize)
    perm = torch.stack([torch.randperm(v) for _ in range(n)])  # the support's order does not matter
    teacher = lsk.SparseTeacher(teacher.ids.gather(-1, perm), teacher.values.gather(-1, perm), kind,
                                teacher.row_mean, teacher.row_std, teacher.log_normalizer)
    upstream = torch.tensor(0.7, dtype=F64)
    dense = _loss_grad(x, y, labels, upstream, backend="torch", **options)
    sparse = _loss_grad(x, teacher, labels, upstream, backend=backend, support=support, generation_temperature=t_gen,
                        **options)
    _close("loss", sparse[0], dense[0], 1e-10)
    _close("grad_student", sparse[1], dense[1], 1e-10)


def padded_teacher(n: int, v: int, k: int, *, kind="logits", stats=True, normalizer=True, tau_t=1.5,
                    standardize=True, pad=True, t_gen=1.0) -> lsk.SparseTeacher:
    """A top-k teacher of random rows, with -inf padding and masked-out entries in some rows."""
    y = torch.randn(n, v, dtype=F64) * 3
    t = lsk.SparseTeacher.from_logits(y, k, kind=kind, generation_temperature=t_gen, stats=stats,
                                      temperature=tau_t if normalizer else None, standardize=standardize)
    values, mask = t.values.clone(), None
    if pad:
        values[0, k - 2:] = float("-inf")  # padding by value
        mask = torch.ones(n, k, dtype=torch.bool)
        mask[1, 1] = False                 # padding by mask
        mask[2, :] = False                 # a row without a valid entry
    return lsk.SparseTeacher(t.ids, values, kind, t.row_mean, t.row_std, t.log_normalizer, mask)


@matrix("support,standardize,stats,kind", [
    (s, std, stats, kind) for kind in ("logits", "logprobs")
    for s, std, stats in [(s, True, True) for s in SUPPORTS] + [(s, False, False) for s in SUPPORTS]
    + [(s, True, False) for s in SUPPORTS if s != "tail"]],  # tail + standardization needs the stats: test_bad_input
    triton=lambda s, std, stats, kind: kind == "logprobs")
def test_supports_match_the_formula(backend, support, standardize, stats, kind):
    n, v, k = 6, 29, 7
    t_gen = 1.3 if kind == "logprobs" else 1.0
    teacher = padded_teacher(n, v, k, kind=kind, stats=stats, standardize=standardize, t_gen=t_gen)
    x = torch.randn(n, v, dtype=F64) * 2
    labels = torch.randint(0, v, (n,))
    labels[3] = -100
    mask = torch.ones(n, dtype=torch.bool)
    mask[4] = False
    options = dict(temperature=2.0, teacher_temperature=1.5, standardize=standardize, ce_weight=0.4, kd_weight=0.8,
                   support=support, generation_temperature=t_gen)
    loss, grad = _loss_grad(x, teacher, labels, mask=mask, backend=backend, **options)
    want_loss, want_grad = _formula(x, teacher, labels, mask, options=options)
    _close("loss", loss, want_loss, 1e-10)
    _close("grad_student", grad, want_grad, 1e-10)
    assert grad[4].abs().max() == 0 and grad[3].abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_reductions_and_incoming_gradient(backend, reduction):
    n, v, k = 5, 19, 4
    teacher = padded_teacher(n, v, k, pad=False)
    x = torch.randn(v, 2 * n, dtype=F64).t()[::2]  # non-contiguous rows (strided along V)
    options = dict(temperature=1.5, support="tail", reduction=reduction)
    upstream = torch.rand(n, dtype=F64) + 0.5 if reduction == "none" else torch.tensor(1.9, dtype=F64)
    loss, grad = _loss_grad(x, teacher, upstream=upstream, backend=backend, **options)
    want_loss, want_grad = _formula(x, teacher, options=options)
    _close("loss", loss, want_loss, 1e-10)
    weight = upstream.numpy().reshape(-1, 1) if reduction == "none" else float(upstream)
    _close("grad_student", grad, want_grad * weight, 1e-10)


def axolotl_topk_forward_kl(z, ids, t, m, num_items=-1, kd_temperature=1.0):
    """axolotl's ``topk_logprob/forward_kl.py::loss`` restated: the student log-softmax over the full
    vocabulary at T, gathered at the teacher's ids; ``sum exp(t) (t - s)`` over the valid entries,
    divided by ``num_items`` or by the number of valid (position, entry) pairs; no T**2."""
    s = torch.log_softmax(z.double() / kd_temperature, -1).gather(-1, ids)
    m = m.bool()
    t = t.double()[m]
    e = t.exp() * (t - s[m])
    return e.sum() / (num_items if num_items > 0 else e.numel())


def axolotl_liger_topk_kd(z, ids, t, m, kd_temperature=1.0):
    """axolotl's Liger path (``kernels/liger.py``, ``normalize_topk=True``, beta 0) restated: the student
    log-softmax gathered and renormalized over the teacher's k ids; ``T**2 * sum exp(t) (t - s)``."""
    s = torch.log_softmax(z.double() / kd_temperature, -1).gather(-1, ids)
    s = s - torch.logsumexp(torch.where(m.bool(), s, float("-inf")), -1, keepdim=True)
    m = m.bool()
    t = t.double()[m]
    return kd_temperature**2 * (t.exp() * (t - s[m])).sum()


def _axolotl_data(n, v, k, t_gen, tau):
    """axolotl's dataset-time teacher: the stored top-k log-probabilities (at ``t_gen``) renormalized over k at
    the KD temperature, ``log_softmax_k(lp * t_gen / tau)``; ids and a mask with padded entries."""
    y = torch.randn(n, v, dtype=F64) * 3
    lp = torch.log_softmax(y / t_gen, -1)
    values, ids = lp.topk(k, -1)
    m = torch.ones(n, k, dtype=torch.bool)
    m[0, -2:] = False
    m[3, -1] = False
    target = torch.log_softmax(torch.where(m, values * t_gen / tau, float("-inf")), -1)
    return ids, values, m, torch.where(m, target, 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau,t_gen", [(1.0, 1.0), (2.0, 1.5)])
def test_axolotl_parity(backend, tau, t_gen):
    n, v, k = 6, 40, 5
    ids, values, m, target = _axolotl_data(n, v, k, t_gen, tau)
    z = torch.randn(n, v, dtype=F64) * 2
    teacher = lsk.SparseTeacher(ids, values, "logprobs", mask=m)
    common = dict(standardize=False, temperature=tau, generation_temperature=t_gen, reduction="sum", backend=backend)
    ours = lsk.distillation_loss(z, teacher, support="renormalize_teacher", kd_weight=1 / tau**2, **common)
    want = axolotl_topk_forward_kl(z[None], ids[None], target[None], m[None], kd_temperature=tau)
    _close("axolotl forward_kl.loss", ours / m.sum(), want, 1e-6)
    ours = lsk.distillation_loss(z, teacher, support="renormalize", kd_weight=1.0, **common)
    _close("axolotl Liger normalize_topk", ours, axolotl_liger_topk_kd(z, ids, target, m, tau), 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_rows(backend):
    """k = 1, huge values, a constant student row, a NaN teacher row: finite rows stay finite and exact."""
    n, v = 5, 16
    x = torch.randn(n, v, dtype=F64)
    x[2] = 3.0                                   # constant student row
    x[3] = x[3] * 1e150                          # huge student logits
    ids = torch.stack([torch.randperm(v)[:3] for _ in range(n)])
    values = torch.randn(n, 3, dtype=F64)
    values[1] = torch.tensor([1e300, -1e300, 0.0], dtype=F64)  # huge teacher values (standardized over k)
    values[4, 1] = float("nan")
    teacher = lsk.SparseTeacher(ids, values)
    options = dict(temperature=2.0, reduction="none", support="renormalize_teacher")
    loss, grad = _loss_grad(x, teacher, backend=backend, **options)
    assert torch.isnan(loss[4]) and torch.isfinite(loss[:4]).all() and torch.isfinite(grad[:4]).all()
    want_loss, want_grad = _formula(x[:4], lsk.SparseTeacher(ids[:4], values[:4]), options=options)
    _close("loss", loss[:4], want_loss, 1e-10)
    _close("grad_student", grad[:4], want_grad, 1e-10)
    one = lsk.SparseTeacher(ids[:2, :1], values[:2, :1])  # k = 1: renormalized, p = q = 1 on the support
    loss, grad = _loss_grad(x[:2], one, backend=backend, support="renormalize", reduction="none")
    assert torch.equal(loss, torch.zeros(2, dtype=F64)) and grad.abs().max() < 1e-12
    loss, grad = _loss_grad(x[:2], one, backend=backend, support="renormalize_teacher", reduction="none")
    want_loss, want_grad = _formula(x[:2], one, options=dict(support="renormalize_teacher", reduction="none"))
    _close("loss k=1", loss, want_loss, 1e-10)
    _close("grad_student k=1", grad, want_grad, 1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_teacher_and_leading_shape(backend):
    b, t, v, k = 2, 3, 21, 4
    x = torch.randn(b, t, v, dtype=F64)
    ids = torch.stack([torch.randperm(v)[:2 * k] for _ in range(b * t)]).reshape(b, t, 2 * k)[..., ::2]
    values = torch.randn(t, b, k, dtype=F64).transpose(0, 1)
    teacher = lsk.SparseTeacher(ids, values, row_mean=torch.zeros(b, t, dtype=F64),
                                row_std=torch.ones(t, b, dtype=F64).t())
    loss, grad = _loss_grad(x, teacher, backend=backend, temperature=2.0)
    dense = lsk.SparseTeacher(ids.contiguous(), values.contiguous(), row_mean=torch.zeros(b * t, dtype=F64).view(b, t),
                              row_std=torch.ones(b, t, dtype=F64))
    want = _loss_grad(x.reshape(b * t, v), lsk.SparseTeacher(dense.ids.reshape(-1, k), dense.values.reshape(-1, k),
                                                             row_mean=torch.zeros(b * t, dtype=F64),
                                                             row_std=torch.ones(b * t, dtype=F64)),
                      backend="torch", temperature=2.0)
    _close("loss", loss, want[0], 1e-12)
    _close("grad_student", grad.reshape(b * t, v), want[1], 1e-12)


def _bad(**changes):
    ids = torch.tensor([[0, 3], [1, 2]])
    base = dict(ids=ids, values=torch.randn(2, 2, dtype=F64))
    base.update(changes)
    return base


@pytest.mark.parametrize("build,error,name", [
    (lambda: lsk.SparseTeacher(**_bad(ids=torch.zeros(2, 2))), TypeError, "ids"),
    (lambda: lsk.SparseTeacher(**_bad(values=torch.zeros(2, 2, dtype=torch.long))), TypeError, "values"),
    (lambda: lsk.SparseTeacher(**_bad(values=torch.zeros(2, 3))), ValueError, "values"),
    (lambda: lsk.SparseTeacher(**_bad(kind="probs")), ValueError, "kind"),
    (lambda: lsk.SparseTeacher(**_bad(row_mean=torch.zeros(2, dtype=F64))), ValueError, "row_std"),
    (lambda: lsk.SparseTeacher(**_bad(row_std=torch.zeros(3, dtype=F64), row_mean=torch.zeros(3))), ValueError,
     "row_mean"),
    (lambda: lsk.SparseTeacher(**_bad(mask=torch.ones(2, 2))), TypeError, "mask"),
    (lambda: lsk.SparseTeacher(**_bad(values=torch.randn(2, 2, requires_grad=True))), ValueError, "values"),
])
def test_bad_sparse_teacher(build, error, name):
    with pytest.raises(error, match=name):
        build()


def _call(teacher=None, v=5, **options):
    teacher = teacher or lsk.SparseTeacher(**_bad())
    return lsk.distillation_loss(torch.randn(2, v, dtype=F64), teacher, **options)


@pytest.mark.parametrize("call,error,name", [
    (lambda: _call(v=1), ValueError, "k = 2"),
    (lambda: _call(v=3), IndexError, "ids"),
    (lambda: _call(lsk.SparseTeacher(torch.tensor([[0, 0], [1, 2]]), torch.randn(2, 2))), ValueError, "ids"),
    (lambda: _call(lsk.SparseTeacher(torch.tensor([[0, 1]]), torch.randn(1, 2))), ValueError, "rows"),
    (lambda: _call(support="tail"), ValueError, "log_normalizer"),
    (lambda: _call(support="full"), ValueError, "support"),
    (lambda: _call(generation_temperature=2.0), ValueError, "generation_temperature"),
    (lambda: _call(generation_temperature=0.0), ValueError, "generation_temperature"),
    (lambda: _call(divergence="reverse_kl"), ValueError, "divergence"),
    (lambda: _call(backend="cuda"), RuntimeError, "cuda"),
    (lambda: _call(temperature=torch.tensor(2.0, dtype=F64)), ValueError, "temperature"),
    (lambda: lsk.distillation_loss(torch.randn(2, 5), torch.randn(2, 5), generation_temperature=2.0), ValueError,
     "generation_temperature"),
])
def test_bad_input(call, error, name):
    with pytest.raises(error, match=name):
        call()


FUSED = [b for b in BACKENDS if b != "torch"]


def _as(teacher: lsk.SparseTeacher, dtype: torch.dtype) -> lsk.SparseTeacher:
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return lsk.SparseTeacher(teacher.ids, teacher.values.to(dtype), teacher.kind, cast(teacher.row_mean),
                             cast(teacher.row_std), cast(teacher.log_normalizer), teacher.mask)


@pytest.mark.parametrize("backend,dtype,support", [
    (b, dtype, s) for b in FUSED for dtype in (torch.float32, torch.bfloat16) for s in SUPPORTS
    if b != "triton" or dtype == torch.bfloat16])
def test_low_precision_within_eager_error(backend, dtype, support):
    """float32 math (float32 / bf16 students): within 2x the eager reference's error in the same dtypes
    (logitstd_kernels/testing.py), the bf16 gradient recomputed for an incoming gradient != 1."""
    from logitstd_kernels.testing import assert_within_eager_error

    n, v, k = 4, 67, 6
    teacher = padded_teacher(n, v, k)
    x = (torch.randn(n, v, dtype=F64) * 3).to(dtype)
    labels = torch.randint(0, v, (n,))
    options = dict(support=support, ce_weight=0.2, kd_weight=1.1, upstream=torch.tensor(0.7))
    fast = _loss_grad(x, _as(teacher, torch.float32), labels, backend=backend, **options)
    eager = _loss_grad(x, _as(teacher, torch.float32), labels, backend="torch", **options)
    exact = _loss_grad(x.double(), teacher, labels, backend="torch", **dict(options, upstream=torch.tensor(0.7, dtype=F64)))
    for name, i in (("loss", 0), ("grad_student", 1)):
        assert_within_eager_error(name, fast[i], eager[i], exact[i])


@needs("triton" in FUSED, "the Triton backend does not run here")
@pytest.mark.parametrize("support", SUPPORTS)
def test_triton_rows_longer_than_a_tile(support, monkeypatch):
    """Rows of several tiles (the moments merged across tiles, a partial last tile; row 3's student
    mass on the support: the tail's exact outside sum over several tiles)."""
    from logitstd_kernels._triton import sparse_launch

    monkeypatch.setattr(sparse_launch, "SPARSE_BLOCK", 8)
    standardize = support != "tail"  # unstandardized, row 3's student keeps ~e^-25 of its mass off the support
    teacher = padded_teacher(4, 37, 5, standardize=standardize, stats=standardize)
    x = torch.randn(4, 37, dtype=F64) * 2 + 100.0
    x[3, teacher.ids[3]] += 40.0
    options = dict(support=support, reduction="none", temperature=1.5, standardize=standardize)
    loss, grad = _loss_grad(x, teacher, backend="triton", **options)
    want_loss, want_grad = _formula(x, teacher, options=options)
    _close("loss", loss, want_loss, 1e-10)
    _close("grad_student", grad, want_grad, 1e-10)


@pytest.mark.parametrize("backend", FUSED)
def test_tail_with_the_student_mass_on_the_support(backend):
    """The student puts all but ~1e-12 of its mass on the teacher's top-k: the tail's q_T is far below
    float32's roundoff of Z, and must come from the classes outside the support, not from Z - Z_S."""
    from logitstd_kernels.testing import assert_within_eager_error

    n, v, k = 3, 50, 5
    teacher = padded_teacher(n, v, k, pad=False, standardize=False)
    x = torch.randn(n, v, dtype=F64)
    x.scatter_(-1, teacher.ids, 30.0 + torch.randn(n, k, dtype=F64))
    options = dict(support="tail", standardize=False, temperature=1.5, upstream=torch.tensor(1.0))
    fast = _loss_grad(x.float(), _as(teacher, torch.float32), backend=backend, **options)
    eager = _loss_grad(x.float(), _as(teacher, torch.float32), backend="torch", **options)
    exact = _loss_grad(x, teacher, backend="torch", **dict(options, upstream=torch.tensor(1.0, dtype=F64)))
    assert torch.isfinite(fast[1]).all()
    for name, i in (("loss", 0), ("grad_student", 1)):
        assert_within_eager_error(name, fast[i], eager[i], exact[i])


@pytest.mark.parametrize("backend", [b for b in FUSED if b == "cpu"])
@pytest.mark.parametrize("support", SUPPORTS)
def test_cpu_rows_longer_than_a_block(backend, support):
    """The C++ kernel's rows of several 2048-class blocks (vec_rows.h, kBlock) and a partial last one, with
    labels and the student's mass mostly on the support in one row."""
    n, v, k = 3, 5001, 40
    teacher = padded_teacher(n, v, k)
    x = torch.randn(n, v, dtype=F64) * 2
    x[1, teacher.ids[1]] += 12.0
    labels = torch.randint(0, v, (n,))
    options = dict(support=support, temperature=2.0, ce_weight=0.3, kd_weight=0.9, reduction="none")
    loss, grad = _loss_grad(x, teacher, labels, backend=backend, **options)
    want_loss, want_grad = _formula(x, teacher, labels, options=options)
    _close("loss", loss, want_loss, 1e-10)
    _close("grad_student", grad, want_grad, 1e-10)


@pytest.mark.parametrize("backend,reduction", [(b, r) for b in FUSED for r in ("mean", "none")
                                               if b != "triton" or r == "mean"])
def test_opcheck(backend, reduction):
    """``torch.library.opcheck`` of the sparse op: schema, fake (meta) implementation, autograd
    registration."""
    from logitstd_kernels._ops.sparse_op import SparseOpInputs

    teacher = padded_teacher(4, 19, 3, pad=True).rows()
    x = torch.randn(4, 19, dtype=torch.float32, requires_grad=True)
    labels = torch.tensor([1, 2, -100, 4])
    config = DistillConfig(support="tail", reduction=reduction)
    inputs = SparseOpInputs(x, teacher._replace(values=teacher.values.float()), labels, None, config, True, backend)
    torch.library.opcheck(torch.ops.logitstd.sparse_distillation_loss.default, inputs.flat())
