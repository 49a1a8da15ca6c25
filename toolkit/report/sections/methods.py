"""Section 10: which training-free fix helps which category (view method_comparison), every method's
improvement runs on the labelled failures, plugins' included."""

from __future__ import annotations

from functools import partial

import pandas as pd

from toolkit.report.display import ci_text
from toolkit.report.htmlpage import Context, slug
from toolkit.report.sections.common import tie_banner
from toolkit.store import db

METHOD_COLUMNS = [
    "category", "method_rank_r1", "method_label", "n", "baseline_r1_pct", "improved_r1_pct", "delta_r1_pp",
    "ci_low_r1_pp", "ci_high_r1_pp", "mcnemar_p_r1", "delta_r5_pp", "delta_r10_pp", "mcnemar_p_r5", "mcnemar_p_r10",
    "share_r1_successes_broken", "control_population", "is_bank_overlap", "tie_count", "improvement_id",
]  # fmt: skip


def render(ctx: Context) -> None:
    """Section 10: every method's improvement runs on the labelled failures, per category (view method_comparison):
    a ranked table of which method helps which category most, and one grouped chart per category."""
    con, page, rrid, simulated, missing = ctx.con, ctx.page, ctx.rrid, ctx.simulated, ctx.missing
    from toolkit.report.figures import method_comparison_chart

    page.h2("methods", "10. Which fix helps which category")
    flag = " SIMULATED labels chose these captions." if simulated else ""
    df = (
        con.execute("SELECT * FROM method_comparison WHERE retrieval_run_id = ?", [rrid]).df()
        if rrid is not None and db.table_exists(con, "method_comparison")
        else pd.DataFrame()
    )
    if df.empty:
        from toolkit.improve.methods import names

        page.p(
            "No improvement run yet. Compare the fixes with, e.g.: clipfail improve --categories Object,Attribute "
            f"--method qb-norm --control successes:200 (methods: {', '.join(names())}).",
            cls="missing",
        )
        missing.append("method comparison: clipfail improve --method ...")
        return
    page.p(
        "Each training-free fix is an improvement run on the same labelled failures: templates (prompt "
        "ensembling, one row per pooling), inverted-softmax, qb-norm (QB-Norm with the Dynamic Inverted Softmax "
        "over a query bank) and query-expansion (Rocchio-style). Per category ('*' = all the run's captions), "
        "rank 1 is the method with the largest R@1 gain there (counted pessimistically for a run whose ties "
        "would otherwise decide it: no method gains from ties); deltas are pp with the paired bootstrap 95% "
        "interval and the exact McNemar p; the share of R@1 successes broken comes from the method's control "
        "run (blank without one; a gain on failures alone is biased upward). Values from view method_comparison."
        + _plugin_note(df)
        + flag
    )
    tie_banner(ctx, "population = 'failures'")
    overlap = df[df["is_bank_overlap"]]
    if not overlap.empty:
        ids = ", ".join(str(int(i)) for i in sorted(set(overlap["improvement_id"])))
        page.p(
            f"WARNING: the query bank of improvement run(s) {ids} held evaluated captions (--allow-bank-overlap): "
            "their own text normalised their scores, so those gains are not a fair test.",
            cls="banner",
        )
    table = df[METHOD_COLUMNS].copy()
    table.insert(
        table.columns.get_loc("mcnemar_p_r1"),
        "95% CI ΔR@1",
        [ci_text(a, b) for a, b in zip(table.pop("ci_low_r1_pp"), table.pop("ci_high_r1_pp"))],
    )
    page.table(
        table,
        "method_comparison",
        "Table 14. Which method helps which category most: methods ranked by ΔR@1 within each category "
        "(view method_comparison)." + flag,
        {
            "baseline_r1_pct": "f2",
            "improved_r1_pct": "f2",
            "delta_r1_pp": "pp",
            "delta_r5_pp": "pp",
            "delta_r10_pp": "pp",
            "mcnemar_p_r1": "p",
            "mcnemar_p_r5": "p",
            "mcnemar_p_r10": "p",
            "share_r1_successes_broken": "f4",
            "method_rank_r1": "int",
            "improvement_id": "int",
        },  # fmt: skip
    )
    for category, group in df.groupby("category", sort=False):
        group = group.sort_values("improvement_id")
        num = page.next_figure()
        name = "all captions" if category == "*" else str(category)
        page.figure(
            partial(
                method_comparison_chart,
                group,
                f"Figure {num}. {name}: baseline vs each method" + (" (SIMULATED labels)" if simulated else ""),
                page.figures_dir / f"figure{num}_methods_{slug(name)}",
                subtitle="Recall@K (%) of the labelled failures; view method_comparison",
            ),
            f"Figure {num}. {name}: baseline and improved R@1/5/10 per method.{flag}",
        )


BUILTIN = {"templates", "inverted-softmax", "qb-norm", "query-expansion", "templates+inverted-softmax",
           "templates+qb-norm"}  # fmt: skip


def _plugin_note(df: pd.DataFrame) -> str:
    """A sentence naming the methods on the page that are not clipfail's own (plugins, entry-point group
    clipfail.methods); empty when there are none."""
    other = sorted({str(m) for m in df["method"].dropna()} - BUILTIN)
    if not other:
        return ""
    return (
        f" Also here: {', '.join(other)}, improvement method(s) added by a plugin (entry-point group "
        "clipfail.methods): see that package's documentation for what they do."
    )
