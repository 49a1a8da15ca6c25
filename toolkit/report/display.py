"""Tables shared by the CLI and the report: the same rows, labels and interval texts in both.

`improvement_table(recall)` turns rows of view `improvement_recall` (one row per improvement run and
K in 1, 5, 10) into the reference study's table: one row per improvement run (a pooling), with its
improved Recall@K, the deltas in pp, the bootstrap 95% intervals and the McNemar p-values.
`improvement_stats_table(recall)` gives the same statistics one row per run and K, with the fixed and
broken captions. `improvement_tables(recall, effective_k)` groups both per population under a title
(what `clipfail improve` prints); the report renders `improvement_table` per subset.

Every number is a value of the view: nothing here computes one, it only selects, pivots and labels
(an interval's text is its two stored bounds, signed, with 2 decimals).

Ties: each table row carries the run's ``tie count`` (view improvement_ties: 'pessimistic' for a run whose
optimistic and pessimistic Recall@K differ by more than 0.01 pp, whose figures are then the pessimistic
ones), and `tie_notes(ties)` words the flag of each such run, and of runs whose ties were not recorded,
for the CLI and the report alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

RECALL_KS = (1, 5, 10)

#: improvement_table's columns that hold Recall@K values (in %) and their deltas (in pp)
RECALL_COLUMNS = [f"improved R@{k}" for k in RECALL_KS] + [f"ΔR@{k} (pp)" for k in RECALL_KS]
#: the column naming the count of a row's figures (view improvement_ties.tie_count)
TIE_COLUMN = "tie count"


def pooling_label(pooling: str, tau) -> str:
    """'max', 'mean', or 'logsumexp (tau=1)' (the temperature with %g); 'none' for a method without pooling (NULL)."""
    if pooling is None or pd.isna(pooling):
        return "none"
    return f"logsumexp (tau={float(tau):g})" if pooling == "logsumexp" and not pd.isna(tau) else str(pooling)


def ci_text(lo, hi) -> str:
    """'[-1.23, +4.56]' from two stored bounds in pp; '' when one is missing."""
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return ""
    return f"[{float(lo):+.2f}, {float(hi):+.2f}]"


def _runs(recall: pd.DataFrame, improvement_ids: Sequence[int] | None):
    """(improvement_id, its rows indexed by k) in the order of `improvement_ids`, else of first appearance."""
    groups = {int(i): g.set_index("k") for i, g in recall.groupby("improvement_id", sort=False)}
    order = list(groups) if improvement_ids is None else [int(i) for i in improvement_ids]
    missing = [i for i in order if i not in groups]
    if missing:
        raise ValueError(f"improvement_recall rows lack improvement runs {missing}")
    return [(i, groups[i]) for i in order]


def improvement_table(recall: pd.DataFrame, improvement_ids: Sequence[int] | None = None) -> pd.DataFrame:
    """One row per improvement run of `recall` (rows of view improvement_recall), in the order of
    `improvement_ids` (default: as they come). Columns: pooling, improved R@1/5/10 (%), ΔR@1/5/10 (pp), 95% CI
    ΔR@1/5/10 (text), McNemar p R@1/5/10, tie count (which count the figures use: improvement_recall.tie_count),
    improvement_id."""
    rows = []
    for imp_id, g in _runs(recall, improvement_ids):
        row = {"pooling": pooling_label(g["pooling"].iloc[0], g["tau"].iloc[0])}
        row |= {f"improved R@{k}": g.loc[k, "improved_pct"] for k in RECALL_KS}
        row |= {f"ΔR@{k} (pp)": g.loc[k, "delta_pp"] for k in RECALL_KS}
        row |= {f"95% CI ΔR@{k}": ci_text(g.loc[k, "ci_low_pp"], g.loc[k, "ci_high_pp"]) for k in RECALL_KS}
        row |= {f"McNemar p R@{k}": g.loc[k, "mcnemar_p"] for k in RECALL_KS}
        row[TIE_COLUMN] = g["tie_count"].iloc[0]
        row["improvement_id"] = imp_id
        rows.append(row)
    columns = ["pooling", *RECALL_COLUMNS, *(f"95% CI ΔR@{k}" for k in RECALL_KS)]
    columns += [*(f"McNemar p R@{k}" for k in RECALL_KS), TIE_COLUMN, "improvement_id"]
    return pd.DataFrame(rows, columns=columns)


def improvement_stats_table(recall: pd.DataFrame, improvement_ids: Sequence[int] | None = None) -> pd.DataFrame:
    """One row per improvement run and K: pooling, K, Δ (pp), 95% CI (pp) (text), McNemar p (text, 4
    significant digits), fixed, broken (captions the prompts fixed / broke at that K)."""
    rows = []
    for _imp_id, g in _runs(recall, improvement_ids):
        label = pooling_label(g["pooling"].iloc[0], g["tau"].iloc[0])
        for k in RECALL_KS:
            rows.append(
                {
                    "pooling": label,
                    "K": k,
                    "Δ (pp)": g.loc[k, "delta_pp"],
                    "95% CI (pp)": ci_text(g.loc[k, "ci_low_pp"], g.loc[k, "ci_high_pp"]),
                    "McNemar p": f"{g.loc[k, 'mcnemar_p']:.4g}",
                    "fixed": int(g.loc[k, "n_fixed"]),
                    "broken": int(g.loc[k, "n_broken"]),
                }
            )
    return pd.DataFrame(rows, columns=["pooling", "K", "Δ (pp)", "95% CI (pp)", "McNemar p", "fixed", "broken"])


def improvement_title(recall: pd.DataFrame, effective_k: str | None = None) -> str:
    """The heading of one population's rows: categories, population, n, K, retrieval run, baseline Recall@K,
    and (given) the effective K text of `improve.effective_k`."""
    first = recall.iloc[0]
    base = recall.drop_duplicates("k").set_index("k")["baseline_pct_optimistic"]
    pess = recall.drop_duplicates("k").set_index("k")["baseline_pct_pessimistic"]
    k_asked = first["k_prompts"]
    k_text = f"K per category {first['k_per_category']}, " if pd.isna(k_asked) else f"K {int(k_asked)}, "
    if pd.isna(k_asked) and pd.isna(first["k_per_category"]):
        k_text = ""  # a method without prompts
    title = (
        f"{first['categories'].replace(',', '+')} {first['population']} (n={int(first['n'])}, {k_text}"
        f"retrieval run {first['retrieval_run_id']}). Baseline: R@1 {base[1]:.2f}, R@5 {base[5]:.2f}, "
        f"R@10 {base[10]:.2f}"
    )
    if pess.notna().all() and not pess.equals(base):  # ties at the baseline: the worst place among them too
        title += f" (pessimistic, ties counted against: R@1 {pess[1]:.2f}, R@5 {pess[5]:.2f}, R@10 {pess[10]:.2f})"
    if effective_k:
        title += f"\nPrompts per caption (effective K): {effective_k}"
    return title


def tie_notes(ties: pd.DataFrame) -> list[str]:
    """One sentence per run of `ties` (rows of view improvement_ties) whose figures are not plainly optimistic:
    a tie-affected run (its figures are the pessimistic ones) or one whose ties were not recorded."""
    out = []
    for r in ties.itertuples():
        run = f"improvement run {int(r.improvement_id)} ({r.method}, {r.population})"
        if not r.is_tie_recorded:
            out.append(
                f"{run} was made before ties were recorded: its figures count ties optimistically and its "
                "pessimistic figures are unknown (running the same configuration again records them)."
            )
        elif r.is_tie_affected:
            out.append(
                f"TIES: {run}: the ground-truth image ties with other images for {int(r.n_improved_tied)} of its "
                f"{int(r.n_captions)} captions ({int(r.n_baseline_tied)} at the baseline), so its optimistic and "
                f"pessimistic Recall@K differ by up to {r.max_gap_pp:.2f} pp. No method gains from ties: its "
                "figures count every tie against it (pessimistic), baseline and improved alike; both counts are in "
                "view improvement_recall (*_optimistic, *_pessimistic)."
            )
    return out


def improvement_tables(
    recall: pd.DataFrame, effective_k: dict[str, str] | None = None
) -> list[tuple[str, pd.DataFrame, pd.DataFrame]]:
    """Per population of `recall` (in order of appearance): (title, improvement_table, improvement_stats_table)."""
    out = []
    for population, grp in recall.groupby("population", sort=False):
        title = improvement_title(grp, (effective_k or {}).get(population))
        out.append((title, improvement_table(grp), improvement_stats_table(grp)))
    return out


#: extended_improvement_table's columns
EXTENDED_COLUMNS = [
    "improvement_id", "method", "population", "source", "K", "n", "covered", "ΔR COCO pairs (pp)",
    "ΔR with source (pp)", "95% CI (pp)", "McNemar p", "fixed", "broken", TIE_COLUMN,
]  # fmt: skip


def extended_improvement_table(extended: pd.DataFrame) -> pd.DataFrame:
    """One row per improvement run, source and K of `extended` (rows of view improvement_recall_extended), in its
    order: the run's plain delta (COCO pairs only: coco_delta_pp) beside the delta with the source's verified
    positives counted as hits, with that delta's bootstrap interval (text), McNemar p,
    fixed and broken captions and its tie count; `covered`: the captions the source covers."""
    rows = [
        {
            "improvement_id": int(r.improvement_id),
            "method": r.method,
            "population": r.population,
            "source": r.source,
            "K": int(r.k),
            "n": int(r.n),
            "covered": int(r.n_covered),
            "ΔR COCO pairs (pp)": r.coco_delta_pp,
            "ΔR with source (pp)": r.delta_pp,
            "95% CI (pp)": ci_text(r.ci_low_pp, r.ci_high_pp),
            "McNemar p": r.mcnemar_p,
            "fixed": int(r.n_fixed),
            "broken": int(r.n_broken),
            TIE_COLUMN: r.tie_count,
        }
        for r in extended.itertuples()
    ]
    return pd.DataFrame(rows, columns=EXTENDED_COLUMNS)
