"""The study's report: one self-contained HTML page, with its figures as PNG/SVG and its tables as CSV.

`write_report(con, out_dir, retrieval_run_id=None)` writes

    out_dir/report.html                  every figure embedded as a base64 data URI (no other files needed)
    out_dir/figures/figureN_*.png|.svg   Figure 1-2 (taxonomy), Figure 3.. (one per improvement subset)
    out_dir/tables/*.csv                 every table of the page (text cells guarded against spreadsheet
                                         formulas by toolkit.sheets: `=HYPERLINK(..)` is written `'=HYPERLINK(..)`)

and nothing else: the files are staged and swapped in, so a reused out_dir keeps nothing of an
earlier report, and a folder holding files that no report wrote is refused (toolkit.report.outdir).

Every number on the page is a value that a SQL view returned (recall_summary, taxonomy_distribution,
taxonomy_actionable, taxonomy_by_annotator, annotator_agreement, improvement_recall,
category_recall_delta, improvement_effective_k, triage_*, run_comparison, ...): the queries below only
select, filter and order. Python formats
values (decimal places, a sign) and never computes one. The provenance section lists what made
the numbers: model, weights, subset, seeds, package versions and every run's config hash.

Labels written by the demo's simulated annotators (annotations.is_simulated) are flagged in a
banner at the top of the page and beside every table and figure that uses them.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import importlib.metadata
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from toolkit._version import __version__
from toolkit.improve.stage import summary as improve_summary
from toolkit.report.display import ci_text, improvement_table, pooling_label
from toolkit.report.outdir import FreshFolder
from toolkit.sheets import write_frame_csv
from toolkit.store import db
from toolkit.store import paths as study_paths
from toolkit.store.runs import resolve_retrieval_run

PACKAGES = ["clipfail", "torch", "torchvision", "open_clip_torch", "duckdb", "numpy", "pandas", "matplotlib", "pillow"]


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


# --------------------------------------------------------------------------- small helpers


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "x"


def _fmt(value, kind: str) -> str:
    """Format one value; kind: 'int', 'id' (no separators), 'f2', 'f4', 'pp' (signed, 2 decimals),
    'p' (p-value), 'bool', 'text'."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    if kind == "int":
        return f"{int(value):,}"
    if kind == "id":
        return str(int(value))
    if kind == "f2":
        return f"{float(value):.2f}"
    if kind == "f4":
        return f"{float(value):.4f}"
    if kind == "pp":
        return f"{float(value):+.2f}"
    if kind == "p":
        v = float(value)
        return "<0.0001" if v < 1e-4 else f"{v:.4f}"
    if kind == "bool":
        return "yes" if bool(value) else "no"
    return str(value)


