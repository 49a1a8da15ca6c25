"""Which retrieval run a command is about: one resolver, `resolve_retrieval_run`, with one rule per need.

Every stage after `evaluate` works on one retrieval run. Given an id (`--run`), that run is checked;
without one, the default depends on what the stage needs of the run:

=========  ======================================  ================================================
need       the run must                            default (no id given)
=========  ======================================  ================================================
"ranks"    be text-to-image (it has ranks and      the most recent text-to-image run (highest id)
           R@1 failures to draw from)              -- sample-failures, triage
"sample"   be text-to-image and have a failure     the run whose failure sample was drawn last
           sample                                  (highest sample-failures run id) -- annotate,
                                                   labelstudio
"labels"   be text-to-image and have imported      the run labelled most recently (latest
           labels                                  `annotations.imported_at`; ties: the higher id)
                                                   -- analyze, improve
"report"   exist (any direction)                   the run labelled most recently, else the most
                                                   recent text-to-image run, else None (a report of
                                                   an empty study says what is missing) -- report
=========  ======================================  ================================================

"The run labelled most recently" is the one whose labels were imported last, not the highest id:
after labelling an older run again, analyze, improve and report all follow it, and all agree.

Errors are `UserError`s that name the fix: an unknown id lists the runs that would do; a run of the
wrong direction, or without the sample or labels the stage needs, says which command makes them.
"""

from __future__ import annotations

from toolkit.errors import UserError

NEEDS = ("ranks", "sample", "labels", "report")

_PURPOSE = {"ranks": "this command", "sample": "this command", "labels": "this command", "report": "the report"}


def _ids(rows) -> str:
    return ", ".join(str(int(r[0])) for r in rows)


def _text_to_image_runs(con) -> list[tuple]:
    return con.execute(
        "SELECT retrieval_run_id FROM retrieval_runs WHERE direction = 'text-to-image' ORDER BY 1"
    ).fetchall()


def _sampled_runs(con) -> list[tuple]:
    """(retrieval_run_id, the latest sample-failures run id) of every run with a failure sample, latest first."""
    return con.execute(
        "SELECT retrieval_run_id, max(run_id) AS last_sample FROM failure_samples GROUP BY 1 "
        "ORDER BY last_sample DESC, retrieval_run_id DESC"
    ).fetchall()


def _labelled_runs(con) -> list[tuple]:
    """(retrieval_run_id, latest import, number of labels) of every run with imported labels, latest first."""
    return con.execute(
        """
        SELECT s.retrieval_run_id, max(a.imported_at) AS last_import, count(*) AS n_labels
        FROM annotations a JOIN failure_samples s USING (sample_id)
        GROUP BY s.retrieval_run_id
        ORDER BY last_import DESC, s.retrieval_run_id DESC
        """
    ).fetchall()


def _row(con, retrieval_run_id: int) -> dict | None:
    df = con.execute("SELECT * FROM retrieval_runs WHERE retrieval_run_id = ?", [int(retrieval_run_id)]).df()
    return None if df.empty else df.iloc[0].to_dict()


def _no_labels_message(purpose: str) -> str:
    return (
        f"No labels have been imported yet: {purpose} needs labelled R@1 failures. Draw them with clipfail "
        "sample-failures, fill in the assign_<annotator>.csv files it writes (or use clipfail annotate), then run: "
        "clipfail import-labels failure_analysis/assign_*.csv"
    )


NO_SAMPLE = "The database has no sampled failures. Run clipfail sample-failures first (and check --db)."


def resolve_retrieval_run(con, retrieval_run_id: int | None = None, need: str = "ranks", purpose: str | None = None):
    """The `retrieval_runs` row (a dict) a command works on; see the module docstring for the rule of each `need`.

    `purpose` names the command in messages ("triage needs a text-to-image run"). Only need="report"
    returns None (no id given and no run to report on); every other miss is a `UserError`.
    """
    if need not in NEEDS:
        raise ValueError(f"need must be one of {NEEDS}, not {need!r}")
    purpose = purpose or _PURPOSE[need]
    if retrieval_run_id is not None:
        return _check_given(con, int(retrieval_run_id), need, purpose)
    if need == "ranks":
        runs = _text_to_image_runs(con)
        if not runs:
            raise UserError(
                f"The database has no text-to-image retrieval run: {purpose} needs one. Run: clipfail evaluate"
            )
        return _row(con, int(runs[-1][0]))
    if need == "sample":
        runs = _sampled_runs(con)
        if not runs:
            raise UserError(NO_SAMPLE)
        return _row(con, int(runs[0][0]))
    labelled = _labelled_runs(con)
    if need == "labels":
        if not labelled:
            raise UserError(_no_labels_message(purpose))
        return _row(con, int(labelled[0][0]))
    # report
    if labelled:
        return _row(con, int(labelled[0][0]))
    runs = _text_to_image_runs(con)
    return _row(con, int(runs[-1][0])) if runs else None


def _check_given(con, rrid: int, need: str, purpose: str) -> dict:
    row = _row(con, rrid)
    if row is None:
        if need == "report":
            known = con.execute("SELECT retrieval_run_id FROM retrieval_runs ORDER BY 1").fetchall()
            hint = f"Retrieval runs: {_ids(known)}." if known else "Run clipfail evaluate first."
        elif need == "ranks":
            known = _text_to_image_runs(con)
            hint = f"Text-to-image runs: {_ids(known)}." if known else "Run clipfail evaluate first."
        elif need == "sample":
            known = _sampled_runs(con)
            hint = (
                f"Runs with a failure sample: {_ids(known)}. Give one of them with --run."
                if known
                else "Run clipfail sample-failures first."
            )
        else:
            known = _labelled_runs(con)
            hint = (
                f"Runs with labels: {_ids(known)}. Give one of them with --run." if known else "No labels yet either."
            )
        raise UserError(f"No retrieval run with id {rrid}. {hint}")
    if need == "report":
        return row
    if row["direction"] != "text-to-image":
        known = _text_to_image_runs(con)
        listing = f" (text-to-image runs: {_ids(known)})" if known else ""
        raise UserError(
            f"Retrieval run {rrid} is {row['direction']}; {purpose} needs a text-to-image run. "
            f"Give --run with a text-to-image run id{listing}."
        )
    if need == "sample" and not any(int(r[0]) == rrid for r in _sampled_runs(con)):
        sampled = _sampled_runs(con)
        have = f"Runs with a failure sample: {_ids(sampled)}. " if sampled else ""
        raise UserError(
            f"Retrieval run {rrid} has no sampled failures. {have}Give one of them with --run, or run "
            f"clipfail sample-failures --run {rrid}."
        )
    if need == "labels":
        labelled = _labelled_runs(con)
        if not any(int(r[0]) == rrid for r in labelled):
            if not labelled:
                raise UserError(_no_labels_message(purpose))
            have = ", ".join(f"{int(r[0])} ({int(r[2])} labels)" for r in labelled)
            raise UserError(
                f"Retrieval run {rrid} has no imported labels. Runs with labels: {have}. Give one of them with "
                f"--run, or label its failure sample and run: clipfail import-labels FILES"
            )
    return row
