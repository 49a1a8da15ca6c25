"""Section 2: the failure taxonomy of the report's retrieval run (views sample_label_counts,
taxonomy_distribution, taxonomy_actionable, taxonomy_by_annotator), with its two bar charts."""

from __future__ import annotations

from functools import partial

from toolkit.report.htmlpage import Context

PCT = {"percent": "f2", "percent_lr": "f2"}


def render(ctx: Context) -> None:
    page = ctx.page
    page.h2("taxonomy", "2. Failure taxonomy")
    if not ctx.n_labelled:
        page.p(
            "No labels yet. Sample failures (clipfail sample-failures), fill in the assign_*.csv files, then: "
            "clipfail import-labels failure_analysis/assign_*.csv",
            cls="missing",
        )
        ctx.missing.append("labels: clipfail sample-failures, then clipfail import-labels")
        return
    con, rrid, flag = ctx.con, ctx.rrid, ctx.flag
    n = con.execute(
        "SELECT n_outside_overlap, n_overlap FROM sample_label_counts WHERE retrieval_run_id = ?", [rrid]
    ).fetchone()
    page.p(
        f"Labelled R@1 failures of retrieval run {rrid}: {n[0]} outside the overlap set (merged over annotators; "
        f"the taxonomy's n) and {n[1]} in the overlap set (used for agreement).{flag}"
    )
    dist = con.execute(
        "SELECT category, is_actionable, count, percent, percent_lr, n_total FROM taxonomy_distribution "
        "WHERE retrieval_run_id = ? ORDER BY rank",
        [rrid],
    ).df()
    act = con.execute(
        "SELECT category, count, percent, percent_lr, n_total FROM taxonomy_actionable "
        "WHERE retrieval_run_id = ? ORDER BY rank",
        [rrid],
    ).df()
    by_ann = con.execute(
        "SELECT annotator, category, count, percent, n_total FROM taxonomy_by_annotator "
        "WHERE retrieval_run_id = ? ORDER BY annotator, rank",
        [rrid],
    ).df()
    page.table(
        dist,
        "taxonomy_distribution",
        f"Table 2. Failure categories, merged over annotators, overlap set excluded (view taxonomy_distribution; "
        f"percent rounded half up, percent_lr sums to 100).{flag}",
        PCT,
    )
    _chart(ctx, dist, "Failure categories", "taxonomy", "labelled R@1 failures, overlap set excluded",
           "Overall category distribution (all labels)")  # fmt: skip
    page.table(
        act,
        "taxonomy_actionable",
        f"Table 3. Actionable categories only, re-normalised (view taxonomy_actionable).{flag}",
        PCT,
    )
    _chart(ctx, act, "Actionable failure categories", "actionable", "not-actionable categories removed",
           "Actionable-only distribution (excluding Ambiguous)")  # fmt: skip
    page.table(
        by_ann, "taxonomy_by_annotator", f"Table 4. Each annotator's own set (view taxonomy_by_annotator).{flag}", PCT
    )


def _chart(ctx: Context, df, title: str, name: str, subtitle: str, caption: str) -> None:
    from toolkit.report.figures import taxonomy_bar_chart

    if df.empty:
        return
    num = ctx.page.next_figure()
    ctx.page.figure(
        partial(
            taxonomy_bar_chart,
            df,
            f"Figure {num}. {title}" + (" (SIMULATED labels)" if ctx.simulated else ""),
            ctx.page.figures_dir / f"figure{num}_{name}",
            subtitle=f"retrieval run {ctx.rrid}: {subtitle}",
        ),
        f"Figure {num}. {caption}.{ctx.flag}",
    )
