-- method_comparison: which training-free fix helps which failure category. One row per improvement
-- run of the labelled failures (population 'failures') and category of its captions ('*' = all of
-- them), for every method (templates: prompt ensembling, one row per pooling; inverted-softmax;
-- qb-norm; query-expansion): n, the baseline and improved Recall@1/5/10 in %, the deltas in pp with
-- their stored paired-bootstrap 95% intervals and exact McNemar p-values (improvement_stats, as in
-- improvement_recall), the captions fixed and broken at R@1, and from the matching control run
-- (same retrieval run, categories, method and parameters, pooling, tau, seed, subset size; the newest
-- if several) the share of its R@1 successes that the method breaks (n_broken / baseline hits at K=1;
-- NULL without a control). method_rank_r1 ranks the methods within (retrieval run, category) by the
-- R@1 delta, 1 = largest gain (ties share a rank). is_bank_overlap flags a qb-norm bank that held
-- evaluated captions (--allow-bank-overlap). pooling, tau and the template columns are NULL for a method without
-- prompts (they match a control's NULL).
-- Ties: no method gains from them. The headline columns (baseline/improved/delta, intervals, p-values,
-- fixed/broken, the control's share broken, and so method_rank_r1) use each run's tie_count (view
-- improvement_ties): the pessimistic count (rank + n_tied <= K, baseline and improved alike) for a run that
-- is_tie_affected, else the optimistic one; baseline_r{K}_pct_optimistic / _pessimistic and
-- improved_r{K}_pct_optimistic / _pessimistic give both (pessimistic NULL: ties not recorded).
-- Rows: by retrieval run, category ('*' first, then taxonomy order), rank, improvement run.
-- Reads: improvement_runs, improvement_stats, categories, improvement_ties.
CREATE OR REPLACE VIEW method_comparison AS
WITH improvement_runs AS (
    SELECT
        improvement_id, run_id, retrieval_run_id, categories, population, pooling, tau, template_set,
        template_mode, k_prompts, seed, max_subset, is_overlap_included, method, method_params, is_bank_overlap
    FROM improvement_runs
),
improvement_stats AS (
    SELECT
        improvement_id, category, k, n, baseline_hits, improved_hits, n_fixed, n_broken, ci_low_pp, ci_high_pp,
        mcnemar_p, baseline_hits_pessimistic, improved_hits_pessimistic, n_fixed_pessimistic, n_broken_pessimistic,
        ci_low_pp_pessimistic, ci_high_pp_pessimistic, mcnemar_p_pessimistic
    FROM improvement_stats
),
improvement_ties AS (
    SELECT improvement_id, is_tie_affected, tie_count FROM improvement_ties
),
categories AS (
    SELECT name AS category, position FROM categories
),
headline_stats AS (
    -- each stored statistic in the count its run headlines (tie_count), and the hits under both counts
    SELECT
        s.improvement_id,
        s.category,
        s.k,
        s.n,
        CASE WHEN t.is_tie_affected THEN s.baseline_hits_pessimistic ELSE s.baseline_hits END AS baseline_hits,
        CASE WHEN t.is_tie_affected THEN s.improved_hits_pessimistic ELSE s.improved_hits END AS improved_hits,
        CASE WHEN t.is_tie_affected THEN s.n_fixed_pessimistic ELSE s.n_fixed END AS n_fixed,
        CASE WHEN t.is_tie_affected THEN s.n_broken_pessimistic ELSE s.n_broken END AS n_broken,
        CASE WHEN t.is_tie_affected THEN s.ci_low_pp_pessimistic ELSE s.ci_low_pp END AS ci_low_pp,
        CASE WHEN t.is_tie_affected THEN s.ci_high_pp_pessimistic ELSE s.ci_high_pp END AS ci_high_pp,
        CASE WHEN t.is_tie_affected THEN s.mcnemar_p_pessimistic ELSE s.mcnemar_p END AS mcnemar_p,
        s.baseline_hits AS baseline_hits_optimistic,
        s.improved_hits AS improved_hits_optimistic,
        s.baseline_hits_pessimistic,
        s.improved_hits_pessimistic
    FROM improvement_stats s
    JOIN improvement_ties t ON t.improvement_id = s.improvement_id
),
labelled_runs AS (
    SELECT
        *,
        coalesce(method, 'templates') AS method_name,
        CASE
            WHEN coalesce(method, 'templates') = 'templates'
                THEN 'templates ' || template_set || '/' || template_mode
                     || coalesce(' K' || k_prompts::VARCHAR, '') || ' ' || pooling
                     || CASE WHEN pooling = 'logsumexp' AND tau IS NOT NULL THEN ' tau=' || tau::VARCHAR ELSE '' END
            ELSE method || ' ' || coalesce(method_params, '')
        END AS method_label
    FROM improvement_runs
),
failures AS (
    SELECT * FROM labelled_runs WHERE population = 'failures'
),
controls AS (
    SELECT
        u.improvement_id, u.retrieval_run_id, u.categories, u.method_name, u.method_params, u.pooling, u.tau,
        u.template_set, u.template_mode, u.k_prompts, u.seed, u.max_subset, u.is_overlap_included, u.population,
        s.n, s.baseline_hits, s.n_broken
    FROM labelled_runs u
    JOIN headline_stats s ON s.improvement_id = u.improvement_id AND s.category = '*' AND s.k = 1
    WHERE u.population <> 'failures'
),
matched_control AS (
    SELECT
        f.improvement_id,
        arg_max(c.population, c.improvement_id) AS control_population,
        max(c.improvement_id) AS control_improvement_id,
        arg_max(c.n, c.improvement_id) AS control_n,
        arg_max(c.n_broken, c.improvement_id) AS control_n_broken_r1,
        arg_max(c.n_broken / nullif(c.baseline_hits, 0)::DOUBLE, c.improvement_id) AS share_r1_successes_broken
    FROM failures f
    JOIN controls c
        ON c.retrieval_run_id = f.retrieval_run_id AND c.categories = f.categories
        AND c.method_name = f.method_name AND c.method_params IS NOT DISTINCT FROM f.method_params
        AND c.pooling IS NOT DISTINCT FROM f.pooling AND c.tau IS NOT DISTINCT FROM f.tau
        AND c.template_set IS NOT DISTINCT FROM f.template_set AND c.template_mode IS NOT DISTINCT FROM f.template_mode
        AND c.k_prompts IS NOT DISTINCT FROM f.k_prompts AND c.seed = f.seed
        AND c.max_subset IS NOT DISTINCT FROM f.max_subset AND c.is_overlap_included = f.is_overlap_included
    GROUP BY f.improvement_id
),
wide AS (
    SELECT
        improvement_id,
        category,
        any_value(n) AS n,
        any_value(100.0 * baseline_hits / n) FILTER (WHERE k = 1) AS baseline_r1,
        any_value(100.0 * baseline_hits / n) FILTER (WHERE k = 5) AS baseline_r5,
        any_value(100.0 * baseline_hits / n) FILTER (WHERE k = 10) AS baseline_r10,
        any_value(100.0 * improved_hits / n) FILTER (WHERE k = 1) AS improved_r1,
        any_value(100.0 * improved_hits / n) FILTER (WHERE k = 5) AS improved_r5,
        any_value(100.0 * improved_hits / n) FILTER (WHERE k = 10) AS improved_r10,
        any_value(ci_low_pp) FILTER (WHERE k = 1) AS ci_low_r1,
        any_value(ci_high_pp) FILTER (WHERE k = 1) AS ci_high_r1,
        any_value(ci_low_pp) FILTER (WHERE k = 5) AS ci_low_r5,
        any_value(ci_high_pp) FILTER (WHERE k = 5) AS ci_high_r5,
        any_value(ci_low_pp) FILTER (WHERE k = 10) AS ci_low_r10,
        any_value(ci_high_pp) FILTER (WHERE k = 10) AS ci_high_r10,
        any_value(mcnemar_p) FILTER (WHERE k = 1) AS mcnemar_p_r1,
        any_value(mcnemar_p) FILTER (WHERE k = 5) AS mcnemar_p_r5,
        any_value(mcnemar_p) FILTER (WHERE k = 10) AS mcnemar_p_r10,
        any_value(n_fixed) FILTER (WHERE k = 1) AS n_fixed_r1,
        any_value(n_broken) FILTER (WHERE k = 1) AS n_broken_r1,
        any_value(100.0 * baseline_hits_optimistic / n) FILTER (WHERE k = 1) AS baseline_r1_optimistic,
        any_value(100.0 * baseline_hits_pessimistic / n) FILTER (WHERE k = 1) AS baseline_r1_pessimistic,
        any_value(100.0 * improved_hits_optimistic / n) FILTER (WHERE k = 1) AS improved_r1_optimistic,
        any_value(100.0 * improved_hits_pessimistic / n) FILTER (WHERE k = 1) AS improved_r1_pessimistic,
        any_value(100.0 * baseline_hits_optimistic / n) FILTER (WHERE k = 5) AS baseline_r5_optimistic,
        any_value(100.0 * baseline_hits_pessimistic / n) FILTER (WHERE k = 5) AS baseline_r5_pessimistic,
        any_value(100.0 * improved_hits_optimistic / n) FILTER (WHERE k = 5) AS improved_r5_optimistic,
        any_value(100.0 * improved_hits_pessimistic / n) FILTER (WHERE k = 5) AS improved_r5_pessimistic,
        any_value(100.0 * baseline_hits_optimistic / n) FILTER (WHERE k = 10) AS baseline_r10_optimistic,
        any_value(100.0 * baseline_hits_pessimistic / n) FILTER (WHERE k = 10) AS baseline_r10_pessimistic,
        any_value(100.0 * improved_hits_optimistic / n) FILTER (WHERE k = 10) AS improved_r10_optimistic,
        any_value(100.0 * improved_hits_pessimistic / n) FILTER (WHERE k = 10) AS improved_r10_pessimistic
    FROM headline_stats
    GROUP BY improvement_id, category
),
final AS (
    SELECT
        f.retrieval_run_id,
        w.category,
        f.method_name AS method,
        f.method_params,
        f.method_label,
        f.pooling,
        f.tau,
        f.improvement_id,
        f.run_id,
        f.categories,
        w.n,
        round(w.baseline_r1, 2) AS baseline_r1_pct,
        round(w.baseline_r5, 2) AS baseline_r5_pct,
        round(w.baseline_r10, 2) AS baseline_r10_pct,
        round(w.improved_r1, 2) AS improved_r1_pct,
        round(w.improved_r5, 2) AS improved_r5_pct,
        round(w.improved_r10, 2) AS improved_r10_pct,
        round(w.improved_r1 - w.baseline_r1, 2) AS delta_r1_pp,
        round(w.improved_r5 - w.baseline_r5, 2) AS delta_r5_pp,
        round(w.improved_r10 - w.baseline_r10, 2) AS delta_r10_pp,
        round(w.ci_low_r1, 2) AS ci_low_r1_pp,
        round(w.ci_high_r1, 2) AS ci_high_r1_pp,
        round(w.ci_low_r5, 2) AS ci_low_r5_pp,
        round(w.ci_high_r5, 2) AS ci_high_r5_pp,
        round(w.ci_low_r10, 2) AS ci_low_r10_pp,
        round(w.ci_high_r10, 2) AS ci_high_r10_pp,
        w.mcnemar_p_r1,
        w.mcnemar_p_r5,
        w.mcnemar_p_r10,
        w.n_fixed_r1,
        w.n_broken_r1,
        mc.control_population,
        mc.control_improvement_id,
        mc.control_n,
        mc.control_n_broken_r1,
        mc.share_r1_successes_broken,
        rank() OVER (
            PARTITION BY f.retrieval_run_id, w.category ORDER BY w.improved_r1 - w.baseline_r1 DESC
        ) AS method_rank_r1,
        coalesce(f.is_bank_overlap, false) AS is_bank_overlap,
        t.tie_count,
        t.is_tie_affected,
        round(w.baseline_r1_optimistic, 2) AS baseline_r1_pct_optimistic,
        round(w.baseline_r1_pessimistic, 2) AS baseline_r1_pct_pessimistic,
        round(w.improved_r1_optimistic, 2) AS improved_r1_pct_optimistic,
        round(w.improved_r1_pessimistic, 2) AS improved_r1_pct_pessimistic,
        round(w.baseline_r5_optimistic, 2) AS baseline_r5_pct_optimistic,
        round(w.baseline_r5_pessimistic, 2) AS baseline_r5_pct_pessimistic,
        round(w.improved_r5_optimistic, 2) AS improved_r5_pct_optimistic,
        round(w.improved_r5_pessimistic, 2) AS improved_r5_pct_pessimistic,
        round(w.baseline_r10_optimistic, 2) AS baseline_r10_pct_optimistic,
        round(w.baseline_r10_pessimistic, 2) AS baseline_r10_pct_pessimistic,
        round(w.improved_r10_optimistic, 2) AS improved_r10_pct_optimistic,
        round(w.improved_r10_pessimistic, 2) AS improved_r10_pct_pessimistic,
        w.category <> '*' AS is_category_row,
        o.position AS category_position
    FROM failures f
    JOIN wide w ON w.improvement_id = f.improvement_id
    LEFT JOIN matched_control mc ON mc.improvement_id = f.improvement_id
    JOIN improvement_ties t ON t.improvement_id = f.improvement_id
    LEFT JOIN categories o ON o.category = w.category
)
SELECT * EXCLUDE (is_category_row, category_position) FROM final
ORDER BY retrieval_run_id, is_category_row, category_position NULLS LAST, category, method_rank_r1, improvement_id
