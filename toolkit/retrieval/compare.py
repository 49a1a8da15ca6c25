"""Paired comparison of two retrieval runs: does model B fix the failures of model A, or others?

`compare(con, run_a, run_b, ks=(1, 5, 10), seed=42)` compares two retrieval runs of the SAME subset
and direction (different models, weights or precision): every query has an exact rank in both, so
the outcomes are paired. It writes, in one transaction,

- a `runs` row (stage 'compare') with the config (the two run ids, K values, bootstrap seed and
  resamples) as canonical JSON and its hash,
- a `run_comparisons` row: the two runs, subset, direction, number of queries, K values,
- one `run_comparison_stats` row per K: hits of A and B, fixed (A miss -> B hit) and broken
  (A hit -> B miss) counts, a paired bootstrap 95% interval of ΔR@K = R@K(B) - R@K(A) in
  percentage points (`toolkit.stats.paired_bootstrap_ci`, 10,000 resamples, seeded) and the exact
  McNemar p-value (`toolkit.stats.mcnemar_exact`); the same statistics again on the pessimistic hits
  (gt_rank + n_tied <= K: a query whose ground truth ties with other items counts at the worst place
  among them), so that neither run gains from ties.

The numbers a report quotes come from the views, which read the ranks and the stored statistics:
`run_pairs` (per query: both ranks, the rank change, hit@1/5/10 of each run), `run_comparison`
(per comparison and K: R@K of each run, ΔR@K in pp with the stored interval and p-value, and the
counts of failures fixed, broken, shared and neither) and `failure_overlap_by_category` (A's
labelled R@1 failures per category: fixed by B or still failing in B; and B's labelled failures
that A retrieved at rank 1, i.e. broken). Ties: `run_comparison` headlines the pessimistic figures of
a comparison in which, for some K, either run's optimistic and pessimistic R@K differ by more than
0.01 pp (is_tie_affected; tie_count names the count used), as improvement_ties does for improvement runs.

Runs on different subsets or in different directions are refused. A run compared with itself (or
two runs with identical ranks) gives zero deltas, and the result says so. The same comparison
again is a no-op that returns the stored one (a comparison stored before ties were compared gets its
pessimistic statistics filled in, nothing else changes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from toolkit import stats
from toolkit.errors import UserError
from toolkit.store import db

STAGE = "compare"
DEFAULT_KS = (1, 5, 10)
MAX_K = 2**31 - 1
CI_LEVEL = 0.95
METHOD = "v1: paired hits on gt_rank <= K; multinomial paired bootstrap percentile CI; exact McNemar"


@dataclass
class CompareResult:
    run_comparison_id: int
    run_id: int
    is_noop: bool
    retrieval_run_a_id: int
    retrieval_run_b_id: int
    subset: str
    direction: str
    n_queries: int
    ks: list[int]
    is_same_run: bool
    is_identical_ranks: bool  # every query has the same rank in both runs: every delta is zero
    summary: pd.DataFrame  # this comparison's rows of the run_comparison view


def parse_ks(value) -> list[int]:
    """`"1,5,10"` (or a sequence of ints) -> sorted distinct K values, each from 1 to 2^31-1."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        if not value.strip() or any(not p for p in parts):
            raise UserError(f"--k must be comma-separated whole numbers such as 1,5,10, not {value!r}.")
        out = []
        for p in parts:
            try:
                out.append(int(p))
            except ValueError:
                raise UserError(f"--k must be comma-separated whole numbers such as 1,5,10; {p!r} is not.") from None
    else:
        out = [int(v) for v in value]
        if not out:
            raise UserError("Give at least one K (--k 1,5,10).")
    bad = [k for k in out if not 1 <= k <= MAX_K]
    if bad:
        raise UserError(f"--k values must be from 1 to {MAX_K}; got {', '.join(map(str, bad))}.")
    return sorted(set(out))


def _run_row(con, rrid: int, which: str) -> dict:
    rows = con.execute(
        """
        SELECT r.retrieval_run_id, r.subset_id, s.name AS subset, r.model, r.direction
        FROM retrieval_runs r JOIN subsets s USING (subset_id) WHERE r.retrieval_run_id = ?
        """,
        [int(rrid)],
    ).df()
    if rows.empty:
        known = [str(r[0]) for r in con.execute("SELECT retrieval_run_id FROM retrieval_runs ORDER BY 1").fetchall()]
        hint = f"Known retrieval runs: {', '.join(known)}." if known else "The database has no retrieval run yet."
        raise UserError(
            f'There is no retrieval run {rrid} ({which}). {hint} See: clipfail sql "SELECT * FROM recall_summary"'
        )
    return rows.iloc[0].to_dict()


