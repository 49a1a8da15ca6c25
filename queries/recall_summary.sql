-- recall_summary: one row per retrieval run: Recall@1/5/10 (fractions), mean and median rank, and the
-- number of R@1 failures (gt_rank > 1), from the stored per-query ranks. Ranks follow the run's
-- tie_policy ('optimistic': 1 + items scoring strictly higher). For image-to-text a query is an image
-- and its rank is the best rank among its captions.
-- Reads: retrieval_runs, subsets, retrieval_ranks.
CREATE OR REPLACE VIEW recall_summary AS
WITH retrieval_runs AS (
    SELECT retrieval_run_id, subset_id, model, direction FROM retrieval_runs
),
subsets AS (
    SELECT subset_id, name FROM subsets
),
retrieval_ranks AS (
    SELECT retrieval_run_id, gt_rank FROM retrieval_ranks
),
per_run AS (
    SELECT
        retrieval_run_id,
        count(*) AS n_queries,
        count(*) FILTER (WHERE gt_rank <= 1) / count(*)::DOUBLE AS r_at_1,
        count(*) FILTER (WHERE gt_rank <= 5) / count(*)::DOUBLE AS r_at_5,
        count(*) FILTER (WHERE gt_rank <= 10) / count(*)::DOUBLE AS r_at_10,
        avg(gt_rank) AS mean_rank,
        median(gt_rank::DOUBLE) AS median_rank,
        count(*) FILTER (WHERE gt_rank > 1) AS n_r1_failures
    FROM retrieval_ranks
    GROUP BY retrieval_run_id
),
final AS (
    SELECT
        r.retrieval_run_id,
        s.name AS subset,
        r.model,
        r.direction,
        coalesce(p.n_queries, 0) AS n_queries,
        p.r_at_1,
        p.r_at_5,
        p.r_at_10,
        p.mean_rank,
        p.median_rank,
        coalesce(p.n_r1_failures, 0) AS n_r1_failures
    FROM retrieval_runs AS r
    JOIN subsets AS s USING (subset_id)
    LEFT JOIN per_run AS p USING (retrieval_run_id)
)
SELECT * FROM final
ORDER BY retrieval_run_id
