"""Section 3: agreement of the annotators on the overlap set (view annotator_agreement); no section without
labels."""

from __future__ import annotations

from toolkit.report.htmlpage import Context


def render(ctx: Context) -> None:
    if not ctx.n_labelled:
        return
    page = ctx.page
    page.h2("agreement", "3. Annotator agreement on the overlap set")
    df = ctx.con.execute(
        """
        SELECT measure, annotators, n_annotators, n_items, n_agree, percent_agreement,
               observed_agreement, expected_agreement, kappa
        FROM annotator_agreement WHERE retrieval_run_id = ? ORDER BY measure, annotators
        """,
        [ctx.rrid],
    ).df()
    if df.empty:
        page.p("No overlap sample was labelled by two or more annotators.", cls="missing")
        return
    page.p(
        "Pairwise percent agreement and Cohen's kappa for each pair of annotators, and Fleiss' kappa over all "
        "of them (n_agree: unanimous items), on the overlap samples. The reference study measured none."
        + (" These agreements are between SIMULATED annotators." if ctx.simulated else "")
    )
    page.table(
        df,
        "annotator_agreement",
        "Table 5. Agreement (view annotator_agreement)" + ctx.flag,
        {"percent_agreement": "f2"},
    )
