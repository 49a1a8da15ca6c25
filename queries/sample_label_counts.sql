-- sample_label_counts: one row per retrieval run with labelled failure samples (view sample_labels): how many,
-- how many outside the overlap set (the taxonomy's n, merged over annotators) and in it (used for agreement),
-- and whether any of their labels is simulated (the demo's annotators). A run without labels has no row.
-- Rows: by retrieval run.
-- Reads: sample_labels.
CREATE OR REPLACE VIEW sample_label_counts AS
WITH sample_labels AS (
    SELECT retrieval_run_id, sample_id, is_overlap, is_simulated FROM sample_labels
),
final AS (
    SELECT
        retrieval_run_id,
        count(*) AS n_labelled,
        count(*) FILTER (WHERE NOT is_overlap) AS n_outside_overlap,
        count(*) FILTER (WHERE is_overlap) AS n_overlap,
        coalesce(bool_or(is_simulated), false) AS is_simulated
    FROM sample_labels
    GROUP BY retrieval_run_id
)
SELECT * FROM final
ORDER BY retrieval_run_id
