-- category_recall_delta: improvement_recall per category within each improvement run: for each
-- (improvement run, category, K in 1, 5, 10) the n, baseline and improved Recall@K in %, the delta
-- in pp, and the stored bootstrap interval / McNemar p / fixed / broken counts of that category.
-- category is the caption's label; it is NULL for control captions that carry no label (and those
-- have no stored statistics). Rows follow the taxonomy order (categories.position), NULL last.
-- Ties, as in improvement_recall: the headline columns use the run's tie_count (view improvement_ties: the
-- pessimistic count, baseline and improved alike, for a tie-affected run), and the *_optimistic /
-- *_pessimistic columns give the category's Recall@K under both counts (pessimistic NULL: ties not recorded).
-- Reads: improvement_runs, improvement_hits, improvement_stats, categories, improvement_ties.
CREATE OR REPLACE VIEW category_recall_delta AS
WITH improvement_runs AS (
    SELECT improvement_id, run_id, retrieval_run_id, categories, population, pooling, tau FROM improvement_runs
),
improvement_hits AS (
    SELECT
        improvement_id, category, k, is_baseline_hit, is_improved_hit, is_baseline_hit_pessimistic,
        is_improved_hit_pessimistic
    FROM improvement_hits
),
improvement_stats AS (
    SELECT
        improvement_id, category, k, ci_low_pp, ci_high_pp, mcnemar_p, n_fixed, n_broken, ci_low_pp_pessimistic,
        ci_high_pp_pessimistic, mcnemar_p_pessimistic, n_fixed_pessimistic, n_broken_pessimistic
    FROM improvement_stats
),
improvement_ties AS (
    SELECT improvement_id, is_tie_recorded, is_tie_affected, tie_count FROM improvement_ties
),
categories AS (
    SELECT name AS category, position FROM categories
),
recall AS (
    SELECT
        improvement_id,
        category,
        k,
        count(*) AS n,
        avg(CASE WHEN is_baseline_hit THEN 1.0 ELSE 0.0 END) AS baseline,
        avg(CASE WHEN is_improved_hit THEN 1.0 ELSE 0.0 END) AS improved,
        avg(CASE WHEN is_baseline_hit_pessimistic THEN 1.0 ELSE 0.0 END) AS baseline_pessimistic,
        avg(CASE WHEN is_improved_hit_pessimistic THEN 1.0 ELSE 0.0 END) AS improved_pessimistic
    FROM improvement_hits
    GROUP BY improvement_id, category, k
),
category_stats AS (
    SELECT * FROM improvement_stats WHERE category <> '*'
),
headline AS (
    -- the figures of the count the run headlines (tie_count); category NULL rows have no statistics
    SELECT
        rc.improvement_id,
        rc.category,
        rc.k,
        CASE WHEN t.is_tie_affected THEN rc.baseline_pessimistic ELSE rc.baseline END AS baseline,
        CASE WHEN t.is_tie_affected THEN rc.improved_pessimistic ELSE rc.improved END AS improved,
        CASE WHEN t.is_tie_affected THEN s.ci_low_pp_pessimistic ELSE s.ci_low_pp END AS ci_low_pp,
        CASE WHEN t.is_tie_affected THEN s.ci_high_pp_pessimistic ELSE s.ci_high_pp END AS ci_high_pp,
        CASE WHEN t.is_tie_affected THEN s.mcnemar_p_pessimistic ELSE s.mcnemar_p END AS mcnemar_p,
        CASE WHEN t.is_tie_affected THEN s.n_fixed_pessimistic ELSE s.n_fixed END AS n_fixed,
        CASE WHEN t.is_tie_affected THEN s.n_broken_pessimistic ELSE s.n_broken END AS n_broken
    FROM recall rc
    JOIN improvement_ties t ON t.improvement_id = rc.improvement_id
    LEFT JOIN category_stats s ON s.improvement_id = rc.improvement_id AND s.category = rc.category AND s.k = rc.k
),
final AS (
    SELECT
        u.improvement_id,
        u.run_id,
        u.retrieval_run_id,
        u.categories,
        u.population,
        u.pooling,
        u.tau,
        rc.category,
        rc.k,
        rc.n,
        round(100 * h.baseline, 2) AS baseline_pct,
        round(100 * h.improved, 2) AS improved_pct,
        round(100 * (h.improved - h.baseline), 2) AS delta_pp,
        round(h.ci_low_pp, 2) AS ci_low_pp,
        round(h.ci_high_pp, 2) AS ci_high_pp,
        h.mcnemar_p,
        h.n_fixed,
        h.n_broken,
        t.tie_count,
        t.is_tie_affected,
        round(100 * rc.baseline, 2) AS baseline_pct_optimistic,
        CASE WHEN t.is_tie_recorded THEN round(100 * rc.baseline_pessimistic, 2) END AS baseline_pct_pessimistic,
        round(100 * rc.improved, 2) AS improved_pct_optimistic,
        CASE WHEN t.is_tie_recorded THEN round(100 * rc.improved_pessimistic, 2) END AS improved_pct_pessimistic,
        round(100 * (rc.improved - rc.baseline), 2) AS delta_pp_optimistic,
        CASE
            WHEN t.is_tie_recorded THEN round(100 * (rc.improved_pessimistic - rc.baseline_pessimistic), 2)
        END AS delta_pp_pessimistic,
        o.position AS category_position  -- sort key only
    FROM recall rc
    JOIN improvement_runs u ON u.improvement_id = rc.improvement_id
    JOIN headline h ON h.improvement_id = rc.improvement_id AND h.category IS NOT DISTINCT FROM rc.category
        AND h.k = rc.k
    JOIN improvement_ties t ON t.improvement_id = rc.improvement_id
    LEFT JOIN categories o ON o.category = rc.category
)
SELECT * EXCLUDE (category_position) FROM final
ORDER BY improvement_id, category_position NULLS LAST, category NULLS LAST, k
