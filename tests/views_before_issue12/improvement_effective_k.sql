-- improvement_effective_k: the distribution of effective K per improvement run and category. A
-- caption gets the caption itself plus the distinct template prompts that apply to it, at most the
-- K asked for (`--k`, improvement_runs.k_prompts; NULL for runs made before K could be chosen), so
-- its effective K (improvement_ranks.n_prompts) may be smaller. One row per (improvement run,
-- category, effective K): how many captions got that many prompts, their share of the run's
-- captions of that category in % (2 decimals), and how many of them had fewer distinct texts than
-- prompts (always 0 since prompts are distinct; NULL for older runs, which did not record it).
-- category is the caption's label, or NULL for unlabelled control captions.
CREATE OR REPLACE VIEW improvement_effective_k AS
WITH improvement_runs_ AS (
    SELECT * FROM improvement_runs
),
ranks AS (
    SELECT improvement_id, category, n_prompts, n_distinct_prompts FROM improvement_ranks
),
per_k AS (
    SELECT
        improvement_id,
        category,
        n_prompts AS effective_k,
        count(*) AS n_captions,
        count(*) FILTER (WHERE n_distinct_prompts < n_prompts) AS n_with_repeats,
        count(n_distinct_prompts) AS n_recorded
    FROM ranks
    GROUP BY improvement_id, category, n_prompts
),
per_category AS (
    SELECT improvement_id, category, count(*) AS n_category FROM ranks GROUP BY improvement_id, category
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
    u.template_set,
    u.template_mode,
    u.k_prompts,
    p.category,
    p.effective_k,
    p.n_captions,
    round(100.0 * p.n_captions / c.n_category, 2) AS pct_of_category,
    p.effective_k < u.k_prompts AS is_below_k,
    CASE WHEN p.n_recorded = p.n_captions THEN p.n_with_repeats END AS n_with_repeats
FROM per_k p
JOIN improvement_runs_ u ON u.improvement_id = p.improvement_id
JOIN per_category c ON c.improvement_id = p.improvement_id AND c.category IS NOT DISTINCT FROM p.category
LEFT JOIN category_order o ON o.category = p.category
ORDER BY u.improvement_id, coalesce(o.position, 2147483647), p.category NULLS LAST, p.effective_k DESC
