"""Figures as PNG and SVG files, drawn with matplotlib's Agg backend (no display needed).

`taxonomy_bar_chart(df, title, path_stem)` draws Figures 1 and 2 of the study (and any other
category table shaped like the taxonomy views): one bar per category in the order of `df`,
each labelled with its count and percentage as the view gives them (nothing is recomputed).
The report stage reuses it, and draws its other charts here too:
`improvement_bar_chart` (baseline vs improved Recall@K per pooling, from improvement_recall),
`triage_confusion_figure` (a heatmap of the triage_confusion view), and for each comparison of two
runs `rank_scatter` (view run_pairs) and `fixed_broken_shared_chart` (view
failure_overlap_by_category). Every chart draws the values it is given; none computes a number.

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
    fig.set_layout_engine("none")  # keep the layout the PNG was drawn with: the SVG has the same, without a second pass
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


def improvement_bar_chart(group, labels, title: str, path_stem, subtitle: str | None = None) -> list[Path]:
    """Grouped bars: for R@1, R@5, R@10 the baseline and each pooling's improved Recall@K (in %, from the view).

    `group` holds one row per improvement run of one subset (columns baseline_r1/5/10, taken from its first
    row, and improved_r1/5/10); `labels` names each row's bars in the legend (the report's pooling labels).
    """
    first = group.iloc[0]
    series = [("baseline", [first["baseline_r1"], first["baseline_r5"], first["baseline_r10"]])]
    for label, row in zip(labels, group.itertuples()):
        series.append((label, [row.improved_r1, row.improved_r5, row.improved_r10]))
    colours = ["#9a9a9a", "#3b6ea5", "#e08a2c", "#4e9a4e", "#a04ea0", "#c44e52", "#5aa0c8"]
    fig = Figure(figsize=(7.5, 4.6), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for j, (label, values) in enumerate(series):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(3)]
        bars = ax.bar(
            xs,
            [float(v) for v in values],
            width=width,
            label=label,
            color=colours[j % len(colours)],
            edgecolor="#2b2b2b",
            linewidth=0.5,
        )
        for bar, v in zip(bars, values):
            ax.annotate(
                f"{float(v):.1f}",
                xy=(bar.get_x() + bar.get_width() / 2, bar.get_height()),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.set_xticks(range(3), ["R@1", "R@5", "R@10"])
    ax.set_ylabel("Recall@K (%)")
    top = max(float(v) for _, values in series for v in values)
    ax.set_ylim(0, max(10.0, top * 1.18))
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(frameon=False, fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=12, fontweight="bold")
    if subtitle:
        ax.set_title(subtitle, fontsize=9, color="#444444")
    return _save(fig, Path(path_stem))


def triage_confusion_figure(conf, title: str, path_stem) -> list[Path]:
    """A heatmap of the triage_confusion view: human labels (rows) by suggestions (columns), counts as given."""
    rows = list(dict.fromkeys(conf["human_category"]))
    cols = list(dict.fromkeys(conf["suggested_category"]))
    cols = [c for c in cols if c != "(none)"] + (["(none)"] if "(none)" in cols else [])
    cells = {(h, s): int(n) for h, s, n in zip(conf["human_category"], conf["suggested_category"], conf["n"])}
    grid = [[cells.get((h, s), 0) for s in cols] for h in rows]
    fig = Figure(figsize=(1.2 + 0.9 * len(cols), 1.0 + 0.55 * len(rows)))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(grid, cmap="Blues", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel("triage suggestion")
    ax.set_ylabel("human label")
    top = max((max(r) for r in grid), default=0)
    for i, r in enumerate(grid):
        for j, v in enumerate(r):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color="white" if v > top / 2 else "black")
    fig.suptitle(title, fontsize=10, fontweight="bold")
    fig.tight_layout()
    return _save(fig, Path(path_stem))


# --------------------------------------------------------------------------- comparison of two runs (issue 18)

FIXED_COLOUR = "#2e8b57"
BROKEN_COLOUR = "#c0392b"
SHARED_COLOUR = "#9a9a9a"


def rank_scatter(
    pairs, title: str, path_stem, *, label_a: str, label_b: str, subtitle: str | None = None
) -> list[Path]:
    """Log-log scatter of each query's rank in run A (x) against run B (y), as the `run_pairs` view gives
    them, with the diagonal (same rank). Points below it are queries that B ranks better. Ranks start
    at 1, so both axes start at 1; rank 1 (a hit at R@1) sits on the axis line."""
    path_stem = Path(path_stem)
    xs = [int(v) for v in pairs["rank_a"]]
    ys = [int(v) for v in pairs["rank_b"]]
    top = max(xs + ys + [2])
    fig = Figure(figsize=(5.6, 5.2), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(xs, ys, s=6, alpha=0.35, color=ACTIONABLE_COLOUR, linewidths=0, rasterized=len(xs) > 5000)
    ax.plot([1, top], [1, top], color="#444444", linewidth=0.8, linestyle="--", label="same rank")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(0.8, top * 1.25)
    ax.set_ylim(0.8, top * 1.25)
    ax.set_xlabel(f"rank in A: {label_a}")
    ax.set_ylabel(f"rank in B: {label_b}")
    ax.legend(frameon=False, fontsize=8, loc="upper left")
    ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(title, fontsize=11, fontweight="bold")
    if subtitle:
        ax.set_title(subtitle, fontsize=8, color="#444444")
    return _save(fig, path_stem)


def fixed_broken_shared_chart(df, title: str, path_stem, *, subtitle: str | None = None) -> list[Path]:
    """Grouped bars per category of the `failure_overlap_by_category` view: fixed (A's labelled failures
    that B retrieves at rank 1), broken (B's labelled failures that A retrieved at rank 1; drawn only
    where the view gives a number) and shared (A's labelled failures that B also misses)."""
    path_stem = Path(path_stem)
    cats = [str(c) for c in df["category"]]
    series = [("fixed", "n_fixed", FIXED_COLOUR), ("shared", "n_shared", SHARED_COLOUR)]
    has_broken = "n_broken" in df.columns and df["n_broken"].notna().any()
    if has_broken:
        series.insert(1, ("broken", "n_broken", BROKEN_COLOUR))
    width = 0.8 / len(series)
    fig = Figure(figsize=(max(6.0, 1.0 + 1.1 * len(cats)), 4.6), layout="constrained")
    ax = fig.add_subplot()
    top = 0
    for j, (label, col, colour) in enumerate(series):
        values = [0 if v is None or v != v else int(v) for v in df[col]]
        top = max([top] + values)
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(cats))]
        bars = ax.bar(xs, values, width=width, color=colour, edgecolor="#2b2b2b", linewidth=0.5, label=label)
        for bar, v in zip(bars, values):
            ax.annotate(
                str(v),
                xy=(bar.get_x() + bar.get_width() / 2, bar.get_height()),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8,
            )
    ax.set_ylim(0, top * 1.2 + 1)
    ax.set_xticks(range(len(cats)), cats)
    ax.set_ylabel("labelled failures (count)")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(frameon=False, fontsize=8, loc="upper right")
    fig.suptitle(title, fontsize=11, fontweight="bold")
    if subtitle:
        ax.set_title(subtitle, fontsize=8, color="#444444")
    return _save(fig, path_stem)


