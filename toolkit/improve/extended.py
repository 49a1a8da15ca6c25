"""Improvement runs with extended positives counted (issue 27, part 5).

COCO pairs each caption with one image, so a fix that moves another image the caption describes just as well
(a verified positive of ECCV Caption or CxC, `toolkit.retrieval.positives`) above the caption's own image loses
R@1, and one that swaps such an image for the caption's own gains it, though neither changed whether a valid image
is on top. When the run's subset has imported positives, `improve` also ranks, on the method's very scores and
with the very ranking of the caption's own image (`pooling.gt_rank_counts`), every extended positive of each
caption (the text-to-image pairs of every positive set of the subset, other than the caption's own image), and
stores them in `improvement_positive_ranks`. The view `improvement_hits_extended` then says, per positive set,
caption and K, whether ANY positive is within K before (the retrieval run's ranks: improvement_ranks for the own
image, positive_ranks for the others) and after, under both tie counts; the paired statistics of those hits
(`toolkit.stats.paired_outcomes`, as for improvement_stats) are stored per positive set and K in
`improvement_stats_extended`, and the view `improvement_recall_extended` gives R@K, delta, interval and McNemar.

A run made before an import has none of these rows: the same `clipfail improve` again (its units are reused)
scores its captions again, checks that the caption's own image gets the stored rank and tie count back (else
nothing is written), and stores the missing ranks and statistics. A subset without positives gets no row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from toolkit import stats
from toolkit.errors import UserError
from toolkit.improve import pooling


@dataclass
class Plan:
    """What one improve call does about extended positives."""

    has_sets: bool  # the retrieval run's subset has some positive set
    pending: dict[int, bool] = field(default_factory=dict)  # reused improvement id -> its captions need scores again
    pairs: dict[str, pd.DataFrame] | None = None  # population -> its captions' extended positives (row, col, ids)
    ranks: dict = field(default_factory=dict)  # (population, variant) -> improved ranks of those pairs
    ids: dict[str, int] = field(default_factory=dict)  # unit config hash -> its improvement id (new or reused)
    reused: set[str] = field(default_factory=set)  # config hashes of the reused units

    def needs_scores(self, improvement_id) -> bool:
        return improvement_id is not None and self.pending.get(int(improvement_id), False)


def plan(con, retrieval_run_id: int, reused_ids) -> Plan:
    """Whether the subset has positives, and which reused improvement runs lack extended figures."""
    has = con.execute(
        "SELECT count(*) FROM positive_sets p JOIN retrieval_runs r USING (subset_id) WHERE r.retrieval_run_id = ?",
        [int(retrieval_run_id)],
    ).fetchone()[0]
    return Plan(bool(has), pending(con, reused_ids) if has else {})


def pending(con, improvement_ids) -> dict[int, bool]:
    """{improvement id: True when some extended positive of its captions has no improved rank (its method must
    score again), False when only the statistics of some positive set are missing}; runs with nothing missing,
    or whose subset has no positives, are left out."""
    ids = [int(i) for i in improvement_ids]
    if not ids:
        return {}
    rows = con.execute(
        """
        WITH u AS (
            SELECT u.improvement_id, r.subset_id FROM improvement_runs u JOIN retrieval_runs r USING (retrieval_run_id)
            WHERE list_contains(?, u.improvement_id)
        ),
        no_stats AS (
            SELECT DISTINCT u.improvement_id FROM u JOIN positive_sets p USING (subset_id)
            ANTI JOIN improvement_stats_extended s
                ON s.improvement_id = u.improvement_id AND s.positive_set_id = p.positive_set_id
        ),
        no_ranks AS (
            SELECT DISTINCT p.improvement_id
            FROM improvement_positives p
            ANTI JOIN improvement_positive_ranks k
                ON k.improvement_id = p.improvement_id AND k.caption_id = p.caption_id AND k.positive_id = p.positive_id
            WHERE NOT p.is_own_image AND list_contains(?, p.improvement_id)
        )
        SELECT improvement_id, improvement_id IN (SELECT improvement_id FROM no_ranks) AS needs_scores
        FROM (SELECT improvement_id FROM no_stats UNION SELECT improvement_id FROM no_ranks)
        ORDER BY 1
        """,
        [ids, ids],
    ).fetchall()
    return {int(i): bool(s) for i, s in rows}


def unranked_improvements(con, subset_id: int | None = None) -> list[int]:
    """Improvement runs (of `subset_id`, or of every subset) whose subset has positives but that lack the extended
    figures of some positive set: made before the import; `clipfail improve` with their options again adds them.
    Runs made before ties were recorded are left out: that call runs their configuration again as a new run."""
    ids = con.execute(
        """
        SELECT DISTINCT u.improvement_id FROM improvement_runs u JOIN retrieval_runs r USING (retrieval_run_id)
        JOIN positive_sets p ON p.subset_id = r.subset_id
        ANTI JOIN improvement_stats_extended s
            ON s.improvement_id = u.improvement_id AND s.positive_set_id = p.positive_set_id
        WHERE (? IS NULL OR r.subset_id = ?)
          AND NOT EXISTS (SELECT 1 FROM improvement_ranks k WHERE k.improvement_id = u.improvement_id
                          AND (k.improved_n_tied IS NULL OR k.baseline_n_tied IS NULL))
        ORDER BY 1
        """,
        [subset_id, subset_id],
    ).fetchall()
    return [int(r[0]) for r in ids]


def population_pairs(con, retrieval_run_id: int, pops, images) -> dict[str, pd.DataFrame] | None:
    """Per population: its captions' extended positives other than their own image (every positive set of the
    subset, text-to-image), as (row: the caption's row in the population, col: the image's column in the gallery,
    caption_id, positive_id), by caption and image id. None when the subset has no positive set."""
    rrid = int(retrieval_run_id)
    has = con.execute(
        "SELECT count(*) FROM positive_sets p JOIN retrieval_runs r USING (subset_id) WHERE r.retrieval_run_id = ?",
        [rrid],
    ).fetchone()[0]
    if not has:
        return None
    df = con.execute(
        """
        SELECT DISTINCT e.query_id AS caption_id, e.positive_id
        FROM retrieval_runs r
        JOIN positive_sets p USING (subset_id)
        JOIN extra_positives e ON e.positive_set_id = p.positive_set_id AND e.direction = 'text-to-image'
        JOIN subset_captions c ON c.subset_id = r.subset_id AND c.caption_id = e.query_id
        WHERE r.retrieval_run_id = ? AND e.positive_id <> c.image_id
        ORDER BY 1, 2
        """,
        [rrid],
    ).df()
    col_of = pd.Series(np.arange(len(images.item_ids)), index=np.asarray(images.item_ids, dtype=np.int64))
    lost = sorted(set(df["positive_id"].tolist()) - set(col_of.index.tolist()))
    if lost:
        raise UserError(
            f"Retrieval run {rrid}'s image embeddings lack {len(lost)} image(s) of its subset that are extended "
            f"positives (e.g. {lost[0]}). Re-run clipfail embed (with --recompute) and clipfail evaluate."
        )
    out = {}
    for pop in pops:
        row_of = pd.Series(np.arange(len(pop.captions)), index=pop.captions["caption_id"].to_numpy(np.int64))
        sel = df[df["caption_id"].isin(row_of.index)]
        out[pop.name] = pd.DataFrame(
            {
                "row": row_of.loc[sel["caption_id"].to_numpy()].to_numpy(np.int64),
                "col": col_of.loc[sel["positive_id"].to_numpy()].to_numpy(np.int64),
                "caption_id": sel["caption_id"].to_numpy(np.int64),
                "positive_id": sel["positive_id"].to_numpy(np.int64),
            }
        )
    return out


def empty_ranks(pairs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(pairs)
    return np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.float64)


def rank_block(scores, rows, pairs: pd.DataFrame, out) -> None:
    """Into `out` (rank, n_tied, score over the pairs): the pairs whose caption is in this block (`rows`: its
    population rows; `scores`: its (len(rows), M) scores), ranked by `pooling.gt_rank_counts` as the caption's own
    image is: one call per round, each caption's next positive in each round."""
    rows = np.asarray(rows, dtype=np.int64)
    at = np.flatnonzero(np.isin(pairs["row"].to_numpy(), rows))
    if not len(at):
        return
    order = np.argsort(rows, kind="stable")
    local = order[np.searchsorted(rows[order], pairs["row"].to_numpy()[at])]
    cols = pairs["col"].to_numpy()[at]
    rank, tied, score = out
    while len(at):
        _, first = np.unique(local, return_index=True)  # one positive of each caption per round
        r, t = pooling.gt_rank_counts(scores[local[first]], cols[first])
        rank[at[first]], tied[at[first]] = r, t
        score[at[first]] = np.asarray(scores)[local[first], cols[first]]
        keep = np.ones(len(at), bool)
        keep[first] = False
        at, local, cols = at[keep], local[keep], cols[keep]


