"""Where a study stands: which stages have run, for which subset and model, and what comes next.

Each stage supplies its own status query: a view `status_<stage>` in queries/ (status_ingest, status_embed,
status_evaluate, status_compare, status_triage, status_sample_failures, status_import_labels, status_improve,
status_method_comparison, status_report), all with the same columns (see queries/status_ingest.sql). One row
per thing the stage stored (a subset, an embedding set, a retrieval run, a triage run, a comparison, a
method's improvement runs, ...), with its counts as text and the command that carries it on. `study_status(con)`
lists every view named status_* and puts their rows in stage order: a new stage adds its view and nothing here,
and an improvement method's runs (a plugin's included) show up through status_improve, one row per method.

The next steps are those of the first row that blocks the study (a subset not embedded, failures not
labelled, ...), else every suggested one (the taxonomy, the fix, the report), else "up to date".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

import queries
from toolkit.store import paths as study_paths
from toolkit.store.db import table_exists

STATUS_VIEWS = [v for v in queries.VIEWS if v.startswith("status_")]
COLUMNS = ["stage", "subset", "model", "detail", "rows", "next"]

NOTHING_YET = [
    "Get COCO 2017 val:  clipfail download-coco --dest ~/coco",
    "then run the pipeline:  clipfail run --coco-root ~/coco --model openai/clip-vit-base-patch32",
    "(or ingest only:  clipfail ingest --coco-root ~/coco; offline tour:  clipfail demo)",
]
UP_TO_DATE = 'Everything is up to date. Explore with:  clipfail sql "SELECT * FROM recall_summary"'


@dataclass
class StatusResult:
    stages: pd.DataFrame  # stage, subset, model, detail, rows, next (lines joined by newlines; '' when none)
    runs: pd.DataFrame  # stage, runs, last_finished_at (view runs_by_stage)
    next_steps: list[str] = field(default_factory=list)
    has_simulated_labels: bool = False
    missing_files: list[str] = field(default_factory=list)  # referenced files not in place (paths.missing_files)


def stage_rows(con) -> pd.DataFrame:
    """The rows of every status_* view, in stage order (each view's own order within a stage)."""
    frames = [con.execute(f"SELECT * FROM {v}").df() for v in STATUS_VIEWS if table_exists(con, v)]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=["stage_order", *COLUMNS[:-1], "next_step", "next_kind", "is_simulated"])
    rows = pd.concat(frames, ignore_index=True)
    return rows.sort_values("stage_order", kind="stable").reset_index(drop=True)


def study_status(con) -> StatusResult:
    rows = stage_rows(con)
    stages = rows[COLUMNS[:-1]].assign(next=rows["next_step"].fillna("").astype(str))
    runs = con.execute("SELECT stage, runs, last_finished_at FROM runs_by_stage").df()
    steps = _next_steps(rows)
    missing = study_paths.missing_files(con)
    if missing:  # never "up to date" while a referenced file is not where the database says
        steps = study_paths.relocate_hints(con, missing) + [s for s in steps if not s.startswith("Everything is")]
    return StatusResult(
        stages=stages.reset_index(drop=True),
        runs=runs,
        next_steps=steps,
        has_simulated_labels=bool(rows["is_simulated"].fillna(False).astype(bool).any()),
        missing_files=missing.lines(),
    )


def _next_steps(rows: pd.DataFrame) -> list[str]:
    """The first blocking row's step, else every suggested step (each once, in stage order)."""
    if rows.empty:
        return list(NOTHING_YET)
    blocking = rows[rows["next_kind"] == "blocking"]
    if not blocking.empty:
        return str(blocking["next_step"].iloc[0]).split("\n")
    steps: list[str] = []
    for step in rows.loc[rows["next_kind"] == "suggested", "next_step"]:
        steps += [line for line in str(step).split("\n") if line not in steps]
    return steps or [UP_TO_DATE]
