-- improvement_recall_wide: one row per improvement run (every method), its K = 1, 5, 10 rows of view
-- improvement_recall side by side: n, baseline and improved Recall@K in %, the delta in pp with its bootstrap
-- 95% interval and McNemar p per K, and the captions fixed and broken at K = 1 (the headline count of
-- tie_count, as in improvement_recall). method is improvement_runs.method as stored (NULL for runs made before
-- methods: prompt ensembling, like 'templates'); pooling_position orders the poolings max, mean, logsumexp,
-- then any other (or none). run_order numbers the rows in the order of the report's consolidated table: by
-- retrieval run, categories, template set, template mode (NULL last), population, pooling_position, tau (NULL
-- last), improvement run; the rows come in that order.
-- Reads: improvement_recall, improvement_runs.
CREATE OR REPLACE VIEW improvement_recall_wide AS
WITH improvement_recall AS (
    SELECT
        improvement_id, run_id, retrieval_run_id, categories, population, pooling, tau, template_set,
        template_mode, k_per_category, k_prompts, tie_count, k, n, baseline_pct, improved_pct, delta_pp, ci_low_pp,
        ci_high_pp, mcnemar_p, n_fixed, n_broken
    FROM improvement_recall
),
improvement_runs AS (
    SELECT improvement_id, method FROM improvement_runs
),
wide AS (
    SELECT
        improvement_id, run_id, retrieval_run_id, categories, population, pooling, tau, template_set, template_mode,
        k_per_category, k_prompts, tie_count, any_value(n) AS n,
        any_value(baseline_pct) FILTER (WHERE k = 1) AS baseline_r1,
        any_value(baseline_pct) FILTER (WHERE k = 5) AS baseline_r5,
        any_value(baseline_pct) FILTER (WHERE k = 10) AS baseline_r10,
        any_value(improved_pct) FILTER (WHERE k = 1) AS improved_r1,
        any_value(improved_pct) FILTER (WHERE k = 5) AS improved_r5,
        any_value(improved_pct) FILTER (WHERE k = 10) AS improved_r10,
        any_value(delta_pp) FILTER (WHERE k = 1) AS delta_r1_pp,
        any_value(delta_pp) FILTER (WHERE k = 5) AS delta_r5_pp,
        any_value(delta_pp) FILTER (WHERE k = 10) AS delta_r10_pp,
        any_value(ci_low_pp) FILTER (WHERE k = 1) AS ci_low_r1_pp,
        any_value(ci_high_pp) FILTER (WHERE k = 1) AS ci_high_r1_pp,
        any_value(ci_low_pp) FILTER (WHERE k = 5) AS ci_low_r5_pp,
        any_value(ci_high_pp) FILTER (WHERE k = 5) AS ci_high_r5_pp,
        any_value(ci_low_pp) FILTER (WHERE k = 10) AS ci_low_r10_pp,
        any_value(ci_high_pp) FILTER (WHERE k = 10) AS ci_high_r10_pp,
        any_value(mcnemar_p) FILTER (WHERE k = 1) AS mcnemar_p_r1,
        any_value(mcnemar_p) FILTER (WHERE k = 5) AS mcnemar_p_r5,
        any_value(mcnemar_p) FILTER (WHERE k = 10) AS mcnemar_p_r10,
        any_value(n_fixed) FILTER (WHERE k = 1) AS n_fixed_r1,
        any_value(n_broken) FILTER (WHERE k = 1) AS n_broken_r1
    FROM improvement_recall
    GROUP BY improvement_id, run_id, retrieval_run_id, categories, population, pooling, tau, template_set,
        template_mode, k_per_category, k_prompts, tie_count
),
positioned AS (
    SELECT
        w.*,
        u.method,
        CASE w.pooling WHEN 'max' THEN 0 WHEN 'mean' THEN 1 WHEN 'logsumexp' THEN 2 ELSE 3 END AS pooling_position
    FROM wide w
    JOIN improvement_runs u ON u.improvement_id = w.improvement_id
),
final AS (
    SELECT
        *,
        row_number() OVER (
            ORDER BY retrieval_run_id, categories, template_set NULLS LAST, template_mode NULLS LAST, population,
                pooling_position, tau NULLS LAST, improvement_id
        ) AS run_order
    FROM positioned
)
SELECT * FROM final
ORDER BY run_order