# --------------------------------------------------------------------------- hubness and methods (issue 17)


def k_occurrence_histogram(hist, title: str, path_stem, *, subtitle: str | None = None) -> list[Path]:
    """Histogram of the k-occurrence N_k of a run's gallery items, log-scaled counts.

    `hist` has columns k (1 or 10), n_k (a k-occurrence value) and n_items (how many gallery items
    have it), as the report's query of view image_hubness returns them; nothing is recomputed.
    One panel per k; the y axis (number of items) is logarithmic, so the long tail of hubs shows."""
    path_stem = Path(path_stem)
    ks = sorted({int(k) for k in hist["k"]})
    fig = Figure(figsize=(4.2 * max(1, len(ks)), 3.8), layout="constrained")
    for i, k in enumerate(ks):
        ax = fig.add_subplot(1, len(ks), i + 1)
        part = hist[hist["k"] == k]
        ax.bar([int(v) for v in part["n_k"]], [int(c) for c in part["n_items"]], width=1.0,
               color=ACTIONABLE_COLOUR, edgecolor="#2b2b2b", linewidth=0.3)  # fmt: skip
        ax.set_yscale("log")
        ax.set_xlabel(f"N_{k} (queries with the item in their top {k})")
        ax.set_ylabel("gallery items (log scale)")
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(title, fontsize=12, fontweight="bold")
    if subtitle:
        fig.text(0.5, 0.0, subtitle, ha="center", va="bottom", fontsize=8, color="#444444")
    return _save(fig, path_stem)