def _guess_kind(series: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(series):
        return "bool"
    if pd.api.types.is_integer_dtype(series):
        return "int"
    if pd.api.types.is_float_dtype(series):
        return "f4"
    return "text"


class _Page:
    """Collects sections of HTML, the CSVs and the figures of one report."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.tables_dir = out_dir / "tables"
        self.figures_dir = out_dir / "figures"
        self.parts: list[str] = []
        self.toc: list[tuple[str, str]] = []
        self.tables: list[Path] = []
        self.figures: list[Path] = []
        self.n_figure = 0

    def h2(self, anchor: str, title: str) -> None:
        self.toc.append((anchor, title))
        self.parts.append(f'<h2 id="{anchor}">{html.escape(title)}</h2>')

    def h3(self, title: str) -> None:
        self.parts.append(f"<h3>{html.escape(title)}</h3>")

    def p(self, text: str, cls: str | None = None, raw: bool = False) -> None:
        body = text if raw else html.escape(text)
        self.parts.append(f'<p class="{cls}">{body}</p>' if cls else f"<p>{body}</p>")

    def table(
        self,
        df: pd.DataFrame,
        name: str,
        caption: str,
        formats: dict[str, str] | None = None,
        csv: bool = True,
        html_columns: list[str] | None = None,
    ) -> None:
        """An HTML table of df (formatted per column; only html_columns, if given) and, with csv=True,
        tables/<name>.csv of all the raw values."""
        formats = formats or {}
        if csv:
            self.tables_dir.mkdir(parents=True, exist_ok=True)
            path = write_frame_csv(df, self.tables_dir / f"{name}.csv")  # text cells guarded against formulas
            self.tables.append(path)
        if html_columns is not None:
            df = df[html_columns]
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
        kinds = {c: formats.get(c) or _guess_kind(df[c]) for c in df.columns}
        for c in df.columns:  # ids and seeds are labels, not quantities: no thousands separators
            if c not in formats and kinds[c] in ("int", "f4") and (str(c).endswith("_id") or c == "seed"):
                kinds[c] = "id"
        rows = []
        for rec in df.itertuples(index=False):
            cells = []
            for col, value in zip(df.columns, rec):
                kind = kinds[col]
                cls = ' class="num"' if kind in ("int", "id", "f2", "f4", "pp", "p") else ""
                cells.append(f"<td{cls}>{html.escape(_fmt(value, kind))}</td>")
            rows.append("<tr>" + "".join(cells) + "</tr>")
        link = f' <a class="csv" href="tables/{name}.csv">{name}.csv</a>' if csv else ""
        self.parts.append(
            f'<div class="scroll"><table data-name="{html.escape(name)}"><caption>{html.escape(caption)}{link}'
            f"</caption><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
        )

    def figure(self, paths: list[Path], caption: str) -> None:
        png = next(p for p in paths if p.suffix == ".png")
        self.figures.extend(paths)
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        links = " ".join(f'<a href="figures/{p.name}">{p.suffix[1:].upper()}</a>' for p in paths)
        self.parts.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)} ({links})</figcaption></figure>"
        )

    def next_figure(self) -> int:
        self.n_figure += 1
        return self.n_figure


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#1d1d1d;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em}h2{border-bottom:2px solid #3b6ea5;padding-bottom:.2em;margin-top:2em}
h3{margin-top:1.5em}
div.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:.8em 0 1.4em;font-size:.85em}
caption{text-align:left;font-weight:600;padding-bottom:.3em}
th,td{border:1px solid #c8c8c8;padding:.25em .6em}th{background:#eef2f7;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tbody tr:nth-child(even){background:#fafafa}
figure{margin:1em 0}figure img{max-width:min(100%,760px);border:1px solid #ddd}figcaption{font-size:.9em;color:#444}
.meta{color:#555;font-size:.9em}.note{color:#444;font-size:.9em}
.banner{background:#fff1d6;border:2px solid #d48806;padding:.7em 1em;font-weight:600;margin:1em 0}
.missing{background:#f4f4f4;border-left:4px solid #999;padding:.5em 1em}
a.csv{font-weight:normal;font-size:.85em;margin-left:.5em}
nav ul{columns:2;list-style:none;padding-left:0}
code{background:#f2f2f2;padding:0 .2em}
dl.configs dd{margin:0 0 .5em 1em;word-break:break-all;font-size:.85em}
summary{cursor:pointer;color:#3b6ea5}
"""


# --------------------------------------------------------------------------- sections


def _baseline(con, page: _Page, rrid: int | None) -> None:
    page.h2("baseline", "1. Baseline retrieval (Recall@K)")
    df = con.execute(
        """
        SELECT retrieval_run_id, subset, model, direction, n_queries, r_at_1, r_at_5, r_at_10,
               mean_rank, median_rank, n_r1_failures, r_at_1_pessimistic, r_at_5_pessimistic, r_at_10_pessimistic,
               n_tied_queries, is_tie_affected
        FROM recall_summary ORDER BY retrieval_run_id
        """
    ).df()
    if df.empty:
        page.p("No retrieval run yet. Run: clipfail evaluate", cls="missing")
        return
    page.p(
        "Recall@K is the share of queries whose own image ranks within the top K among all images of the "
        "subset (fractions, as in the reference study). Ranks are optimistic: 1 + the number of images "
        "scoring strictly higher; the *_pessimistic columns count every image that ties with the ground truth "
        "against it (rank + n_tied), and n_tied_queries is how many queries have such a tie."
        + (f" The rest of this report is about retrieval run {rrid}." if rrid else "")
    )
    flagged = df[df["is_tie_affected"].fillna(False).astype(bool)]
    if not flagged.empty:
        ids = ", ".join(str(int(i)) for i in flagged["retrieval_run_id"])
        page.p(
            f"TIES: in retrieval run(s) {ids} the ground truth ties with other items often enough that the optimistic "
            "and pessimistic Recall@K differ by more than 0.01 pp: quote the pessimistic figures (r_at_K_pessimistic) "
            "beside the optimistic ones, never the optimistic ones alone.",
            cls="banner",
        )
    page.table(
        df,
        "recall_summary",
        "Table 1. Recall@K of every retrieval run (view recall_summary)",
        {"mean_rank": "f2", "median_rank": "f2"},
    )


def _taxonomy(con, page: _Page, rrid: int, simulated: bool) -> None:
    from toolkit.report.figures import taxonomy_bar_chart

    page.h2("taxonomy", "2. Failure taxonomy")
    flag = " SIMULATED labels." if simulated else ""
    n = con.execute(
        "SELECT count(*) FILTER (WHERE NOT is_overlap), count(*) FILTER (WHERE is_overlap) "
        "FROM sample_labels WHERE retrieval_run_id = ?",
        [rrid],
    ).fetchone()
    page.p(
        f"Labelled R@1 failures of retrieval run {rrid}: {n[0]} outside the overlap set (merged over annotators; "
        f"the taxonomy's n) and {n[1]} in the overlap set (used for agreement).{flag}"
    )
    dist = con.execute(
        "SELECT category, is_actionable, count, percent, percent_lr, n_total FROM taxonomy_distribution "
        "WHERE retrieval_run_id = ? ORDER BY rank",
        [rrid],
    ).df()
    act = con.execute(
        "SELECT category, count, percent, percent_lr, n_total FROM taxonomy_actionable "
        "WHERE retrieval_run_id = ? ORDER BY rank",
        [rrid],
    ).df()
    by_ann = con.execute(
        "SELECT annotator, category, count, percent, n_total FROM taxonomy_by_annotator "
        "WHERE retrieval_run_id = ? ORDER BY annotator, rank",
        [rrid],
    ).df()
    pct = {"percent": "f2", "percent_lr": "f2"}
    page.table(
        dist,
        "taxonomy_distribution",
        f"Table 2. Failure categories, merged over annotators, overlap set excluded (view taxonomy_distribution; "
        f"percent rounded half up, percent_lr sums to 100).{flag}",
        pct,
    )
    if not dist.empty:
        num = page.next_figure()
        page.figure(
            taxonomy_bar_chart(
                dist,
                f"Figure {num}. Failure categories" + (" (SIMULATED labels)" if simulated else ""),
                page.figures_dir / f"figure{num}_taxonomy",
                subtitle=f"retrieval run {rrid}: labelled R@1 failures, overlap set excluded",
            ),
            f"Figure {num}. Overall category distribution (all labels).{flag}",
        )
    page.table(
        act,
        "taxonomy_actionable",
        f"Table 3. Actionable categories only, re-normalised (view taxonomy_actionable).{flag}",
        pct,
    )
    if not act.empty:
        num = page.next_figure()
        page.figure(
            taxonomy_bar_chart(
                act,
                f"Figure {num}. Actionable failure categories" + (" (SIMULATED labels)" if simulated else ""),
                page.figures_dir / f"figure{num}_actionable",
                subtitle=f"retrieval run {rrid}: not-actionable categories removed",
            ),
            f"Figure {num}. Actionable-only distribution (excluding Ambiguous).{flag}",
        )
    page.table(
        by_ann, "taxonomy_by_annotator", f"Table 4. Each annotator's own set (view taxonomy_by_annotator).{flag}", pct
    )


def _agreement(con, page: _Page, rrid: int, simulated: bool) -> None:
    page.h2("agreement", "3. Annotator agreement on the overlap set")
    df = con.execute(
        """
        SELECT measure, annotators, n_annotators, n_items, n_agree, percent_agreement,
               observed_agreement, expected_agreement, kappa
        FROM annotator_agreement WHERE retrieval_run_id = ? ORDER BY measure, annotators
        """,
        [rrid],
    ).df()
    if df.empty:
        page.p("No overlap sample was labelled by two or more annotators.", cls="missing")
        return
    page.p(
        "Pairwise percent agreement and Cohen's kappa for each pair of annotators, and Fleiss' kappa over all "
        "of them (n_agree: unanimous items), on the overlap samples. The reference study measured none."
        + (" These agreements are between SIMULATED annotators." if simulated else "")
    )
    page.table(
        df,
        "annotator_agreement",
        "Table 5. Agreement (view annotator_agreement)" + (" SIMULATED labels." if simulated else ""),
        {"percent_agreement": "f2"},
    )


def _provenance(con, page: _Page, rrid: int | None) -> None:
    page.h2("provenance", "Provenance")
    if rrid is not None:
        info = con.execute(
            """
            SELECT r.retrieval_run_id, s.name AS subset, s.subset_id, s.num_images, s.captions_per_image,
                   s.seed AS subset_seed, s.source_file, s.source_sha256, r.model,
                   ie.pretrained, ie.checkpoint_sha256, ie.precision,
                   r.image_embedding_set_id, ie.sha256 AS image_embeddings_sha256,
                   r.text_embedding_set_id, te.sha256 AS text_embeddings_sha256,
                   r.direction, r.tie_policy, r.topk
            FROM retrieval_runs r
            JOIN subsets s USING (subset_id)
            JOIN embedding_sets ie ON ie.embedding_set_id = r.image_embedding_set_id
            JOIN embedding_sets te ON te.embedding_set_id = r.text_embedding_set_id
            WHERE r.retrieval_run_id = ?
            """,
            [rrid],
        ).df()
        if not info.empty:
            info["source_file"] = [str(study_paths.resolve(con, v)) for v in info["source_file"]]  # stored relative
            long = pd.DataFrame({"field": list(info.columns), "value": [str(v) for v in info.iloc[0]]})
            long.loc[long["value"].isin(["None", "nan", "<NA>"]), "value"] = ""
            page.table(long, "provenance_retrieval_run", f"Retrieval run {rrid}: data, model and weights", csv=True)
    runs = con.execute(
        """
        SELECT run_id, stage, started_at, finished_at, seed, model, pretrained, package_version,
               config_hash, config_json
        FROM runs ORDER BY run_id
        """
    ).df()
    page.table(
        runs,
        "provenance_runs",
        "Every stage run in this database (table runs), with its config hash (configs in the CSV and below)",
        html_columns=[c for c in runs.columns if c != "config_json"],
    )
    configs = "".join(
        f"<dt>run {int(r.run_id)} ({html.escape(str(r.stage))})</dt>"
        f"<dd><code>{html.escape(str(r.config_json))}</code></dd>"
        for r in runs.itertuples()
    )
    page.parts.append(
        f'<details><summary>Every run\'s config (canonical JSON)</summary><dl class="configs">{configs}</dl></details>'
    )
    versions = []
    for name in PACKAGES:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = __version__ if name == "clipfail" else "(not installed)"
        versions.append((name, version))
    versions.append(("python", platform.python_version()))
    page.table(
        pd.DataFrame(versions, columns=["package", "version"]),
        "provenance_versions",
        "Package versions that wrote this report (each run's clipfail version is in the table above)",
    )


# --------------------------------------------------------------------------- entry point


def write_report(
    con,
    out_dir="report",
    retrieval_run_id: int | None = None,
    db_path: str | None = None,
    notes: list[str] | None = None,
):
    """Write report.html, figures/ and tables/ for one retrieval run (default: the one labelled last).

    `notes` are shown in a box under the title (the demo says there that its model is random).

    The report is written into a fresh staging folder and swapped into out_dir (toolkit.report.outdir), so
    out_dir then holds this report only. A folder holding files that an earlier report did not write
    (or that changed since) is refused, listing them, before anything is written."""
    with FreshFolder(out_dir, "report") as fresh:
        return _write_report(con, fresh, retrieval_run_id, db_path, notes)


def _write_report(con, fresh: FreshFolder, retrieval_run_id, db_path, notes) -> ReportResult:
    started = db.now()
    out_dir = fresh.out_dir
    run = resolve_retrieval_run(con, retrieval_run_id, need="report")
    rrid = None if run is None else int(run["retrieval_run_id"])
    page = _Page(fresh.staging)
    missing: list[str] = []
    simulated = False
    if rrid is not None:
        row = con.execute(
            "SELECT coalesce(bool_or(is_simulated), false), count(*) FROM sample_labels WHERE retrieval_run_id = ?",
            [rrid],
        ).fetchone()
        simulated, n_labelled = bool(row[0]), int(row[1])
    else:
        n_labelled = 0

    _baseline(con, page, rrid)
    if rrid is None:
        missing.append("a text-to-image retrieval run: clipfail evaluate")
    if n_labelled:
        _taxonomy(con, page, rrid, simulated)
        _agreement(con, page, rrid, simulated)
    else:
        page.h2("taxonomy", "2. Failure taxonomy")
        page.p(
            "No labels yet. Sample failures (clipfail sample-failures), fill in the assign_*.csv files, then: "
            "clipfail import-labels failure_analysis/assign_*.csv",
            cls="missing",
        )
        missing.append("labels: clipfail sample-failures, then clipfail import-labels")
    _improvement_sections(con, page, rrid, simulated, missing)
    _triage_section(con, page, rrid, simulated, missing)
    _comparison_sections(con, page)
    _hubness_section(con, page, rrid, missing)
    _method_comparison_section(con, page, rrid, simulated, missing)
    _provenance(con, page, rrid)

    # The run row: the same database state and options again is a no-op (the files are rewritten anyway).
    state = con.execute("SELECT coalesce(max(run_id), 0) FROM runs WHERE stage <> 'report'").fetchone()[0]
    config = {"out_dir": str(out_dir.resolve()), "retrieval_run_id": rrid, "last_run_id": int(state)}
    run_id = db.find_run(con, "report", config)
    is_noop = run_id is not None
    if not is_noop and not db.is_read_only(con):  # a write-protected study is only read: no run row
        with db.transaction(con):
            run_id = db.insert_run(con, "report", config, started)

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
    )
    toc = "".join(f'<li><a href="#{a}">{html.escape(t)}</a></li>' for a, t in page.toc)
    doc = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title>'
        f"<style>{CSS}</style></head><body>"
        f'<h1>{title}</h1><p class="meta">{meta}</p>{banner}'
        f"<nav><ul>{toc}</ul></nav>{''.join(page.parts)}</body></html>\n"
    )
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
        missing=missing,
    )


