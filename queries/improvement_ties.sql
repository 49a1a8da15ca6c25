-- improvement_ties: one row per improvement run: how ties with the ground-truth image affect its
-- Recall@K, and which count its headline figures use. A method must not gain from ties (a transform
-- that gives every image the same score would otherwise rank every ground truth first).
-- n_baseline_tied / n_improved_tied: captions whose GT image has exactly the same score as at least
-- one other image (baseline_n_tied / improved_n_tied > 0). max_gap_pp: the largest difference, in pp,
-- between the optimistic (rank <= K) and the pessimistic (rank + n_tied <= K) Recall@K, over K in 1, 5,
-- 10, baseline and improved, the whole run and each category of its captions (NULL-labelled control
-- captions as one group). is_tie_affected: that difference is more than 0.01 pp (one step of the
-- 2-decimal rounding of the views; computed exactly, as hits_optimistic - hits_pessimistic > n / 10000)
-- in at least one of them. tie_count names the count of the headline columns of improvement_recall,
-- category_recall_delta and method_comparison: 'pessimistic' for a tie-affected run (baseline and
-- improved alike), else 'optimistic' (the two then differ by at most 0.01 pp), or 'optimistic (ties
-- unknown)' for a run made before ties were recorded (is_tie_recorded false; the tie columns NULL).
-- Reads: improvement_runs, improvement_hits.
CREATE OR REPLACE VIEW improvement_ties AS
WITH improvement_runs AS (
    SELECT improvement_id, run_id, retrieval_run_id, categories, population, method FROM improvement_runs
),
improvement_hits AS (
    SELECT
        improvement_id, category, k, is_baseline_hit, is_improved_hit, is_baseline_hit_pessimistic,
        is_improved_hit_pessimistic, baseline_n_tied, improved_n_tied
    FROM improvement_hits
),
tie_counts AS (
    SELECT
        improvement_id,
        count(*) AS n_captions,
        count(*) = count(baseline_n_tied) AND count(*) = count(improved_n_tied) AS is_tie_recorded,
        count(*) FILTER (WHERE baseline_n_tied > 0) AS n_baseline_tied,
        count(*) FILTER (WHERE improved_n_tied > 0) AS n_improved_tied
    FROM improvement_hits
    WHERE k = 1
    GROUP BY improvement_id
),
groups AS (
    -- hits per K of the whole run and of each category (both grouping sets; only the gaps are kept)
    SELECT
        improvement_id,
        k,
        count(*) AS n,
        greatest(
            count(*) FILTER (WHERE is_baseline_hit) - count(*) FILTER (WHERE is_baseline_hit_pessimistic),
            count(*) FILTER (WHERE is_improved_hit) - count(*) FILTER (WHERE is_improved_hit_pessimistic)
        ) AS gap_hits
    FROM improvement_hits
    GROUP BY GROUPING SETS ((improvement_id, k), (improvement_id, k, category))
),
gaps AS (
    SELECT
        improvement_id,
        max(100.0 * gap_hits / n) AS max_gap_pp,
        bool_or(gap_hits * 10000 > n) AS is_tie_affected
    FROM groups
    GROUP BY improvement_id
),
final AS (
    SELECT
        u.improvement_id,
        u.run_id,
        u.retrieval_run_id,
        u.categories,
        u.population,
        coalesce(u.method, 'templates') AS method,
        c.n_captions,
        c.is_tie_recorded,
        CASE WHEN c.is_tie_recorded THEN c.n_baseline_tied END AS n_baseline_tied,
        CASE WHEN c.is_tie_recorded THEN c.n_improved_tied END AS n_improved_tied,
        CASE WHEN c.is_tie_recorded THEN round(g.max_gap_pp, 2) END AS max_gap_pp,
        CASE WHEN c.is_tie_recorded THEN g.is_tie_affected END AS is_tie_affected,
        CASE
            WHEN NOT c.is_tie_recorded THEN 'optimistic (ties unknown)'
            WHEN g.is_tie_affected THEN 'pessimistic'
            ELSE 'optimistic'
        END AS tie_count
    FROM improvement_runs u
    JOIN tie_counts c ON c.improvement_id = u.improvement_id
    JOIN gaps g ON g.improvement_id = u.improvement_id
)
SELECT * FROM final
ORDER BY improvement_id
