-- triage_distribution: the taxonomy estimated by triage over ALL R@1 failures of a retrieval run,
-- with the human distribution of the labelled sample (taxonomy_distribution) beside it.
--
-- Newest triage run of each retrieval run. One row per taxonomy category plus '(none)' (failures
-- no rule had evidence for). n_triage: failures with that suggestion; percent_of_failures =
-- 100 * n_triage / n_failures; percent_of_suggested = 100 * n_triage / n_suggested (NULL for
-- '(none)'), both rounded half up to 2 decimals in exact integer arithmetic, as
-- taxonomy_percentages rounds (so they may sum to 99.99 or 100.01). n_human / percent_human: the labelled sample's count and
-- percent from taxonomy_distribution (overlap set excluded; NULL when nothing is labelled yet).
-- Reads: triage_runs, triage_suggestions, categories, taxonomy_distribution.
CREATE OR REPLACE VIEW triage_distribution AS
WITH triage_runs AS (
    SELECT retrieval_run_id, triage_run_id FROM triage_runs
),
triage_suggestions AS (
    SELECT retrieval_run_id, triage_run_id, suggested_category FROM triage_suggestions
),
categories AS (
    SELECT name AS category, position FROM categories
),
taxonomy_distribution AS (
    SELECT retrieval_run_id, category, "count", percent, n_total FROM taxonomy_distribution
),
latest AS (
    SELECT retrieval_run_id, max(triage_run_id) AS triage_run_id FROM triage_runs GROUP BY retrieval_run_id
),
suggestions AS (
    SELECT t.retrieval_run_id, t.triage_run_id, t.suggested_category
    FROM triage_suggestions t
    JOIN latest l USING (retrieval_run_id, triage_run_id)
),
totals AS (
    SELECT retrieval_run_id, triage_run_id, count(*) AS n_failures, count(suggested_category) AS n_suggested
    FROM suggestions
    GROUP BY ALL
),
estimated AS (
    SELECT retrieval_run_id, coalesce(suggested_category, '(none)') AS category, count(*) AS n
    FROM suggestions
    GROUP BY ALL
),
category_order AS (
    -- every taxonomy category, then '(none)' (no position: sorts last)
    SELECT category, position FROM categories
    UNION ALL
    SELECT '(none)', NULL
),
human AS (
    SELECT retrieval_run_id, category, "count" AS n_human, percent AS percent_human, n_total
    FROM taxonomy_distribution
),
final AS (
    SELECT
        t.retrieval_run_id,
        t.triage_run_id,
        c.category,
        coalesce(e.n, 0) AS n_triage,
        (((20000 * coalesce(e.n, 0) + t.n_failures) // (2 * t.n_failures))::DECIMAL(18, 0) / 100)::DECIMAL(5, 2)
            AS percent_of_failures,
        CASE WHEN c.category <> '(none)' AND t.n_suggested > 0
            THEN (((20000 * coalesce(e.n, 0) + t.n_suggested) // (2 * t.n_suggested))::DECIMAL(18, 0) / 100)
                ::DECIMAL(5, 2)
        END AS percent_of_suggested,
        h.n_human,
        h.percent_human,
        t.n_failures,
        t.n_suggested,
        h.n_total AS n_human_total,
        c.position AS category_position  -- sort key only
    FROM totals t
    CROSS JOIN category_order c
    LEFT JOIN estimated e ON e.retrieval_run_id = t.retrieval_run_id AND e.category = c.category
    LEFT JOIN human h ON h.retrieval_run_id = t.retrieval_run_id AND h.category = c.category
)
SELECT * EXCLUDE (category_position) FROM final
ORDER BY retrieval_run_id, category_position NULLS LAST, category
