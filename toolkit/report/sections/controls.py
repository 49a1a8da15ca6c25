"""Section 6: the control runs of prompt ensembling (view improvement_recall, populations other than
'failures'): what the prompts break on R@1 successes, or their net effect on every caption."""

from __future__ import annotations

from toolkit.report.htmlpage import Context
from toolkit.report.sections.common import templates_wide

FORMATS = {
    "baseline_pct": "f2", "improved_pct": "f2", "delta_pp": "pp", "ci_low_pp": "pp", "ci_high_pp": "pp",
    "mcnemar_p": "p", "tau": "f2",
}  # fmt: skip


def render(ctx: Context) -> None:
    if templates_wide(ctx).empty:
        return
    page = ctx.page
    page.h2("controls", "6. Controls")
    controls = ctx.con.execute(
        """
        SELECT r.improvement_id, r.categories, r.population, r.pooling, r.tau, r.tie_count, r.k, r.n,
               r.baseline_pct, r.improved_pct, r.delta_pp, r.ci_low_pp, r.ci_high_pp, r.mcnemar_p, r.n_fixed,
               r.n_broken
        FROM improvement_recall r
        JOIN improvement_recall_wide w ON w.improvement_id = r.improvement_id
        WHERE r.retrieval_run_id = ? AND r.population <> 'failures' AND (w.method IS NULL OR w.method = 'templates')
        ORDER BY r.categories, r.population, w.pooling_position, r.tau, r.improvement_id, r.k
        """,
        [ctx.rrid],
    ).df()
    if controls.empty:
        page.p(
            "No control run. A gain measured on R@1 failures alone is biased upward (their baseline R@1 is 0, so "
            "R@1 can only improve). Run the same configuration on successes: clipfail improve --categories ... "
            "--pooling all --control successes:200",
            cls="missing",
        )
        ctx.missing.append("a control: clipfail improve ... --control successes:N")
        return
    page.p(
        "The same configurations run on R@1 successes (population 'successes': their baseline R@1 is 100%, so "
        "only losses are possible there; n_broken counts the successes the prompts break) or on every caption "
        "of the retrieval run (population 'all': the net effect). n_fixed: baseline miss, improved hit; "
        "n_broken: baseline hit, improved miss, at that K."
    )
    page.table(controls, "improvement_controls", "Table 8. Control runs (view improvement_recall).", FORMATS)
