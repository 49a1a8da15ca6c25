-- improvement_headline: one row per improvement run, category of its captions and K in (1, 5, 10), with
-- category '*' for the whole run (every caption): n, the baseline and improved Recall@K in % (2 decimals), the
-- delta in pp (computed unrounded, then rounded) and the stored paired statistics of that delta
-- (improvement_stats: bootstrap 95% interval in pp, exact McNemar p, captions fixed and broken). category is the
-- caption's label, NULL for control captions that carry no label (those have no stored statistics).
-- Ties (a method must not gain from them): the headline columns (baseline_pct, improved_pct, delta_pp,
-- ci_low_pp, ci_high_pp, mcnemar_p, n_fixed, n_broken) use the count named in tie_count (view improvement_ties):
-- the pessimistic one (rank + n_tied <= K), baseline and improved alike, for a run that is_tie_affected, otherwise
-- the optimistic one (rank <= K); the *_optimistic / *_pessimistic columns give both (pessimistic NULL when the
-- run did not record ties). The one place that chooses the headline count: improvement_recall (category '*') and
-- category_recall_delta (the other rows) read it.
-- Rows: by improvement run, category ('*' first, then by name, NULL last), K.
-- Reads: improvement_hits, improvement_stats, improvement_ties.
CREATE OR REPLACE VIEW improvement_headline AS
WITH improvement_hits AS (
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
hits AS (
    -- every caption twice: once in its run ('*') and once in its category
    SELECT improvement_id, '*' AS category, k, is_baseline_hit, is_improved_hit, is_baseline_hit_pessimistic,
        is_improved_hit_pessimistic
    FROM improvement_hits
    UNION ALL
    SELECT improvement_id, category, k, is_baseline_hit, is_improved_hit, is_baseline_hit_pessimistic,
        is_improved_hit_pessimistic
    FROM improvement_hits
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
    FROM hits
    GROUP BY improvement_id, category, k
),
headline AS (
    -- the figures of the count the run headlines (tie_count)
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
    LEFT JOIN improvement_stats s ON s.improvement_id = rc.improvement_id AND s.category = rc.category AND s.k = rc.k
),
final AS (
    SELECT
        rc.improvement_id,
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
        rc.category = '*' AS is_whole_run  -- sort key only
    FROM recall rc
    JOIN headline h ON h.improvement_id = rc.improvement_id AND h.category IS NOT DISTINCT FROM rc.category
        AND h.k = rc.k
    JOIN improvement_ties t ON t.improvement_id = rc.improvement_id
)
SELECT * EXCLUDE (is_whole_run) FROM final
ORDER BY improvement_id, is_whole_run DESC, category NULLS LAST, k
