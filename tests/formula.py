"""An independent NumPy transcription of docs/design.md section 1, including its gradients, the
divergences (forward KL, reverse KL, generalized JSD, Jeffreys, TVD) and the reductions.

It deliberately shares no code with the package: the reference (PyTorch autograd) and every fused
backend are checked against it, so a mistake in the shared math would have to be made twice.

The math runs in float64 by default; ``dtype=np.longdouble`` (80-bit extended precision on x86,
quad precision on aarch64) gives a truth more exact than any float64 implementation, which the tests
use to measure the error of float64 results. Conventions: ``0 * log 0 = 0`` (a teacher class with
probability 0, e.g. a ``-inf`` teacher logit without standardization, contributes nothing to the
loss and gets a zero gradient), and a constant row (``std = 0``, ``eps > 0``) has no gradient
through its standard deviation, as in ``torch.std``'s backward.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

REDUCTIONS = ("none", "sum", "batchmean", "mean")


def _log_softmax(z: np.ndarray) -> np.ndarray:
    top = z.max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0)
    shifted = z - top
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _where(cond: np.ndarray, value: np.ndarray) -> np.ndarray:
    """``value`` where ``cond``, else 0 (the limit of a term whose probability is 0)."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return np.where(cond, value, 0)


def _term_form(prob: np.ndarray, g: np.ndarray, g_mag: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dD/dlogit = prob (g - E_prob g) for a per-element ``g``, and its terms' magnitude."""
    mean = _where(prob > 0, prob * g).sum(axis=-1, keepdims=True)
    mean_mag = _where(prob > 0, prob * g_mag).sum(axis=-1, keepdims=True)
    return _where(prob > 0, prob * (g - mean)), _where(prob > 0, prob * (g_mag + mean_mag))


def _kl(log_p: np.ndarray, log_q: np.ndarray) -> tuple:
    """KL(p || q), d/dlog-its of q and of p (before the temperatures), and the terms' magnitudes."""
    p, q = np.exp(log_p), np.exp(log_q)
    l = _where(p > 0, log_p - log_q)
    l_mag = _where(p > 0, np.abs(log_p) + np.abs(log_q))
    d = _where(p > 0, p * l).sum(axis=-1, keepdims=True)
    d_mag = _where(p > 0, p * l_mag).sum(axis=-1, keepdims=True)
    return d, q - p, _where(p > 0, p * (l - d)), d_mag, q + p, _where(p > 0, p * (l_mag + d_mag))


def _divergence(log_q: np.ndarray, log_p: np.ndarray, divergence: str, beta: float) -> tuple:
    """D(p, q) per row (keepdims), dD/da, dD/db (a, b: the tempered student and teacher logits) and
    the magnitudes of the terms of each. ``jsd``: m = beta p + (1 - beta) q, D = beta KL(p || m) +
    (1 - beta) KL(q || m), beta 0 and 1 meaning forward and reverse KL; ``tvd``: 1/2 sum |p - q|, its
    subgradient 0 where p = q."""
    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    if divergence == "forward_kl":
        return _kl(log_p, log_q)
    if divergence == "reverse_kl":
        d, d_b, d_a, d_mag, d_b_mag, d_a_mag = _kl(log_q, log_p)
        return d, d_a, d_b, d_mag, d_a_mag, d_b_mag
    if divergence == "jeffreys":
        forward, reverse = _kl(log_p, log_q), _kl(log_q, log_p)
        return (forward[0] + reverse[0], forward[1] + reverse[2], forward[2] + reverse[1],
                forward[3] + reverse[3], forward[4] + reverse[5], forward[5] + reverse[4])
    p, q = np.exp(log_p), np.exp(log_q)
    dtype = log_p.dtype.type
    if divergence == "tvd":
        d = 0.5 * np.abs(p - q).sum(axis=-1, keepdims=True)
        half = dtype(0.5) * np.ones_like(p)
        d_a, d_a_mag = _term_form(q, 0.5 * np.sign(q - p), half)
        d_b, d_b_mag = _term_form(p, 0.5 * np.sign(p - q), half)
        return d, d_a, d_b, 0.5 * (p + q).sum(axis=-1, keepdims=True), d_a_mag, d_b_mag  # |p - q|: terms p, q
    assert divergence == "jsd", divergence
    beta = dtype(beta)
    log_m = np.logaddexp(np.log(beta) + log_p, np.log1p(-beta) + log_q)
    lp, lq = _where(p > 0, log_p - log_m), _where(q > 0, log_q - log_m)
    d = (beta * _where(p > 0, p * lp) + (1 - beta) * _where(q > 0, q * lq)).sum(axis=-1, keepdims=True)
    lp_mag = _where(p > 0, np.abs(log_p) + np.abs(log_m))
    lq_mag = _where(q > 0, np.abs(log_q) + np.abs(log_m))
    d_mag = (beta * _where(p > 0, p * lp_mag) + (1 - beta) * _where(q > 0, q * lq_mag)).sum(axis=-1, keepdims=True)
    d_a, d_a_mag = _term_form(q, (1 - beta) * lq, (1 - beta) * lq_mag)
    d_b, d_b_mag = _term_form(p, beta * lp, beta * lp_mag)
    return d, d_a, d_b, d_mag, d_a_mag, d_b_mag


def _dkd(log_q: np.ndarray, log_p: np.ndarray, labels: np.ndarray, alpha: float, beta: float) -> tuple:
    """Decoupled KD, ``alpha TCKD + beta NCKD`` (the official formula, the target class masked out of
    NCKD exactly): D per row (keepdims), dD/da, dD/db and their terms' magnitudes, written out by hand
    (g the label; hats: the softmaxes over the other classes):

    - TCKD = p_g ln(p_g / q_g) + (1 - p_g) ln((1 - p_g) / (1 - q_g));
      d/da_g = q_g - p_g, d/da_k = q^_k (p_g - q_g); d/db_g = delta p_g (1 - p_g), d/db_k = -delta p_g p_k,
      delta = ln(p_g / q_g) - ln((1 - p_g) / (1 - q_g));
    - NCKD = sum_k p^_k ln(p^_k / q^_k); d/da_k = q^_k - p^_k, d/db_k = p^_k (l^_k - NCKD), 0 at g.
    """
    dtype = log_q.dtype.type
    alpha, beta = dtype(alpha), dtype(beta)
    rows = np.arange(log_q.shape[0])
    target = np.zeros(log_q.shape, bool)
    target[rows, labels] = True
    q, p = np.exp(log_q), np.exp(log_p)
    q_g, p_g = q[rows, labels][:, None], p[rows, labels][:, None]
    rest_q, rest_p = np.where(target, 0, q).sum(-1, keepdims=True), np.where(target, 0, p).sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        hat_q, hat_p = np.where(target, 0, q / rest_q), np.where(target, 0, p / rest_p)
        log_hat_q, log_hat_p = np.log(hat_q), np.log(hat_p)
    bins = ((p_g, q_g), (rest_p, rest_q))
    tckd = sum(_where(bp > 0, bp * (np.log(bp) - np.log(bq))) for bp, bq in bins)
    tckd_mag = sum(_where(bp > 0, bp * (np.abs(np.log(bp)) + np.abs(np.log(bq)))) for bp, bq in bins)
    hat_l = _where(hat_p > 0, log_hat_p - log_hat_q)
    hat_l_mag = _where(hat_p > 0, np.abs(log_hat_p) + np.abs(log_hat_q))
    nckd = _where(hat_p > 0, hat_p * hat_l).sum(-1, keepdims=True)
    nckd_mag = _where(hat_p > 0, hat_p * hat_l_mag).sum(-1, keepdims=True)
    delta = _where(p_g > 0, np.log(p_g) - np.log(q_g)) - _where(rest_p > 0, np.log(rest_p) - np.log(rest_q))
    delta_mag = sum(_where(bp > 0, np.abs(np.log(bp)) + np.abs(np.log(bq))) for bp, bq in bins)
    d_a = np.where(target, alpha * (q_g - p_g), alpha * hat_q * (p_g - q_g) + beta * (hat_q - hat_p))
    d_a_mag = np.where(target, alpha * (q_g + p_g), alpha * hat_q * (p_g + q_g) + beta * (hat_q + hat_p))
    d_b = np.where(target, alpha * delta * p_g * (1 - p_g),
                   -alpha * delta * p_g * p + beta * _where(hat_p > 0, hat_p * (hat_l - nckd)))
    d_b_mag = np.where(target, alpha * delta_mag * p_g, alpha * delta_mag * p_g * p
                       + beta * _where(hat_p > 0, hat_p * (hat_l_mag + nckd_mag)))
    return (alpha * tckd + beta * nckd, d_a, d_b, alpha * tckd_mag + beta * nckd_mag, d_a_mag, d_b_mag)


def rows_loss_and_grads(x: np.ndarray, y: np.ndarray, tau_s: float, tau_t: float, standardize: bool,
                        correction: int, eps: float, magnitudes: bool = False, divergence: str = "forward_kl",
                        beta: float = 0.5, labels: Optional[np.ndarray] = None, dkd_alpha: float = 1.0,
                        dkd_beta: float = 8.0):
    """Loss of every row (last axis = classes) and its gradients with respect to x and y, row by row.

    With ``magnitudes=True`` also the magnitudes of the terms each result is a sum or difference of
    (same shapes; recursively: an intermediate sum such as the KL or the chain rule's row sum enters
    with its own terms' magnitude): the scale a rounding error of the computation is proportional
    to, so that ``u * magnitude`` is the error a computation with unit roundoff ``u`` makes by
    rounding those terms alone, and bounds how well it can resolve a result that cancels far below
    them (logitstd_kernels/testing.py uses it as the criterion's allowance).
    """
    num_classes = x.shape[-1]
    dtype = x.dtype
    tau_s, tau_t, eps = dtype.type(tau_s), dtype.type(tau_t), dtype.type(eps)

    def standardized(v: np.ndarray):
        mu = v.mean(axis=-1, keepdims=True)
        sigma = np.sqrt(((v - mu) ** 2).sum(axis=-1, keepdims=True) / (num_classes - correction))
        s = sigma + eps
        return (v - mu) / s, s, sigma

    if standardize:
        u, s_x, sigma_x = standardized(x)
        w, s_y, sigma_y = standardized(y)
    else:
        u, w = x, y
    a, b = u / tau_s, w / tau_t
    log_q, log_p = _log_softmax(a), _log_softmax(b)
    if divergence == "dkd":
        d, d_a, d_b, d_mag, d_a_mag, d_b_mag = _dkd(log_q, log_p, labels, dkd_alpha, dkd_beta)
    else:
        d, d_a, d_b, d_mag, d_a_mag, d_b_mag = _divergence(log_q, log_p, divergence, beta)
    loss = tau_s**2 * d[..., 0]
    g_u = tau_s * d_a
    g_w = tau_s**2 * d_b / tau_t
    if magnitudes:
        loss_mag = tau_s**2 * d_mag[..., 0]
        g_u_mag = tau_s * d_a_mag
        g_w_mag = tau_s**2 * d_b_mag / tau_t

    def chain(g: np.ndarray, z: np.ndarray, s: np.ndarray, sigma: np.ndarray) -> np.ndarray:
        big_s = (g * z).sum(axis=-1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            second = np.where(sigma > 0, z * big_s * s / ((num_classes - correction) * sigma), 0)
        return (g - second) / s

    def chain_magnitude(g_mag: np.ndarray, z: np.ndarray, s: np.ndarray, sigma: np.ndarray) -> np.ndarray:
        big_s = (g_mag * np.abs(z)).sum(axis=-1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            second = np.where(sigma > 0, np.abs(z) * big_s * s / ((num_classes - correction) * sigma), 0)
        return (g_mag + second) / s

    if not standardize:
        results = (loss, g_u, g_w)
        mags = (loss_mag, g_u_mag, g_w_mag) if magnitudes else None
    else:
        results = (loss, chain(g_u, u, s_x, sigma_x), chain(g_w, w, s_y, sigma_y))
        mags = ((loss_mag, chain_magnitude(g_u_mag, u, s_x, sigma_x), chain_magnitude(g_w_mag, w, s_y, sigma_y))
                if magnitudes else None)
    return (results, mags) if magnitudes else results


def row_loss_and_grads(x: np.ndarray, y: np.ndarray, tau_s: float, tau_t: float, standardize: bool,
                       correction: int, eps: float) -> tuple[float, np.ndarray, np.ndarray]:
    """Loss of one row and its gradients with respect to the student x and the teacher y."""
    loss, gx, gy = rows_loss_and_grads(x[None], y[None], tau_s, tau_t, standardize, correction, eps)
    return float(loss[0]), gx[0], gy[0]


def loss_and_grads(x: np.ndarray, y: np.ndarray, *, temperature: float = 2.0,
                   teacher_temperature: Optional[float] = None, standardize: bool = True, correction: int = 1,
                   eps: float = 1e-7, reduction: str = "batchmean", mask: Optional[np.ndarray] = None,
                   upstream=1.0, dtype=np.float64, magnitudes: bool = False, divergence: str = "forward_kl",
                   beta: float = 0.5, labels: Optional[np.ndarray] = None, dkd_alpha: float = 1.0,
                   dkd_beta: float = 8.0):
    """The public contract for (..., V) logits: the reduced loss and ``upstream``-weighted gradients.

    ``reduction``: "none" (the loss of every row; ``upstream`` has the leading shape), "sum",
    "batchmean" (sum / included rows, at least 1), "mean" (sum / (included rows x V)). Rows where
    ``mask`` is False give 0 loss and 0 gradient and are not counted; their data is never read.
    With ``magnitudes=True`` returns ``(results, magnitudes)``, see :func:`rows_loss_and_grads`.
    """
    assert reduction in REDUCTIONS, reduction
    tau_s = float(temperature)
    tau_t = tau_s if teacher_temperature is None else float(teacher_temperature)
    x, y = np.asarray(x, dtype=dtype), np.asarray(y, dtype=dtype)
    lead, num_classes = x.shape[:-1], x.shape[-1]
    xs, ys = x.reshape(-1, num_classes), y.reshape(-1, num_classes)
    keep = np.ones(xs.shape[0], bool) if mask is None else np.asarray(mask, bool).reshape(-1)
    rows = [np.zeros(xs.shape[0], dtype), np.zeros_like(xs), np.zeros_like(ys)]
    mags = [np.zeros(xs.shape[0], dtype), np.zeros_like(xs), np.zeros_like(ys)]
    if keep.any():
        row_labels = None if labels is None else np.asarray(labels).reshape(-1)[keep]
        computed = rows_loss_and_grads(xs[keep], ys[keep], tau_s, tau_t, standardize, correction, eps, magnitudes,
                                       divergence, beta, row_labels, dkd_alpha, dkd_beta)
        values, magnitude_values = computed if magnitudes else (computed, None)
        for target, value in zip(rows, values):
            target[keep] = value
        if magnitudes:
            for target, value in zip(mags, magnitude_values):
                target[keep] = value
    count = int(keep.sum())
    upstream = np.asarray(upstream, dtype=dtype)

    def reduce(row_loss, gx, gy, absolute=False):
        if reduction == "none":
            loss = row_loss.reshape(lead)
            weight = upstream.reshape(-1, 1) * np.ones((xs.shape[0], 1), dtype)
        else:
            divisor = {"sum": 1, "batchmean": max(count, 1), "mean": max(count, 1) * num_classes}[reduction]
            loss = np.asarray(row_loss.sum() / divisor)
            weight = upstream / divisor * np.ones((xs.shape[0], 1), dtype)
        if absolute:
            weight = np.abs(weight)
        return loss, (gx * weight).reshape(x.shape), (gy * weight).reshape(y.shape)

    results = reduce(*rows)
    return (results, reduce(*mags, absolute=True)) if magnitudes else results


def objective_numpy(x, y, labels, *, ce_weight, kd_weight, temperature, teacher_temperature=None, standardize=True,
                    correction=1, eps=1e-7, ignore_index=-100, label_smoothing=0.0, mask=None, reduction="mean",
                    upstream=1.0):
    """(loss, d/dx, d/dy, ce, kd) of ce_weight * CE + kd_weight * tau^2 KL in float64, row by row."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    lead, num_classes = x.shape[:-1], x.shape[-1]
    xs, ys = x.reshape(-1, num_classes), y.reshape(-1, num_classes)
    keep = np.ones(xs.shape[0], bool) if mask is None else np.asarray(mask).reshape(-1).copy()
    lab = None if labels is None else np.asarray(labels).reshape(-1)
    if lab is not None:
        keep &= lab != ignore_index
    tau_t = temperature if teacher_temperature is None else teacher_temperature
    rows, ce_rows, kd_rows = (np.zeros(xs.shape[0]) for _ in range(3))
    gx, gy = np.zeros_like(xs), np.zeros_like(ys)
    for r in np.nonzero(keep)[0]:
        kd, kgx, kgy = row_loss_and_grads(xs[r], ys[r], temperature, tau_t, standardize, correction, eps)
        kd_rows[r] = kd
        gx[r] = kd_weight * kgx
        gy[r] = kd_weight * kgy
        rows[r] = kd_weight * kd
        if lab is not None:
            z = xs[r] - xs[r].max()
            log_softmax = z - np.log(np.exp(z).sum())
            target = np.full(num_classes, label_smoothing / num_classes)
            target[lab[r]] += 1.0 - label_smoothing
            ce_rows[r] = -(target * log_softmax).sum()
            rows[r] += ce_weight * ce_rows[r]
            gx[r] += ce_weight * (np.exp(log_softmax) - target)
    count = max(int(keep.sum()), 1)
    if reduction == "none":
        weight = np.asarray(upstream, np.float64).reshape(-1, 1) * np.ones((xs.shape[0], 1))
        return (rows.reshape(lead), (weight * gx).reshape(x.shape), (weight * gy).reshape(y.shape),
                ce_rows.reshape(lead), kd_rows.reshape(lead))
    div = 1.0 if reduction == "sum" else float(count)
    up = float(upstream)
    return (rows.sum() / div, up * gx.reshape(x.shape) / div, up * gy.reshape(y.shape) / div, ce_rows.sum() / div,
            kd_rows.sum() / div)


def logit_transform(x, scale: float = 1.0, softcap: Optional[float] = None):
    """``(z, dz/dx)`` elementwise for a model's last logit transforms: ``z = scale * x``, then
    ``z = softcap * tanh(z / softcap)`` when ``softcap`` is given."""
    u = scale * np.asarray(x, np.float64)
    if softcap is None:
        return u, np.full_like(u, scale)
    t = np.tanh(u / softcap)
    return softcap * t, scale * (1.0 - t * t)


def _softmax_backward(prob: np.ndarray, grad_prob: np.ndarray, temperature: float) -> np.ndarray:
    """d/dz of a function of softmax(z / T), given its gradient with respect to the softmax."""
    return prob * (grad_prob - (grad_prob * prob).sum(axis=-1, keepdims=True)) / temperature


def _correlations(x: np.ndarray, y: np.ndarray, temperature: float) -> tuple:
    """The official ``cc_loss`` and ``bc_loss`` (raw logits) and their gradients with respect to x:
    with G = P^T P (class) or P P^T (batch), L = sum (G_t - G_s)^2 / n, dL/dG_s = -2 (G_t - G_s) / n,
    and dL/dP_s = 2 P_s dG (class) or 2 dG P_s (batch), dG being symmetric."""
    rows, classes = x.shape
    ps, pt = np.exp(_log_softmax(x / temperature)), np.exp(_log_softmax(y / temperature))
    diff_c = pt.T @ pt - ps.T @ ps
    diff_b = pt @ pt.T - ps @ ps.T
    grad_c = _softmax_backward(ps, 2 * ps @ (-2 * diff_c / classes), temperature)
    grad_b = _softmax_backward(ps, 2 * (-2 * diff_b / rows) @ ps, temperature)
    return (diff_c**2).sum() / classes, grad_c, (diff_b**2).sum() / rows, grad_b


def mlkd_numpy(x, y, *, temperatures, temperature_weights=None, confidence="row", class_weight=1.0, batch_weight=1.0,
               standardize=True, correction=1, eps=1e-7, upstream=1.0):
    """(loss, d/dx) of multi-level KD (Jin et al. 2023) on (N, V) logits in float64, restated from the
    official code: masks from ``np.percentile(..., 50)`` of the teacher's confidence (max probability per
    row) and class mass (summed probability per class), kept where ``<=``; per temperature the KD of each
    row (``rows_loss_and_grads``) weighted by the row mask (``"row"``), or its batch mean times the kept
    fraction (``"fraction"``, the official code as written), or unweighted (``"none"``); plus the class
    and batch correlation terms, times the kept fractions unless ``"none"``."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    rows = x.shape[0]
    weights = [1.0] * len(temperatures) if temperature_weights is None else list(temperature_weights)
    prob = np.exp(_log_softmax(y))
    conf, mass = prob.max(axis=-1), prob.sum(axis=0)
    row_mask = (conf <= np.percentile(conf, 50)).astype(np.float64)
    class_mask = (mass <= np.percentile(mass, 50)).astype(np.float64)
    frac_rows = 1.0 if confidence == "none" else row_mask.mean()
    frac_classes = 1.0 if confidence == "none" else class_mask.mean()
    per_row = row_mask if confidence == "row" else np.full(rows, frac_rows)
    loss, grad = 0.0, np.zeros_like(x)
    for tau, weight in zip(temperatures, weights):
        kd, kd_grad, _ = rows_loss_and_grads(x, y, tau, tau, standardize, correction, eps)
        cc, cc_grad, bc, bc_grad = _correlations(x, y, tau)
        loss += weight * ((kd * per_row).sum() / rows + class_weight * frac_classes * cc
                          + batch_weight * frac_rows * bc)
        grad += weight * (kd_grad * per_row[:, None] / rows + class_weight * frac_classes * cc_grad
                          + batch_weight * frac_rows * bc_grad)
    return loss, upstream * grad


def _sparse_teacher_b(v: np.ndarray, valid: np.ndarray, stats: Optional[tuple], scale: float, tau_t: float,
                      standardize: bool, correction: int, eps: float) -> np.ndarray:
    """The teacher's KD logits at its valid stored entries (docs/design.md section 9)."""
    r = v[valid] * scale
    if not standardize:
        return r / tau_t
    if stats is not None:
        mu, sigma = stats[0] * scale, stats[1] * scale
        return (r - mu) / (sigma + eps) / tau_t
    c = 1.0 / max(np.abs(r).max(), 1.0)  # (c r - c mu) / (c sigma + c eps): the same, without overflow
    mu = (c * r).mean()
    dof = r.size - correction
    sigma = np.sqrt(((c * r - mu) ** 2).sum() / dof) if dof > 0 else 0.0
    return (c * r - mu) / (sigma + c * eps) / tau_t


def _lse(z: np.ndarray) -> float:
    top = z.max()
    return float(top + np.log(np.exp(z - top).sum()))


def sparse_row_kl(x: np.ndarray, ids: np.ndarray, v: np.ndarray, valid: np.ndarray, *, support: str,
                  stats: Optional[tuple] = None, log_normalizer: Optional[float] = None, scale: float = 1.0,
                  tau_s: float = 2.0, tau_t: float = 2.0, standardize: bool = True, correction: int = 1,
                  eps: float = 1e-7) -> tuple[float, np.ndarray]:
    """``tau_s**2 * D`` of one student row ``x`` (V,) and a sparse teacher row, and its gradient in x.

    S: the valid entries' classes; p the teacher over S, q the student. "renormalize":
    ``KL(p || q_S / q(S))``, ``dD/da = q_S / q(S) - p`` on S; "renormalize_teacher":
    ``sum_S p log(p / q)``, ``dD/da = q - p``; "tail": p = exp(b - L') with ``L' = max(L, lse_S b)``,
    the tail class ``p_T = 1 - sum_S p``, ``q_T = 1 - q(S)``, ``dD/da = q - p`` on S and
    ``q (1 - p_T / q_T)`` outside. The chain rule through the student's standardization as in
    :func:`rows_loss_and_grads`.
    """
    num_classes = x.shape[0]
    if standardize:
        mu = x.mean()
        sigma = np.sqrt(((x - mu) ** 2).sum() / (num_classes - correction))
        u, s = (x - mu) / (sigma + eps), sigma + eps
    else:
        u = x
    a = u / tau_s
    log_q = _log_softmax(a)
    q = np.exp(log_q)
    cls = ids[valid]
    d_a = np.zeros(num_classes)
    if cls.size == 0:
        return 0.0, d_a
    b = _sparse_teacher_b(v, valid, stats, scale, tau_t, standardize, correction, eps)
    lse_b = _lse(b)
    if support == "tail":
        # the full row's log-partition; None: values that are log-probabilities at tau_t (0)
        stored = 0.0 if log_normalizer is None else log_normalizer
        log_p = b - (lse_b if cls.size == num_classes else max(stored, lse_b))
    else:
        log_p = b - lse_b
    p = np.exp(log_p)
    if support == "renormalize":
        log_qs = log_q[cls] - _lse(log_q[cls])
        d = float(np.sum(_where(p > 0, p * (log_p - log_qs))))
        d_a[cls] = np.exp(log_qs) - p
    else:
        d = float(np.sum(_where(p > 0, p * (log_p - log_q[cls]))))
        d_a = q.copy()
        d_a[cls] -= p
        if support == "tail" and cls.size < num_classes:
            p_tail = max(1.0 - p.sum(), 0.0)
            outside = np.ones(num_classes, bool)
            outside[cls] = False
            q_tail = q[outside].sum()
            if p_tail > 0:
                d += p_tail * (np.log(p_tail) - np.log(q_tail))
            d_a[outside] = q[outside] * (1.0 - p_tail / q_tail)
    g_u = tau_s * d_a
    if standardize:
        big_s = (g_u * u).sum()
        second = u * big_s * s / ((num_classes - correction) * sigma) if sigma > 0 else 0.0
        g_x = (g_u - second) / s
    else:
        g_x = g_u
    return tau_s**2 * d, g_x


def sparse_objective(x: np.ndarray, ids: np.ndarray, v: np.ndarray, valid: np.ndarray, labels=None, mask=None, *,
                     stats=None, log_normalizer=None, ce_weight: float = 0.0, kd_weight: float = 1.0,
                     ignore_index: int = -100, reduction: str = "mean", **options) -> tuple:
    """(loss, d/dx) of ``ce_weight * CE + kd_weight * tau_s**2 D`` for (N, V) rows and a sparse teacher
    (N, k), row by row in float64: rows with a False ``mask`` or an ignored label are left out, "mean"
    divides by the included rows, "none" returns every row's loss (gradient for upstream 1)."""
    rows, grad = np.zeros(x.shape[0]), np.zeros_like(x)
    keep = np.ones(x.shape[0], bool) if mask is None else np.asarray(mask, bool).copy()
    if labels is not None:
        keep &= np.asarray(labels) != ignore_index
    for r in np.nonzero(keep)[0]:
        kd, g = sparse_row_kl(x[r], ids[r], v[r], valid[r], stats=None if stats is None else
                              (stats[0][r], stats[1][r]), log_normalizer=None if log_normalizer is None else
                              float(log_normalizer[r]), **options)
        rows[r], grad[r] = kd_weight * kd, kd_weight * g
        if labels is not None and ce_weight:
            log_softmax = _log_softmax(x[r])
            rows[r] -= ce_weight * log_softmax[labels[r]]
            grad[r] += ce_weight * np.exp(log_softmax)
            grad[r, labels[r]] -= ce_weight
    if reduction == "none":
        return rows, grad
    divisor = 1.0 if reduction == "sum" else float(max(int(keep.sum()), 1))
    return rows.sum() / divisor, grad / divisor
