-- failure_overlap_by_category: one row per (comparison, category) of a `clipfail compare RUN_A RUN_B` of
-- text-to-image runs, from the labelled R@1 failures (view sample_labels: every labelled sample once,
-- an overlap sample by its majority label).
-- n_labelled_a: run A's labelled failures in the category; of those, n_fixed have rank 1 in run B and
-- n_shared still fail in B (rank > 1); percent_fixed = 100 * n_fixed / n_labelled_a, rounded half up to
-- 2 decimals in integer arithmetic (NULL without such failures); median_rank_a / median_rank_b: their
-- ranks in A and in B. n_labelled_b / n_broken: run B's labelled failures in the category and how many
-- of them A retrieved at rank 1 (broken by going from A to B); both NULL when run B has no labelled
-- failures at all. is_simulated: some of these labels come from the demo's simulated annotators.
-- Ties: the ranks are counted as the comparison's headline counts them (view run_comparison, tie_count):
-- for a tie-affected comparison, rank + n_tied (the worst place among the items sharing the ground truth's
-- score) in both runs, so that neither run's ties fix or break a failure; else gt_rank. tie_count names it.
-- Ordered by comparison, then taxonomy order (categories.position; unknown names last, by name).
-- Reads: run_comparisons, run_comparison, sample_labels, retrieval_ranks, categories.
CREATE OR REPLACE VIEW failure_overlap_by_category AS
WITH run_comparisons AS (
    SELECT run_comparison_id, retrieval_run_a_id, retrieval_run_b_id, direction FROM run_comparisons
),
run_comparison AS (
    SELECT DISTINCT run_comparison_id, is_tie_affected FROM run_comparison
),
sample_labels AS (
    SELECT retrieval_run_id, caption_id, category, is_simulated FROM sample_labels
),
retrieval_ranks AS (
    SELECT retrieval_run_id, query_id, gt_rank, n_tied FROM retrieval_ranks
),
categories AS (
    SELECT name AS category, position FROM categories
),
labelled_a AS (
    SELECT
        c.run_comparison_id,
        t.is_tie_affected,
        l.category,
        l.is_simulated,
        ra.gt_rank + CASE WHEN t.is_tie_affected THEN ra.n_tied ELSE 0 END AS rank_a,
        rb.gt_rank + CASE WHEN t.is_tie_affected THEN rb.n_tied ELSE 0 END AS rank_b
    FROM run_comparisons c
    JOIN run_comparison t ON t.run_comparison_id = c.run_comparison_id
    JOIN sample_labels l ON l.retrieval_run_id = c.retrieval_run_a_id
    JOIN retrieval_ranks ra ON ra.retrieval_run_id = c.retrieval_run_a_id AND ra.query_id = l.caption_id
    JOIN retrieval_ranks rb ON rb.retrieval_run_id = c.retrieval_run_b_id AND rb.query_id = l.caption_id
    WHERE c.direction = 'text-to-image'
),
labelled_b AS (
    SELECT
        c.run_comparison_id,
        t.is_tie_affected,
        l.category,
        l.is_simulated,
        ra.gt_rank + CASE WHEN t.is_tie_affected THEN ra.n_tied ELSE 0 END AS rank_a,
        rb.gt_rank + CASE WHEN t.is_tie_affected THEN rb.n_tied ELSE 0 END AS rank_b
    FROM run_comparisons c
    JOIN run_comparison t ON t.run_comparison_id = c.run_comparison_id
    JOIN sample_labels l ON l.retrieval_run_id = c.retrieval_run_b_id
    JOIN retrieval_ranks ra ON ra.retrieval_run_id = c.retrieval_run_a_id AND ra.query_id = l.caption_id
    JOIN retrieval_ranks rb ON rb.retrieval_run_id = c.retrieval_run_b_id AND rb.query_id = l.caption_id
    WHERE c.direction = 'text-to-image'
),
per_category_a AS (
    SELECT
        run_comparison_id,
        category,
        count(*) AS n_labelled_a,
        count(*) FILTER (WHERE rank_b <= 1) AS n_fixed,
        count(*) FILTER (WHERE rank_b > 1) AS n_shared,
        median(rank_a::DOUBLE) AS median_rank_a,
        median(rank_b::DOUBLE) AS median_rank_b,
        bool_or(is_simulated) AS is_simulated,
        bool_or(is_tie_affected) AS is_tie_affected
    FROM labelled_a
    GROUP BY run_comparison_id, category
),
per_category_b AS (
    SELECT
        run_comparison_id,
        category,
        count(*) AS n_labelled_b,
        count(*) FILTER (WHERE rank_a <= 1) AS n_broken,
        bool_or(is_simulated) AS is_simulated,
        bool_or(is_tie_affected) AS is_tie_affected
    FROM labelled_b
    GROUP BY run_comparison_id, category
),
comparisons_labelled_b AS (
    SELECT DISTINCT run_comparison_id FROM labelled_b
),
final AS (
    SELECT
        coalesce(a.run_comparison_id, b.run_comparison_id) AS run_comparison_id,
        coalesce(a.category, b.category) AS category,
        coalesce(a.n_labelled_a, 0) AS n_labelled_a,
        coalesce(a.n_fixed, 0) AS n_fixed,
        coalesce(a.n_shared, 0) AS n_shared,
        CASE WHEN a.n_labelled_a > 0
            THEN (((20000 * a.n_fixed + a.n_labelled_a) // (2 * a.n_labelled_a))::DECIMAL(18, 0) / 100)::DECIMAL(5, 2)
        END AS percent_fixed,
        a.median_rank_a,
        a.median_rank_b,
        CASE WHEN lb.run_comparison_id IS NOT NULL THEN coalesce(b.n_labelled_b, 0) END AS n_labelled_b,
        CASE WHEN lb.run_comparison_id IS NOT NULL THEN coalesce(b.n_broken, 0) END AS n_broken,
        coalesce(a.is_simulated, false) OR coalesce(b.is_simulated, false) AS is_simulated,
        CASE WHEN coalesce(a.is_tie_affected, b.is_tie_affected) THEN 'pessimistic' ELSE 'optimistic' END AS tie_count,
        o.position AS category_position
    FROM per_category_a a
    FULL OUTER JOIN per_category_b b ON b.run_comparison_id = a.run_comparison_id AND b.category = a.category
    LEFT JOIN comparisons_labelled_b lb ON lb.run_comparison_id = coalesce(a.run_comparison_id, b.run_comparison_id)
    LEFT JOIN categories o ON o.category = coalesce(a.category, b.category)
)
SELECT * EXCLUDE (category_position) FROM final
ORDER BY run_comparison_id, category_position NULLS LAST, category