def ranks_frame(pairs: pd.DataFrame, out) -> pd.DataFrame:
    rank, tied, score = out
    return pd.DataFrame(
        {
            "caption_id": pairs["caption_id"].to_numpy(np.int64),
            "positive_id": pairs["positive_id"].to_numpy(np.int64),
            "rank": rank,
            "n_tied": tied,
            "score": score,
        }
    )


def _check_reproduced(con, improvement_id: int, computed: pd.DataFrame) -> None:
    """A reused run scored again must give its captions' own images the stored ranks and tie counts back."""
    stored = con.execute(
        "SELECT caption_id, improved_rank, improved_n_tied FROM improvement_ranks WHERE improvement_id = ?",
        [improvement_id],
    ).df()
    got = computed[["caption_id", "improved_rank", "improved_n_tied"]].merge(
        stored, on="caption_id", how="outer", suffixes=("", "_stored"), indicator=True
    )
    bad = got[
        (got["_merge"] != "both")
        | (got["improved_rank"] != got["improved_rank_stored"])
        | (got["improved_n_tied"] != got["improved_n_tied_stored"])
    ]
    if len(bad):
        raise UserError(
            f"Improvement run {improvement_id} was scored again to rank its extended positives, but {len(bad)} of its "
            "captions' own images did not get their stored rank and tie count back (another machine or library "
            "version scores differently), so its extended figures would not match its own. Nothing was written."
        )