POOLING_ORDER = "CASE pooling WHEN 'max' THEN 0 WHEN 'mean' THEN 1 WHEN 'logsumexp' THEN 2 ELSE 3 END"
# sections 4-6 are about prompt ensembling; the other methods' runs are compared in section 9 (issue 17)
TEMPLATES_ONLY = (
    "improvement_id IN (SELECT improvement_id FROM improvement_runs WHERE coalesce(method, 'templates') = 'templates')"
)

# One row per improvement run, its K = 1/5/10 rows of improvement_recall side by side (SQL only selects).
WIDE_SQL = f"""
SELECT
    improvement_id, run_id, retrieval_run_id, categories, population, pooling, tau, template_set, template_mode,
    k_per_category, k_prompts, tie_count, any_value(n) AS n,
    any_value(baseline_pct) FILTER (WHERE k = 1) AS baseline_r1,
    any_value(baseline_pct) FILTER (WHERE k = 5) AS baseline_r5,
    any_value(baseline_pct) FILTER (WHERE k = 10) AS baseline_r10,
    any_value(improved_pct) FILTER (WHERE k = 1) AS improved_r1,
    any_value(improved_pct) FILTER (WHERE k = 5) AS improved_r5,
    any_value(improved_pct) FILTER (WHERE k = 10) AS improved_r10,
    any_value(delta_pp) FILTER (WHERE k = 1) AS delta_r1_pp,
    any_value(delta_pp) FILTER (WHERE k = 5) AS delta_r5_pp,
    any_value(delta_pp) FILTER (WHERE k = 10) AS delta_r10_pp,
    any_value(ci_low_pp) FILTER (WHERE k = 1) AS ci_low_r1_pp,
    any_value(ci_high_pp) FILTER (WHERE k = 1) AS ci_high_r1_pp,
    any_value(ci_low_pp) FILTER (WHERE k = 5) AS ci_low_r5_pp,
    any_value(ci_high_pp) FILTER (WHERE k = 5) AS ci_high_r5_pp,
    any_value(ci_low_pp) FILTER (WHERE k = 10) AS ci_low_r10_pp,
    any_value(ci_high_pp) FILTER (WHERE k = 10) AS ci_high_r10_pp,
    any_value(mcnemar_p) FILTER (WHERE k = 1) AS mcnemar_p_r1,
    any_value(mcnemar_p) FILTER (WHERE k = 5) AS mcnemar_p_r5,
    any_value(mcnemar_p) FILTER (WHERE k = 10) AS mcnemar_p_r10,
    any_value(n_fixed) FILTER (WHERE k = 1) AS n_fixed_r1,
    any_value(n_broken) FILTER (WHERE k = 1) AS n_broken_r1
FROM improvement_recall
WHERE retrieval_run_id = ? AND {TEMPLATES_ONLY}
GROUP BY improvement_id, run_id, retrieval_run_id, categories, population, pooling, tau, template_set,
    template_mode, k_per_category, k_prompts, tie_count
ORDER BY categories, template_set, template_mode, population, {POOLING_ORDER}, tau, improvement_id
"""

