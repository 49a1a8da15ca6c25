"""Section 7: automatic triage of the report's retrieval run (views triage_distribution, triage_agreement,
triage_confusion), with the confusion matrix as a figure."""

from __future__ import annotations

from functools import partial

from toolkit.report.htmlpage import Context


def render(ctx: Context) -> None:
    """Section 7: triage agreement (view triage_agreement), its confusion matrix as a figure (triage_confusion),
    and the estimated taxonomy over all failures beside the labelled one (triage_distribution)."""
    con, page, rrid, simulated, missing = ctx.con, ctx.page, ctx.rrid, ctx.simulated, ctx.missing
    from toolkit.report.figures import triage_confusion_figure

    page.h2("triage", "7. Automatic triage")
    flag = " SIMULATED labels." if simulated else ""
    has = (
        rrid is not None
        and con.execute("SELECT triage_run_id FROM triage_runs WHERE retrieval_run_id = ? LIMIT 1", [rrid]).fetchone()
    )
    if not has:
        page.p("No triage run yet. Run: clipfail triage", cls="missing")
        missing.append("triage: clipfail triage")
        return
    page.p(
        "clipfail triage suggests a category for every R@1 failure from evidence: COCO object instances "
        "(Object, Count, Spatial), caption-to-caption cosines and shared category sets (Ambiguous), and the "
        "caption lexicon (Attribute, Action); the first rule that fires wins, and no evidence means no "
        "suggestion. Suggestions are hidden on the overlap set by default, so its agreement is unbiased."
    )
    dist = con.execute(
        "SELECT category, n_triage, percent_of_failures, percent_of_suggested, n_human, percent_human, n_failures "
        "FROM triage_distribution WHERE retrieval_run_id = ?",
        [rrid],
    ).df()
    page.table(
        dist,
        "triage_distribution",
        "Table 9. Estimated taxonomy over all R@1 failures (triage) beside the labelled sample "
        "(view triage_distribution)." + flag,
        {"percent_of_failures": "f2", "percent_of_suggested": "f2", "percent_human": "f2"},
    )
    agree = con.execute(
        "SELECT reference, n_labelled, n, n_agree, coverage, accuracy, accuracy_labelled, expected_agreement, kappa "
        "FROM triage_agreement WHERE retrieval_run_id = ?",
        [rrid],
    ).df()
    if agree.empty:
        page.p("No labelled failure of this run to compare the suggestions with.", cls="missing")
        return
    page.table(
        agree,
        "triage_agreement",
        "Table 10. Agreement of the suggestions with each annotator, the overlap majority and all labels "
        "(view triage_agreement; n counts the labelled failures with a suggestion)." + flag,
    )
    conf = con.execute(
        "SELECT human_category, suggested_category, n FROM triage_confusion WHERE retrieval_run_id = ?", [rrid]
    ).df()
    page.table(conf, "triage_confusion", "Table 11. Human label by triage suggestion (view triage_confusion)." + flag)
    num = page.next_figure()
    page.figure(
        partial(
            triage_confusion_figure,
            conf,
            f"Figure {num}. Triage confusion matrix",
            page.figures_dir / f"figure{num}_triage",
        ),
        f"Figure {num}. Human labels (rows) against triage suggestions (columns).{flag}",
    )
