"""The readers of other frameworks' stored top-k teachers (``logitstd_kernels.sparse_formats``): the
``SparseTeacher`` they return, under the settings their docstrings give, reproduces each framework's
loss, restated here from its source (axolotl ``integrations/kd``, DistillKit ``distillkit/common.py``
and ``kl.py``, NeMo RL ``algorithms/loss_functions.py``), in float64 to 1e-6 (the parity bar of the
sparse objective)."""

from __future__ import annotations

import pytest
import torch

import logitstd_kernels as lsk
from logitstd_kernels.sparse_formats import from_axolotl, from_distillkit, from_nemo_rl, padded_rows
from test_sparse_teacher import BACKENDS, axolotl_topk_forward_kl

F64 = torch.float64


def _close(name, got, want):
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-6, atol=1e-9, msg=lambda m: f"{name}: {m}")


def _axolotl_columns(v: int, k: int, t_gen: float, tau: float):
    """Per-position columns as axolotl's dataset step writes them: a padded prompt position (ids
    range(k), -inf, mask 0), a ragged position (k - 2 entries), log-probabilities renormalized over
    the entries at ``tau`` (``p ** (t_gen / tau)`` renormalized)."""
    y = torch.randn(5, v, dtype=F64) * 2
    lp, ids = torch.log_softmax(y / t_gen, -1).topk(k, -1)
    ids_rows, lp_rows, mask_rows = [list(range(k))], [[float("-inf")] * k], [[0] * k]
    for pos in range(5):
        n = k - 2 if pos == 2 else k
        p = lp[pos, :n].exp() / lp[pos, :n].exp().sum()
        p = p ** (t_gen / tau)
        ids_rows.append(ids[pos, :n].tolist())
        lp_rows.append((p / p.sum()).log().tolist())
        mask_rows.append([1] * n)
    return ids_rows, lp_rows, mask_rows


@pytest.mark.parametrize("backend", BACKENDS)
def test_axolotl_columns(backend):
    v, k, t_gen, tau = 30, 5, 1.5, 2.0
    ids_rows, lp_rows, mask_rows = _axolotl_columns(v, k, t_gen, tau)
    teacher = from_axolotl(ids_rows, lp_rows, mask_rows)
    teacher = lsk.SparseTeacher(teacher.ids, teacher.values.double(), "logprobs", mask=teacher.mask)
    z = torch.randn(6, v, dtype=F64) * 2
    ours = lsk.distillation_loss(z, teacher, support="renormalize_teacher", standardize=False, temperature=tau,
                                 generation_temperature=tau, kd_weight=1 / tau**2, reduction="sum", backend=backend)
    ids, values, mask = padded_rows(ids_rows, lp_rows, mask_rows, dtype=F64)
    want = axolotl_topk_forward_kl(z[None], ids[None], torch.where(mask, values, 0.0)[None], mask[None],
                                   kd_temperature=tau)
    _close("axolotl forward_kl", ours / mask.sum(), want)


def distillkit_sparse_kl(z, ids, values, mask, tau, t_gen, missing):
    """DistillKit's sparse KL (``log_target=True``) restated: student log-softmax over the vocabulary at
    tau gathered; teacher ``a v - lse(a v)``, a = t_gen / tau ("zero"), or the values with a tail class
    ``log(1 - sum p)`` for teacher and student ("symmetric_uniform" at tau == t_gen); times tau**2,
    divided by the positions of ``mask``."""
    s = torch.log_softmax(z / tau, -1).gather(-1, ids)
    if missing == "zero":
        a = t_gen / tau
        t = a * values - torch.logsumexp(a * values, -1, keepdim=True)
        per = (t.exp() * (t - s)).sum(-1)
    else:
        t = values
        per = (t.exp() * (t - s)).sum(-1)
        lt = torch.log1p(-t.exp().sum(-1).clamp(1e-8, 1 - 1e-8))
        ls = torch.log1p(-s.exp().sum(-1).clamp(1e-8, 1 - 1e-8))
        per = per + lt.exp() * (lt - ls)
    return (per * mask).sum() * tau**2 / mask.sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("missing,tau,t_gen", [("zero", 2.0, 1.0), ("symmetric_uniform", 1.5, 1.5)])
def test_distillkit_layout(backend, missing, tau, t_gen):
    v, k, n = 40, 6, 7
    y = torch.randn(n, v, dtype=F64) * 2
    values, ids = torch.log_softmax(y / t_gen, -1).topk(k, -1)
    mask = torch.ones(n, dtype=F64)
    mask[3] = 0
    z = torch.randn(n, v, dtype=F64) * 2
    teacher = from_distillkit(ids, values)
    support = "renormalize_teacher" if missing == "zero" else "tail"
    ours = lsk.distillation_loss(z, teacher, support=support, standardize=False, temperature=tau,
                                 generation_temperature=t_gen, kd_weight=1.0, mask=mask.bool(), backend=backend)
    _close(f"DistillKit {missing}", ours, distillkit_sparse_kl(z, ids, values, mask, tau, t_gen, missing))


def nemo_rl_forward_kl(z, topk_logits, idx, token_mask):
    """NeMo RL's distillation loss (forward KL, ``zero_outside_topk=False``) restated: teacher and
    student log-softmax over the k indices; the masked mean over the tokens."""
    tl = torch.log_softmax(topk_logits, -1)
    sl = torch.log_softmax(z.gather(-1, idx), -1)
    per = (tl.exp() * (tl - sl)).sum(-1)
    return (per * token_mask).sum() / token_mask.sum()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nemo_rl_tensors(backend):
    b, s, v, k = 2, 4, 33, 5
    y = torch.randn(b, s, v, dtype=F64) * 2
    logits, idx = y.topk(k, -1)
    z = torch.randn(b, s, v, dtype=F64)
    token_mask = torch.ones(b, s, dtype=F64)
    token_mask[1, -1] = 0
    ours = lsk.distillation_loss(z, from_nemo_rl(logits, idx), support="renormalize", standardize=False,
                                 temperature=1.0, kd_weight=1.0, mask=token_mask.bool(), backend=backend)
    _close("NeMo RL forward KL", ours, nemo_rl_forward_kl(z, logits, idx, token_mask))


def test_padded_rows_checks_lengths():
    with pytest.raises(ValueError, match="position 0"):
        padded_rows([[1, 2]], [[0.0]])
    with pytest.raises(ValueError, match="positions"):
        padded_rows([[1]], [[0.0], [1.0]])
    ids, values, mask = padded_rows([[3, 1], None, [2]], [[-0.1, -2.0], None, [-0.5]])
    assert ids.shape == (3, 2) and mask.tolist() == [[True, True], [False, False], [True, False]]
    assert values[1].eq(float("-inf")).all()
