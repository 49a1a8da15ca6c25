"""Figures as PNG and SVG files, drawn with matplotlib's Agg backend (no display needed).

`taxonomy_bar_chart(df, title, path_stem)` draws Figures 1 and 2 of the study (and any other
category table shaped like the taxonomy views): one bar per category in the order of `df`,
each labelled with its count and percentage as the view gives them (nothing is recomputed).
The report stage reuses it.

Files are reproducible: the SVG has a fixed hash salt and no date, the PNG no timestamp.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before anything imports pyplot; harmless if already Agg

from matplotlib.figure import Figure  # noqa: E402

ACTIONABLE_COLOUR = "#3b6ea5"
NOT_ACTIONABLE_COLOUR = "#9a9a9a"
DPI = 150


def _save(fig: Figure, path_stem: Path) -> list[Path]:
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    png = path_stem.with_name(path_stem.name + ".png")
    svg = path_stem.with_name(path_stem.name + ".svg")
    fig.savefig(png, dpi=DPI, metadata={"Software": None})
    with matplotlib.rc_context({"svg.hashsalt": "clipfail", "svg.fonttype": "none"}):
        fig.savefig(svg, metadata={"Date": None, "Creator": None})
    return [png, svg]


def taxonomy_bar_chart(
    df,
    title: str,
    path_stem,
    *,
    subtitle: str | None = None,
    category_col: str = "category",
    count_col: str = "count",
    percent_col: str = "percent",
) -> list[Path]:
    """Bar chart of a category table, one bar per row in the given order, with
    "count" and "percent%" written on each bar. Writes `<path_stem>.png` and `<path_stem>.svg`
    and returns both paths.

    `df` needs the category, count and percent columns (names configurable); an `is_actionable`
    column, if present, colours non-actionable categories grey.
    """
    path_stem = Path(path_stem)
    categories = [str(c) for c in df[category_col]]
    counts = [int(c) for c in df[count_col]]
    percents = [float(p) for p in df[percent_col]]
    if "is_actionable" in df.columns:
        colours = [ACTIONABLE_COLOUR if bool(a) else NOT_ACTIONABLE_COLOUR for a in df["is_actionable"]]
    else:
        colours = [ACTIONABLE_COLOUR] * len(categories)

    width = max(6.0, 1.0 + 1.05 * len(categories))
    fig = Figure(figsize=(width, 4.8), layout="constrained")
    ax = fig.add_subplot()
    xs = list(range(len(categories)))
    bars = ax.bar(xs, counts, color=colours, width=0.7, edgecolor="#2b2b2b", linewidth=0.6)
    top = max(counts, default=0)
    ax.set_ylim(0, top * 1.22 + 1)
    for bar, count, pct in zip(bars, counts, percents):
        ax.annotate(
            f"{count}\n{pct:.2f}%",
            xy=(bar.get_x() + bar.get_width() / 2, bar.get_height()),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax.set_xticks(xs, categories)
    ax.set_ylabel("failures (count)")
    ax.spines[["top", "right"]].set_visible(False)
    ax.yaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title, fontsize=12, fontweight="bold")
    if subtitle:
        ax.set_title(subtitle, fontsize=9, color="#444444")
    if "is_actionable" in df.columns and not all(bool(a) for a in df["is_actionable"]):
        from matplotlib.patches import Patch

        ax.legend(
            handles=[
                Patch(facecolor=ACTIONABLE_COLOUR, label="actionable"),
                Patch(facecolor=NOT_ACTIONABLE_COLOUR, label="not actionable"),
            ],
            frameon=False,
            fontsize=8,
            loc="upper right",
        )
    return _save(fig, path_stem)
