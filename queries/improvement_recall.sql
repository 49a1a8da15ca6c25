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
-- Reads: improvement_runs, improvement_effective_k, improvement_hits, improvement_ties, improvement_stats
-- (category '*': the whole run).
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
improvement_hits AS (
    SELECT
        improvement_id, k, is_baseline_hit, is_improved_hit, is_baseline_hit_pessimistic, is_improved_hit_pessimistic
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
effective_k AS (
    SELECT
        improvement_id,
        min(effective_k) AS effective_k_min,
        round(sum(effective_k * n_captions) / sum(n_captions), 2) AS effective_k_mean
    FROM improvement_effective_k
    GROUP BY improvement_id
),
run_stats AS (
    SELECT * FROM improvement_stats WHERE category = '*'
),
recall AS (
    SELECT
        improvement_id,
        k,
        count(*) AS n,
        avg(CASE WHEN is_baseline_hit THEN 1.0 ELSE 0.0 END) AS baseline,
        avg(CASE WHEN is_improved_hit THEN 1.0 ELSE 0.0 END) AS improved,
        avg(CASE WHEN is_baseline_hit_pessimistic THEN 1.0 ELSE 0.0 END) AS baseline_pessimistic,
        avg(CASE WHEN is_improved_hit_pessimistic THEN 1.0 ELSE 0.0 END) AS improved_pessimistic
    FROM improvement_hits
    GROUP BY improvement_id, k
),
headline AS (
    -- the figures of the count the run headlines (tie_count)
    SELECT
        rc.improvement_id,
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
    LEFT JOIN run_stats s ON s.improvement_id = rc.improvement_id AND s.k = rc.k
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
        END AS delta_pp_pessimistic
    FROM recall rc
    JOIN improvement_runs u ON u.improvement_id = rc.improvement_id
    JOIN effective_k e ON e.improvement_id = rc.improvement_id
    JOIN headline h ON h.improvement_id = rc.improvement_id AND h.k = rc.k
    JOIN improvement_ties t ON t.improvement_id = rc.improvement_id
)
SELECT * FROM final
ORDER BY improvement_id, k