def load_pair_ranks(con, run_a: int, run_b: int) -> pd.DataFrame:
    """query_id, rank_a, rank_b, n_tied_a, n_tied_b of two runs over the same queries (refused when the query
    sets differ)."""
    sql = "SELECT query_id, gt_rank, n_tied FROM retrieval_ranks WHERE retrieval_run_id = ? ORDER BY query_id"
    a = con.execute(sql, [int(run_a)]).df()
    b = con.execute(sql, [int(run_b)]).df()
    if len(a) != len(b) or not np.array_equal(a["query_id"].to_numpy(), b["query_id"].to_numpy()):
        only_a = len(set(a["query_id"]) - set(b["query_id"]))
        only_b = len(set(b["query_id"]) - set(a["query_id"]))
        raise UserError(
            f"Retrieval runs {run_a} and {run_b} do not rank the same queries ({only_a} only in run {run_a}, "
            f"{only_b} only in run {run_b}), so their outcomes cannot be paired. Evaluate both models on the "
            "same subset again (clipfail evaluate --subset NAME --model ...) and compare those runs."
        )
    return pd.DataFrame(
        {
            "query_id": a["query_id"].to_numpy(np.int64),
            "rank_a": a["gt_rank"].to_numpy(np.int64),
            "rank_b": b["gt_rank"].to_numpy(np.int64),
            "n_tied_a": a["n_tied"].to_numpy(np.int64),
            "n_tied_b": b["n_tied"].to_numpy(np.int64),
        }
    )


def _paired(ha: np.ndarray, hb: np.ndarray, seed: int, n_resamples: int) -> dict:
    lo, hi = stats.paired_bootstrap_ci(ha, hb, n_resamples=n_resamples, seed=seed, level=CI_LEVEL)
    return {
        "hits_a": int(ha.sum()),
        "hits_b": int(hb.sum()),
        "n_fixed": int((~ha & hb).sum()),
        "n_broken": int((ha & ~hb).sum()),
        "ci_low_pp": 100 * lo,
        "ci_high_pp": 100 * hi,
        "mcnemar_p": stats.mcnemar_exact(ha, hb),
    }


PESSIMISTIC = ("hits_a", "hits_b", "n_fixed", "n_broken", "ci_low_pp", "ci_high_pp", "mcnemar_p")


def compute_stats(
    rank_a: np.ndarray,
    rank_b: np.ndarray,
    ks,
    seed: int,
    n_resamples: int = stats.BOOTSTRAP_RESAMPLES,
    n_tied_a: np.ndarray | None = None,
    n_tied_b: np.ndarray | None = None,
) -> pd.DataFrame:
    """run_comparison_stats rows (without run_comparison_id), one per K: the optimistic statistics (rank <= K)
    and, given the tie counts, the pessimistic ones (rank + n_tied <= K; the `*_pessimistic` columns)."""
    rows = []
    for k in ks:
        row = {"k": int(k), "n": int(len(rank_a))}
        row |= _paired(rank_a <= k, rank_b <= k, seed, n_resamples)
        row |= {"ci_level": CI_LEVEL, "bootstrap_resamples": int(n_resamples), "bootstrap_seed": int(seed)}
        if n_tied_a is not None and n_tied_b is not None:
            pess = _paired(rank_a + n_tied_a <= k, rank_b + n_tied_b <= k, seed, n_resamples)
            row |= {f"{name}_pessimistic": pess[name] for name in PESSIMISTIC}
        rows.append(row)
    return pd.DataFrame(rows)


def _fill_pessimistic(con, cid: int, pairs: pd.DataFrame, ks, seed: int, n_resamples: int) -> None:
    """A comparison stored before ties were compared: add its pessimistic statistics (nothing else changes)."""
    missing = con.execute(
        "SELECT count(*) FROM run_comparison_stats WHERE run_comparison_id = ? AND mcnemar_p_pessimistic IS NULL",
        [cid],
    ).fetchone()[0]
    if not missing:
        return
    st = compute_stats(
        pairs["rank_a"].to_numpy(), pairs["rank_b"].to_numpy(), ks, seed, n_resamples,
        pairs["n_tied_a"].to_numpy(), pairs["n_tied_b"].to_numpy(),
    )  # fmt: skip
    cols = [f"{name}_pessimistic" for name in PESSIMISTIC]
    sets = ", ".join(f"{c} = ?" for c in cols)
    with db.transaction(con):
        for row in st.to_dict("records"):
            con.execute(
                f"UPDATE run_comparison_stats SET {sets} WHERE run_comparison_id = ? AND k = ?",
                [row[c] for c in cols] + [cid, int(row["k"])],
            )


