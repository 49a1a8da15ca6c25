"""Section 8: every stored `clipfail compare` of two retrieval runs (views run_comparison, run_pairs,
failure_overlap_by_category)."""

from __future__ import annotations

from functools import partial

from toolkit.report.htmlpage import Context


def render(ctx: Context) -> None:
    """Every stored comparison: the R@K table with ΔR@K, its interval and McNemar p and the paired counts; a
    log-log scatter of the ranks; the labelled failures per category fixed / broken / shared, as a table and a
    bar chart."""
    con, page = ctx.con, ctx.page
    page.h2("comparisons", "8. Comparisons of retrieval runs")
    ids = [int(r[0]) for r in con.execute("SELECT run_comparison_id FROM run_comparisons ORDER BY 1").fetchall()]
    if not ids:
        page.p(
            "No comparison yet. Evaluate a second model on the same subset, then: clipfail compare RUN_A RUN_B "
            "(or clipfail benchmark --models FILE for many models).",
            cls="missing",
        )
        return
    page.p(
        "Each comparison pairs two retrieval runs of the same subset and direction query by query. ΔR@K = R@K(B) - "
        "R@K(A) in percentage points, with a paired bootstrap 95% interval (10,000 resamples, seeded) and the exact "
        "McNemar p-value; fixed = A misses and B hits at K, broken = the reverse, shared = both miss, neither = "
        "both hit."
    )
    for cid in ids:
        _comparison(ctx, cid)


def _comparison(ctx: Context, cid: int) -> None:
    """One comparison: its R@K table, the rank scatter, and its labelled failures per category."""
    con, page = ctx.con, ctx.page
    rows = con.execute(
        """
        SELECT k, n_queries, r_at_k_a, r_at_k_b, delta_pp, ci_low_pp, ci_high_pp, mcnemar_p,
               n_fixed, n_broken, n_shared, n_neither,
               retrieval_run_a_id, retrieval_run_b_id, subset, direction, model_a, weights_a, model_b, weights_b,
               is_same_run, is_tie_affected, tie_count, n_tied_queries_a, n_tied_queries_b
        FROM run_comparison WHERE run_comparison_id = ? ORDER BY k
        """,
        [cid],
    ).df()
    if rows.empty:
        return
    first = rows.iloc[0]
    label_a = f"run {int(first['retrieval_run_a_id'])}, {first['model_a']} ({first['weights_a']})"
    label_b = f"run {int(first['retrieval_run_b_id'])}, {first['model_b']} ({first['weights_b']})"
    page.h3(f"Comparison {cid}: B = {label_b} against A = {label_a}")
    page.p(f"Subset {first['subset']}, {first['direction']}, {int(first['n_queries']):,} paired queries.")
    if bool(first["is_same_run"]):
        page.p("A and B are the same run: every delta is zero.", cls="note")
    if bool(first["is_tie_affected"]):
        page.p(
            f"TIES: the ground truth ties with other items for {int(first['n_tied_queries_a']):,} queries in A and "
            f"{int(first['n_tied_queries_b']):,} in B, and counting them optimistically would move R@K by more than "
            "0.01 pp. Every figure of this comparison counts them pessimistically (rank + n_tied <= K, both runs), "
            "so neither run gains from ties (view run_comparison, tie_count; the optimistic figures are its "
            "r_at_k_a/b_optimistic columns).",
            cls="banner",
        )
    cols = ["k", "n_queries", "r_at_k_a", "r_at_k_b", "delta_pp", "ci_low_pp", "ci_high_pp", "mcnemar_p"]
    cols += ["n_fixed", "n_broken", "n_shared", "n_neither"]
    page.table(
        rows[cols],
        f"run_comparison_{cid}",
        f"Comparison {cid}. Recall@K of A and B, ΔR@K (pp) with its 95% interval and McNemar p, and the paired "
        "outcomes (view run_comparison)",
        {"delta_pp": "pp", "ci_low_pp": "pp", "ci_high_pp": "pp", "mcnemar_p": "p"},
    )
    ranks = (
        "rank_a_pessimistic AS rank_a, rank_b_pessimistic AS rank_b" if first["is_tie_affected"] else "rank_a, rank_b"
    )
    pairs = con.execute(f"SELECT {ranks} FROM run_pairs WHERE run_comparison_id = ?", [cid]).df()  # what it counts
    from toolkit.report.figures import fixed_broken_shared_chart, rank_scatter

    num = page.next_figure()
    page.figure(
        partial(
            rank_scatter,
            pairs,
            f"Figure {num}. Rank in A against rank in B",
            page.figures_dir / f"figure{num}_rank_scatter_{cid}",
            label_a=f"run {int(first['retrieval_run_a_id'])}",
            label_b=f"run {int(first['retrieval_run_b_id'])}",
            subtitle=f"comparison {cid}, {first['direction']}, log-log; below the diagonal B ranks better",
        ),
        f"Figure {num}. Each query's rank in A ({label_a}) against B ({label_b}), log-log (view run_pairs).",
    )
    overlap = con.execute(
        """
        SELECT category, n_labelled_a, n_fixed, n_shared, percent_fixed, median_rank_a, median_rank_b,
               n_labelled_b, n_broken, is_simulated
        FROM failure_overlap_by_category WHERE run_comparison_id = ?
        """,
        [cid],
    ).df()
    if overlap.empty:
        page.p(
            "No labelled failures of run A (or B) for this comparison: the per-category split needs "
            "clipfail sample-failures and import-labels on a text-to-image run.",
            cls="missing",
        )
        return
    flag = " SIMULATED labels." if bool(overlap["is_simulated"].any()) else ""
    page.table(
        overlap,
        f"failure_overlap_{cid}",
        f"Comparison {cid}. Labelled R@1 failures of A per category, fixed by B or still failing (shared); "
        "B's labelled failures that A retrieved at rank 1 (broken; empty when B has no labels) "
        "(view failure_overlap_by_category)." + flag,
        {"percent_fixed": "f2", "median_rank_a": "f2", "median_rank_b": "f2"},
    )
    num = page.next_figure()
    page.figure(
        partial(
            fixed_broken_shared_chart,
            overlap,
            f"Figure {num}. Fixed, broken and shared failures per category",
            page.figures_dir / f"figure{num}_fixed_broken_shared_{cid}",
            subtitle=f"comparison {cid}: B = run {int(first['retrieval_run_b_id'])}, "
            f"A = run {int(first['retrieval_run_a_id'])}",
        ),
        f"Figure {num}. Labelled failures per category: fixed by B, broken by B, shared (view "
        f"failure_overlap_by_category).{flag}",
    )
