-- category_recall_delta: improvement_recall per category within each improvement run: for each
-- (improvement run, category, K in 1, 5, 10) the n, baseline and improved Recall@K in %, the delta
-- in pp, and the stored bootstrap interval / McNemar p / fixed / broken counts of that category.
-- category is the caption's label; it is NULL for control captions that carry no label (and those
-- have no stored statistics). Rows follow the taxonomy order (categories.position), NULL last.
-- Ties, as in improvement_recall: the headline columns use the run's tie_count (view improvement_ties: the
-- pessimistic count, baseline and improved alike, for a tie-affected run), and the *_optimistic /
-- *_pessimistic columns give the category's Recall@K under both counts (pessimistic NULL: ties not recorded);
-- they are the rows of view improvement_headline other than the whole run's ('*').
-- Reads: improvement_runs, improvement_headline, categories.
CREATE OR REPLACE VIEW category_recall_delta AS
WITH improvement_runs AS (
    SELECT improvement_id, run_id, retrieval_run_id, categories, population, pooling, tau FROM improvement_runs
),
improvement_headline AS (
    SELECT
        improvement_id, category, k, n, baseline_pct, improved_pct, delta_pp, ci_low_pp, ci_high_pp, mcnemar_p,
        n_fixed, n_broken, tie_count, is_tie_affected, baseline_pct_optimistic, baseline_pct_pessimistic,
        improved_pct_optimistic, improved_pct_pessimistic, delta_pp_optimistic, delta_pp_pessimistic
    FROM improvement_headline
),
categories AS (
    SELECT name AS category, position FROM categories
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
        h.* EXCLUDE (improvement_id),
        o.position AS category_position  -- sort key only
    FROM improvement_headline h
    JOIN improvement_runs u ON u.improvement_id = h.improvement_id
    LEFT JOIN categories o ON o.category = h.category
    WHERE h.category IS DISTINCT FROM '*'
)
SELECT * EXCLUDE (category_position) FROM final
ORDER BY improvement_id, category_position NULLS LAST, category NULLS LAST, k
