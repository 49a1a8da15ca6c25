-- run_comparison: one row per (comparison, K) of a `clipfail compare RUN_A RUN_B --k ...`: R@K of run A
-- and of run B (fractions, as recall_summary gives them), delta_pp = R@K(B) - R@K(A) in percentage
-- points (from the hit counts, rounded once to 2 decimals), the stored paired bootstrap 95% interval of
-- that delta (pp, 2 decimals) and the exact McNemar p-value (toolkit.stats, written by compare), and
-- the paired outcomes at K: n_fixed (A miss, B hit), n_broken (A hit, B miss), n_shared (a failure in
-- both) and n_neither (a hit in both), which add up to n_queries. weights_a / weights_b: the pretrained
-- tag, else `checkpoint <sha256 prefix>`, else 'random init', of the image embeddings each run used.
-- Ties: no run gains from them. is_tie_affected: for some K of the comparison, either run's optimistic
-- (gt_rank <= K) and pessimistic (gt_rank + n_tied <= K: the worst place among the items that share the
-- ground truth's score) hit counts differ by more than 0.01 pp (exactly: hits_optimistic -
-- hits_pessimistic > n / 10000), the rule of recall_summary and improvement_ties. tie_count names the count
-- of the headline columns (r_at_k_a/b, delta_pp, the interval, mcnemar_p and the four outcome counts):
-- 'pessimistic' for a tie-affected comparison (both runs alike), else 'optimistic' (the two then differ by
-- at most 0.01 pp). r_at_k_a/b_optimistic and _pessimistic give both; n_tied_queries_a/b count the queries
-- whose ground truth ties with another item. A tie-affected comparison stored before ties were compared
-- has no pessimistic interval or p-value (NULL) until the same `clipfail compare` is run again.
-- Ordered by comparison, then K.
-- Reads: run_comparisons, run_comparison_stats, run_pairs, retrieval_runs, embedding_sets, subsets.
CREATE OR REPLACE VIEW run_comparison AS
WITH run_comparisons AS (
    SELECT run_comparison_id, retrieval_run_a_id, retrieval_run_b_id, subset_id, direction, is_same_run
    FROM run_comparisons
),
run_comparison_stats AS (
    SELECT
        run_comparison_id, k, ci_low_pp, ci_high_pp, ci_level, mcnemar_p, ci_low_pp_pessimistic,
        ci_high_pp_pessimistic, mcnemar_p_pessimistic
    FROM run_comparison_stats
),
run_pairs AS (
    SELECT run_comparison_id, rank_a, rank_b, rank_a_pessimistic, rank_b_pessimistic FROM run_pairs
),
retrieval_runs AS (
    SELECT retrieval_run_id, model, image_embedding_set_id FROM retrieval_runs
),
embedding_sets AS (
    SELECT embedding_set_id, pretrained, checkpoint_sha256, precision FROM embedding_sets
),
subsets AS (
    SELECT subset_id, name FROM subsets
),
runs_described AS (
    SELECT
        r.retrieval_run_id,
        r.model,
        coalesce(e.pretrained, 'checkpoint ' || left(e.checkpoint_sha256, 12), 'random init') AS weights,
        e.precision
    FROM retrieval_runs r
    LEFT JOIN embedding_sets e ON e.embedding_set_id = r.image_embedding_set_id
),
outcomes AS (
    -- the paired outcomes at K under both counts (o: optimistic, gt_rank <= K; p: pessimistic, + n_tied)
    SELECT
        s.run_comparison_id,
        s.k,
        count(*) AS n_queries,
        count(*) FILTER (WHERE p.rank_a <= s.k) AS o_hits_a,
        count(*) FILTER (WHERE p.rank_b <= s.k) AS o_hits_b,
        count(*) FILTER (WHERE p.rank_a > s.k AND p.rank_b <= s.k) AS o_fixed,
        count(*) FILTER (WHERE p.rank_a <= s.k AND p.rank_b > s.k) AS o_broken,
        count(*) FILTER (WHERE p.rank_a > s.k AND p.rank_b > s.k) AS o_shared,
        count(*) FILTER (WHERE p.rank_a <= s.k AND p.rank_b <= s.k) AS o_neither,
        count(*) FILTER (WHERE p.rank_a_pessimistic <= s.k) AS p_hits_a,
        count(*) FILTER (WHERE p.rank_b_pessimistic <= s.k) AS p_hits_b,
        count(*) FILTER (WHERE p.rank_a_pessimistic > s.k AND p.rank_b_pessimistic <= s.k) AS p_fixed,
        count(*) FILTER (WHERE p.rank_a_pessimistic <= s.k AND p.rank_b_pessimistic > s.k) AS p_broken,
        count(*) FILTER (WHERE p.rank_a_pessimistic > s.k AND p.rank_b_pessimistic > s.k) AS p_shared,
        count(*) FILTER (WHERE p.rank_a_pessimistic <= s.k AND p.rank_b_pessimistic <= s.k) AS p_neither,
        count(*) FILTER (WHERE p.rank_a_pessimistic > p.rank_a) AS n_tied_queries_a,
        count(*) FILTER (WHERE p.rank_b_pessimistic > p.rank_b) AS n_tied_queries_b
    FROM run_comparison_stats s
    JOIN run_pairs p ON p.run_comparison_id = s.run_comparison_id
    GROUP BY s.run_comparison_id, s.k
),
ties AS (
    SELECT
        run_comparison_id,
        bool_or(greatest(o_hits_a - p_hits_a, o_hits_b - p_hits_b) * 10000 > n_queries) AS is_tie_affected
    FROM outcomes
    GROUP BY run_comparison_id
),
final AS (
    SELECT
        c.run_comparison_id,
        c.retrieval_run_a_id,
        c.retrieval_run_b_id,
        sub.name AS subset,
        c.direction,
        ra.model AS model_a,
        ra.weights AS weights_a,
        ra.precision AS precision_a,
        rb.model AS model_b,
        rb.weights AS weights_b,
        rb.precision AS precision_b,
        o.k,
        o.n_queries,
        CASE WHEN t.is_tie_affected THEN o.p_hits_a ELSE o.o_hits_a END / o.n_queries::DOUBLE AS r_at_k_a,
        CASE WHEN t.is_tie_affected THEN o.p_hits_b ELSE o.o_hits_b END / o.n_queries::DOUBLE AS r_at_k_b,
        round(
            100 * CASE
                WHEN t.is_tie_affected THEN o.p_hits_b - o.p_hits_a
                ELSE o.o_hits_b - o.o_hits_a
            END / o.n_queries::DOUBLE,
            2
        ) AS delta_pp,
        round(CASE WHEN t.is_tie_affected THEN s.ci_low_pp_pessimistic ELSE s.ci_low_pp END, 2) AS ci_low_pp,
        round(CASE WHEN t.is_tie_affected THEN s.ci_high_pp_pessimistic ELSE s.ci_high_pp END, 2) AS ci_high_pp,
        s.ci_level,
        CASE WHEN t.is_tie_affected THEN s.mcnemar_p_pessimistic ELSE s.mcnemar_p END AS mcnemar_p,
        CASE WHEN t.is_tie_affected THEN o.p_fixed ELSE o.o_fixed END AS n_fixed,
        CASE WHEN t.is_tie_affected THEN o.p_broken ELSE o.o_broken END AS n_broken,
        CASE WHEN t.is_tie_affected THEN o.p_shared ELSE o.o_shared END AS n_shared,
        CASE WHEN t.is_tie_affected THEN o.p_neither ELSE o.o_neither END AS n_neither,
        c.is_same_run,
        t.is_tie_affected,
        CASE WHEN t.is_tie_affected THEN 'pessimistic' ELSE 'optimistic' END AS tie_count,
        o.o_hits_a / o.n_queries::DOUBLE AS r_at_k_a_optimistic,
        o.p_hits_a / o.n_queries::DOUBLE AS r_at_k_a_pessimistic,
        o.o_hits_b / o.n_queries::DOUBLE AS r_at_k_b_optimistic,
        o.p_hits_b / o.n_queries::DOUBLE AS r_at_k_b_pessimistic,
        o.n_tied_queries_a,
        o.n_tied_queries_b
    FROM outcomes o
    JOIN ties t ON t.run_comparison_id = o.run_comparison_id
    JOIN run_comparisons c ON c.run_comparison_id = o.run_comparison_id
    JOIN run_comparison_stats s ON s.run_comparison_id = o.run_comparison_id AND s.k = o.k
    JOIN subsets sub ON sub.subset_id = c.subset_id
    LEFT JOIN runs_described ra ON ra.retrieval_run_id = c.retrieval_run_a_id
    LEFT JOIN runs_described rb ON rb.retrieval_run_id = c.retrieval_run_b_id
)
SELECT * FROM final
ORDER BY run_comparison_id, k