# improvement_id -> what makes its failure subset and prompts (captions with their labels, templates' content):
# the report's sections group the poolings of one subset, and only those.
SUBSET_KEY_SQL = """
SELECT u.improvement_id,
       md5(coalesce(u.templates_sha256, '') || '|' || string_agg(r.caption_id::VARCHAR || ':'
           || coalesce(r.category, ''), ',' ORDER BY r.caption_id)) AS subset_key
FROM improvement_runs u
JOIN improvement_ranks r USING (improvement_id)
WHERE u.retrieval_run_id = ?
GROUP BY u.improvement_id, u.templates_sha256
"""

PCT = {
    "baseline_r1": "f2",
    "baseline_r5": "f2",
    "baseline_r10": "f2",
    "improved_r1": "f2",
    "improved_r5": "f2",
    "improved_r10": "f2",
    "delta_r1_pp": "pp",
    "delta_r5_pp": "pp",
    "delta_r10_pp": "pp",
    "mcnemar_p_r1": "p",
    "mcnemar_p_r5": "p",
    "mcnemar_p_r10": "p",
}


STUDY_FORMATS = {
    "improved R@1": "f2",
    "improved R@5": "f2",
    "improved R@10": "f2",
    "ΔR@1 (pp)": "pp",
    "ΔR@5 (pp)": "pp",
    "ΔR@10 (pp)": "pp",
    "McNemar p R@1": "p",
    "McNemar p R@5": "p",
    "McNemar p R@10": "p",
    "improvement_id": "int",
}


