"""What several sections share: the prompt-ensembling runs of the report's retrieval run (sections 4-6) and the
banner that names runs whose figures count ties pessimistically (sections 4 and 10)."""

from __future__ import annotations

import pandas as pd

from toolkit.report.htmlpage import Context
from toolkit.store import db

# prompt ensembling (sections 4-6): a run of method 'templates', or one made before there were methods. A method
# whose runs carry no template set or pooling stores NULL there, so the test is on the method, never on those.
TEMPLATES = "(method IS NULL OR method = 'templates')"

# the consolidated table's columns (view improvement_recall_wide)
WIDE_COLUMNS = [
    "improvement_id", "run_id", "retrieval_run_id", "categories", "population", "pooling", "tau", "template_set",
    "template_mode", "k_per_category", "k_prompts", "tie_count", "n", "baseline_r1", "baseline_r5", "baseline_r10",
    "improved_r1", "improved_r5", "improved_r10", "delta_r1_pp", "delta_r5_pp", "delta_r10_pp", "ci_low_r1_pp",
    "ci_high_r1_pp", "ci_low_r5_pp", "ci_high_r5_pp", "ci_low_r10_pp", "ci_high_r10_pp", "mcnemar_p_r1",
    "mcnemar_p_r5", "mcnemar_p_r10", "n_fixed_r1", "n_broken_r1",
]  # fmt: skip

NO_IMPROVEMENT = "No improvement run yet. Run: clipfail improve --categories Object --pooling all"


def templates_wide(ctx: Context) -> pd.DataFrame:
    """The prompt-ensembling runs of the report's retrieval run, one row per run with K = 1/5/10 side by side
    (view improvement_recall_wide, in its run_order); empty when there are none."""
    if "wide" not in ctx.cache:
        if ctx.rrid is None or not db.table_exists(ctx.con, "improvement_recall_wide"):
            ctx.cache["wide"] = pd.DataFrame(columns=WIDE_COLUMNS)
        else:
            ctx.cache["wide"] = ctx.con.execute(
                f"SELECT {', '.join(WIDE_COLUMNS)} FROM improvement_recall_wide "
                f"WHERE retrieval_run_id = ? AND {TEMPLATES} ORDER BY run_order",
                [ctx.rrid],
            ).df()
    return ctx.cache["wide"]


def tie_banner(ctx: Context, where: str) -> None:
    """A banner naming this retrieval run's improvement runs (those `where` selects) whose figures count ties
    pessimistically (view improvement_ties: tie-affected) or whose ties were not recorded (toolkit.report.display)."""
    from toolkit.report.display import tie_notes

    ties = ctx.con.execute(
        f"SELECT * FROM improvement_ties WHERE retrieval_run_id = ? AND {where} ORDER BY improvement_id", [ctx.rrid]
    ).df()
    notes = tie_notes(ties)
    if notes:
        ctx.page.p(
            "No method gains from ties: a run whose optimistic and pessimistic Recall@K differ by more than 0.01 pp "
            "is shown with its pessimistic figures (column tie count). "
            + " ".join(n[0].upper() + n[1:] for n in notes),
            cls="banner",
        )
