"""Section 5: every prompt-ensembling run of the report's retrieval run, failures and controls, one row each
with R@1/5/10 side by side (view improvement_recall_wide). No section without such runs (section 4 says so)."""

from __future__ import annotations

from toolkit.report.htmlpage import Context
from toolkit.report.sections.common import templates_wide

FORMATS = {
    "baseline_r1": "f2", "baseline_r5": "f2", "baseline_r10": "f2", "improved_r1": "f2", "improved_r5": "f2",
    "improved_r10": "f2", "delta_r1_pp": "pp", "delta_r5_pp": "pp", "delta_r10_pp": "pp", "mcnemar_p_r1": "p",
    "mcnemar_p_r5": "p", "mcnemar_p_r10": "p", "tau": "f2",
}  # fmt: skip


def render(ctx: Context) -> None:
    wide = templates_wide(ctx)
    if wide.empty:
        return
    page = ctx.page
    page.h2("consolidated", "5. All improvement runs (consolidated)")
    page.p(
        "Every improvement run of this retrieval run, failures and controls, with R@1/5/10 side by side "
        "(view improvement_recall). This is the consolidated table the reference study left as a CSV to be added."
    )
    flag = " SIMULATED labels chose these captions." if ctx.simulated else ""
    page.table(wide, "improvement_runs_consolidated", "Table 7. Consolidated improvement runs." + flag, FORMATS)
