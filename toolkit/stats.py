"""Statistics for paired retrieval outcomes and for annotator agreement.

Paired outcomes: for the same n captions, a baseline and an improved method each either hit
(GT rank <= K) or miss. `paired_bootstrap_ci` gives a percentile interval for the difference of
their Recall@K, `mcnemar_exact` an exact test of "no difference".

Agreement: `cohen_kappa` (two raters) and `fleiss_kappa` / `fleiss_kappa_table` (any fixed number
of raters per item).
Degenerate case, for both: when the expected (chance) agreement is exactly 1, i.e. every label
given is the same single category, kappa = 0/0 is undefined and these functions return NaN (the
SQL view `annotator_agreement` returns NULL in the same case). With no items they return NaN too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000


def paired_bootstrap_ci(
    base_hits,
    new_hits,
    *,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 42,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval for mean(new_hits) - mean(base_hits), resampling pairs.

    Returns (low, high) as fractions (multiply by 100 for percentage points); (nan, nan) for n = 0.

    A bootstrap resample draws n caption indices with replacement and recomputes the mean of
    d = new - base over them. d takes only the values -1, 0 and +1, so a resample's mean depends
    only on how many of each it drew: (c(+1) - c(-1)) / n with (c(-1), c(0), c(+1)) multinomial
    with n trials and the observed proportions. Drawing those counts (`Generator.multinomial`,
    seeded with `seed`) is the same distribution as drawing indices, in O(n_resamples) memory and
    time whatever n is. The interval is the (1-level)/2 and (1+level)/2 quantiles of the
    resampled means (numpy's default linear interpolation).
    """
    b = np.asarray(base_hits, dtype=bool)
    a = np.asarray(new_hits, dtype=bool)
    if b.shape != a.shape or b.ndim != 1:
        raise ValueError(f"hit vectors must be 1-D and the same length, got {b.shape} and {a.shape}")
    if not 0 < level < 1:
        raise ValueError("level must be between 0 and 1")
    n = b.size
    if n == 0:
        return (float("nan"), float("nan"))
    d = a.astype(np.int8) - b.astype(np.int8)
    counts = np.array([(d == -1).sum(), (d == 0).sum(), (d == 1).sum()], dtype=np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, counts / n, size=n_resamples)
    means = (draws[:, 2] - draws[:, 0]) / n
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return (float(lo), float(hi))


def mcnemar_exact(base_hits, new_hits) -> float:
    """Exact two-sided McNemar p-value for paired hit/miss outcomes.

    With b = #(baseline hit, improved miss) and c = #(baseline miss, improved hit), under the null
    hypothesis each of the b + c discordant pairs is equally likely to go either way, so
    p = min(1, 2 * P[Binomial(b + c, 1/2) <= min(b, c)]). It equals the two-sided
    `scipy.stats.binomtest(min(b, c), b + c, 0.5)` p-value. With no discordant pair, p = 1.
    Computed exactly with integers (no scipy needed).
    """
    b_ = np.asarray(base_hits, dtype=bool)
    a_ = np.asarray(new_hits, dtype=bool)
    if b_.shape != a_.shape or b_.ndim != 1:
        raise ValueError(f"hit vectors must be 1-D and the same length, got {b_.shape} and {a_.shape}")
    b = int((b_ & ~a_).sum())
    c = int((~b_ & a_).sum())
    return mcnemar_exact_counts(b, c)


