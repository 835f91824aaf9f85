"""The per-row coefficient tensor of the vocabulary-parallel phases 2 and 3: its columns, defined once.

The global statistics (phase 1) and the global sums (phase 2) reach each local phase as columns of a
small (N, C) tensor in the accumulation dtype; nothing is read back on the host. Both phase backends
(``phases.py``: PyTorch; ``_triton/vocab_parallel.py``: Triton) read the columns by these names.
"""

# Phase 2's columns (``SUMS_COLUMNS`` of them): the shifts and scales of a = (x - shift_x) ka and
# b = (y - shift_y) kb, the exponentials' shifts a_max and b_max, sigma of x and y (1 unstandardized),
# the student's raw max (the CE's shift) and whether this rank owns the row's label (0/1).
SHIFT_X, SHIFT_Y, KA, KB, A_MAX, B_MAX, SIGMA_X, SIGMA_Y, MAX_X, OWNS = range(10)
SUMS_COLUMNS = 10
# Phase 3 adds: 1/Za, 1/Zb, the chain rule's factors, log(Za e^a_max / (Zb e^b_max)), KL, the
# log-sum-exp of the CE, label_smoothing / V, and whether the row is included (0/1).
INV_ZA, INV_ZB, FACTOR_X, FACTOR_Y, LOG_RATIO, KL, LSE, SMOOTH_OVER_V, KEEP = range(10, 19)
GRADS_COLUMNS = 19

# Phase 1's output: per row, for x then y, the slice's mean, scale c = max|v - mean|, scaled sum of
# squares sum((v - mean) / c)^2 and max (float64).
STATS_PER_INPUT = 4
STATS_COLUMNS = 2 * STATS_PER_INPUT


def sums_count(standardize: bool, has_labels: bool) -> int:
    """Phase 2's partial sums per row: Za, Zb, sum e^b (b - a); with standardization sum e^a u,
    sum e^b u, sum e^b w, sum e^b (b - a) w; with labels sum e^(x - max x), the owned label logit,
    the ownership flag and sum x."""
    return 3 + 4 * standardize + 4 * has_labels


# Phase 2's partial sums, by position in a row of ``sums_count`` of them: always the first three,
# then the standardization's four (when standardizing), then the CE's four, counted from the end.
ZA, ZB, SUM_PD = 0, 1, 2  # sum e^(a - a_max), sum e^(b - b_max), sum e^(b - b_max) (b - a)
SUM_AU, SUM_BU, SUM_BW, SUM_BDW = 3, 4, 5, 6  # ... times u (x's z-score) or w (y's)
ZC, X_LABEL, OWNERS, SUM_X = -4, -3, -2, -1  # sum e^(x - max x), the label's logit, its owner count, sum x