def thumbnail_grid(items, title: str, path_stem, *, columns: int = 5) -> list[Path]:
    """A grid of image thumbnails: `items` is a list of (image file path or None, label). A missing or
    unreadable file is drawn as a grey box labelled "(image file not found)"."""
    from PIL import Image

    path_stem = Path(path_stem)
    n = max(1, len(items))
    cols = min(columns, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(2.2 * cols, 2.5 * rows + 0.5), layout="constrained")
    for i, (path, label) in enumerate(items):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_xticks([])
        ax.set_yticks([])
        img = None
        if path is not None:
            try:
                with Image.open(path) as src:
                    src.thumbnail((256, 256))
                    img = src.convert("RGB")
            except OSError:
                img = None
        if img is not None:
            ax.imshow(img)
        else:
            ax.set_facecolor("#dddddd")
            ax.text(0.5, 0.5, "(image file\nnot found)", ha="center", va="center", fontsize=8, transform=ax.transAxes)
        ax.set_title(label, fontsize=8)
    fig.suptitle(title, fontsize=11, fontweight="bold")
    return _save(fig, path_stem)


def method_comparison_chart(df, title: str, path_stem, *, subtitle: str | None = None) -> list[Path]:
    """Grouped bars for one category: for R@1, R@5, R@10 the baseline and each method's improved Recall@K
    (in %), as view method_comparison gives them. `df` has one row per method (columns method_label,
    baseline_r1/5/10_pct, improved_r1/5/10_pct)."""
    path_stem = Path(path_stem)
    first = df.iloc[0]
    series = [("baseline", [first["baseline_r1_pct"], first["baseline_r5_pct"], first["baseline_r10_pct"]])]
    for row in df.itertuples():
        series.append((str(row.method_label), [row.improved_r1_pct, row.improved_r5_pct, row.improved_r10_pct]))
    colours = ["#9a9a9a", "#3b6ea5", "#e08a2c", "#4e9a4e", "#a04ea0", "#c44e52", "#5aa0c8", "#8c6d31"]
    fig = Figure(figsize=(max(7.5, 1.5 + 0.5 * len(series) * 3), 4.6), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for j, (label, values) in enumerate(series):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(3)]
        ax.bar(xs, [float(v) for v in values], width=width, label=label, color=colours[j % len(colours)],
               edgecolor="#2b2b2b", linewidth=0.5)  # fmt: skip
    ax.set_xticks(range(3), ["R@1", "R@5", "R@10"])
    ax.set_ylabel("Recall@K (%)")
    top = max(float(v) for _, values in series for v in values)
    ax.set_ylim(0, max(10.0, top * 1.18))
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(frameon=False, fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=12, fontweight="bold")
    if subtitle:
        ax.set_title(subtitle, fontsize=9, color="#444444")
    return _save(fig, path_stem)


# --------------------------------------------------------------------------- phrase ablation (issue 28)