def _effective_k_text(con, run: pd.Series, k_asked: int | None) -> str:
    """The K asked for and how many prompts the captions really got (view improvement_effective_k)."""
    if k_asked is None:  # a run made before prompts were distinct: K templates, copies of the caption included
        return f"Templates per category (K, copies of the caption included): {run['k_per_category']}."
    dist = con.execute(
        "SELECT effective_k, sum(n_captions) AS n FROM improvement_effective_k WHERE improvement_id = ? "
        "GROUP BY ALL ORDER BY effective_k DESC",
        [int(run["improvement_id"])],
    ).fetchall()
    parts = ", ".join(f"{int(k)} for {int(n)} caption{'s' if n != 1 else ''}" for k, n in dist)
    return f"Distinct prompts per caption: K {k_asked} asked; effective K {parts} (view improvement_effective_k)."


def _improvement_sections(con, page: _Page, rrid, simulated: bool, missing: list[str]) -> None:
    from toolkit.report.figures import improvement_bar_chart

    page.h2("improvement", "4. Category-aware prompt ensembling")
    flag = " SIMULATED labels chose these captions." if simulated else ""
    if rrid is None or not db.table_exists(con, "improvement_recall"):
        page.p("No improvement run yet. Run: clipfail improve --categories Object --pooling all", cls="missing")
        missing.append("improvement runs: clipfail improve")
        return
    wide = con.execute(WIDE_SQL, [rrid]).df()
    if wide.empty:
        page.p("No improvement run yet. Run: clipfail improve --categories Object --pooling all", cls="missing")
        missing.append("improvement runs: clipfail improve")
        return
    page.p(
        "Each caption of a labelled subset is expanded into up to K distinct prompts (the caption itself and the "
        "templates that apply to it; how many each caption got, its effective K, is given per subset); each is scored "
        "against every image and the scores are pooled per image (max, mean, or logsumexp with temperature "
        "tau). All values are percentages; deltas are percentage points (pp) against the same captions' baseline. "
        "The 95% interval is a paired bootstrap (10,000 resamples, seeded) and p is the exact McNemar test "
        "of the paired hit/miss outcomes; both are stored by improve and read from view improvement_recall." + flag
    )
    _tie_banner(con, page, rrid, TEMPLATES_ONLY)
    keys = ["categories", "template_set", "template_mode", "k_prompts"]
    failures = wide[wide["population"] == "failures"]
    # One section per subset: runs that share categories and templates but not their captions (another
    # --max-subset, --seed, --include-overlap, or labels imported since) or their templates' content have
    # their own n and baseline, so they are never put under one heading (or into one CSV).
    subset_key = failures["improvement_id"].map(dict(con.execute(SUBSET_KEY_SQL, [rrid]).fetchall()))
    used_slugs: set[str] = set()
    # dropna=False: runs made before K could be chosen have no k_prompts and must still be shown
    for n_sub, (key, group) in enumerate(
        failures.groupby([*keys, subset_key.rename("subset_key")], sort=False, dropna=False), start=1
    ):
        categories, template_set, template_mode, k_prompts, _subset = key
        group = group.reset_index(drop=True)
        first = group.iloc[0]
        k_asked = None if pd.isna(k_prompts) else int(k_prompts)
        k_title = "" if k_asked is None else f", K {k_asked}"
        page.h3(
            f"4.{n_sub} {categories} (n={int(first['n'])}, templates {template_set}, mode {template_mode}{k_title})"
        )
        page.p(
            f"Baseline: R@1 {_fmt(first['baseline_r1'], 'f2')}, R@5 {_fmt(first['baseline_r5'], 'f2')}, "
            f"R@10 {_fmt(first['baseline_r10'], 'f2')}. {_effective_k_text(con, first, k_asked)}"
        )
        slug = _slug(f"{categories}_{template_set}_{template_mode}" + ("" if k_asked in (None, 10) else f"_k{k_asked}"))
        if slug in used_slugs:  # another subset of the same categories: its own CSV, named by its first run
            slug = f"{slug}_run{int(first['improvement_id'])}"
        used_slugs.add(slug)
        page.table(
            improvement_table(improve_summary(con, group["improvement_id"]), group["improvement_id"]),
            f"improvement_{slug}",
            f"Table 6.{n_sub}. {categories}: baseline vs improved Recall@K per pooling (view improvement_recall)."
            + flag,
            STUDY_FORMATS,
        )
        num = page.next_figure()
        page.figure(
            improvement_bar_chart(
                group,
                [pooling_label(p, t) for p, t in zip(group["pooling"], group["tau"])],
                f"Figure {num}. {categories} subset (n={int(first['n'])})"
                + (" (SIMULATED labels)" if simulated else ""),
                page.figures_dir / f"figure{num}_{slug}",
                subtitle=f"baseline vs improved Recall@K across poolings; templates {template_set}, {template_mode}",
            ),
            f"Figure {num}. {categories} subset: baseline vs improved R@1/5/10 across pooling.{flag}",
        )
        if len(str(categories).split(",")) > 1:
            per_cat = con.execute(
                f"""
                SELECT improvement_id, pooling, tau, tie_count, category, k, n, baseline_pct, improved_pct,
                       delta_pp, ci_low_pp, ci_high_pp, mcnemar_p
                FROM category_recall_delta
                WHERE list_contains(?, improvement_id)
                ORDER BY {POOLING_ORDER}, improvement_id, category, k
                """,
                [[int(i) for i in group["improvement_id"]]],
            ).df()
            page.table(
                per_cat,
                f"improvement_{slug}_by_category",
                f"Table 6.{n_sub}b. {categories}: the same runs per category (view category_recall_delta).",
                {
                    "baseline_pct": "f2",
                    "improved_pct": "f2",
                    "delta_pp": "pp",
                    "ci_low_pp": "pp",
                    "ci_high_pp": "pp",
                    "mcnemar_p": "p",
                    "tau": "f2",
                },
            )

    page.h2("consolidated", "5. All improvement runs (consolidated)")
    page.p(
        "Every improvement run of this retrieval run, failures and controls, with R@1/5/10 side by side "
        "(view improvement_recall). This is the consolidated table the reference study left as a CSV to be added."
    )
    page.table(
        wide, "improvement_runs_consolidated", "Table 7. Consolidated improvement runs." + flag, PCT | {"tau": "f2"}
    )

    page.h2("controls", "6. Controls")
    controls = con.execute(
        f"""
        SELECT improvement_id, categories, population, pooling, tau, tie_count, k, n, baseline_pct, improved_pct,
               delta_pp, ci_low_pp, ci_high_pp, mcnemar_p, n_fixed, n_broken
        FROM improvement_recall
        WHERE retrieval_run_id = ? AND population <> 'failures' AND {TEMPLATES_ONLY}
        ORDER BY categories, population, {POOLING_ORDER}, tau, improvement_id, k
        """,
        [rrid],
    ).df()
    if controls.empty:
        page.p(
            "No control run. A gain measured on R@1 failures alone is biased upward (their baseline R@1 is 0, so "
            "R@1 can only improve). Run the same configuration on successes: clipfail improve --categories ... "
            "--pooling all --control successes:200",
            cls="missing",
        )
        missing.append("a control: clipfail improve ... --control successes:N")
        return
    page.p(
        "The same configurations run on R@1 successes (population 'successes': their baseline R@1 is 100%, so "
        "only losses are possible there; n_broken counts the successes the prompts break) or on every caption "
        "of the retrieval run (population 'all': the net effect). n_fixed: baseline miss, improved hit; "
        "n_broken: baseline hit, improved miss, at that K."
    )
    page.table(
        controls,
        "improvement_controls",
        "Table 8. Control runs (view improvement_recall).",
        {
            "baseline_pct": "f2",
            "improved_pct": "f2",
            "delta_pp": "pp",
            "ci_low_pp": "pp",
            "ci_high_pp": "pp",
            "mcnemar_p": "p",
            "tau": "f2",
        },
    )


