"""Pooling a caption's K prompt scores per image into one score, and ranking the GT image.

For one caption, `scores[k, j]` is the similarity (cosine: both embeddings L2-normalised) of
prompt k with image j. Pooling reduces the K axis to one score per image:

- ``max``: ``max_k s[k, j]``
- ``mean``: ``mean_k s[k, j]``
- ``logsumexp`` with temperature ``tau > 0``: ``tau * log( (1/K) * sum_k exp(s[k, j] / tau) )``,
  i.e. ``tau * logsumexp(s / tau) - tau * log(K)``, a "log-mean-exp".

The ``- tau * log(K)`` shift is subtracted. It is the same constant for every image of a query,
so it changes no rank, but it keeps the pooled value on the cosine scale: it lies between the
mean and the max, tends to the max as tau -> 0 and to the mean as tau -> inf, and equals the
score itself when K = 1 or when all K scores are equal (so an identity-only or duplicated template
set reproduces the baseline scores exactly, not just its ranks).

Numerics: pooling runs in float64 on the float32 scores. For K below 2**29 the float64 sum of K
float32 values is exact, so ``mean`` of K identical scores returns the score bit for bit. The
log-mean-exp is computed as ``m + tau * log1p(mean(expm1((s - m) / tau)))`` with ``m`` the max,
which is stable for any tau and exact (= m) when all scores equal m.

Ranking uses the same tie policy as retrieval (`toolkit.retrieval`, "optimistic"): the rank of the
ground-truth image is 1 + the number of images whose pooled score is STRICTLY higher.

Mean pooling = CLIP's embedding-average ensemble. Since the dot product is linear,
``mean_k <t_k, x> = <mean_k t_k, x>``: mean pooling of the K prompt cosines equals scoring the
image against the average of the K normalised prompt embeddings (the zero-shot "prompt ensemble"
of the CLIP paper). CLIP re-normalises that average; dividing by its norm scales every image's
score for this query by the same positive number, so the per-query ranking is unchanged too. The
two computations are equal up to floating-point rounding (they add in a different order), so only
images whose scores are within rounding of each other (~1e-7 in float32) could swap.
`tests/test_improve_core.py` checks the equivalence.
"""

from __future__ import annotations

import numpy as np

POOLINGS = ("max", "mean", "logsumexp")


def pool_scores(scores, method: str, tau: float = 1.0) -> np.ndarray:
    """Pool `scores` of shape (..., K, M) over the K axis into (..., M) float64 scores."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim < 2:
        raise ValueError(f"scores must have shape (..., K, M), got {s.shape}")
    if s.shape[-2] == 0:
        raise ValueError("cannot pool zero prompts (K = 0)")
    if method == "max":
        return s.max(axis=-2)
    if method == "mean":
        return s.mean(axis=-2)
    if method == "logsumexp":
        if not tau > 0 or not np.isfinite(tau):
            raise ValueError(f"tau must be a positive finite number, got {tau}")
        m = s.max(axis=-2, keepdims=True)
        z = np.expm1((s - m) / tau).mean(axis=-2)
        return m[..., 0, :] + tau * np.log1p(z)
    raise ValueError(f"unknown pooling {method!r}; choose one of {', '.join(POOLINGS)}")


def gt_ranks(pooled, gt_index) -> np.ndarray:
    """Optimistic rank of each row's GT column: 1 + #columns with a strictly higher score.

    pooled: (N, M) scores; gt_index: (N,) column of each row's ground-truth image.
    """
    p = np.asarray(pooled)
    g = np.asarray(gt_index, dtype=np.int64)
    if p.ndim != 2 or g.shape != (p.shape[0],):
        raise ValueError(f"pooled must be (N, M) and gt_index (N,), got {p.shape} and {g.shape}")
    gt_score = p[np.arange(p.shape[0]), g]
    return 1 + (p > gt_score[:, None]).sum(axis=1).astype(np.int64)
