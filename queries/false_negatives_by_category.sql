-- false_negatives_by_category: one row per (retrieval run, human category) of the labelled R@1 failures
-- (sample_labels): how many of them are verified false negatives, i.e. their top-1 image is an extended positive
-- of the caption (failure_false_negatives). n_labelled: labelled failures of the category; n_checkable: those whose
-- caption some imported source covers (the others cannot be checked); n_verified: those whose top-1 is verified;
-- share_verified: n_verified / n_checkable (a fraction, NULL when nothing is checkable); share_of_verified: the
-- category's part of the run's verified false negatives, i.e. what humans called them (a fraction, NULL when the
-- run has none). Only runs with some imported positives for their subset appear (a failure's coverage is known).
-- Ordered by run, then the taxonomy order (categories.position, then name).
-- Reads: sample_labels, failure_false_negatives, categories, retrieval_runs, positive_sets.
CREATE OR REPLACE VIEW false_negatives_by_category AS
WITH sample_labels AS (
    SELECT retrieval_run_id, caption_id, category FROM sample_labels
),
failure_false_negatives AS (
    SELECT retrieval_run_id, query_id, is_top1_extended_positive, covering_sources FROM failure_false_negatives
),
categories AS (
    SELECT name AS category, position FROM categories
),
retrieval_runs AS (
    SELECT retrieval_run_id, subset_id FROM retrieval_runs
),
positive_sets AS (
    SELECT DISTINCT subset_id FROM positive_sets
),
labelled AS (
    SELECT
        l.retrieval_run_id,
        l.category,
        f.covering_sources IS NOT NULL AS is_checkable,
        coalesce(f.is_top1_extended_positive, FALSE) AS is_verified
    FROM sample_labels l
    JOIN retrieval_runs r USING (retrieval_run_id)
    SEMI JOIN positive_sets p ON p.subset_id = r.subset_id
    LEFT JOIN failure_false_negatives f ON f.retrieval_run_id = l.retrieval_run_id AND f.query_id = l.caption_id
),
per_category AS (
    SELECT
        retrieval_run_id,
        category,
        count(*) AS n_labelled,
        count(*) FILTER (WHERE is_checkable) AS n_checkable,
        count(*) FILTER (WHERE is_verified) AS n_verified
    FROM labelled
    GROUP BY ALL
),
final AS (
    SELECT
        p.retrieval_run_id,
        p.category,
        p.n_labelled,
        p.n_checkable,
        p.n_verified,
        p.n_verified / nullif(p.n_checkable, 0)::DOUBLE AS share_verified,
        p.n_verified / nullif(sum(p.n_verified) OVER (PARTITION BY p.retrieval_run_id), 0)::DOUBLE
            AS share_of_verified,
        c.position  -- sort key only
    FROM per_category p
    LEFT JOIN categories c USING (category)
)
SELECT * EXCLUDE (position) FROM final
ORDER BY retrieval_run_id, position NULLS LAST, category