def summary(con, run_comparison_id: int) -> pd.DataFrame:
    """This comparison's rows of the run_comparison view (one per K)."""
    return con.execute(
        "SELECT * FROM run_comparison WHERE run_comparison_id = ? ORDER BY k", [int(run_comparison_id)]
    ).df()


def compare(
    con,
    run_a: int,
    run_b: int,
    ks=DEFAULT_KS,
    *,
    seed: int = 42,
    n_resamples: int = stats.BOOTSTRAP_RESAMPLES,
) -> CompareResult:
    """Compare retrieval run B against run A (B minus A); see the module docstring."""
    started = db.now()
    ks = parse_ks(ks)
    if not 0 <= int(seed) <= 2**32 - 1:
        raise UserError("--seed must be from 0 to 2^32-1.")
    if n_resamples < 1:
        raise UserError("The number of bootstrap resamples must be at least 1.")
    a = _run_row(con, run_a, "run A")
    b = _run_row(con, run_b, "run B")
    if int(a["subset_id"]) != int(b["subset_id"]):
        raise UserError(
            f"Retrieval run {run_a} is on subset {a['subset']!r} and run {run_b} on subset {b['subset']!r}: "
            "a paired comparison needs the same queries and gallery. Evaluate both models on one subset "
            f"(clipfail evaluate --subset {a['subset']} --model ...) and compare those runs."
        )
    if a["direction"] != b["direction"]:
        raise UserError(
            f"Retrieval run {run_a} is {a['direction']} and run {run_b} is {b['direction']}: their queries differ "
            "(captions vs images). Compare two runs of the same direction (clipfail evaluate --direction ...)."
        )
    pairs = load_pair_ranks(con, run_a, run_b)
    if pairs.empty:
        raise UserError(f"Retrieval runs {run_a} and {run_b} have no ranked queries to compare.")
    rank_a, rank_b = pairs["rank_a"].to_numpy(), pairs["rank_b"].to_numpy()
    is_same = int(run_a) == int(run_b)
    identical = bool(np.array_equal(rank_a, rank_b))
    config = {
        "retrieval_run_a_id": int(run_a),
        "retrieval_run_b_id": int(run_b),
        "ks": ks,
        "bootstrap_seed": int(seed),
        "bootstrap_resamples": int(n_resamples),
        "ci_level": CI_LEVEL,
        "method": METHOD,
    }
    chash = db.config_hash(config)
    existing = con.execute(
        "SELECT run_comparison_id, run_id FROM run_comparisons WHERE config_hash = ? ORDER BY 1 LIMIT 1", [chash]
    ).fetchone()
    common = dict(
        retrieval_run_a_id=int(run_a),
        retrieval_run_b_id=int(run_b),
        subset=str(a["subset"]),
        direction=str(a["direction"]),
        n_queries=len(pairs),
        ks=ks,
        is_same_run=is_same,
        is_identical_ranks=identical,
    )
    if existing is not None:
        cid, run_id = int(existing[0]), int(existing[1])
        if not db.is_read_only(con):
            _fill_pessimistic(con, cid, pairs, ks, int(seed), int(n_resamples))
        return CompareResult(cid, run_id, True, summary=summary(con, cid), **common)

    st = compute_stats(
        rank_a, rank_b, ks, seed, n_resamples, pairs["n_tied_a"].to_numpy(), pairs["n_tied_b"].to_numpy()
    )
    with db.transaction(con):
        run_id = db.insert_run(con, STAGE, config | {"subset": str(a["subset"])}, started, seed=int(seed))
        cid = con.execute(
            """
            INSERT INTO run_comparisons (retrieval_run_a_id, retrieval_run_b_id, subset_id, direction, n_queries, ks,
                                         is_same_run, config_hash, created_at, run_id)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING run_comparison_id
            """,
            [
                int(run_a),
                int(run_b),
                int(a["subset_id"]),
                str(a["direction"]),
                len(pairs),
                ",".join(map(str, ks)),
                is_same,
                chash,
                db.now(),
                run_id,
            ],
        ).fetchone()[0]
        db.insert_df(con, "run_comparison_stats", st.assign(run_comparison_id=np.int64(cid)))
    return CompareResult(int(cid), run_id, False, summary=summary(con, cid), **common)