# --------------------------------------------------------------------------- triage (issue 16)


def _triage_section(con, page: _Page, rrid, simulated: bool, missing: list[str]) -> None:
    """Section 7: triage agreement (view triage_agreement), its confusion matrix as a figure (triage_confusion),
    and the estimated taxonomy over all failures beside the labelled one (triage_distribution)."""
    from toolkit.report.figures import triage_confusion_figure

    page.h2("triage", "7. Automatic triage")
    flag = " SIMULATED labels." if simulated else ""
    has = (
        rrid is not None
        and con.execute("SELECT count(*) FROM triage_runs WHERE retrieval_run_id = ?", [rrid]).fetchone()[0]
    )
    if not has:
        page.p("No triage run yet. Run: clipfail triage", cls="missing")
        missing.append("triage: clipfail triage")
        return
    page.p(
        "clipfail triage suggests a category for every R@1 failure from evidence: COCO object instances "
        "(Object, Count, Spatial), caption-to-caption cosines and shared category sets (Ambiguous), and the "
        "caption lexicon (Attribute, Action); the first rule that fires wins, and no evidence means no "
        "suggestion. Suggestions are hidden on the overlap set by default, so its agreement is unbiased."
    )
    dist = con.execute(
        "SELECT category, n_triage, percent_of_failures, percent_of_suggested, n_human, percent_human, n_failures "
        "FROM triage_distribution WHERE retrieval_run_id = ?",
        [rrid],
    ).df()
    page.table(
        dist,
        "triage_distribution",
        "Table 9. Estimated taxonomy over all R@1 failures (triage) beside the labelled sample "
        "(view triage_distribution)." + flag,
        {"percent_of_failures": "f2", "percent_of_suggested": "f2", "percent_human": "f2"},
    )
    agree = con.execute(
        "SELECT reference, n_labelled, n, n_agree, coverage, accuracy, accuracy_labelled, expected_agreement, kappa "
        "FROM triage_agreement WHERE retrieval_run_id = ?",
        [rrid],
    ).df()
    if agree.empty:
        page.p("No labelled failure of this run to compare the suggestions with.", cls="missing")
        return
    page.table(
        agree,
        "triage_agreement",
        "Table 10. Agreement of the suggestions with each annotator, the overlap majority and all labels "
        "(view triage_agreement; n counts the labelled failures with a suggestion)." + flag,
    )
    conf = con.execute(
        "SELECT human_category, suggested_category, n FROM triage_confusion WHERE retrieval_run_id = ?", [rrid]
    ).df()
    page.table(conf, "triage_confusion", "Table 11. Human label by triage suggestion (view triage_confusion)." + flag)
    num = page.next_figure()
    page.figure(
        triage_confusion_figure(
            conf, f"Figure {num}. Triage confusion matrix", page.figures_dir / f"figure{num}_triage"
        ),
        f"Figure {num}. Human labels (rows) against triage suggestions (columns).{flag}",
    )