def _stats_rows(hits: pd.DataFrame, seed: int) -> pd.DataFrame:
    """improvement_stats_extended rows (without improvement_id) from improvement_hits_extended rows: per positive set
    and K, the paired statistics of the optimistic and of the pessimistic hits (`stats.paired_outcomes`, as
    improvement_stats)."""
    n_resamples = stats.BOOTSTRAP_RESAMPLES
    rows = []
    for (psid, k), g in hits.groupby(["positive_set_id", "k"], sort=True):
        b, a = g["is_baseline_hit"].to_numpy(bool), g["is_improved_hit"].to_numpy(bool)
        bp, ap = g["is_baseline_hit_pessimistic"].to_numpy(bool), g["is_improved_hit_pessimistic"].to_numpy(bool)
        row = {"positive_set_id": int(psid), "k": int(k), "n": len(g)} | stats.paired_outcomes(b, a, n_resamples, seed)
        row |= {"ci_level": 0.95, "bootstrap_resamples": n_resamples, "bootstrap_seed": seed}
        row |= {f"{name}_pessimistic": v for name, v in stats.paired_outcomes(bp, ap, n_resamples, seed).items()}
        rows.append(row)
    return pd.DataFrame(rows)


def store(con, improvement_id: int, ranks: pd.DataFrame | None, seed: int) -> list[int]:
    """Inside the caller's transaction: the improved ranks of the run's extended positives that are not stored yet,
    then, for each positive set of its subset without statistics for this run, the paired statistics of its hits
    (view improvement_hits_extended). Returns the ids of the positive sets whose statistics were written."""
    from toolkit.store import db

    iid = int(improvement_id)
    if ranks is not None and len(ranks):
        con.register("_improve_positive_ranks", ranks.assign(improvement_id=np.int64(iid)))
        try:
            con.execute(
                """
                INSERT INTO improvement_positive_ranks BY NAME
                SELECT n.* FROM _improve_positive_ranks n
                ANTI JOIN improvement_positive_ranks o
                    ON o.improvement_id = n.improvement_id AND o.caption_id = n.caption_id
                    AND o.positive_id = n.positive_id
                """
            )
        finally:
            con.unregister("_improve_positive_ranks")
    sets = [
        int(r[0])
        for r in con.execute(
            """
            SELECT p.positive_set_id FROM improvement_runs u JOIN retrieval_runs r USING (retrieval_run_id)
            JOIN positive_sets p ON p.subset_id = r.subset_id
            ANTI JOIN improvement_stats_extended s
                ON s.improvement_id = u.improvement_id AND s.positive_set_id = p.positive_set_id
            WHERE u.improvement_id = ? ORDER BY 1
            """,
            [iid],
        ).fetchall()
    ]
    if not sets:
        return []
    hits = con.execute(
        """
        SELECT positive_set_id, k, is_baseline_hit, is_improved_hit, is_baseline_hit_pessimistic,
               is_improved_hit_pessimistic
        FROM improvement_hits_extended WHERE improvement_id = ? AND list_contains(?, positive_set_id)
        """,
        [iid, sets],
    ).df()
    unranked = sorted(set(sets) - set(hits["positive_set_id"].astype(int)))
    if unranked or hits[["is_baseline_hit_pessimistic", "is_improved_hit_pessimistic"]].isna().any().any():
        # every positive was ranked above: a gap here is a bug, never a partial figure
        raise RuntimeError(f"improvement run {iid}: extended positives of set(s) {unranked} are not all ranked")
    db.insert_df(con, "improvement_stats_extended", _stats_rows(hits, seed).assign(improvement_id=np.int64(iid)))
    return sets