def mcnemar_exact_counts(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the two discordant counts (see `mcnemar_exact`)."""
    if b < 0 or c < 0:
        raise ValueError("counts must be non-negative")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    term = tail = 1  # C(n, 0); then C(n, i+1) = C(n, i) * (n - i) / (i + 1), exact in integers
    for i in range(k):
        term = term * (n - i) // (i + 1)
        tail += term
    # Python divides big integers with correct rounding
    return min(1.0, 2 * tail / 2**n)


def paired_outcomes(base_hits, new_hits, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 42) -> dict:
    """The stored statistics of one paired delta (improvement_stats, improvement_stats_extended): hits before and
    after, captions fixed (miss -> hit) and broken (hit -> miss), the `paired_bootstrap_ci` bounds in pp and the
    `mcnemar_exact` p-value."""
    b = np.asarray(base_hits, dtype=bool)
    a = np.asarray(new_hits, dtype=bool)
    lo, hi = paired_bootstrap_ci(b, a, n_resamples=n_resamples, seed=seed)
    return {
        "baseline_hits": int(b.sum()),
        "improved_hits": int(a.sum()),
        "n_fixed": int((~b & a).sum()),
        "n_broken": int((b & ~a).sum()),
        "ci_low_pp": 100 * lo,
        "ci_high_pp": 100 * hi,
        "mcnemar_p": mcnemar_exact(b, a),
    }


def cohen_kappa(labels_a: Sequence, labels_b: Sequence) -> float:
    """Cohen's kappa of two raters' categorical labels on the same items.

    kappa = (p_o - p_e) / (1 - p_e), p_o = share of items with equal labels,
    p_e = sum over categories of (share of a's labels) * (share of b's labels).
    NaN when there are no items or p_e = 1 (see the module docstring).
    """
    a = list(labels_a)
    b = list(labels_b)
    if len(a) != len(b):
        raise ValueError(f"the two raters labelled different numbers of items ({len(a)} and {len(b)})")
    n = len(a)
    if n == 0:
        return float("nan")
    p_o = sum(x == y for x, y in zip(a, b)) / n
    cats = set(a) | set(b)
    p_e = sum((a.count(c) / n) * (b.count(c) / n) for c in cats)
    if p_e >= 1.0:
        return float("nan")
    return (p_o - p_e) / (1 - p_e)


def fleiss_kappa_table(counts) -> float:
    """Fleiss' kappa from an items x categories table of how many raters chose each category.

    Every item must have the same number of raters n >= 2. With N items:
    P_i = (sum_j n_ij^2 - n) / (n (n - 1)), P_bar = mean_i P_i, p_j = sum_i n_ij / (N n),
    P_e = sum_j p_j^2, kappa = (P_bar - P_e) / (1 - P_e). NaN for no items or P_e = 1.
    """
    t = np.asarray(counts, dtype=np.float64)
    if t.ndim != 2:
        raise ValueError(f"counts must be a 2-D items x categories table, got shape {t.shape}")
    if t.shape[0] == 0:
        return float("nan")
    if (t < 0).any():
        raise ValueError("counts must be non-negative")
    per_item = t.sum(axis=1)
    n = per_item[0]
    if not (per_item == n).all():
        raise ValueError("every item must have the same number of raters")
    if n < 2:
        raise ValueError("Fleiss' kappa needs at least two raters per item")
    N = t.shape[0]
    P_i = ((t * t).sum(axis=1) - n) / (n * (n - 1))
    P_bar = P_i.mean()
    p_j = t.sum(axis=0) / (N * n)
    P_e = float((p_j * p_j).sum())
    if P_e >= 1.0:
        return float("nan")
    return float((P_bar - P_e) / (1 - P_e))


def fleiss_kappa(item_labels: Sequence[Sequence]) -> float:
    """Fleiss' kappa from each item's list of labels, one per rater (the same count for every item).

    `fleiss_kappa([["Object", "Object", "Action"], ["Count", "Count", "Count"], ...])`; see
    `fleiss_kappa_table` for the formula.
    """
    items = [list(x) for x in item_labels]
    cats = sorted({lab for item in items for lab in item}, key=str)
    index = {c: j for j, c in enumerate(cats)}
    table = np.zeros((len(items), len(cats)), dtype=np.int64)
    for i, item in enumerate(items):
        for lab in item:
            table[i, index[lab]] += 1
    return fleiss_kappa_table(table)
