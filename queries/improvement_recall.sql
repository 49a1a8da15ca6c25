-- improvement_recall: per improvement run and K in (1, 5, 10), its captions' baseline and improved
-- Recall@K in % (2 decimals) and the delta in percentage points (computed unrounded, then rounded),
-- with the stored paired statistics of that delta (toolkit.stats, written by `improve`): the
-- bootstrap 95% interval in pp, the exact McNemar p-value, and how many captions the prompts
-- fixed (baseline miss -> improved hit) and broke (baseline hit -> improved miss).
-- population is 'failures' (the labelled subset) or a control ('successes', 'all'). k_prompts is
-- the K asked for (prompts per caption, `--k`; NULL for runs made before it could be chosen);
-- effective_k_min / effective_k_mean are what the run's captions actually got (a caption gets fewer
-- when fewer templates apply to it; view improvement_effective_k has the distribution).
-- Reads: improvement_runs, improvement_effective_k, improvement_hits, improvement_stats (category '*': the whole run).
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
    SELECT improvement_id, k, is_baseline_hit, is_improved_hit FROM improvement_hits
),
improvement_stats AS (
    SELECT improvement_id, category, k, ci_low_pp, ci_high_pp, mcnemar_p, n_fixed, n_broken FROM improvement_stats
),
effective_k AS (
    SELECT
        improvement_id,
        min(effective_k) AS effective_k_min,
        round(sum(effective_k * n_captions) / sum(n_captions), 2) AS effective_k_mean
    FROM improvement_effective_k
    GROUP BY improvement_id
),
recall AS (
    SELECT
        improvement_id,
        k,
        count(*) AS n,
        avg(CASE WHEN is_baseline_hit THEN 1.0 ELSE 0.0 END) AS baseline,
        avg(CASE WHEN is_improved_hit THEN 1.0 ELSE 0.0 END) AS improved
    FROM improvement_hits
    GROUP BY improvement_id, k
),
run_stats AS (
    SELECT * FROM improvement_stats WHERE category = '*'
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
        round(100 * rc.baseline, 2) AS baseline_pct,
        round(100 * rc.improved, 2) AS improved_pct,
        round(100 * (rc.improved - rc.baseline), 2) AS delta_pp,
        round(s.ci_low_pp, 2) AS ci_low_pp,
        round(s.ci_high_pp, 2) AS ci_high_pp,
        s.mcnemar_p,
        s.n_fixed,
        s.n_broken
    FROM recall rc
    JOIN improvement_runs u ON u.improvement_id = rc.improvement_id
    JOIN effective_k e ON e.improvement_id = rc.improvement_id
    LEFT JOIN run_stats s ON s.improvement_id = rc.improvement_id AND s.k = rc.k
)
SELECT * FROM final
ORDER BY improvement_id, k
