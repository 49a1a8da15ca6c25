"""Analyze imported labels: the taxonomy tables, annotator agreement, Figures 1 and 2.

Every number comes from the views (queries/taxonomy_distribution.sql, taxonomy_actionable.sql,
taxonomy_by_annotator.sql, annotator_agreement.sql) for one retrieval run; this module only
selects them, writes them as CSV and draws the two bar charts (toolkit.report.figures).

With no `out_dir` (the Python API's default) nothing is written: the result holds the tables.
Files written in `out_dir` (the CLI's --out):
  taxonomy_distribution.csv, taxonomy_actionable.csv, taxonomy_by_annotator.csv,
  annotator_agreement.csv, figure1_taxonomy.png/.svg, figure2_actionable.png/.svg
and nothing else: the files are staged and swapped in (toolkit.report.outdir), so a reused out_dir keeps no
table or figure of an earlier analysis, and a folder holding files that no analysis wrote is
refused. Text cells of the CSVs are guarded against spreadsheet formulas (toolkit.sheets).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from toolkit.report.outdir import FreshFolder
from toolkit.sheets import write_frame_csv
from toolkit.store.runs import resolve_retrieval_run

PERCENT_COLUMNS = ("percent", "percent_lr", "percent_agreement")


@dataclass
class AnalysisResult:
    retrieval_run_id: int
    distribution: pd.DataFrame
    actionable: pd.DataFrame
    by_annotator: pd.DataFrame
    agreement: pd.DataFrame
    is_simulated: bool
    n_labelled_samples: int  # outside the overlap set (the taxonomy's n)
    n_overlap_samples: int  # labelled overlap samples (the agreement's items)
    out_dir: Path | None  # None: nothing was written
    written: list[Path] = field(default_factory=list)


def _view(con, name: str, rrid: int) -> pd.DataFrame:
    df = con.execute(f"SELECT * FROM {name} WHERE retrieval_run_id = ?", [rrid]).df()
    return df.reset_index(drop=True)


def write_csv(df: pd.DataFrame, path: Path) -> Path:
    """CSV with percentages printed with exactly 2 decimals (as the views round them), text cells
    guarded against spreadsheet formulas."""
    out = df.copy()
    for col in PERCENT_COLUMNS:
        if col in out.columns:
            out[col] = out[col].map(lambda v: "" if pd.isna(v) else f"{float(v):.2f}")
    return write_frame_csv(out, path)


def analyze(
    con, out_dir: str | Path | None = None, retrieval_run_id: int | None = None, figures: bool = True
) -> AnalysisResult:
    """Select the taxonomy tables and the agreement of one retrieval run; with `out_dir`, also write
    them as CSVs with Figures 1-2 there (without it, nothing is written)."""
    rrid = int(resolve_retrieval_run(con, retrieval_run_id, need="labels", purpose="analyze")["retrieval_run_id"])
    out_dir = None if out_dir is None else Path(out_dir)
    dist = _view(con, "taxonomy_distribution", rrid)
    act = _view(con, "taxonomy_actionable", rrid)
    by_ann = _view(con, "taxonomy_by_annotator", rrid)
    agree = _view(con, "annotator_agreement", rrid)
    counts = con.execute(
        "SELECT count(*) FILTER (WHERE NOT is_overlap), count(*) FILTER (WHERE is_overlap), "
        "coalesce(bool_or(is_simulated), false) FROM sample_labels WHERE retrieval_run_id = ?",
        [rrid],
    ).fetchone()
    result = AnalysisResult(
        retrieval_run_id=rrid,
        distribution=dist,
        actionable=act,
        by_annotator=by_ann,
        agreement=agree,
        is_simulated=bool(counts[2]),
        n_labelled_samples=int(counts[0]),
        n_overlap_samples=int(counts[1]),
        out_dir=out_dir,
    )
    if out_dir is not None:
        with FreshFolder(out_dir, "analysis") as fresh:
            _write_files(result, fresh, figures)
    return result


def _write_files(result: AnalysisResult, fresh: FreshFolder, figures: bool) -> None:
    """The CSVs and figures, written into the staging folder and swapped into result.out_dir."""
    from toolkit.report.figures import taxonomy_bar_chart

    rrid, dist, act, agree = result.retrieval_run_id, result.distribution, result.actionable, result.agreement
    by_ann, out_dir = result.by_annotator, fresh.staging
    for name, df in (
        ("taxonomy_distribution", dist),
        ("taxonomy_actionable", act),
        ("taxonomy_by_annotator", by_ann),
        ("annotator_agreement", agree),
    ):
        result.written.append(write_csv(df, out_dir / f"{name}.csv"))
    if figures:
        note = " (SIMULATED labels)" if result.is_simulated else ""
        if not dist.empty:
            n = int(dist["n_total"].iloc[0])
            result.written += taxonomy_bar_chart(
                dist,
                f"Figure 1. Failure categories{note}",
                out_dir / "figure1_taxonomy",
                subtitle=f"retrieval run {rrid}: {n} labelled R@1 failures, merged over annotators, overlap set "
                "excluded",
            )
        if not act.empty:
            n = int(act["n_total"].iloc[0])
            result.written += taxonomy_bar_chart(
                act,
                f"Figure 2. Actionable failure categories{note}",
                out_dir / "figure2_actionable",
                subtitle=f"retrieval run {rrid}: {n} actionable failures (not-actionable categories removed)",
            )
    result.written = [fresh.final(p) for p in result.written]
    fresh.commit()
