"""Section 4: category-aware prompt ensembling, one subsection per failure subset (runs that share their
captions and templates, view improvement_subset_keys): baseline, effective K (view improvement_prompt_counts),
the reference study's table (view improvement_recall), a bar chart, and per category (view
category_recall_delta) when the subset spans several."""

from __future__ import annotations

from functools import partial

import pandas as pd

from toolkit.improve.stage import summary as improve_summary
from toolkit.report.display import improvement_table, pooling_label
from toolkit.report.htmlpage import Context, fmt, slug
from toolkit.report.sections.common import NO_IMPROVEMENT, TEMPLATES, templates_wide, tie_banner

STUDY_FORMATS = {
    "improved R@1": "f2", "improved R@5": "f2", "improved R@10": "f2", "ΔR@1 (pp)": "pp", "ΔR@5 (pp)": "pp",
    "ΔR@10 (pp)": "pp", "McNemar p R@1": "p", "McNemar p R@5": "p", "McNemar p R@10": "p", "improvement_id": "int",
}  # fmt: skip
BY_CATEGORY_FORMATS = {
    "baseline_pct": "f2", "improved_pct": "f2", "delta_pp": "pp", "ci_low_pp": "pp", "ci_high_pp": "pp",
    "mcnemar_p": "p", "tau": "f2",
}  # fmt: skip


def render(ctx: Context) -> None:
    page = ctx.page
    page.h2("improvement", "4. Category-aware prompt ensembling")
    wide = templates_wide(ctx)
    if wide.empty:
        page.p(NO_IMPROVEMENT, cls="missing")
        ctx.missing.append("improvement runs: clipfail improve")
        return
    page.p(
        "Each caption of a labelled subset is expanded into up to K distinct prompts (the caption itself and the "
        "templates that apply to it; how many each caption got, its effective K, is given per subset); each is scored "
        "against every image and the scores are pooled per image (max, mean, or logsumexp with temperature "
        "tau). All values are percentages; deltas are percentage points (pp) against the same captions' baseline. "
        "The 95% interval is a paired bootstrap (10,000 resamples, seeded) and p is the exact McNemar test "
        "of the paired hit/miss outcomes; both are stored by improve and read from view improvement_recall."
        + _labels_flag(ctx)
    )
    tie_banner(ctx, TEMPLATES)
    keys = ["categories", "template_set", "template_mode", "k_prompts"]
    failures = wide[wide["population"] == "failures"]
    # One section per subset: runs that share categories and templates but not their captions (another
    # --max-subset, --seed, --include-overlap, or labels imported since) or their templates' content have
    # their own n and baseline, so they are never put under one heading (or into one CSV).
    subset_keys = ctx.con.execute(
        "SELECT improvement_id, subset_key FROM improvement_subset_keys WHERE retrieval_run_id = ?", [ctx.rrid]
    ).fetchall()
    subset_key = failures["improvement_id"].map(dict(subset_keys))
    used_slugs: set[str] = set()
    # dropna=False: runs made before K could be chosen have no k_prompts and must still be shown
    groups = failures.groupby([*keys, subset_key.rename("subset_key")], sort=False, dropna=False)
    for n_sub, (key, group) in enumerate(groups, start=1):
        _subset(ctx, n_sub, key, group.reset_index(drop=True), used_slugs)


def _labels_flag(ctx: Context) -> str:
    return " SIMULATED labels chose these captions." if ctx.simulated else ""


def _subset(ctx: Context, n_sub: int, key, group: pd.DataFrame, used_slugs: set[str]) -> None:
    """Subsection 4.n: one failure subset's runs (one per pooling)."""
    from toolkit.report.figures import improvement_bar_chart

    page, flag = ctx.page, _labels_flag(ctx)
    categories, template_set, template_mode, k_prompts, _subset_key = key
    first = group.iloc[0]
    k_asked = None if pd.isna(k_prompts) else int(k_prompts)
    k_title = "" if k_asked is None else f", K {k_asked}"
    page.h3(f"4.{n_sub} {categories} (n={int(first['n'])}, templates {template_set}, mode {template_mode}{k_title})")
    page.p(
        f"Baseline: R@1 {fmt(first['baseline_r1'], 'f2')}, R@5 {fmt(first['baseline_r5'], 'f2')}, "
        f"R@10 {fmt(first['baseline_r10'], 'f2')}. {_effective_k_text(ctx, first, k_asked)}"
    )
    name = slug(f"{categories}_{template_set}_{template_mode}" + ("" if k_asked in (None, 10) else f"_k{k_asked}"))
    if name in used_slugs:  # another subset of the same categories: its own CSV, named by its first run
        name = f"{name}_run{int(first['improvement_id'])}"
    used_slugs.add(name)
    page.table(
        improvement_table(improve_summary(ctx.con, group["improvement_id"]), group["improvement_id"]),
        f"improvement_{name}",
        f"Table 6.{n_sub}. {categories}: baseline vs improved Recall@K per pooling (view improvement_recall)." + flag,
        STUDY_FORMATS,
    )
    num = page.next_figure()
    page.figure(
        partial(
            improvement_bar_chart,
            group,
            [pooling_label(p, t) for p, t in zip(group["pooling"], group["tau"])],
            f"Figure {num}. {categories} subset (n={int(first['n'])})"
            + (" (SIMULATED labels)" if ctx.simulated else ""),
            page.figures_dir / f"figure{num}_{name}",
            subtitle=f"baseline vs improved Recall@K across poolings; templates {template_set}, {template_mode}",
        ),
        f"Figure {num}. {categories} subset: baseline vs improved R@1/5/10 across pooling.{flag}",
    )
    if len(str(categories).split(",")) > 1:
        per_cat = ctx.con.execute(
            """
            SELECT c.improvement_id, c.pooling, c.tau, c.tie_count, c.category, c.k, c.n, c.baseline_pct,
                   c.improved_pct, c.delta_pp, c.ci_low_pp, c.ci_high_pp, c.mcnemar_p
            FROM category_recall_delta c
            JOIN improvement_recall_wide w ON w.improvement_id = c.improvement_id
            WHERE list_contains(?, c.improvement_id)
            ORDER BY w.pooling_position, c.improvement_id, c.category, c.k
            """,
            [[int(i) for i in group["improvement_id"]]],
        ).df()
        page.table(
            per_cat,
            f"improvement_{name}_by_category",
            f"Table 6.{n_sub}b. {categories}: the same runs per category (view category_recall_delta).",
            BY_CATEGORY_FORMATS,
        )


def _effective_k_text(ctx: Context, run: pd.Series, k_asked: int | None) -> str:
    """The K asked for and how many prompts the captions really got (view improvement_prompt_counts)."""
    if k_asked is None:  # a run made before prompts were distinct: K templates, copies of the caption included
        return f"Templates per category (K, copies of the caption included): {run['k_per_category']}."
    dist = ctx.con.execute(
        "SELECT effective_k, n_captions FROM improvement_prompt_counts WHERE improvement_id = ? "
        "ORDER BY effective_k DESC",
        [int(run["improvement_id"])],
    ).fetchall()
    parts = ", ".join(f"{int(k)} for {int(n)} caption{'s' if n != 1 else ''}" for k, n in dist)
    return f"Distinct prompts per caption: K {k_asked} asked; effective K {parts} (view improvement_effective_k)."
