-- blame_agreement: how far the model's own blame (failure_blame's blamed_category, the role -> category mapping of
-- toolkit/data/blame_roles.csv) agrees with people's labels and with triage's suggestion.
--
-- Uses the newest explain run of each retrieval run (explain_runs.explain_run_id). One row per (retrieval run,
-- reference), where reference is
--   each annotator     (reference_kind 'annotator'): the labels that count for that annotator, as in
--                      sample_labels: their own set and the overlap set;
--   'overlap majority' (reference_kind 'majority'): the majority label of each overlap sample (sample_labels);
--   'all labels'       (reference_kind 'all'): every labelled sample's label from sample_labels;
--   'triage'           (reference_kind 'triage'): the newest triage run's suggested_category, for the explained
--                      failures that have a suggestion;
--   'no labels'        (reference_kind 'none'): a single row when the explained failures have no label and no
--                      triage suggestion at all, with n_labelled = 0 and every measure NULL (never NaN).
-- n_labelled: explained failures with a reference category; n: those with a blamed category (blame 'none' or
-- 'no phrase' is not a category here); coverage = n / n_labelled; n_agree: blamed category = reference;
-- accuracy = n_agree / n. Cohen's kappa over the n blamed failures: p_o = accuracy, p_e = sum over categories of
-- (share of blames in it) * (share of references in it), kappa = (p_o - p_e) / (1 - p_e); NULL when n = 0 or
-- p_e = 1 (the same definition as triage_agreement).
-- Reads: explain_runs, failure_blame, annotations, failure_samples, sample_labels, triage_runs, triage_suggestions.
CREATE OR REPLACE VIEW blame_agreement AS
WITH explain_runs AS (
    SELECT explain_run_id, retrieval_run_id FROM explain_runs
),
failure_blame AS (
    SELECT explain_run_id, retrieval_run_id, caption_id, blamed_category FROM failure_blame
),
annotations AS (
    SELECT sample_id, annotator, category FROM annotations
),
failure_samples AS (
    SELECT sample_id, retrieval_run_id, caption_id, set_name FROM failure_samples
),
sample_labels AS (
    SELECT retrieval_run_id, sample_id, caption_id, category, is_overlap FROM sample_labels
),
triage_runs AS (
    SELECT retrieval_run_id, triage_run_id FROM triage_runs
),
triage_suggestions AS (
    SELECT retrieval_run_id, triage_run_id, caption_id, suggested_category FROM triage_suggestions
),
latest AS (
    SELECT retrieval_run_id, max(explain_run_id) AS explain_run_id FROM explain_runs GROUP BY retrieval_run_id
),
blames AS (
    SELECT b.retrieval_run_id, b.explain_run_id, b.caption_id, b.blamed_category
    FROM failure_blame b
    JOIN latest USING (retrieval_run_id, explain_run_id)
),
latest_triage AS (
    SELECT retrieval_run_id, max(triage_run_id) AS triage_run_id FROM triage_runs GROUP BY retrieval_run_id
),
annotator_labels AS (
    SELECT s.retrieval_run_id, s.caption_id, 'annotator' AS reference_kind, a.annotator AS reference, a.category
    FROM annotations a
    JOIN failure_samples s ON s.sample_id = a.sample_id
    WHERE s.set_name = 'overlap' OR a.annotator = s.set_name
),
majority_labels AS (
    SELECT retrieval_run_id, caption_id, 'majority' AS reference_kind, 'overlap majority' AS reference, category
    FROM sample_labels
    WHERE is_overlap
),
all_labels AS (
    SELECT retrieval_run_id, caption_id, 'all' AS reference_kind, 'all labels' AS reference, category
    FROM sample_labels
),
triage_labels AS (
    SELECT t.retrieval_run_id, t.caption_id, 'triage' AS reference_kind, 'triage' AS reference,
           t.suggested_category AS category
    FROM triage_suggestions t
    JOIN latest_triage l USING (retrieval_run_id, triage_run_id)
    WHERE t.suggested_category IS NOT NULL
),
refs AS (
    SELECT * FROM annotator_labels
    UNION ALL
    SELECT * FROM majority_labels
    UNION ALL
    SELECT * FROM all_labels
    UNION ALL
    SELECT * FROM triage_labels
),
pairs AS (
    SELECT b.retrieval_run_id, b.explain_run_id, r.reference_kind, r.reference, b.caption_id,
           r.category AS human, b.blamed_category AS blamed
    FROM blames b
    JOIN refs r ON r.retrieval_run_id = b.retrieval_run_id AND r.caption_id = b.caption_id
),
observed AS (
    SELECT retrieval_run_id, explain_run_id, reference_kind, reference,
           count(*) AS n_labelled,
           count(blamed) AS n,
           count(*) FILTER (WHERE blamed = human) AS n_agree
    FROM pairs
    GROUP BY ALL
),
unreferenced AS (
    SELECT l.retrieval_run_id, l.explain_run_id, 'none' AS reference_kind, 'no labels' AS reference,
           0 AS n_labelled, 0 AS n, 0 AS n_agree
    FROM latest l
    ANTI JOIN observed o ON o.retrieval_run_id = l.retrieval_run_id AND o.explain_run_id = l.explain_run_id
),
marginals AS (
    SELECT retrieval_run_id, explain_run_id, reference_kind, reference, category,
           sum(from_b) AS n_b, sum(from_h) AS n_h
    FROM (
        SELECT retrieval_run_id, explain_run_id, reference_kind, reference, blamed AS category, 1 AS from_b,
               0 AS from_h
        FROM pairs WHERE blamed IS NOT NULL
        UNION ALL
        SELECT retrieval_run_id, explain_run_id, reference_kind, reference, human, 0, 1
        FROM pairs WHERE blamed IS NOT NULL
    )
    GROUP BY ALL
),
expected AS (
    SELECT retrieval_run_id, explain_run_id, reference_kind, reference, sum(n_b * n_h) AS sum_products
    FROM marginals
    GROUP BY ALL
),
measures AS (
    SELECT o.*,
           CASE WHEN o.n > 0 THEN o.n_agree / o.n END AS p_o,
           CASE WHEN o.n > 0 THEN e.sum_products / (o.n * o.n) END AS p_e
    FROM (SELECT * FROM observed UNION ALL SELECT * FROM unreferenced) o
    LEFT JOIN expected e USING (retrieval_run_id, explain_run_id, reference_kind, reference)
),
final AS (
    SELECT
        retrieval_run_id,
        explain_run_id,
        reference_kind,
        reference,
        n_labelled,
        n,
        n_agree,
        CASE WHEN n_labelled > 0 THEN n / n_labelled END AS coverage,
        p_o AS accuracy,
        p_e AS expected_agreement,
        CASE WHEN n > 0 AND p_e < 1 THEN (p_o - p_e) / (1 - p_e) END AS kappa,
        CASE reference_kind WHEN 'annotator' THEN 0 WHEN 'majority' THEN 1 WHEN 'all' THEN 2 WHEN 'triage' THEN 3
            ELSE 4 END AS kind_order
    FROM measures
)
SELECT * EXCLUDE (kind_order) FROM final
ORDER BY retrieval_run_id, explain_run_id, kind_order, reference
