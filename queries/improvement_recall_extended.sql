-- improvement_recall_extended: one row per (improvement run, source of extended positives, K in 1, 5, 10): the run's
-- baseline and improved Recall@K in % (2 decimals) with the source's verified positives counted as hits (a caption is
-- a hit at K if ANY of its positives, its COCO image or a pair of the source, ranks within K; view
-- improvement_hits_extended), the delta in pp (computed unrounded, then rounded), and the stored paired statistics of
-- that delta (improvement_stats_extended, toolkit.stats as for improvement_recall: bootstrap 95% interval in pp, exact
-- McNemar p, captions fixed and broken). A fix that only swaps one valid image for another shows no gain here.
-- source: 'eccv', 'cxc' or 'file:<name>', the newest positive set of each source of the run's subset
-- (positive_set_id). n: every caption of the run, as in improvement_recall (a caption the source does not cover
-- counts with its COCO image only); n_covered: those the source covers (queries of the source inside the subset).
-- coco_delta_pp / coco_tie_count: the run's plain delta and its count (improvement_headline, category '*'), beside.
-- Ties (no method gains from them): *_optimistic / *_pessimistic give both counts (improvement_hits_extended), and
-- the headline columns (baseline_pct, improved_pct, delta_pp, ci_low_pp, ci_high_pp, mcnemar_p, n_fixed, n_broken)
-- use the pessimistic one, baseline and improved alike, for a (run, source) that is_tie_affected: for some K the two
-- counts of the baseline or the improved hits differ by more than 0.01 pp (hits_optimistic - hits_pessimistic >
-- n / 10000, the rule of improvement_ties); tie_count names it. A (run, source) appears once its statistics are
-- stored (`clipfail improve` writes them; for a run made before the import, the same `clipfail improve` again).
-- Ordered by improvement run, source, K.
-- Reads: improvement_runs, positive_sets, improvement_hits_extended, improvement_stats_extended, improvement_headline.
CREATE OR REPLACE VIEW improvement_recall_extended AS
WITH improvement_runs AS (
    SELECT improvement_id, run_id, retrieval_run_id, categories, population, method FROM improvement_runs
),
positive_sets AS (
    SELECT positive_set_id, subset_id, source FROM positive_sets
),
improvement_hits_extended AS (
    SELECT
        improvement_id, positive_set_id, source, k, is_covered, is_baseline_hit, is_improved_hit,
        is_baseline_hit_pessimistic, is_improved_hit_pessimistic
    FROM improvement_hits_extended
),
improvement_stats_extended AS (
    SELECT
        improvement_id, positive_set_id, k, ci_low_pp, ci_high_pp, mcnemar_p, n_fixed, n_broken,
        ci_low_pp_pessimistic, ci_high_pp_pessimistic, mcnemar_p_pessimistic, n_fixed_pessimistic,
        n_broken_pessimistic
    FROM improvement_stats_extended
),
improvement_headline AS (
    SELECT improvement_id, category, k, delta_pp, tie_count FROM improvement_headline
),
newest_sets AS (
    SELECT subset_id, source, max(positive_set_id) AS positive_set_id
    FROM positive_sets
    GROUP BY ALL
),
recall AS (
    SELECT
        h.improvement_id,
        h.positive_set_id,
        h.source,
        h.k,
        count(*) AS n,
        count(*) FILTER (WHERE h.is_covered) AS n_covered,
        avg(CASE WHEN h.is_baseline_hit THEN 1.0 ELSE 0.0 END) AS baseline,
        avg(CASE WHEN h.is_improved_hit THEN 1.0 ELSE 0.0 END) AS improved,
        avg(CASE WHEN h.is_baseline_hit_pessimistic THEN 1.0 ELSE 0.0 END) AS baseline_pessimistic,
        avg(CASE WHEN h.is_improved_hit_pessimistic THEN 1.0 ELSE 0.0 END) AS improved_pessimistic,
        greatest(
            count(*) FILTER (WHERE h.is_baseline_hit) - count(*) FILTER (WHERE h.is_baseline_hit_pessimistic),
            count(*) FILTER (WHERE h.is_improved_hit) - count(*) FILTER (WHERE h.is_improved_hit_pessimistic)
        ) AS gap_hits
    FROM improvement_hits_extended h
    SEMI JOIN newest_sets s ON s.positive_set_id = h.positive_set_id
    GROUP BY ALL
),
ties AS (
    SELECT improvement_id, positive_set_id, bool_or(gap_hits * 10000 > n) AS is_tie_affected
    FROM recall
    GROUP BY ALL
),
headline AS (
    -- the figures of the count the (run, source) headlines
    SELECT
        rc.improvement_id,
        rc.positive_set_id,
        rc.k,
        t.is_tie_affected,
        CASE WHEN t.is_tie_affected THEN rc.baseline_pessimistic ELSE rc.baseline END AS baseline,
        CASE WHEN t.is_tie_affected THEN rc.improved_pessimistic ELSE rc.improved END AS improved,
        CASE WHEN t.is_tie_affected THEN s.ci_low_pp_pessimistic ELSE s.ci_low_pp END AS ci_low_pp,
        CASE WHEN t.is_tie_affected THEN s.ci_high_pp_pessimistic ELSE s.ci_high_pp END AS ci_high_pp,
        CASE WHEN t.is_tie_affected THEN s.mcnemar_p_pessimistic ELSE s.mcnemar_p END AS mcnemar_p,
        CASE WHEN t.is_tie_affected THEN s.n_fixed_pessimistic ELSE s.n_fixed END AS n_fixed,
        CASE WHEN t.is_tie_affected THEN s.n_broken_pessimistic ELSE s.n_broken END AS n_broken
    FROM recall rc
    JOIN ties t USING (improvement_id, positive_set_id)
    JOIN improvement_stats_extended s USING (improvement_id, positive_set_id, k)
),
final AS (
    SELECT
        u.improvement_id,
        u.run_id,
        u.retrieval_run_id,
        u.categories,
        u.population,
        coalesce(u.method, 'templates') AS method,
        rc.source,
        rc.positive_set_id,
        rc.k,
        rc.n,
        rc.n_covered,
        round(100 * h.baseline, 2) AS baseline_pct,
        round(100 * h.improved, 2) AS improved_pct,
        round(100 * (h.improved - h.baseline), 2) AS delta_pp,
        round(h.ci_low_pp, 2) AS ci_low_pp,
        round(h.ci_high_pp, 2) AS ci_high_pp,
        h.mcnemar_p,
        h.n_fixed,
        h.n_broken,
        CASE WHEN h.is_tie_affected THEN 'pessimistic' ELSE 'optimistic' END AS tie_count,
        h.is_tie_affected,
        p.delta_pp AS coco_delta_pp,
        p.tie_count AS coco_tie_count,
        round(100 * rc.baseline, 2) AS baseline_pct_optimistic,
        round(100 * rc.baseline_pessimistic, 2) AS baseline_pct_pessimistic,
        round(100 * rc.improved, 2) AS improved_pct_optimistic,
        round(100 * rc.improved_pessimistic, 2) AS improved_pct_pessimistic,
        round(100 * (rc.improved - rc.baseline), 2) AS delta_pp_optimistic,
        round(100 * (rc.improved_pessimistic - rc.baseline_pessimistic), 2) AS delta_pp_pessimistic
    FROM recall rc
    JOIN headline h USING (improvement_id, positive_set_id, k)
    JOIN improvement_runs u ON u.improvement_id = rc.improvement_id
    LEFT JOIN improvement_headline p ON p.improvement_id = rc.improvement_id AND p.category = '*' AND p.k = rc.k
)
SELECT * FROM final
ORDER BY improvement_id, source, k
