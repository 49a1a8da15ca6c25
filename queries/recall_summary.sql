-- recall_summary: one row per retrieval run: Recall@1/5/10 (fractions), mean and median rank, and the
-- number of R@1 failures (gt_rank > 1), from the stored per-query ranks. Ranks follow the run's
-- tie_policy ('optimistic': 1 + items scoring strictly higher). For image-to-text a query is an image
-- and its rank is the best rank among its captions.
-- Ties: r_at_1/5/10 count optimistically (a tie does not push the ground truth down);
-- r_at_1/5/10_pessimistic count rank + n_tied <= K (n_tied: other items with exactly the GT score, the
-- worst place among them). n_tied_queries: queries whose GT ties with at least one other item.
-- is_tie_affected: for some K the two counts differ by more than 0.01 pp (one step of a 2-decimal
-- percentage; exactly: hits_optimistic - hits_pessimistic > n / 10000); such a run's optimistic figures
-- must not be quoted alone.
-- Reads: retrieval_runs, subsets, retrieval_ranks.
CREATE OR REPLACE VIEW recall_summary AS
WITH retrieval_runs AS (
    SELECT retrieval_run_id, subset_id, model, direction FROM retrieval_runs
),
subsets AS (
    SELECT subset_id, name FROM subsets
),
retrieval_ranks AS (
    SELECT retrieval_run_id, gt_rank, n_tied FROM retrieval_ranks
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
        count(*) FILTER (WHERE gt_rank > 1) AS n_r1_failures,
        count(*) FILTER (WHERE gt_rank + n_tied <= 1) / count(*)::DOUBLE AS r_at_1_pessimistic,
        count(*) FILTER (WHERE gt_rank + n_tied <= 5) / count(*)::DOUBLE AS r_at_5_pessimistic,
        count(*) FILTER (WHERE gt_rank + n_tied <= 10) / count(*)::DOUBLE AS r_at_10_pessimistic,
        count(*) FILTER (WHERE n_tied > 0) AS n_tied_queries,
        greatest(
            count(*) FILTER (WHERE gt_rank <= 1 AND gt_rank + n_tied > 1),
            count(*) FILTER (WHERE gt_rank <= 5 AND gt_rank + n_tied > 5),
            count(*) FILTER (WHERE gt_rank <= 10 AND gt_rank + n_tied > 10)
        ) * 10000 > count(*) AS is_tie_affected
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
        coalesce(p.n_r1_failures, 0) AS n_r1_failures,
        p.r_at_1_pessimistic,
        p.r_at_5_pessimistic,
        p.r_at_10_pessimistic,
        coalesce(p.n_tied_queries, 0) AS n_tied_queries,
        p.is_tie_affected
    FROM retrieval_runs AS r
    JOIN subsets AS s USING (subset_id)
    LEFT JOIN per_run AS p USING (retrieval_run_id)
)
SELECT * FROM final
ORDER BY retrieval_run_id
