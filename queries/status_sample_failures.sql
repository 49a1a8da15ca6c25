-- status_sample_failures: what `clipfail status` says of sample-failures: one row per retrieval run with
-- failure samples (how many, in how many sets), and what comes next while none of them is labelled
-- (blocking): filling in the label files and importing them. Columns: as status_ingest.
-- Rows: by retrieval run.
-- Reads: failure_samples, annotations, retrieval_runs, subsets.
CREATE OR REPLACE VIEW status_sample_failures AS
WITH failure_samples AS (
    SELECT sample_id, retrieval_run_id, set_name FROM failure_samples
),
annotations AS (
    SELECT sample_id FROM annotations
),
retrieval_runs AS (
    SELECT retrieval_run_id, subset_id, model FROM retrieval_runs
),
subsets AS (
    SELECT subset_id, name FROM subsets
),
samples AS (
    SELECT retrieval_run_id, count(*) AS n, count(DISTINCT set_name) AS n_sets
    FROM failure_samples
    GROUP BY retrieval_run_id
),
labelled AS (
    SELECT DISTINCT f.retrieval_run_id
    FROM failure_samples f
    JOIN annotations a ON a.sample_id = f.sample_id
),
final AS (
    SELECT
        'sample-failures' AS stage,
        6 AS stage_order,
        coalesce(s.name, '') AS subset,
        coalesce(r.model, '') AS model,
        'retrieval run ' || m.retrieval_run_id AS detail,
        m.n || ' samples in ' || m.n_sets || ' sets' AS rows,
        CASE
            WHEN l.retrieval_run_id IS NULL
                THEN 'Fill in the category column of assign_<annotator>.csv, and of each annotator''s copy of'
                    || chr(10) || 'assign_overlap.csv, in the sample-failures --out folder (default '
                    || 'failure_analysis/; see README.txt' || chr(10)
                    || 'there), then:  clipfail import-labels failure_analysis/assign_*.csv'
        END AS next_step,
        CASE WHEN l.retrieval_run_id IS NULL THEN 'blocking' END AS next_kind,
        false AS is_simulated,
        m.retrieval_run_id  -- sort key only
    FROM samples m
    LEFT JOIN retrieval_runs r ON r.retrieval_run_id = m.retrieval_run_id
    LEFT JOIN subsets s ON s.subset_id = r.subset_id
    LEFT JOIN labelled l ON l.retrieval_run_id = m.retrieval_run_id
)
SELECT * EXCLUDE (retrieval_run_id) FROM final
ORDER BY retrieval_run_id
