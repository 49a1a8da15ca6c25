-- improvement_recall: per improvement run and K in (1, 5, 10), its captions' baseline and improved
-- Recall@K in % (2 decimals) and the delta in percentage points (computed unrounded, then rounded),
-- with the stored paired statistics of that delta (toolkit.stats, written by `improve`): the
-- bootstrap 95% interval in pp, the exact McNemar p-value, and how many captions the prompts
-- fixed (baseline miss -> improved hit) and broke (baseline hit -> improved miss).
-- population is 'failures' (the labelled subset) or a control ('successes', 'all'). k_prompts is
-- the K asked for (prompts per caption, `--k`; NULL for runs made before it could be chosen);
-- effective_k_min / effective_k_mean are what the run's captions actually got (a caption gets fewer
-- when fewer templates apply to it; view improvement_effective_k has the distribution).
-- Ties (a method must not gain from them): baseline_pct_optimistic / _pessimistic, improved_pct_optimistic /
-- _pessimistic and delta_pp_optimistic / _pessimistic give Recall@K under both counts (optimistic: rank <= K;
-- pessimistic: rank + n_tied <= K, n_tied = other images with exactly the GT image's score; NULL when the run
-- did not record ties). The headline columns (baseline_pct, improved_pct, delta_pp, ci_low_pp, ci_high_pp,
-- mcnemar_p, n_fixed, n_broken) use the count named in tie_count: the pessimistic one, baseline and improved
-- alike, for a run that is_tie_affected (view improvement_ties: the two counts differ by more than 0.01 pp),
-- otherwise the optimistic one (as before ties were recorded: 'optimistic (ties unknown)').
-- The headline columns and both counts are the rows of view improvement_headline with category '*' (the whole
-- run), the one place that chooses the count.
-- Reads: improvement_runs, improvement_effective_k, improvement_headline.
CREATE OR REPLACE VIEW improvement_recall AS
WITH improvement_runs AS (
    SELECT
        improvement_id, run_id, retrieval_run_id, categories, population, pooling, tau, template_set,
        template_mode, k_per_category, k_prompts
    FROM improvement_runs
),
improvement_effective_k AS (
    SELECT improvement_id, effective_k, n_captions FROM improvement_effective_k
),
improvement_headline AS (
    SELECT
        improvement_id, category, k, n, baseline_pct, improved_pct, delta_pp, ci_low_pp, ci_high_pp, mcnemar_p,
        n_fixed, n_broken, tie_count, is_tie_affected, baseline_pct_optimistic, baseline_pct_pessimistic,
        improved_pct_optimistic, improved_pct_pessimistic, delta_pp_optimistic, delta_pp_pessimistic
    FROM improvement_headline
),
effective_k AS (
    SELECT
        improvement_id,
        min(effective_k) AS effective_k_min,
        round(sum(effective_k * n_captions) / sum(n_captions), 2) AS effective_k_mean
    FROM improvement_effective_k
    GROUP BY improvement_id
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
        u.template_set,
        u.template_mode,
        u.k_per_category,
        u.k_prompts,
        e.effective_k_min,
        e.effective_k_mean,
        h.* EXCLUDE (improvement_id, category)
    FROM improvement_headline h
    JOIN improvement_runs u ON u.improvement_id = h.improvement_id
    JOIN effective_k e ON e.improvement_id = h.improvement_id
    WHERE h.category = '*'
)
SELECT * FROM final
ORDER BY improvement_id, k
