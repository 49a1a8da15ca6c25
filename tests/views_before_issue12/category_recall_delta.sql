-- category_recall_delta: improvement_recall per category within each improvement run: for each
-- (improvement run, category, K in 1, 5, 10) the n, baseline and improved Recall@K in %, the delta
-- in pp, and the stored bootstrap interval / McNemar p / fixed / broken counts of that category.
-- category is the caption's label; it is NULL for control captions that carry no label (and those
-- have no stored statistics).
CREATE OR REPLACE VIEW category_recall_delta AS
WITH improvement_runs_ AS (
    SELECT * FROM improvement_runs
),
ranks AS (
    SELECT improvement_id, category, baseline_rank, improved_rank FROM improvement_ranks
),
ks AS (
    SELECT unnest([1, 5, 10]) AS k
),
recall AS (
    SELECT
        r.improvement_id,
        r.category,
        ks.k,
        count(*) AS n,
        avg(CASE WHEN r.baseline_rank <= ks.k THEN 1.0 ELSE 0.0 END) AS baseline,
        avg(CASE WHEN r.improved_rank <= ks.k THEN 1.0 ELSE 0.0 END) AS improved
    FROM ranks r CROSS JOIN ks
    GROUP BY r.improvement_id, r.category, ks.k
),
category_stats AS (
    SELECT * FROM improvement_stats WHERE category <> '*'
),
category_order AS (
    SELECT name AS category, position FROM categories
)
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
    s.n_broken
FROM recall rc
JOIN improvement_runs_ u ON u.improvement_id = rc.improvement_id
LEFT JOIN category_stats s ON s.improvement_id = rc.improvement_id AND s.category = rc.category AND s.k = rc.k
LEFT JOIN category_order o ON o.category = rc.category
ORDER BY u.improvement_id, coalesce(o.position, 2147483647), rc.category NULLS LAST, rc.k
