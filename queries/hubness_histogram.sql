-- hubness_histogram: the k-occurrence distribution of each retrieval run's gallery (view image_hubness): one
-- row per run, k in (1, 10) and value n_k of N_k, with n_items, how many gallery items have N_k = n_k. k = 10
-- rows are missing for a run stored with top-k < 10 (N_10 NULL). Rows: by run, k, n_k.
-- Reads: image_hubness.
CREATE OR REPLACE VIEW hubness_histogram AS
WITH image_hubness AS (
    SELECT retrieval_run_id, gallery_id, n_1, n_10 FROM image_hubness
),
final AS (
    SELECT retrieval_run_id, 1 AS k, n_1 AS n_k, count(*) AS n_items
    FROM image_hubness
    GROUP BY retrieval_run_id, n_1
    UNION ALL
    SELECT retrieval_run_id, 10 AS k, n_10 AS n_k, count(*) AS n_items
    FROM image_hubness
    WHERE n_10 IS NOT NULL
    GROUP BY retrieval_run_id, n_10
)
SELECT * FROM final
ORDER BY retrieval_run_id, k, n_k
