"""Section 1: Recall@K of every retrieval run (view recall_summary), with a banner for runs whose ties matter."""

from __future__ import annotations

from toolkit.report.htmlpage import Context

COLUMNS = [
    "retrieval_run_id", "subset", "model", "direction", "n_queries", "r_at_1", "r_at_5", "r_at_10", "mean_rank",
    "median_rank", "n_r1_failures", "r_at_1_pessimistic", "r_at_5_pessimistic", "r_at_10_pessimistic",
    "n_tied_queries", "is_tie_affected",
]  # fmt: skip


def render(ctx: Context) -> None:
    page = ctx.page
    page.h2("baseline", "1. Baseline retrieval (Recall@K)")
    df = ctx.con.execute(f"SELECT {', '.join(COLUMNS)} FROM recall_summary ORDER BY retrieval_run_id").df()
    if ctx.rrid is None:
        ctx.missing.append("a text-to-image retrieval run: clipfail evaluate")
    if df.empty:
        page.p("No retrieval run yet. Run: clipfail evaluate", cls="missing")
        return
    page.p(
        "Recall@K is the share of queries whose own image ranks within the top K among all images of the "
        "subset (fractions, as in the reference study). Ranks are optimistic: 1 + the number of images "
        "scoring strictly higher; the *_pessimistic columns count every image that ties with the ground truth "
        "against it (rank + n_tied), and n_tied_queries is how many queries have such a tie."
        + (f" The rest of this report is about retrieval run {ctx.rrid}." if ctx.rrid else "")
    )
    flagged = df[df["is_tie_affected"].fillna(False).astype(bool)]
    if not flagged.empty:
        ids = ", ".join(str(int(i)) for i in flagged["retrieval_run_id"])
        page.p(
            f"TIES: in retrieval run(s) {ids} the ground truth ties with other items often enough that the optimistic "
            "and pessimistic Recall@K differ by more than 0.01 pp: quote the pessimistic figures (r_at_K_pessimistic) "
            "beside the optimistic ones, never the optimistic ones alone.",
            cls="banner",
        )
    page.table(
        df,
        "recall_summary",
        "Table 1. Recall@K of every retrieval run (view recall_summary)",
        {"mean_rank": "f2", "median_rank": "f2"},
    )
