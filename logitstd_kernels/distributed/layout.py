"""The per-row coefficient tensor of the vocabulary-parallel phases and their partial sums: the
columns and positions, defined once.

The global statistics (phase 1) and the global sums (phase 2, and the pointwise phase of jsd and
tvd) reach each local phase as columns of a small (N, C) tensor in the accumulation dtype; nothing is
read back on the host. Both phase backends (``torch_phases.py``; ``_triton/vocab_parallel.py``: Triton)
read the columns by these names and write their partial sums at these positions.

The divergences are the kernels' codes (``config.DistillConfig.kernel_divergence``): the KLs' sums
come in one group per direction (forward for forward KL and Jeffreys, reverse for reverse KL and
Jeffreys); jsd and tvd take the pointwise phase instead (docs/tensor-parallel.md).
"""

from __future__ import annotations

from typing import NamedTuple

from ..config import DIVERGENCE_CODES

# Phase 2's columns (``SUMS_COLUMNS`` of them): the shifts and scales of a = (x - shift_x) ka and
# b = (y - shift_y) kb, the exponentials' shifts a_max and b_max, sigma of x and y (1 unstandardized),
# the student's raw max (the CE's shift), whether this rank owns the row's label (0/1), the Bregman
# shift c of d = b - a (the whole row's mean of d) and the Bregman terms' factors
# k_f = e^(a_max - b_max - c) and k_r = e^(b_max - a_max + c).
SHIFT_X, SHIFT_Y, KA, KB, A_MAX, B_MAX, SIGMA_X, SIGMA_Y, MAX_X, OWNS, SHIFT_D, K_F, K_R = range(13)
SUMS_COLUMNS = 13
# The pointwise phase (jsd, tvd) adds: 1/Za, 1/Zb and log(Za e^a_max / (Zb e^b_max)).
INV_ZA, INV_ZB, LOG_RATIO = range(13, 16)
POINTWISE_COLUMNS = 16
# Phase 3 adds: the chain rule's factors, the forward and the reverse KL, E_q g and E_p h (jsd, tvd),
# the log-sum-exp of the CE, label_smoothing / V, and whether the row is included (0/1).
FACTOR_X, FACTOR_Y, KL, KL_R, E_QG, E_PH, LSE, SMOOTH_OVER_V, KEEP = range(16, 25)
GRADS_COLUMNS = 25

# Phase 1's output: per row, for x then y, the slice's mean, scale c = max|v - mean|, scaled sum of
# squares sum((v - mean) / c)^2 and max (float64).
STATS_PER_INPUT = 4
STATS_COLUMNS = 2 * STATS_PER_INPUT

# Phase 2's partial sums, with ea = e^(a - a_max), eb = e^(b - b_max), d = b - a, u = (x - shift_x) /
# sigma_x and w = (y - shift_y) / sigma_y. First sum ea and sum eb, then groups:
ZA, ZB = 0, 1
# the standardization's (standardized only): sum ea u, sum eb w;
AU, BW = 0, 1
# each KL direction's, with (e, t) = (eb, -(d + c)) forward and (ea, d + c) reverse: sum e d, sum |e d|
# (the size of the direct form's terms), the Bregman sum sum e phi(t) (``bregman_terms``) and,
# standardized, the chain rule's two: forward sum eb u and sum eb d w, reverse sum ea d u and sum ea w;
KL_D, KL_ABS, KL_BREG, KL_U, KL_W = range(5)
# the CE's (with labels): sum e^(x - max x), the owned label's logit, its owner count and sum x.
ZC, X_LABEL, OWNERS, SUM_X = range(4)

# The pointwise phase's partial sums (jsd, tvd), with the per-element loss, g and h of
# ``divergence.h``: sum loss, sum q g, sum p h and, standardized, sum q g u and sum p h w.
PW_LOSS, PW_QG, PW_PH, PW_QGU, PW_PHW = range(5)

_FORWARD = (DIVERGENCE_CODES["forward_kl"], DIVERGENCE_CODES["jeffreys"])
_REVERSE = (DIVERGENCE_CODES["reverse_kl"], DIVERGENCE_CODES["jeffreys"])
_POINTWISE = (DIVERGENCE_CODES["jsd"], DIVERGENCE_CODES["tvd"])


def has_forward(divergence: int) -> bool:
    return divergence in _FORWARD


def has_reverse(divergence: int) -> bool:
    return divergence in _REVERSE


def is_pointwise(divergence: int) -> bool:
    """jsd and tvd: per-element terms that need the global normalizers (a third collective)."""
    return divergence in _POINTWISE


class SumLayout(NamedTuple):
    """Where phase 2's groups start in a row of ``count`` partial sums (-1: absent)."""

    std: int
    forward: int
    reverse: int
    labels: int
    count: int


def sum_layout(standardize: bool, has_labels: bool, divergence: int) -> SumLayout:
    """Phase 2's groups in this order: Za and Zb, the standardization's, forward KL's, reverse KL's,
    the CE's (``ZA`` ... above)."""
    kl_size = 5 if standardize else 3
    offsets, at = [], 2
    for present, size in ((standardize, 2), (has_forward(divergence), kl_size), (has_reverse(divergence), kl_size),
                          (has_labels, 4)):
        offsets.append(at if present else -1)
        at += size if present else 0
    return SumLayout(*offsets, count=at)


def pointwise_count(standardize: bool) -> int:
    """The pointwise phase's partial sums per row (``PW_LOSS`` ...)."""
    return 5 if standardize else 3
