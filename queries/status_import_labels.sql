-- status_import_labels: what `clipfail status` says of the labels: one row per retrieval run with labelled
-- failure samples (labels, samples, annotators; SIMULATED when the demo's annotators wrote any), and what comes
-- next while no improvement run exists for it (suggested): the taxonomy, then the text-side fix.
-- Columns: as status_ingest. Rows: by retrieval run.
-- Reads: annotations, failure_samples, retrieval_runs, subsets, improvement_runs.
CREATE OR REPLACE VIEW status_import_labels AS
WITH annotations AS (
    SELECT sample_id, annotator, is_simulated FROM annotations
),
failure_samples AS (
    SELECT sample_id, retrieval_run_id FROM failure_samples
),
retrieval_runs AS (
    SELECT retrieval_run_id, subset_id, model FROM retrieval_runs
),
subsets AS (
    SELECT subset_id, name FROM subsets
),
improvement_runs AS (
    SELECT retrieval_run_id FROM improvement_runs
),
labels AS (
    SELECT
        f.retrieval_run_id,
        count(*) AS n_labels,
        count(DISTINCT a.sample_id) AS n_samples,
        string_agg(DISTINCT a.annotator, ',' ORDER BY a.annotator) AS annotators,
        coalesce(bool_or(a.is_simulated), false) AS is_simulated
    FROM annotations a
    JOIN failure_samples f ON f.sample_id = a.sample_id
    GROUP BY f.retrieval_run_id
),
improved AS (
    SELECT DISTINCT retrieval_run_id FROM improvement_runs
),
final AS (
    SELECT
        'import-labels' AS stage,
        7 AS stage_order,
        coalesce(s.name, '') AS subset,
        coalesce(r.model, '') AS model,
        'retrieval run ' || b.retrieval_run_id || ', annotators ' || b.annotators
            || CASE WHEN b.is_simulated THEN ' (SIMULATED)' ELSE '' END AS detail,
        b.n_labels || ' labels on ' || b.n_samples || ' samples' AS rows,
        CASE
            WHEN i.retrieval_run_id IS NULL
                THEN 'See the taxonomy:  clipfail analyze' || chr(10)
                    || 'Try the text-side fix:  clipfail improve --categories Object --pooling all --control successes:100'
        END AS next_step,
        CASE WHEN i.retrieval_run_id IS NULL THEN 'suggested' END AS next_kind,
        b.is_simulated,
        b.retrieval_run_id  -- sort key only
    FROM labels b
    LEFT JOIN retrieval_runs r ON r.retrieval_run_id = b.retrieval_run_id
    LEFT JOIN subsets s ON s.subset_id = r.subset_id
    LEFT JOIN improved i ON i.retrieval_run_id = b.retrieval_run_id
)
SELECT * EXCLUDE (retrieval_run_id) FROM final
ORDER BY retrieval_run_id