def write(con, rrid: int, ext: Plan, units, computed: dict, seed: int) -> list[int]:
    """Inside the caller's transaction: for every new unit (when the subset has positives) and every reused unit
    with something pending (ext.ids maps each unit to its improvement id), `store` its extended ranks and
    statistics; the retrieval run's own ranks of the positives first (`positives.rank_if_imported`: whatever is
    missing). A reused unit scored again must reproduce its stored ranks. Returns the improvement ids written."""
    from toolkit.retrieval import positives

    new = [u for u in units if ext.has_sets and u.config_hash not in ext.reused]
    todo = new + [u for u in units if u.config_hash in ext.reused and ext.ids[u.config_hash] in ext.pending]
    if not todo:
        return []
    positives.rank_if_imported(con, rrid)
    written = []
    for u in todo:
        iid = ext.ids[u.config_hash]
        ranks = ext.ranks.get((u.pop.name, u.key))
        if u.config_hash in ext.reused and ranks is not None:
            _check_reproduced(con, iid, computed[(u.pop.name, u.key)])
        if store(con, iid, ranks, seed):
            written.append(iid)
    return written


def summary(con, improvement_ids) -> pd.DataFrame:
    """Rows of the view `improvement_recall_extended` for these improvement runs (per source and K)."""
    return con.execute(
        "SELECT * FROM improvement_recall_extended WHERE list_contains(?, improvement_id) "
        "ORDER BY improvement_id, source, k",
        [[int(i) for i in improvement_ids]],
    ).df()
