"""Section 12: are the misses real? The extended positives of ECCV Caption and CxC (`clipfail positives import`):
how much of the subset they cover (view positive_coverage), the retrieval metrics with them counted
(recall_extended), the share of each human category's failures whose top-1 image is a verified positive
(false_negatives_by_category, as a figure), how triage and people label those verified false negatives
(false_negatives_triage_agreement, false_negatives_by_triage_rule), and each improvement run's deltas with the COCO
pairs only and with the verified positives counted (improvement_recall_extended). Without imported positives it says
why there is nothing (the demo's images are generated, not COCO's: no positive applies, none is simulated) and what
to run.
"""

from __future__ import annotations

from functools import partial

from toolkit.report.htmlpage import Context

IMPORT = "clipfail positives import --source eccv (or --source cxc)"
NO_POSITIVES = (
    "No extended positives are imported for this subset, so every miss here is counted against the one image COCO "
    "pairs each caption with. ECCV Caption and CxC verify more pairs of the COCO 5k test split, by COCO caption and "
    f"image ids. For a study of COCO images, run: {IMPORT}. A study of generated images, such as clipfail demo's, "
    "cannot have any: its images are not COCO's, so no ECCV Caption or CxC positive applies, and none is simulated."
)
GENERATED = (
    "This study's images are generated (clipfail demo), not COCO's, so no ECCV Caption or CxC positive can apply to "
    "them: this section stays empty rather than simulate positives. On a study of COCO images (the 5k test split, "
    f"by COCO ids), run: {IMPORT}."
)
RECALL_COLUMNS = [
    "retrieval_run_id", "direction", "source", "metric", "k", "value", "n_queries", "tie_count", "value_optimistic",
    "value_pessimistic",
]  # fmt: skip


def render(ctx: Context) -> None:
    """Section 12 (see the module docstring)."""
    con, page, rrid = ctx.con, ctx.page, ctx.rrid
    page.h2("positives", "12. Are the misses real?")
    if rrid is None:
        page.p("No retrieval run yet. Run: clipfail evaluate", cls="missing")
        return
    sid = con.execute("SELECT subset_id FROM retrieval_runs WHERE retrieval_run_id = ?", [rrid]).fetchone()[0]
    cov = con.execute(
        "SELECT c.* FROM positive_coverage c JOIN positive_sets p USING (positive_set_id) WHERE p.subset_id = ? "
        "ORDER BY c.positive_set_id, c.direction DESC",
        [sid],
    ).df()
    if cov.empty:
        page.p(GENERATED if ctx.generated_images else NO_POSITIVES, cls="missing")
        return
    page.p(
        "COCO pairs each caption with one image, so a model that retrieves another image the caption describes just "
        "as well is counted as wrong. ECCV Caption (Chun et al., 2022) and CxC (Parekh et al., 2021) verify more "
        "pairs of the COCO 5k test split; here they count as hits beside the COCO pairs (which always count). "
        "Each source is counted on the queries it covers inside this subset. Values are fractions; where ties "
        "change a figure its pessimistic count is the headline (tie_count)."
    )
    page.table(
        cov,
        "positive_coverage",
        "Table 18. Coverage of each imported positive set: queries of the subset, those the source covers, and "
        "positives per covered query, COCO pairs included (view positive_coverage).",
        {"mean_positives": "f2"},
    )
    metrics = con.execute(
        f"SELECT {', '.join(RECALL_COLUMNS)} FROM recall_extended "
        "WHERE retrieval_run_id IN (SELECT retrieval_run_id FROM retrieval_runs WHERE subset_id = ?) "
        "ORDER BY retrieval_run_id, source <> 'coco', source, metric DESC, k",
        [sid],
    ).df()
    page.table(
        metrics,
        "recall_extended",
        "Table 19. R@K, R-Precision and mAP@R of each retrieval run of this subset, per source ('coco': the COCO "
        "pairs only), both directions (view recall_extended).",
    )
    _false_negatives(ctx)
    _improvements(ctx, sid)


