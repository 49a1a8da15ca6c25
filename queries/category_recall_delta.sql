-- category_recall_delta: improvement_recall per category within each improvement run: for each
-- (improvement run, category, K in 1, 5, 10) the n, baseline and improved Recall@K in %, the delta
-- in pp, and the stored bootstrap interval / McNemar p / fixed / broken counts of that category.
-- category is the caption's label; it is NULL for control captions that carry no label (and those
-- have no stored statistics). Rows follow the taxonomy order (categories.position), NULL last.
-- Reads: improvement_runs, improvement_hits, improvement_stats, categories.
CREATE OR REPLACE VIEW category_recall_delta AS
WITH improvement_runs AS (
    SELECT improvement_id, run_id, retrieval_run_id, categories, population, pooling, tau FROM improvement_runs
),
improvement_hits AS (
    SELECT improvement_id, category, k, is_baseline_hit, is_improved_hit FROM improvement_hits
),
improvement_stats AS (
    SELECT improvement_id, category, k, ci_low_pp, ci_high_pp, mcnemar_p, n_fixed, n_broken FROM improvement_stats
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
        avg(CASE WHEN is_improved_hit THEN 1.0 ELSE 0.0 END) AS improved
    FROM improvement_hits
    GROUP BY improvement_id, category, k
),
category_stats AS (
    SELECT * FROM improvement_stats WHERE category <> '*'
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
        round(100 * rc.baseline, 2) AS baseline_pct,
        round(100 * rc.improved, 2) AS improved_pct,
        round(100 * (rc.improved - rc.baseline), 2) AS delta_pp,
        round(s.ci_low_pp, 2) AS ci_low_pp,
        round(s.ci_high_pp, 2) AS ci_high_pp,
        s.mcnemar_p,
        s.n_fixed,
        s.n_broken,
        o.position AS category_position  -- sort key only
    FROM recall rc
    JOIN improvement_runs u ON u.improvement_id = rc.improvement_id
    LEFT JOIN category_stats s ON s.improvement_id = rc.improvement_id AND s.category = rc.category AND s.k = rc.k
    LEFT JOIN categories o ON o.category = rc.category
)
SELECT * EXCLUDE (category_position) FROM final
ORDER BY improvement_id, category_position NULLS LAST, category NULLS LAST, k
