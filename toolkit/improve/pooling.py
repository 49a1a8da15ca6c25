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

Ranking (`gt_rank_counts`, the one ranking of improve's scores, whatever the method) counts as
retrieval does (`toolkit.retrieval.ranking`, `retrieval_ranks`): the optimistic rank of the ground-truth
image is 1 + the number of images whose score is STRICTLY higher, and ``n_tied`` the number of
OTHER images with exactly its score, so that ``rank + n_tied`` is the pessimistic rank (the worst
place the GT image could take among the images it ties with). A method whose scores tie the GT
image with others therefore cannot gain from it where the pessimistic count is read (views
`improvement_ties`, `improvement_recall`). Scores that are not finite (NaN, +-inf: a transform that
overflowed) are refused (`NonFiniteScores`): NaN compares false with everything, so it would rank 1.

Parameter ranges (`TAU_RANGE`, `BETA_RANGE`, `ALPHA_RANGE`; `clipfail improve` and the functions of
`toolkit.improve.stage` / `toolkit.improve.transforms` refuse values outside them): tau from 1e-6 to 1e6 (below,
logsumexp is max pooling to float64 precision; far above, (s - m) / tau underflows); beta of the
inverted softmax and QB-Norm from 1e-6 to 1e6 (below, beta times one float32 step of a cosine,
~6e-8, is lost in float64 rounding next to the normaliser log Z (~5-20), so distinct scores tie:
beta 1e-20 ties every image); alpha of query expansion from 0 to 1e6 (above, the caption's own
embedding is lost in float32 rounding next to the expansion, and near 3e38 it overflows).

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
TAU_RANGE = (1e-6, 1e6)  # logsumexp temperature (see the module docstring)
BETA_RANGE = (1e-6, 1e6)  # inverted-softmax / qb-norm
ALPHA_RANGE = (0.0, 1e6)  # query-expansion
DEFAULT_BETA = 20.0  # the QB-Norm paper's and code's default
DEFAULT_K_BANK = 1
DEFAULT_TOP = 3
DEFAULT_ALPHA = 0.5


class NonFiniteScores(ValueError):
    """Scores to rank hold NaN or an infinity (a transform overflowed or underflowed)."""

    def __init__(self, n_rows: int, n_values: int):
        self.n_rows, self.n_values = n_rows, n_values
        super().__init__(f"{n_values} scores of {n_rows} queries are not finite numbers (NaN or infinite)")


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


def gt_rank_counts(scores, gt_index) -> tuple[np.ndarray, np.ndarray]:
    """(optimistic rank, n_tied) of each row's GT column, as `retrieval_ranks` counts them: rank = 1 + #columns
    with a strictly higher score; n_tied = #OTHER columns with exactly the GT score (pessimistic rank =
    rank + n_tied). Refuses scores that are not finite (`NonFiniteScores`).

    scores: (N, M); gt_index: (N,) column of each row's ground-truth image.
    """
    p = np.asarray(scores)
    g = np.asarray(gt_index, dtype=np.int64)
    if p.ndim != 2 or g.shape != (p.shape[0],):
        raise ValueError(f"scores must be (N, M) and gt_index (N,), got {p.shape} and {g.shape}")
    finite = np.isfinite(p)
    if not finite.all():
        raise NonFiniteScores(int((~finite.all(axis=1)).sum()), int((~finite).sum()))
    gt_score = p[np.arange(p.shape[0]), g][:, None]
    higher = (p > gt_score).sum(axis=1).astype(np.int64)
    tied = (p == gt_score).sum(axis=1).astype(np.int64) - 1  # the GT column itself is not counted
    return 1 + higher, tied


def gt_ranks(pooled, gt_index) -> np.ndarray:
    """Optimistic rank of each row's GT column: 1 + #columns with a strictly higher score (`gt_rank_counts`)."""
    return gt_rank_counts(pooled, gt_index)[0]