BLAME_COLOURS = {
    "attribute": "#d95f02", "count": "#7570b3", "relation": "#1b9e77", "action": "#e7298a", "object": "#3b6ea5",
    "none": "#bdbdbd", "no phrase": "#eeeeee",
}  # fmt: skip


def blame_by_category_chart(df, title: str, path_stem, *, subtitle: str | None = None) -> list[Path]:
    """Stacked horizontal bars of the blame_by_category view: one bar per human category (in the view's order),
    split by blamed role into the view's percentages, each segment labelled with its count."""
    path_stem = Path(path_stem)
    cats = list(dict.fromkeys(str(c) for c in df["category"]))
    roles = [r for r in BLAME_COLOURS if r in set(df["blamed_role"])]
    cells = {(str(c), r): (float(p), int(n)) for c, r, p, n in zip(df["category"], df["blamed_role"], df["percent"],
                                                                   df["n"])}  # fmt: skip
    fig = Figure(figsize=(8.0, 1.4 + 0.45 * len(cats)), layout="constrained")
    ax = fig.add_subplot()
    ys = list(range(len(cats)))[::-1]
    left = [0.0] * len(cats)
    for role in roles:
        widths = [cells.get((c, role), (0.0, 0))[0] for c in cats]
        bars = ax.barh(ys, widths, left=left, color=BLAME_COLOURS[role], edgecolor="#2b2b2b", linewidth=0.4,
                       label=role)  # fmt: skip
        for bar, c in zip(bars, cats):
            n = cells.get((c, role), (0.0, 0))[1]
            if n and bar.get_width() >= 6:
                ax.text(bar.get_x() + bar.get_width() / 2, bar.get_y() + bar.get_height() / 2, str(n),
                        ha="center", va="center", fontsize=7)  # fmt: skip
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(ys, cats, fontsize=8)
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of the category's explained failures")
    ax.legend(frameon=False, fontsize=7, ncol=len(roles), loc="lower center", bbox_to_anchor=(0.5, 1.0))
    ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(title, fontsize=11, fontweight="bold")
    if subtitle:
        fig.text(0.5, 0.0, subtitle, ha="center", va="bottom", fontsize=8, color="#444444")
    return _save(fig, path_stem)


# --------------------------------------------------------------------------- extended positives (issue 27)


def false_negative_share_chart(df, title: str, path_stem, *, subtitle: str | None = None) -> list[Path]:
    """Horizontal bars of the false_negatives_by_category view: per human category (in the view's order), the share
    of its checkable R@1 failures whose top-1 image is a verified positive (share_verified, a fraction), each bar
    labelled "n_verified of n_checkable"; a category with nothing checkable gets no bar and says so."""
    path_stem = Path(path_stem)
    cats = [str(c) for c in df["category"]]
    shares = [None if v is None or v != v else float(v) for v in df["share_verified"]]
    fig = Figure(figsize=(7.5, 1.4 + 0.45 * len(cats)), layout="constrained")
    ax = fig.add_subplot()
    ys = list(range(len(cats)))[::-1]
    bars = ax.barh(ys, [s or 0.0 for s in shares], color=ACTIONABLE_COLOUR, edgecolor="#2b2b2b", linewidth=0.5)
    for bar, share, n_v, n_c in zip(bars, shares, df["n_verified"], df["n_checkable"]):
        text = f"{int(n_v)} of {int(n_c)}" if share is not None else "none checkable"
        ax.annotate(text, xy=(bar.get_width(), bar.get_y() + bar.get_height() / 2), xytext=(4, 0),
                    textcoords="offset points", va="center", fontsize=8)  # fmt: skip
    ax.set_yticks(ys, cats, fontsize=8)
    ax.set_xlim(0, 1.15)
    ax.set_xlabel("share of the category's checkable R@1 failures whose top-1 is a verified positive")
    ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(title, fontsize=11, fontweight="bold")
    if subtitle:
        ax.set_title(subtitle, fontsize=8, color="#444444")
    return _save(fig, path_stem)