def _false_negatives(ctx: Context) -> None:
    """Tables 20-22 and the figure: the verified false negatives per human category, and triage on them."""
    from toolkit.report.figures import false_negative_share_chart

    con, page, rrid, flag = ctx.con, ctx.page, ctx.rrid, ctx.flag
    page.h3("Verified false negatives among the labelled failures")
    by_cat = con.execute(
        "SELECT category, n_labelled, n_checkable, n_verified, share_verified, share_of_verified "
        "FROM false_negatives_by_category WHERE retrieval_run_id = ?",
        [rrid],
    ).df()
    if by_cat.empty:
        page.p("No labelled failure of this run yet. Run: clipfail sample-failures, then clipfail import-labels.",
               cls="missing")  # fmt: skip
        return
    page.table(
        by_cat,
        "false_negatives_by_category",
        "Table 20. Per human category: labelled R@1 failures, those a source covers (checkable), those whose top-1 "
        "image is a verified positive, their share of the checkable ones and of all verified ones (view "
        "false_negatives_by_category)." + flag,
    )
    num = page.next_figure()
    page.figure(
        partial(
            false_negative_share_chart,
            by_cat,
            f"Figure {num}. Verified false negatives per human category",
            page.figures_dir / f"figure{num}_false_negatives",
        ),
        f"Figure {num}. Share of each category's checkable R@1 failures whose top-1 image is a verified positive of "
        f"the caption (view false_negatives_by_category).{flag}",
    )
    agree = con.execute(
        "SELECT reference, n_labelled, n, n_agree, accuracy, kappa, n_human_ambiguous, n_suggested_ambiguous, "
        "n_by_verified_rule FROM false_negatives_triage_agreement WHERE retrieval_run_id = ?",
        [rrid],
    ).df()
    if agree.empty:
        has_triage = con.execute("SELECT count(*) FROM triage_runs WHERE retrieval_run_id = ?", [rrid]).fetchone()[0]
        page.p(
            "No labelled verified false negative to compare triage with."
            if has_triage
            else "No triage run yet. Run: clipfail triage",
            cls="missing",
        )
        return
    page.table(
        agree,
        "false_negatives_triage_agreement",
        "Table 21. Triage against the human labels on the verified false negatives only (the labelled failures whose "
        "top-1 image is a verified positive): agreement, kappa, how many each side called Ambiguous, and how many "
        "suggestions the Verified rule made (view false_negatives_triage_agreement)." + flag,
    )
    by_rule = con.execute(
        "SELECT rule, n_failures, n_checkable, n_verified, share_verified, share_of_verified "
        "FROM false_negatives_by_triage_rule WHERE retrieval_run_id = ?",
        [rrid],
    ).df()
    page.table(
        by_rule,
        "false_negatives_by_triage_rule",
        "Table 22. Per heuristic triage rule (the first that fired besides Verified): the failures it decides, those "
        "checkable, and those whose top-1 image is a verified positive (view false_negatives_by_triage_rule).",
    )


def _improvements(ctx: Context, subset_id: int) -> None:
    """Table 23: each improvement run's deltas with the COCO pairs only and with the verified positives counted."""
    from toolkit.improve.extended import unranked_improvements
    from toolkit.report.display import extended_improvement_table

    con, page, rrid, flag = ctx.con, ctx.page, ctx.rrid, ctx.flag
    page.h3("Improvement runs with the verified positives counted")
    runs = [
        int(r[0])
        for r in con.execute(
            "SELECT improvement_id FROM improvement_runs WHERE retrieval_run_id = ? ORDER BY 1", [rrid]
        ).fetchall()
    ]
    if not runs:
        page.p("No improvement run yet. Run: clipfail improve --categories Object", cls="missing")
        return
    rows = con.execute(
        "SELECT * FROM improvement_recall_extended WHERE retrieval_run_id = ? ORDER BY improvement_id, source, k",
        [rrid],
    ).df()
    if not rows.empty:
        page.table(
            extended_improvement_table(rows),
            "improvement_recall_extended",
            "Table 23. Each improvement run's ΔR@K with the COCO pairs only beside ΔR@K with the source's verified "
            "positives counted as hits (a caption is a hit if any of its positives is within K), with that delta's "
            "paired bootstrap 95% interval, exact McNemar p, captions fixed and broken; every caption of the run "
            "counts, 'covered' those the source lists. A fix that only swaps one valid image for another gains "
            "nothing here (view improvement_recall_extended)." + flag,
            {"ΔR COCO pairs (pp)": "pp", "ΔR with source (pp)": "pp", "McNemar p": "p"},
        )
    late = sorted(set(unranked_improvements(con, subset_id)) & set(runs))
    if late:
        ids = ", ".join(map(str, late))
        page.p(
            f"Improvement run(s) {ids} were made before the positives were imported: run their clipfail improve "
            "command again (the same options) to rank their extended positives; nothing else changes.",
            cls="missing",
        )
        ctx.missing.append(f"extended positives of improvement run(s) {ids}: clipfail improve (the same options)")
