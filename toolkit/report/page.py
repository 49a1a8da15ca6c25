"""The study's report: one self-contained HTML page, with its figures as PNG/SVG and its tables as CSV.

`write_report(con, out_dir, retrieval_run_id=None)` writes

    out_dir/report.html                  every figure embedded as a base64 data URI (no other files needed)
    out_dir/figures/figureN_*.png|.svg   Figure 1-2 (taxonomy), Figure 3.. (one per improvement subset)
    out_dir/tables/*.csv                 every table of the page (text cells guarded against spreadsheet
                                         formulas by toolkit.sheets: `=HYPERLINK(..)` is written `'=HYPERLINK(..)`)

and nothing else: the files are staged and swapped in, so a reused out_dir keeps nothing of an
earlier report, and a folder holding files that no report wrote is refused (toolkit.report.outdir).

The page is built from a list of sections (toolkit.report.sections.SECTIONS, one module each: baseline,
taxonomy, agreement, ensembling, consolidated, controls, triage, comparisons, hubness, methods, blame,
positives, provenance); this module calls them in turn and wraps what they wrote into one HTML document.

Every number on the page is a value that a SQL view in queries/ returned (recall_summary, taxonomy_distribution,
sample_label_counts, annotator_agreement, improvement_recall, improvement_recall_wide, category_recall_delta,
improvement_prompt_counts, triage_*, run_comparison, hubness_histogram, hub_ranking, method_comparison,
blame_by_category, blame_agreement, blame_examples, positive_coverage, recall_extended, false_negatives_by_category,
false_negatives_triage_agreement, false_negatives_by_triage_rule, improvement_recall_extended, ...):
the sections' queries only select, filter and order. Python formats values (decimal places, a sign) and never
computes one. The provenance section lists what made the numbers: model, weights, subset, seeds, package
versions and every run's config hash.

Labels written by the demo's simulated annotators (annotations.is_simulated) are flagged in a
banner at the top of the page and beside every table and figure that uses them.
"""

from __future__ import annotations

import datetime as dt
import html
from dataclasses import dataclass, field
from pathlib import Path

from toolkit._version import __version__
from toolkit.report.htmlpage import CSS, Context, Page
from toolkit.report.outdir import FreshFolder
from toolkit.report.sections import SECTIONS
from toolkit.store import db
from toolkit.store.runs import resolve_retrieval_run


@dataclass
class ReportResult:
    out_dir: Path
    html_path: Path
    retrieval_run_id: int | None
    run_id: int | None
    is_noop: bool
    is_simulated: bool
    figures: list[Path] = field(default_factory=list)
    tables: list[Path] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)  # titles of the sections with content
    missing: list[str] = field(default_factory=list)  # what has not run yet, with the command


# --------------------------------------------------------------------------- entry point


def write_report(
    con,
    out_dir="report",
    retrieval_run_id: int | None = None,
    db_path: str | None = None,
    notes: list[str] | None = None,
    generated_images: bool = False,
    figures: bool = True,
):
    """Write report.html, figures/ and tables/ for one retrieval run (default: the one labelled last).

    `notes` are shown in a box under the title (the demo says there that its model is random).
    `generated_images` (the demo): section 12 says that no ECCV Caption / CxC positive can apply to its images.
    `figures=False` (`--no-figures`) draws no figure: the page and the tables are the same, and each figure's place
    gives its number and caption and says that it was left out (no figures/ folder).

    The report is written into a fresh staging folder and swapped into out_dir (toolkit.report.outdir), so
    out_dir then holds this report only. A folder holding files that an earlier report did not write
    (or that changed since) is refused, listing them, before anything is written."""
    with FreshFolder(out_dir, "report") as fresh:
        return _write_report(con, fresh, retrieval_run_id, db_path, notes, generated_images, figures)


def _write_report(
    con, fresh: FreshFolder, retrieval_run_id, db_path, notes, generated_images=False, figures=True
) -> ReportResult:
    started = db.now()
    out_dir = fresh.out_dir
    run = resolve_retrieval_run(con, retrieval_run_id, need="report")
    rrid = None if run is None else int(run["retrieval_run_id"])
    ctx = Context(
        con, Page(fresh.staging, draw_figures=figures), rrid, notes=list(notes or []), generated_images=generated_images
    )
    if rrid is not None:
        row = con.execute(
            "SELECT is_simulated, n_labelled FROM sample_label_counts WHERE retrieval_run_id = ?", [rrid]
        ).fetchone()
        ctx.simulated, ctx.n_labelled = (bool(row[0]), int(row[1])) if row else (False, 0)
    for section in SECTIONS:
        section(ctx)
    page, simulated = ctx.page, ctx.simulated

    # The run row: the same database state and options again is a no-op (the files are rewritten anyway).
    state = con.execute("SELECT coalesce(max(run_id), 0) FROM runs WHERE stage <> 'report'").fetchone()[0]
    config = {"out_dir": str(out_dir.resolve()), "retrieval_run_id": rrid, "last_run_id": int(state)}
    if not figures:  # only then: the config of a report with figures stays what earlier versions recorded
        config["figures"] = False
    run_id = db.find_run(con, "report", config)
    is_noop = run_id is not None
    if not is_noop and not db.is_read_only(con):  # a write-protected study is only read: no run row
        with db.transaction(con):
            run_id = db.insert_run(con, "report", config, started)

    doc = _document(page, simulated, notes, db_path, rrid, run_id)
    (fresh.staging / "report.html").write_text(doc, encoding="utf-8")
    figures, tables = [fresh.final(p) for p in page.figures], [fresh.final(p) for p in page.tables]
    fresh.commit()  # out_dir now holds this report, and nothing of an earlier one
    return ReportResult(
        out_dir=out_dir,
        html_path=out_dir / "report.html",
        retrieval_run_id=rrid,
        run_id=run_id,
        is_noop=is_noop,
        is_simulated=simulated,
        figures=figures,
        tables=tables,
        sections=[t for _, t in page.toc],
        missing=ctx.missing,
    )


def _document(page: Page, simulated: bool, notes, db_path, rrid, run_id) -> str:
    """The HTML document: title, meta line, banners, table of contents, then what the sections wrote."""
    title = "CLIP text-to-image retrieval: failure analysis"
    banner = ""
    if simulated:
        banner = (
            '<div class="banner" id="simulated-banner">SIMULATED LABELS. The failure labels in this report were '
            "written by seeded simulated annotators (clipfail demo), not by people. The taxonomy, the agreement "
            "and every per-category improvement below say nothing about CLIP; they only show the pipeline "
            "working.</div>"
        )
    for note in notes or []:
        banner += f'<div class="banner note-box">{html.escape(note)}</div>'
    meta = (
        f"Generated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC} by clipfail {__version__}"
        + (f" from {html.escape(str(db_path))}" if db_path else "")
        + (f"; retrieval run {rrid}" if rrid is not None else "")
        + (f"; report run {run_id}." if run_id is not None else ".")
        + ("" if page.draw_figures else " Tables only: written with --no-figures, no figure was drawn.")
    )
    toc = "".join(f'<li><a href="#{a}">{html.escape(t)}</a></li>' for a, t in page.toc)
    doc = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title>'
        f"<style>{CSS}</style></head><body>"
        f'<h1>{title}</h1><p class="meta">{meta}</p>{banner}'
        f"<nav><ul>{toc}</ul></nav>{''.join(page.parts)}</body></html>\n"
    )
    return doc
