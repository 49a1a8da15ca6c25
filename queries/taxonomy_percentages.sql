-- taxonomy_percentages: the counts and percentages behind taxonomy_distribution,
-- taxonomy_actionable and taxonomy_by_annotator, in one place so that all three round alike.
--
-- One table per (retrieval_run_id, scope, annotator):
--   scope 'overall'      every labelled sample outside the overlap set (from sample_labels),
--                        merged over annotators; annotator is NULL.
--   scope 'actionable'   the same samples without the non-actionable categories
--                        (categories.is_actionable = false: Ambiguous), re-normalised.
--   scope 'by_annotator' each annotator's own set (overlap excluded), one table per annotator.
-- Every category of the taxonomy (for the scope) gets a row, with count 0 if unused.
-- Tables are grouped by retrieval run: filter on retrieval_run_id when a database holds several.
--
-- Two percentages, both with exactly 2 decimals and computed in exact integer arithmetic:
--   percent     round half up of 100 * count / n_total. This is the reference study's table
--               (67/62/25/24/16/15/1 give 31.90, 29.52, 11.90, 11.43, 7.62, 7.14, 0.48); such
--               rounded values may sum to 99.99 or 100.01 (that table sums to 99.99).
--   percent_lr  largest-remainder (Hamilton) rounding, which always sums to exactly 100.00:
--               every category gets floor(10000 * count / n_total) hundredths of a percent, and
--               the hundredths still missing go, one each, to the categories with the largest
--               remainders (10000 * count mod n_total); ties by larger count, then taxonomy order.
-- rank orders each table by count descending, ties in taxonomy order.
-- Reads: sample_labels, categories.
CREATE OR REPLACE VIEW taxonomy_percentages AS
WITH sample_labels AS (
    SELECT retrieval_run_id, sample_id, category, annotators, is_simulated, is_overlap FROM sample_labels
),
categories AS (
    SELECT name AS category, position, is_actionable FROM categories
),
labelled AS (
    SELECT retrieval_run_id, sample_id, category, annotators, is_simulated
    FROM sample_labels
    WHERE NOT is_overlap
),
tables AS (
    -- every (run, scope, annotator) that has at least one label in scope
    SELECT retrieval_run_id, 'overall' AS scope, NULL::VARCHAR AS annotator, bool_or(is_simulated) AS is_simulated
    FROM labelled GROUP BY retrieval_run_id
    UNION ALL
    SELECT l.retrieval_run_id, 'actionable', NULL, bool_or(l.is_simulated)
    FROM labelled l JOIN categories c USING (category)
    WHERE c.is_actionable
    GROUP BY l.retrieval_run_id
    UNION ALL
    SELECT retrieval_run_id, 'by_annotator', annotators, bool_or(is_simulated)
    FROM labelled GROUP BY retrieval_run_id, annotators
),
table_rows AS (
    SELECT t.retrieval_run_id, t.scope, t.annotator, t.is_simulated, c.category, c.position, c.is_actionable
    FROM tables t
    CROSS JOIN categories c
    WHERE t.scope <> 'actionable' OR c.is_actionable
),
counts AS (
    SELECT
        r.retrieval_run_id, r.scope, r.annotator, r.is_simulated, r.category, r.position, r.is_actionable,
        count(l.sample_id) AS count
    FROM table_rows r
    LEFT JOIN labelled l
        ON l.retrieval_run_id = r.retrieval_run_id
        AND l.category = r.category
        AND (r.scope <> 'by_annotator' OR l.annotators = r.annotator)
    GROUP BY ALL
),
totals AS (
    SELECT *, sum(count) OVER (PARTITION BY retrieval_run_id, scope, annotator)::BIGINT AS n_total
    FROM counts
),
hundredths AS (
    SELECT
        *,
        (20000 * count + n_total) // (2 * n_total) AS half_up,  -- round(10000 * count / n_total), halves up
        (10000 * count) // n_total AS floor_part,
        (10000 * count) % n_total AS remainder
    FROM totals
),
largest_remainder AS (
    SELECT
        *,
        10000 - sum(floor_part) OVER (PARTITION BY retrieval_run_id, scope, annotator) AS n_missing,
        row_number() OVER (
            PARTITION BY retrieval_run_id, scope, annotator ORDER BY remainder DESC, count DESC, position, category
        ) AS remainder_rank
    FROM hundredths
),
final AS (
    SELECT
        retrieval_run_id,
        scope,
        annotator,
        row_number() OVER (PARTITION BY retrieval_run_id, scope, annotator ORDER BY count DESC, position, category)
            AS rank,
        category,
        is_actionable,
        count,
        n_total,
        (half_up::DECIMAL(18, 0) / 100)::DECIMAL(5, 2) AS percent,
        ((floor_part + CASE WHEN remainder_rank <= n_missing THEN 1 ELSE 0 END)::DECIMAL(18, 0) / 100)::DECIMAL(5, 2)
            AS percent_lr,
        is_simulated
    FROM largest_remainder
)
SELECT * FROM final
ORDER BY retrieval_run_id, scope, annotator NULLS FIRST, rank