# --------------------------------------------------------------------------- run comparisons (issue 18)


def _comparison_sections(con, page: _Page) -> None:
    """Section 8: every stored `clipfail compare` (views run_comparison, run_pairs, failure_overlap_by_category):
    the R@K table with ΔR@K, its interval and McNemar p and the paired counts; a log-log scatter of the ranks;
    the labelled failures per category fixed / broken / shared, as a table and a bar chart."""
    page.h2("comparisons", "8. Comparisons of retrieval runs")
    ids = [int(r[0]) for r in con.execute("SELECT run_comparison_id FROM run_comparisons ORDER BY 1").fetchall()]
    if not ids:
        page.p(
            "No comparison yet. Evaluate a second model on the same subset, then: clipfail compare RUN_A RUN_B "
            "(or clipfail benchmark --models FILE for many models).",
            cls="missing",
        )
        return
    page.p(
        "Each comparison pairs two retrieval runs of the same subset and direction query by query. ΔR@K = R@K(B) - "
        "R@K(A) in percentage points, with a paired bootstrap 95% interval (10,000 resamples, seeded) and the exact "
        "McNemar p-value; fixed = A misses and B hits at K, broken = the reverse, shared = both miss, neither = "
        "both hit."
    )
    for cid in ids:
        rows = con.execute(
            """
            SELECT k, n_queries, r_at_k_a, r_at_k_b, delta_pp, ci_low_pp, ci_high_pp, mcnemar_p,
                   n_fixed, n_broken, n_shared, n_neither,
                   retrieval_run_a_id, retrieval_run_b_id, subset, direction, model_a, weights_a, model_b, weights_b,
                   is_same_run
            FROM run_comparison WHERE run_comparison_id = ? ORDER BY k
            """,
            [cid],
        ).df()
        if rows.empty:
            continue
        first = rows.iloc[0]
        label_a = f"run {int(first['retrieval_run_a_id'])}, {first['model_a']} ({first['weights_a']})"
        label_b = f"run {int(first['retrieval_run_b_id'])}, {first['model_b']} ({first['weights_b']})"
        page.h3(f"Comparison {cid}: B = {label_b} against A = {label_a}")
        page.p(f"Subset {first['subset']}, {first['direction']}, {int(first['n_queries']):,} paired queries.")
        if bool(first["is_same_run"]):
            page.p("A and B are the same run: every delta is zero.", cls="note")
        cols = ["k", "n_queries", "r_at_k_a", "r_at_k_b", "delta_pp", "ci_low_pp", "ci_high_pp", "mcnemar_p"]
        cols += ["n_fixed", "n_broken", "n_shared", "n_neither"]
        page.table(
            rows[cols],
            f"run_comparison_{cid}",
            f"Comparison {cid}. Recall@K of A and B, ΔR@K (pp) with its 95% interval and McNemar p, and the paired "
            "outcomes (view run_comparison)",
            {"delta_pp": "pp", "ci_low_pp": "pp", "ci_high_pp": "pp", "mcnemar_p": "p"},
        )
        pairs = con.execute("SELECT rank_a, rank_b FROM run_pairs WHERE run_comparison_id = ?", [cid]).df()
        from toolkit.report.figures import fixed_broken_shared_chart, rank_scatter

        num = page.next_figure()
        page.figure(
            rank_scatter(
                pairs,
                f"Figure {num}. Rank in A against rank in B",
                page.figures_dir / f"figure{num}_rank_scatter_{cid}",
                label_a=f"run {int(first['retrieval_run_a_id'])}",
                label_b=f"run {int(first['retrieval_run_b_id'])}",
                subtitle=f"comparison {cid}, {first['direction']}, log-log; below the diagonal B ranks better",
            ),
            f"Figure {num}. Each query's rank in A ({label_a}) against B ({label_b}), log-log (view run_pairs).",
        )
        overlap = con.execute(
            """
            SELECT category, n_labelled_a, n_fixed, n_shared, percent_fixed, median_rank_a, median_rank_b,
                   n_labelled_b, n_broken, is_simulated
            FROM failure_overlap_by_category WHERE run_comparison_id = ?
            """,
            [cid],
        ).df()
        if overlap.empty:
            page.p(
                "No labelled failures of run A (or B) for this comparison: the per-category split needs "
                "clipfail sample-failures and import-labels on a text-to-image run.",
                cls="missing",
            )
            continue
        flag = " SIMULATED labels." if bool(overlap["is_simulated"].any()) else ""
        page.table(
            overlap,
            f"failure_overlap_{cid}",
            f"Comparison {cid}. Labelled R@1 failures of A per category, fixed by B or still failing (shared); "
            "B's labelled failures that A retrieved at rank 1 (broken; empty when B has no labels) "
            "(view failure_overlap_by_category)." + flag,
            {"percent_fixed": "f2", "median_rank_a": "f2", "median_rank_b": "f2"},
        )
        num = page.next_figure()
        page.figure(
            fixed_broken_shared_chart(
                overlap,
                f"Figure {num}. Fixed, broken and shared failures per category",
                page.figures_dir / f"figure{num}_fixed_broken_shared_{cid}",
                subtitle=f"comparison {cid}: B = run {int(first['retrieval_run_b_id'])}, "
                f"A = run {int(first['retrieval_run_a_id'])}",
            ),
            f"Figure {num}. Labelled failures per category: fixed by B, broken by B, shared (view "
            f"failure_overlap_by_category).{flag}",
        )


