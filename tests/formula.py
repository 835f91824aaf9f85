"""An independent float64 NumPy transcription of DESIGN.md section 1, including its gradients.

It deliberately shares no code with the package: the reference (PyTorch autograd) and every fused
backend are checked against it, so a mistake in the shared math would have to be made twice.
"""

from __future__ import annotations

import numpy as np


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def row_loss_and_grads(x: np.ndarray, y: np.ndarray, tau_s: float, tau_t: float, standardize: bool,
                       correction: int, eps: float) -> tuple[float, np.ndarray, np.ndarray]:
    """Loss of one row and its gradients with respect to the student x and the teacher y."""
    num_classes = x.size

    def standardized(v: np.ndarray):
        mu = v.mean()
        sigma = np.sqrt(((v - mu) ** 2).sum() / (num_classes - correction))
        s = sigma + eps
        return (v - mu) / s, s, sigma

    if standardize:
        u, s_x, sigma_x = standardized(x)
        w, s_y, sigma_y = standardized(y)
    else:
        u, w = x, y
    a, b = u / tau_s, w / tau_t
    q, p = _softmax(a), _softmax(b)
    log_q = a - a.max() - np.log(np.exp(a - a.max()).sum())
    log_p = b - b.max() - np.log(np.exp(b - b.max()).sum())
    kl = float((p * (log_p - log_q)).sum())

    g_u = tau_s * (q - p)
    g_b = tau_s**2 * p * (log_p - log_q - kl)
    g_w = g_b / tau_t
    if not standardize:
        return tau_s**2 * kl, g_u, g_w

    def chain(g: np.ndarray, z: np.ndarray, s: float, sigma: float) -> np.ndarray:
        big_s = (g * z).sum()
        second = z * big_s * s / ((num_classes - correction) * sigma) if sigma > 0 else np.zeros_like(z)
        return (g - second) / s

    return tau_s**2 * kl, chain(g_u, u, s_x, sigma_x), chain(g_w, w, s_y, sigma_y)
