"""Where a study stands: which stages have run, for which subset and model, and what comes next.

`study_status(con)` queries the tables (every count is a SQL count) and returns one row per
stage result, in pipeline order, and the commands that would take the study one step further.
Tables of stages that have not landed in this database yet (or are empty) are simply skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from toolkit.store import paths as study_paths
from toolkit.store.db import table_exists

STAGES = ["ingest", "embed", "evaluate", "sample-failures", "import-labels", "improve", "report"]


@dataclass
class StatusResult:
    stages: pd.DataFrame  # stage, subset, model, detail, rows
    runs: pd.DataFrame  # stage, runs, last_finished_at
    next_steps: list[str] = field(default_factory=list)
    has_simulated_labels: bool = False
    missing_files: list[str] = field(default_factory=list)  # referenced files not in place (paths.missing_files)


def _weights(pretrained, checkpoint_sha256) -> str:
    if isinstance(checkpoint_sha256, str) and checkpoint_sha256:
        return f"checkpoint {checkpoint_sha256[:12]}"
    return pretrained if isinstance(pretrained, str) and pretrained else "no pretrained tag"


def study_status(con) -> StatusResult:
    rows: list[dict] = []
    subsets = con.execute(
        """
        SELECT s.subset_id, s.name,
               (SELECT count(*) FROM subset_images i WHERE i.subset_id = s.subset_id) AS n_images,
               (SELECT count(*) FROM subset_captions c WHERE c.subset_id = s.subset_id) AS n_captions
        FROM subsets s ORDER BY s.subset_id
        """
    ).df()
    for s in subsets.itertuples():
        rows.append(
            dict(
                stage="ingest",
                subset=s.name,
                model="",
                detail=f"subset {s.subset_id}",
                rows=f"{s.n_images} images, {s.n_captions} captions",
            )
        )

    emb = con.execute(
        """
        SELECT s.name AS subset, e.model, e.pretrained, e.checkpoint_sha256, e.precision,
               string_agg(e.kind || ' set ' || e.embedding_set_id, ', ' ORDER BY e.kind, e.embedding_set_id) AS sets,
               string_agg(e.rows || ' ' || e.kind, ', ' ORDER BY e.kind, e.embedding_set_id) AS n_rows
        FROM embedding_sets e JOIN subsets s USING (subset_id)
        WHERE e.kind IN ('image', 'text')
        GROUP BY ALL ORDER BY min(e.embedding_set_id)
        """
    ).df()
    for e in emb.itertuples():
        rows.append(
            dict(
                stage="embed",
                subset=e.subset,
                model=f"{e.model} ({_weights(e.pretrained, e.checkpoint_sha256)}, {e.precision})",
                detail=e.sets,
                rows=e.n_rows,
            )
        )

    retrieval = con.execute(
        """
        SELECT r.retrieval_run_id, s.name AS subset, r.model, r.direction,
               (SELECT count(*) FROM retrieval_ranks k WHERE k.retrieval_run_id = r.retrieval_run_id) AS n_ranks,
               (SELECT count(*) FROM retrieval_ranks k
                WHERE k.retrieval_run_id = r.retrieval_run_id AND k.gt_rank > 1) AS n_failures
        FROM retrieval_runs r JOIN subsets s USING (subset_id)
        ORDER BY r.retrieval_run_id
        """
    ).df()
    run_info = {r.retrieval_run_id: r for r in retrieval.itertuples()}
    for r in retrieval.itertuples():
        rows.append(
            dict(
                stage="evaluate",
                subset=r.subset,
                model=r.model,
                detail=f"retrieval run {r.retrieval_run_id} ({r.direction})",
                rows=f"{r.n_ranks} ranks, {r.n_failures} R@1 failures",
            )
        )

    samples = con.execute(
        """
        SELECT retrieval_run_id, count(*) AS n, count(DISTINCT set_name) AS n_sets
        FROM failure_samples GROUP BY retrieval_run_id ORDER BY retrieval_run_id
        """
    ).df()
    for f in samples.itertuples():
        r = run_info.get(f.retrieval_run_id)
        rows.append(
            dict(
                stage="sample-failures",
                subset=r.subset if r else "",
                model=r.model if r else "",
                detail=f"retrieval run {f.retrieval_run_id}",
                rows=f"{f.n} samples in {f.n_sets} sets",
            )
        )

    labels = con.execute(
        """
        SELECT f.retrieval_run_id, count(*) AS n_labels, count(DISTINCT a.sample_id) AS n_samples,
               string_agg(DISTINCT a.annotator, ',' ORDER BY a.annotator) AS annotators,
               bool_or(a.is_simulated) AS is_simulated
        FROM annotations a JOIN failure_samples f USING (sample_id)
        GROUP BY f.retrieval_run_id ORDER BY f.retrieval_run_id
        """
    ).df()
    has_simulated = bool(labels["is_simulated"].any()) if len(labels) else False
    for a in labels.itertuples():
        r = run_info.get(a.retrieval_run_id)
        sim = " (SIMULATED)" if a.is_simulated else ""
        rows.append(
            dict(
                stage="import-labels",
                subset=r.subset if r else "",
                model=r.model if r else "",
                detail=f"retrieval run {a.retrieval_run_id}, annotators {a.annotators}{sim}",
                rows=f"{a.n_labels} labels on {a.n_samples} samples",
            )
        )

    improvements = pd.DataFrame()
    if table_exists(con, "improvement_runs") and table_exists(con, "improvement_ranks"):
        improvements = con.execute(
            """
            SELECT i.retrieval_run_id, count(DISTINCT i.improvement_id) AS n_runs,
                   count(DISTINCT i.run_id) AS n_invocations,
                   string_agg(DISTINCT i.population, ',' ORDER BY i.population) AS populations,
                   (SELECT count(*) FROM improvement_ranks k JOIN improvement_runs j USING (improvement_id)
                    WHERE j.retrieval_run_id = i.retrieval_run_id) AS n_ranks
            FROM improvement_runs i GROUP BY i.retrieval_run_id ORDER BY i.retrieval_run_id
            """
        ).df()
        for m in improvements.itertuples():
            r = run_info.get(m.retrieval_run_id)
            rows.append(
                dict(
                    stage="improve",
                    subset=r.subset if r else "",
                    model=r.model if r else "",
                    detail=f"retrieval run {m.retrieval_run_id}, populations {m.populations}",
                    rows=f"{m.n_runs} improvement runs from {m.n_invocations} invocations, {m.n_ranks} ranks",
                )
            )

    runs = con.execute(
        """
        SELECT stage, count(*) AS runs, max(finished_at) AS last_finished_at
        FROM runs GROUP BY stage ORDER BY min(run_id)
        """
    ).df()
    if "report" in set(runs["stage"]):
        last = runs.loc[runs["stage"] == "report", "last_finished_at"].iloc[0]
        rows.append(dict(stage="report", subset="", model="", detail=f"last written {last:%Y-%m-%d %H:%M}", rows=""))

    stages = pd.DataFrame(rows, columns=["stage", "subset", "model", "detail", "rows"])
    steps = _next_steps(subsets, emb, retrieval, samples, labels, improvements, runs)
    missing = study_paths.missing_files(con)
    if missing:  # never "up to date" while a referenced file is not where the database says
        steps = study_paths.relocate_hints(con, missing) + [s for s in steps if not s.startswith("Everything is")]
    return StatusResult(
        stages=stages,
        runs=runs,
        next_steps=steps,
        has_simulated_labels=has_simulated,
        missing_files=missing.lines(),
    )


def _next_steps(subsets, emb, retrieval, samples, labels, improvements, runs) -> list[str]:
    if subsets.empty:
        return [
            "Get COCO 2017 val:  clipfail download-coco --dest ~/coco",
            "then run the pipeline:  clipfail run --coco-root ~/coco --model openai/clip-vit-base-patch32",
            "(or ingest only:  clipfail ingest --coco-root ~/coco; offline tour:  clipfail demo)",
        ]
    embedded = set(emb["subset"]) if len(emb) else set()
    missing = [n for n in subsets["name"] if n not in embedded]
    if missing:
        return [f"Embed the subset:  clipfail embed --subset {missing[0]} --model openai/clip-vit-base-patch32"]
    t2i = retrieval[retrieval["direction"] == "text-to-image"] if len(retrieval) else retrieval
    evaluated = set(t2i["subset"]) if len(t2i) else set()
    missing = [n for n in subsets["name"] if n not in evaluated]
    if missing:
        return [f"Rank the captions:  clipfail evaluate --subset {missing[0]}"]
    sampled = set(samples["retrieval_run_id"]) if len(samples) else set()
    if not sampled:
        run_id = int(t2i["retrieval_run_id"].max())
        return [f"Sample R@1 failures to label:  clipfail sample-failures --run {run_id} --out failure_analysis/"]
    labelled = set(labels["retrieval_run_id"]) if len(labels) else set()
    unlabelled = sorted(sampled - labelled)
    if unlabelled:
        return [
            "Fill in the category column of assign_<annotator>.csv, and of each annotator's copy of",
            "assign_overlap.csv, in the sample-failures --out folder (default failure_analysis/; see README.txt",
            "there), then:  clipfail import-labels failure_analysis/assign_*.csv",
        ]
    improved = set(improvements["retrieval_run_id"]) if len(improvements) else set()
    steps = []
    if not labelled <= improved:
        steps.append("See the taxonomy:  clipfail analyze")
        steps.append(
            "Try the text-side fix:  clipfail improve --categories Object --pooling all --control successes:100"
        )
    reported = runs[runs["stage"] == "report"]
    newest = runs[runs["stage"] != "report"]["last_finished_at"].max()
    if reported.empty or reported["last_finished_at"].iloc[0] < newest:
        steps.append("Write the report:  clipfail report --out report/")
    return steps or ['Everything is up to date. Explore with:  clipfail sql "SELECT * FROM recall_summary"']
