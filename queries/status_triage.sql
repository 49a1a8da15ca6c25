-- status_triage: what `clipfail status` says of automatic triage: one row per triage run with how many of its
-- retrieval run's R@1 failures got a suggested category, and what comes next (optional): reading its
-- agreement with the labels once the run has some (view triage_agreement). Columns: as status_ingest.
-- Rows: by triage run.
-- Reads: triage_runs, triage_suggestions, retrieval_runs, subsets, failure_samples, annotations.
CREATE OR REPLACE VIEW status_triage AS
WITH triage_runs AS (
    SELECT triage_run_id, retrieval_run_id, n_failures FROM triage_runs
),
triage_suggestions AS (
    SELECT triage_run_id, suggested_category FROM triage_suggestions
),
retrieval_runs AS (
    SELECT retrieval_run_id, subset_id, model FROM retrieval_runs
),
subsets AS (
    SELECT subset_id, name FROM subsets
),
failure_samples AS (
    SELECT sample_id, retrieval_run_id FROM failure_samples
),
annotations AS (
    SELECT sample_id FROM annotations
),
suggested AS (
    SELECT triage_run_id, count(suggested_category) AS n_suggested
    FROM triage_suggestions
    GROUP BY triage_run_id
),
labelled AS (
    SELECT DISTINCT f.retrieval_run_id
    FROM failure_samples f
    JOIN annotations a ON a.sample_id = f.sample_id
),
final AS (
    SELECT
        'triage' AS stage,
        5 AS stage_order,
        s.name AS subset,
        r.model,
        'triage run ' || t.triage_run_id || ' of retrieval run ' || t.retrieval_run_id AS detail,
        coalesce(g.n_suggested, 0) || ' suggestions for ' || t.n_failures || ' R@1 failures' AS rows,
        CASE
            WHEN l.retrieval_run_id IS NOT NULL
                THEN 'See how it agrees with the labels:  clipfail sql "select * from triage_agreement '
                    || 'where retrieval_run_id = ' || t.retrieval_run_id || '"'
        END AS next_step,
        CASE WHEN l.retrieval_run_id IS NOT NULL THEN 'optional' END AS next_kind,
        false AS is_simulated,
        t.triage_run_id  -- sort key only
    FROM triage_runs t
    JOIN retrieval_runs r ON r.retrieval_run_id = t.retrieval_run_id
    JOIN subsets s ON s.subset_id = r.subset_id
    LEFT JOIN suggested g ON g.triage_run_id = t.triage_run_id
    LEFT JOIN labelled l ON l.retrieval_run_id = t.retrieval_run_id
)
SELECT * EXCLUDE (triage_run_id) FROM final
ORDER BY triage_run_id