# --------------------------------------------------------------------------- hubness (issue 17)

HUB_THUMBNAILS = 10


def _hubness_section(con, page: _Page, rrid, missing: list[str]) -> None:
    """Section 9: hubness of the retrieval runs of the report's subset (view hubness_summary, both
    directions), the N_1 / N_10 histograms of the report's run (view image_hubness), and its top hubs
    as thumbnails."""
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
        """
        SELECT 1 AS k, n_1 AS n_k, count(*) AS n_items FROM image_hubness WHERE retrieval_run_id = ? GROUP BY ALL
        UNION ALL
        SELECT 10, n_10, count(*) FROM image_hubness WHERE retrieval_run_id = ? AND n_10 IS NOT NULL GROUP BY ALL
        ORDER BY 1, 2
        """,
        [rrid, rrid],
    ).df()
    if hist.empty:
        return
    num = page.next_figure()
    page.figure(
        k_occurrence_histogram(
            hist, f"Figure {num}. k-occurrence of the gallery (run {rrid})", page.figures_dir / f"figure{num}_hubness"
        ),
        f"Figure {num}. How many gallery items each number of queries retrieves (N_1, N_10; log-scaled counts; "
        "view image_hubness).",
    )
    hubs = con.execute(
        f"""
        SELECT h.gallery_kind, h.gallery_id, h.n_1, h.n_10, h.is_hub, i.rel_path, s.image_root
        FROM image_hubness h
        JOIN retrieval_runs r USING (retrieval_run_id)
        JOIN subsets s ON s.subset_id = r.subset_id
        LEFT JOIN images i ON i.image_id = h.gallery_id AND h.gallery_kind = 'image'
        WHERE h.retrieval_run_id = ?
        ORDER BY h.n_10 DESC NULLS LAST, h.n_1 DESC, h.gallery_id
        LIMIT {HUB_THUMBNAILS}
        """,
        [rrid],
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
            thumbnail_grid(items, f"Figure {num}. Top hubs (run {rrid})", page.figures_dir / f"figure{num}_hubs"),
            f"Figure {num}. The images most often retrieved in a top 10, with their N_10 and N_1.",
        )


# --------------------------------------------------------------------------- method comparison (issue 17)

METHOD_COLUMNS = [
    "category", "method_rank_r1", "method_label", "n", "baseline_r1_pct", "improved_r1_pct", "delta_r1_pp",
    "ci_low_r1_pp", "ci_high_r1_pp", "mcnemar_p_r1", "delta_r5_pp", "delta_r10_pp", "mcnemar_p_r5", "mcnemar_p_r10",
    "share_r1_successes_broken", "control_population", "is_bank_overlap", "tie_count", "improvement_id",
]  # fmt: skip


def _tie_banner(con, page: _Page, rrid, where: str) -> None:
    """A banner naming this retrieval run's improvement runs (those `where` selects) whose figures count ties
    pessimistically (view improvement_ties: tie-affected) or whose ties were not recorded (toolkit.report.display)."""
    from toolkit.report.display import tie_notes

    ties = con.execute(
        f"SELECT * FROM improvement_ties WHERE retrieval_run_id = ? AND {where} ORDER BY improvement_id", [rrid]
    ).df()
    notes = tie_notes(ties)
    if notes:
        page.p(
            "No method gains from ties: a run whose optimistic and pessimistic Recall@K differ by more than 0.01 pp "
            "is shown with its pessimistic figures (column tie count). "
            + " ".join(n[0].upper() + n[1:] for n in notes),
            cls="banner",
        )


def _method_comparison_section(con, page: _Page, rrid, simulated: bool, missing: list[str]) -> None:
    """Section 10: every method's improvement runs on the labelled failures, per category (view method_comparison):
    a ranked table of which method helps which category most, and one grouped chart per category."""
    from toolkit.report.figures import method_comparison_chart

    page.h2("methods", "10. Which fix helps which category")
    flag = " SIMULATED labels chose these captions." if simulated else ""
    df = (
        con.execute("SELECT * FROM method_comparison WHERE retrieval_run_id = ?", [rrid]).df()
        if rrid is not None and db.table_exists(con, "method_comparison")
        else pd.DataFrame()
    )
    if df.empty:
        page.p(
            "No improvement run yet. Compare the fixes with, e.g.: clipfail improve --categories Object,Attribute "
            "--method qb-norm --control successes:200 (methods: templates, inverted-softmax, qb-norm, "
            "query-expansion).",
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
        "run (blank without one; a gain on failures alone is biased upward). Values from view method_comparison." + flag
    )
    _tie_banner(con, page, rrid, "population = 'failures'")
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
            method_comparison_chart(
                group,
                f"Figure {num}. {name}: baseline vs each method" + (" (SIMULATED labels)" if simulated else ""),
                page.figures_dir / f"figure{num}_methods_{_slug(name)}",
                subtitle="Recall@K (%) of the labelled failures; view method_comparison",
            ),
            f"Figure {num}. {name}: baseline and improved R@1/5/10 per method.{flag}",
        )
