-- annotator_agreement: how far annotators agree on the overlap set (primary categories only).
--
-- measure 'cohen': one row per pair of annotators, over the overlap samples both labelled.
--   n_items, n_agree (same category), percent_agreement = 100 * n_agree / n_items,
--   expected_agreement p_e = sum over categories of (share of annotator_a's labels) *
--   (share of annotator_b's labels), and Cohen's kappa = (p_o - p_e) / (1 - p_e).
-- measure 'fleiss': one row per retrieval run, over the overlap samples labelled by every
--   annotator who labelled any overlap sample (listed in annotators; n_annotators of them).
--   With N items, n raters and n_ij raters putting item i in category j:
--   P_i = sum_j n_ij (n_ij - 1) / (n (n - 1)), P_bar = mean P_i (percent_agreement = 100 P_bar),
--   p_j = sum_i n_ij / (N n), P_e = sum_j p_j^2 (expected_agreement), kappa = (P_bar - P_e) / (1 - P_e).
--   n_agree counts the unanimous items.
-- kappa is NULL where it is undefined: no items, or p_e = 1 (every label the same category).
-- Grouped by retrieval run. Checked against toolkit.stats and textbook examples in tests.
CREATE OR REPLACE VIEW annotator_agreement AS
WITH overlap_labels AS (
    SELECT s.retrieval_run_id, a.sample_id, a.annotator, a.category
    FROM annotations a
    JOIN failure_samples s ON s.sample_id = a.sample_id
    WHERE s.set_name = 'overlap'
),
pairs AS (
    SELECT
        x.retrieval_run_id, x.annotator AS annotator_a, y.annotator AS annotator_b, x.sample_id,
        x.category AS category_a, y.category AS category_b
    FROM overlap_labels x
    JOIN overlap_labels y
        ON y.retrieval_run_id = x.retrieval_run_id AND y.sample_id = x.sample_id AND x.annotator < y.annotator
),
pair_observed AS (
    SELECT
        retrieval_run_id, annotator_a, annotator_b,
        count(*) AS n_items,
        count(*) FILTER (WHERE category_a = category_b) AS n_agree
    FROM pairs
    GROUP BY ALL
),
pair_marginals AS (
    SELECT retrieval_run_id, annotator_a, annotator_b, category, sum(from_a) AS n_a, sum(from_b) AS n_b
    FROM (
        SELECT retrieval_run_id, annotator_a, annotator_b, category_a AS category, 1 AS from_a, 0 AS from_b FROM pairs
        UNION ALL
        SELECT retrieval_run_id, annotator_a, annotator_b, category_b, 0, 1 FROM pairs
    )
    GROUP BY ALL
),
pair_expected AS (
    SELECT retrieval_run_id, annotator_a, annotator_b, sum(n_a * n_b) AS sum_products
    FROM pair_marginals
    GROUP BY ALL
),
cohen AS (
    SELECT
        o.retrieval_run_id,
        'cohen' AS measure,
        o.annotator_a || ',' || o.annotator_b AS annotators,
        o.annotator_a,
        o.annotator_b,
        2 AS n_annotators,
        o.n_items,
        o.n_agree,
        o.n_agree / o.n_items AS p_o,
        e.sum_products / (o.n_items * o.n_items) AS p_e,
        e.sum_products = o.n_items * o.n_items AS is_degenerate
    FROM pair_observed o
    JOIN pair_expected e USING (retrieval_run_id, annotator_a, annotator_b)
),
raters AS (
    SELECT
        retrieval_run_id,
        count(DISTINCT annotator) AS n_raters,
        string_agg(DISTINCT annotator, ',' ORDER BY annotator) AS annotators
    FROM overlap_labels
    GROUP BY retrieval_run_id
),
complete_items AS (
    SELECT l.retrieval_run_id, l.sample_id
    FROM overlap_labels l
    JOIN raters r USING (retrieval_run_id)
    GROUP BY l.retrieval_run_id, l.sample_id, r.n_raters
    HAVING count(*) = r.n_raters
),
item_counts AS (
    SELECT l.retrieval_run_id, l.sample_id, l.category, count(*) AS n_ij
    FROM overlap_labels l
    JOIN complete_items USING (retrieval_run_id, sample_id)
    GROUP BY ALL
),
items AS (
    SELECT
        retrieval_run_id, sample_id,
        sum(n_ij * (n_ij - 1)) AS agreeing_pairs,
        count(*) = 1 AS is_unanimous
    FROM item_counts
    GROUP BY ALL
),
category_totals AS (
    SELECT retrieval_run_id, category, sum(n_ij) AS n_j
    FROM item_counts
    GROUP BY ALL
),
fleiss_parts AS (
    SELECT
        r.retrieval_run_id, r.n_raters, r.annotators,
        (SELECT count(*) FROM items i WHERE i.retrieval_run_id = r.retrieval_run_id) AS n_items,
        (SELECT count(*) FILTER (WHERE is_unanimous) FROM items i WHERE i.retrieval_run_id = r.retrieval_run_id)
            AS n_agree,
        (SELECT sum(agreeing_pairs) FROM items i WHERE i.retrieval_run_id = r.retrieval_run_id) AS agreeing_pairs,
        (SELECT sum(n_j * n_j) FROM category_totals t WHERE t.retrieval_run_id = r.retrieval_run_id)
            AS sum_squares
    FROM raters r
    WHERE r.n_raters >= 2
),
fleiss AS (
    SELECT
        retrieval_run_id,
        'fleiss' AS measure,
        annotators,
        NULL::VARCHAR AS annotator_a,
        NULL::VARCHAR AS annotator_b,
        n_raters AS n_annotators,
        n_items,
        n_agree,
        CASE WHEN n_items > 0 THEN agreeing_pairs / (n_items * n_raters * (n_raters - 1)) END AS p_o,
        CASE WHEN n_items > 0 THEN sum_squares / ((n_items * n_raters) * (n_items * n_raters)) END AS p_e,
        n_items = 0 OR sum_squares = (n_items * n_raters) * (n_items * n_raters) AS is_degenerate
    FROM fleiss_parts
),
measures AS (
    SELECT * FROM cohen
    UNION ALL
    SELECT * FROM fleiss
)
SELECT
    retrieval_run_id,
    measure,
    annotators,
    annotator_a,
    annotator_b,
    n_annotators,
    n_items,
    n_agree,
    round(100 * p_o, 2) AS percent_agreement,
    p_o AS observed_agreement,
    p_e AS expected_agreement,
    CASE WHEN NOT is_degenerate THEN (p_o - p_e) / (1 - p_e) END AS kappa
FROM measures
ORDER BY retrieval_run_id, measure, annotator_a, annotator_b
