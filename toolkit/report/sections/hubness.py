"""Section 9: hubness of the retrieval runs of the report's subset (views hubness_summary, hubness_histogram,
hub_ranking)."""

from __future__ import annotations

from functools import partial

from toolkit.report.htmlpage import Context
from toolkit.store import db
from toolkit.store import paths as study_paths

HUB_THUMBNAILS = 10


def render(ctx: Context) -> None:
    """Section 9: hubness of the retrieval runs of the report's subset (view hubness_summary, both
    directions), the N_1 / N_10 histograms of the report's run (view image_hubness), and its top hubs
    as thumbnails."""
    con, page, rrid = ctx.con, ctx.page, ctx.rrid
    from toolkit.report.figures import k_occurrence_histogram, thumbnail_grid

    page.h2("hubness", "9. Hubness")
    if rrid is None or not db.table_exists(con, "hubness_summary"):
        page.p("No retrieval run yet. Run: clipfail evaluate", cls="missing")
        return
    page.p(
        "A hub is a gallery item that many queries retrieve. N_k (k-occurrence) counts the queries that have an "
        "item in their top k; its skewness over the gallery is the standard measure of hubness (0 for a symmetric "
        "spread; CLIP-like embeddings are typically strongly right-skewed). An item is a hub when N_10 is at least "
        "3 times the N_10 it would have if top-10 lists were spread evenly (view image_hubness, column "
        "hub_threshold). Shares are fractions."
    )
    summary = con.execute(
        """
        SELECT h.* FROM hubness_summary h
        JOIN retrieval_runs r USING (retrieval_run_id)
        WHERE r.subset_id = (SELECT subset_id FROM retrieval_runs WHERE retrieval_run_id = ?)
        ORDER BY h.retrieval_run_id
        """,
        [rrid],
    ).df()
    page.table(
        summary,
        "hubness_summary",
        "Table 12. Hubness of each retrieval run of this subset, both directions (view hubness_summary).",
        {
            "skewness_n10": "f2",
            "skewness_n1": "f2",
            "share_never_top10": "f4",
            "share_never_top1": "f4",
            "share_r1_failures_top1_hub": "f4",
        },
    )
    hist = con.execute(
        "SELECT k, n_k, n_items FROM hubness_histogram WHERE retrieval_run_id = ? ORDER BY k, n_k", [rrid]
    ).df()
    if hist.empty:
        return
    num = page.next_figure()
    page.figure(
        partial(
            k_occurrence_histogram,
            hist,
            f"Figure {num}. k-occurrence of the gallery (run {rrid})",
            page.figures_dir / f"figure{num}_hubness",
        ),
        f"Figure {num}. How many gallery items each number of queries retrieves (N_1, N_10; log-scaled counts; "
        "view image_hubness).",
    )
    hubs = con.execute(
        "SELECT gallery_kind, gallery_id, n_1, n_10, is_hub, rel_path, image_root FROM hub_ranking "
        "WHERE retrieval_run_id = ? AND hub_rank <= ? ORDER BY hub_rank",
        [rrid, HUB_THUMBNAILS],
    ).df()
    page.table(
        hubs[["gallery_kind", "gallery_id", "n_1", "n_10", "is_hub"]],
        "top_hubs",
        f"Table 13. The {len(hubs)} gallery items most often in a top 10 (view image_hubness).",
    )
    if (hubs["gallery_kind"] == "image").all():
        items = []
        for r in hubs.itertuples():
            root = study_paths.resolve(con, r.image_root) if isinstance(r.image_root, str) else None
            path = root / r.rel_path if root is not None and isinstance(r.rel_path, str) else None
            items.append((path, f"image {int(r.gallery_id)}\nN_10 {r.n_10}, N_1 {r.n_1}"))
        num = page.next_figure()
        page.figure(
            partial(
                thumbnail_grid, items, f"Figure {num}. Top hubs (run {rrid})", page.figures_dir / f"figure{num}_hubs"
            ),
            f"Figure {num}. The images most often retrieved in a top 10, with their N_10 and N_1.",
        )
