"""Training-free score transforms against hubness, and query expansion, ranked exactly in bounded memory.

A hub is a gallery item that is the nearest neighbour of many queries (views `image_hubness`,
`hubness_summary` measure it). The methods below change a query's scores against the gallery
without retraining; each is a pure function of blocks of scores, and `rank_*` ranks a set of
queries against the WHOLE gallery with them, a block of `retrieval.MM_ROWS` queries at a time, with
the very GEMM blocks `evaluate` ranks with (`toolkit.retrieval.ranking`, "Exactness"): a raw score here is
bit for bit the score evaluate compared.

Notation: s_qj is the float32 score (dot product) of query q and gallery item j; a bank is a set of
queries B (never the evaluated ones, see `clipfail improve --method qb-norm`), and
log Z_j = log sum_{b in B} exp(beta * s_bj) is gallery item j's column-wise softmax normaliser.

- Inverted softmax (Smith et al., ICLR 2017): s'_qj = exp(beta s_qj) / Z_j, with the normaliser taken
  over a set of queries (improve uses every caption of the retrieval run, the transductive setting of
  the paper). Ranked in the log domain: t_qj = beta * s_qj - log Z_j (float64), which orders exactly
  as the ratio (log is increasing) and never overflows. beta must be > 0: at beta = 0 every
  exp(0)/Z_j is the same 1/|B| and all items tie, so the method is undefined there, not the baseline.
- QB-Norm with the Dynamic Inverted Softmax (Bogolin et al., CVPR 2022; as in the authors' code,
  github.com/ioanacroi/qb-norm): the activation set A is the union of the top-`k_bank` gallery items
  of every bank query. A query whose own top-1 item is in A gets the inverted-softmax scores over
  the bank (t_qj above, the whole row); any other query keeps its raw scores s_qj. A bank whose
  top-k items are never an evaluated query's top-1 (an empty effect) therefore changes no rank.
  Ties: a bank query's top-k and a query's top-1 follow `toolkit.retrieval.ranking`'s top-k rule (descending
  score, the lower gallery index first).
- Query expansion (Rocchio-style pseudo-relevance feedback; alpha query expansion): a query moves
  towards the mean of its top-`top` gallery embeddings under the raw scores,
  q' = q + alpha * mean(g_j for j in top-T(q)), computed in float32, then scored with the same GEMM
  blocks. q' is not re-normalised: a positive scale changes no rank, and alpha = 0 gives q
  exactly, so it reproduces the baseline bit for bit.

Ranks follow the retrieval tie policy ("optimistic"): 1 + the number of gallery items whose
transformed score is strictly higher than the ground-truth item's; `n_tied` counts the other items
with exactly the same transformed score (`pooling.gt_rank_counts`, the one ranking improve uses, so
rank + n_tied is the pessimistic rank). A transform that gives NaN or an infinity is refused
(`pooling.NonFiniteScores`), and so are parameters outside `pooling.BETA_RANGE` / `ALPHA_RANGE`.

Memory: each worker thread (torch's thread count) holds one MM_ROWS x M float32 score block and a
few float64 temporaries of the same shape (about 30 bytes x 512 x M: ~80 MB for a 5,000-image
gallery), plus float64 vectors of M; the outputs are a few numbers per query. It does not grow with
the number of queries or bank rows (benchmarks/hubness.py measures it).
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from toolkit.improve import pooling
from toolkit.retrieval import ranking as R

DEFAULT_BETA, DEFAULT_K_BANK = pooling.DEFAULT_BETA, pooling.DEFAULT_K_BANK
DEFAULT_TOP, DEFAULT_ALPHA = pooling.DEFAULT_TOP, pooling.DEFAULT_ALPHA


# ------------------------------------------------------------------------------ pure block functions


def inverted_softmax(S: np.ndarray, log_norm: np.ndarray, beta: float) -> np.ndarray:
    """Log-domain inverted softmax of a block of scores: beta * s_qj - log Z_j (float64)."""
    return beta * S.astype(np.float64) - log_norm[None, :]


def dynamic_inverted_softmax(S: np.ndarray, log_norm: np.ndarray, activated: np.ndarray, beta: float) -> np.ndarray:
    """QB-Norm's DIS on a block: rows whose top-1 (argmax, lowest index among ties) is in `activated`
    (bool, one per gallery item) get `inverted_softmax`, the others their raw scores (float64)."""
    out = S.astype(np.float64)
    rows = np.flatnonzero(activated[np.argmax(S, axis=1)])
    if rows.size:
        out[rows] = beta * out[rows] - log_norm[None, :]
    return out


def stable_topk(S: np.ndarray, k: int) -> np.ndarray:
    """Indices of each row's k highest scores, descending, the lower index first among equal scores
    (`toolkit.retrieval.ranking`'s top-k rule; a stable descending sort cut at k)."""
    rows, M = S.shape
    k = min(k, M)
    top = R._NumpyRows(M, k)
    tv = np.empty((rows, k), np.float32)
    ti = np.empty((rows, k), np.int64)
    buf = np.empty((rows, M), dtype=bool)
    top._topk(np.ascontiguousarray(S, dtype=np.float32), buf, tv, ti)
    return ti


def expand_queries(Q: np.ndarray, S: np.ndarray, gallery: np.ndarray, top: int, alpha: float) -> np.ndarray:
    """Rocchio / alpha query expansion of a block: q + alpha * mean of the top-`top` gallery rows by S (float32)."""
    ti = stable_topk(S, top)
    centroid = gallery[ti].mean(axis=1, dtype=np.float32)
    return (Q.astype(np.float32) + np.float32(alpha) * centroid).astype(np.float32)


def ranks_from_scores(T: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gt_rank, n_tied, gt_score) of each row of transformed scores T against its one GT column
    (`pooling.gt_rank_counts`: a NaN or infinite score is refused)."""
    rank, tied = pooling.gt_rank_counts(T, gt)
    return rank, tied, T[np.arange(T.shape[0]), gt].astype(np.float64)


# ------------------------------------------------------------------------------ streaming


def _check(queries, gallery, name="queries"):
    Q = np.ascontiguousarray(queries, dtype=np.float32)
    G = np.ascontiguousarray(gallery, dtype=np.float32)
    if Q.ndim != 2 or G.ndim != 2 or Q.shape[1] != G.shape[1]:
        raise ValueError(f"{name} ({Q.shape}) and gallery ({G.shape}) must be 2-D with the same dimension")
    if G.shape[0] == 0:
        raise ValueError("the gallery is empty")
    if not (np.isfinite(Q).all() and np.isfinite(G).all()):
        raise ValueError(f"{name} or gallery contain NaN or infinite values")
    return Q, G


def _blocks(Q: np.ndarray, G: np.ndarray, fn: Callable[[int, int, np.ndarray], object], workers: int | None = None):
    """Call fn(b, e, S) for each MM_ROWS block of Q (rows b..e, S = their float32 scores against G,
    from `retrieval._scores`: evaluate's GEMM shape and alignment), on CPU threads. Returns the results
    in block order. torch's thread count is 1 while the workers run (as in retrieval._rank_cpu)."""
    N, d = Q.shape
    M = G.shape[0]
    Qt = torch.from_numpy(Q)
    Gt = torch.from_numpy(G).T
    threads = torch.get_num_threads()
    workers = max(1, min(workers or threads, -(-N // R.MM_ROWS) or 1))
    free: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(workers):
        free.put((torch.empty((R.MM_ROWS, d)), torch.empty((R.MM_ROWS, M))))

    def task(b: int):
        q_buf, s_buf = free.get()
        try:
            with torch.inference_mode():
                n = R._scores(Qt, Gt, b, q_buf, s_buf)
            return fn(b, b + n, s_buf[:n].numpy())
        finally:
            free.put((q_buf, s_buf))

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            return [f.result() for f in [pool.submit(task, b) for b in range(0, N, R.MM_ROWS)]]
    finally:
        torch.set_num_threads(threads)


def raw_scores(queries, gallery) -> np.ndarray:
    """Scores of a few queries (float32), bit for bit evaluate's (same GEMM blocks)."""
    Q, G = _check(queries, gallery)
    out = np.empty((Q.shape[0], G.shape[0]), np.float32)

    def fn(b, e, S):
        out[b:e] = S

    _blocks(Q, G, fn)
    return out


@dataclass
class BankStats:
    """What a query bank contributes: column-wise log-normaliser and activation set (bool per item)."""

    log_norm: np.ndarray  # float64 (M,): log sum_b exp(beta s_bj)
    activated: np.ndarray  # bool (M,): in the top-k_bank of some bank query
    n_bank: int
    beta: float
    k_bank: int

    @property
    def n_activated(self) -> int:
        return int(self.activated.sum())


def bank_stats(bank, gallery, beta: float, k_bank: int = DEFAULT_K_BANK) -> BankStats:
    """One pass over the bank: the column-wise log-sum-exp of beta * scores, and the union of each bank
    query's top-k_bank items. The blocks' partial results are folded in bank order (deterministic)."""
    _check_beta(beta)
    if int(k_bank) < 1:
        raise ValueError("k_bank must be >= 1")
    B, G = _check(bank, gallery, "bank")
    if B.shape[0] == 0:
        raise ValueError("the bank is empty")
    M = G.shape[0]

    def fn(b, e, S):
        x = beta * S.astype(np.float64)
        bm = x.max(axis=0)
        part = (bm, np.exp(x - bm).sum(axis=0))
        act = np.zeros(M, dtype=bool)
        act[stable_topk(S, int(k_bank)).reshape(-1)] = True
        return part, act

    parts = _blocks(B, G, fn)
    state = None
    activated = np.zeros(M, dtype=bool)
    for (bm, bs), act in parts:
        activated |= act
        if state is None:
            state = (bm, bs)
        else:
            m, s = state
            new_m = np.maximum(m, bm)
            state = (new_m, s * np.exp(m - new_m) + bs * np.exp(bm - new_m))
    m, s = state
    return BankStats(m + np.log(s), activated, B.shape[0], float(beta), int(k_bank))


def _check_beta(beta) -> None:
    lo, hi = pooling.BETA_RANGE
    if not (isinstance(beta, (int, float)) and np.isfinite(beta) and lo <= beta <= hi):
        raise ValueError(
            f"beta must be a finite number from {lo:g} to {hi:g} (got {beta!r}); at beta 0 every item ties, and "
            "so it does, through rounding, at a tiny beta"
        )


@dataclass
class MethodRanks:
    gt_rank: np.ndarray  # int64
    n_tied: np.ndarray  # int64
    gt_score: np.ndarray  # float64: the transformed score of the GT item
    n_normalised: int = 0  # queries whose scores were re-normalised (qb-norm: top-1 activated)


def _rank_with(Q, G, gt, transform: Callable[[int, int, np.ndarray], np.ndarray]) -> MethodRanks:
    gt = np.asarray(gt, dtype=np.int64)
    if gt.shape != (Q.shape[0],) or (gt.size and (gt.min() < 0 or gt.max() >= G.shape[0])):
        raise ValueError("gt must hold one gallery index in [0, M) per query")
    N = Q.shape[0]
    out = MethodRanks(np.empty(N, np.int64), np.empty(N, np.int64), np.empty(N, np.float64))

    def fn(b, e, S):
        T = transform(b, e, S)
        out.gt_rank[b:e], out.n_tied[b:e], out.gt_score[b:e] = ranks_from_scores(T, gt[b:e])

    if N:
        _blocks(Q, G, fn)
    return out


def rank_baseline(queries, gallery, gt) -> MethodRanks:
    """The raw scores' ranks (evaluate's gt_rank and n_tied for single-GT queries)."""
    Q, G = _check(queries, gallery)
    return _rank_with(Q, G, gt, lambda b, e, S: S.astype(np.float64))


def rank_inverted_softmax(queries, gallery, gt, norm_queries, beta: float = DEFAULT_BETA) -> MethodRanks:
    """Inverted softmax with the normaliser over `norm_queries` (e.g. every query of the run)."""
    st = bank_stats(norm_queries, gallery, beta, 1)
    Q, G = _check(queries, gallery)
    r = _rank_with(Q, G, gt, lambda b, e, S: inverted_softmax(S, st.log_norm, beta))
    r.n_normalised = Q.shape[0]
    return r


def rank_qb_norm(queries, gallery, gt, bank, beta: float = DEFAULT_BETA, k_bank: int = DEFAULT_K_BANK) -> MethodRanks:
    """QB-Norm with the Dynamic Inverted Softmax over a query bank (see the module docstring)."""
    st = bank_stats(bank, gallery, beta, k_bank)
    return rank_qb_norm_with(queries, gallery, gt, st)


def rank_qb_norm_with(queries, gallery, gt, st: BankStats) -> MethodRanks:
    Q, G = _check(queries, gallery)
    counts = []

    def transform(b, e, S):
        counts.append(int(st.activated[np.argmax(S, axis=1)].sum()))
        return dynamic_inverted_softmax(S, st.log_norm, st.activated, st.beta)

    r = _rank_with(Q, G, gt, transform)
    r.n_normalised = sum(counts)
    return r


def rank_query_expansion(queries, gallery, gt, top: int = DEFAULT_TOP, alpha: float = DEFAULT_ALPHA) -> MethodRanks:
    """Rocchio-style query expansion (see the module docstring), scored with evaluate's GEMM blocks."""
    if int(top) < 1:
        raise ValueError("top must be >= 1")
    lo, hi = pooling.ALPHA_RANGE
    if not (np.isfinite(alpha) and lo <= alpha <= hi):
        raise ValueError(f"alpha must be a finite number from {lo:g} to {hi:g}")
    Q, G = _check(queries, gallery)
    return _rank_with(Q, G, gt, lambda b, e, S: expanded_scores(Q[b:e], S, G, top, alpha))


def expanded_scores(Q: np.ndarray, S: np.ndarray, G: np.ndarray, top: int, alpha: float) -> np.ndarray:
    """The scores (float64) of a block of at most MM_ROWS queries expanded with `expand_queries` (S: their raw
    scores), made with evaluate's GEMM block."""
    Qe = expand_queries(Q, S, G, int(top), float(alpha))
    M, d = G.shape
    q_buf, s_buf = torch.empty((R.MM_ROWS, d)), torch.empty((R.MM_ROWS, M))
    with torch.inference_mode():
        n = R._scores(torch.from_numpy(Qe), torch.from_numpy(G).T, 0, q_buf, s_buf)
    return s_buf[:n].numpy().astype(np.float64)


# ------------------------------------------------------------------------------ combinations with templates


def pooled_transform(st: BankStats, method: str) -> Callable[[np.ndarray], np.ndarray]:
    """The score transform that `templates+<method>` applies to a block of POOLED prompt scores (one row per
    caption, one column per image, after max/mean/logsumexp pooling): the inverted softmax, or the Dynamic
    Inverted Softmax whose test is the pooled row's top-1, with the normaliser and activation set `st` of the
    bank's own (un-templated) captions."""
    if method == "inverted-softmax":
        return lambda pooled: inverted_softmax(pooled, st.log_norm, st.beta)
    if method == "qb-norm":
        return lambda pooled: dynamic_inverted_softmax(pooled, st.log_norm, st.activated, st.beta)
    raise ValueError(f"no templates combination for {method!r}")
