-- run_comparison: one row per (comparison, K) of a `clipfail compare RUN_A RUN_B --k ...`: R@K of run A
-- and of run B (fractions, as recall_summary gives them), delta_pp = R@K(B) - R@K(A) in percentage
-- points (from the hit counts, rounded once to 2 decimals), the stored paired bootstrap 95% interval of
-- that delta (pp, 2 decimals) and the exact McNemar p-value (toolkit.stats, written by compare), and
-- the paired outcomes at K: n_fixed (A miss, B hit), n_broken (A hit, B miss), n_shared (a failure in
-- both) and n_neither (a hit in both), which add up to n_queries. weights_a / weights_b: the pretrained
-- tag, else `checkpoint <sha256 prefix>`, else 'random init', of the image embeddings each run used.
-- Ordered by comparison, then K.
-- Reads: run_comparisons, run_comparison_stats, run_pairs, retrieval_runs, embedding_sets, subsets.
CREATE OR REPLACE VIEW run_comparison AS
WITH run_comparisons AS (
    SELECT run_comparison_id, retrieval_run_a_id, retrieval_run_b_id, subset_id, direction, is_same_run
    FROM run_comparisons
),
run_comparison_stats AS (
    SELECT run_comparison_id, k, ci_low_pp, ci_high_pp, ci_level, mcnemar_p FROM run_comparison_stats
),
run_pairs AS (
    SELECT run_comparison_id, rank_a, rank_b FROM run_pairs
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
    SELECT
        s.run_comparison_id,
        s.k,
        count(*) AS n_queries,
        count(*) FILTER (WHERE p.rank_a <= s.k) AS hits_a,
        count(*) FILTER (WHERE p.rank_b <= s.k) AS hits_b,
        count(*) FILTER (WHERE p.rank_a > s.k AND p.rank_b <= s.k) AS n_fixed,
        count(*) FILTER (WHERE p.rank_a <= s.k AND p.rank_b > s.k) AS n_broken,
        count(*) FILTER (WHERE p.rank_a > s.k AND p.rank_b > s.k) AS n_shared,
        count(*) FILTER (WHERE p.rank_a <= s.k AND p.rank_b <= s.k) AS n_neither
    FROM run_comparison_stats s
    JOIN run_pairs p ON p.run_comparison_id = s.run_comparison_id
    GROUP BY s.run_comparison_id, s.k
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
        o.hits_a / o.n_queries::DOUBLE AS r_at_k_a,
        o.hits_b / o.n_queries::DOUBLE AS r_at_k_b,
        round(100 * (o.hits_b - o.hits_a) / o.n_queries::DOUBLE, 2) AS delta_pp,
        round(s.ci_low_pp, 2) AS ci_low_pp,
        round(s.ci_high_pp, 2) AS ci_high_pp,
        s.ci_level,
        s.mcnemar_p,
        o.n_fixed,
        o.n_broken,
        o.n_shared,
        o.n_neither,
        c.is_same_run
    FROM outcomes o
    JOIN run_comparisons c ON c.run_comparison_id = o.run_comparison_id
    JOIN run_comparison_stats s ON s.run_comparison_id = o.run_comparison_id AND s.k = o.k
    JOIN subsets sub ON sub.subset_id = c.subset_id
    LEFT JOIN runs_described ra ON ra.retrieval_run_id = c.retrieval_run_a_id
    LEFT JOIN runs_described rb ON rb.retrieval_run_id = c.retrieval_run_b_id
)
SELECT * FROM final
ORDER BY run_comparison_id, k
