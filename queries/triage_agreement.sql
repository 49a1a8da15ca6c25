-- triage_agreement: how far the triage suggestions agree with the human labels.
--
-- Uses the newest triage run of each retrieval run (triage_runs.triage_run_id). One row per
-- (retrieval run, reference), where reference is
--   each annotator    (reference_kind 'annotator'): the labels that count for that annotator,
--                     as in sample_labels: their own set and the overlap set;
--   'overlap majority' (reference_kind 'majority'): the majority label of each overlap sample
--                     (sample_labels, with its tie rule);
--   'all labels'      (reference_kind 'all'): every labelled sample's label from sample_labels.
-- n_labelled: labelled samples; n: those with a suggestion (no suggestion is not a category here);
-- coverage = n / n_labelled; n_agree: suggestion = label; accuracy = n_agree / n;
-- accuracy_labelled = n_agree / n_labelled (no suggestion counts as wrong).
-- Cohen's kappa over the n suggested samples: p_o = accuracy, p_e = sum over categories of
-- (share of suggestions in it) * (share of labels in it), kappa = (p_o - p_e) / (1 - p_e);
-- NULL when n = 0 or p_e = 1. Checked against a plain Python reference in tests/test_triage.py.
-- Reads: triage_runs, triage_suggestions, annotations, failure_samples, sample_labels.
CREATE OR REPLACE VIEW triage_agreement AS
WITH triage_runs AS (
    SELECT retrieval_run_id, triage_run_id FROM triage_runs
),
triage_suggestions AS (
    SELECT retrieval_run_id, triage_run_id, caption_id, suggested_category FROM triage_suggestions
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
latest AS (
    SELECT retrieval_run_id, max(triage_run_id) AS triage_run_id FROM triage_runs GROUP BY retrieval_run_id
),
suggestions AS (
    SELECT t.retrieval_run_id, t.triage_run_id, t.caption_id, t.suggested_category
    FROM triage_suggestions t
    JOIN latest l USING (retrieval_run_id, triage_run_id)
),
annotator_labels AS (
    SELECT s.retrieval_run_id, s.sample_id, s.caption_id, 'annotator' AS reference_kind,
           a.annotator AS reference, a.category
    FROM annotations a
    JOIN failure_samples s ON s.sample_id = a.sample_id
    WHERE s.set_name = 'overlap' OR a.annotator = s.set_name
),
majority_labels AS (
    SELECT retrieval_run_id, sample_id, caption_id, 'majority' AS reference_kind,
           'overlap majority' AS reference, category
    FROM sample_labels
    WHERE is_overlap
),
all_labels AS (
    SELECT retrieval_run_id, sample_id, caption_id, 'all' AS reference_kind, 'all labels' AS reference, category
    FROM sample_labels
),
refs AS (
    SELECT * FROM annotator_labels
    UNION ALL
    SELECT * FROM majority_labels
    UNION ALL
    SELECT * FROM all_labels
),
pairs AS (
    SELECT r.retrieval_run_id, g.triage_run_id, r.reference_kind, r.reference, r.sample_id,
           r.category AS human, g.suggested_category AS suggested
    FROM refs r
    JOIN suggestions g ON g.retrieval_run_id = r.retrieval_run_id AND g.caption_id = r.caption_id
),
observed AS (
    SELECT retrieval_run_id, triage_run_id, reference_kind, reference,
           count(*) AS n_labelled,
           count(suggested) AS n,
           count(*) FILTER (WHERE suggested = human) AS n_agree
    FROM pairs
    GROUP BY ALL
),
marginals AS (
    SELECT retrieval_run_id, triage_run_id, reference_kind, reference, category,
           sum(from_s) AS n_s, sum(from_h) AS n_h
    FROM (
        SELECT retrieval_run_id, triage_run_id, reference_kind, reference, suggested AS category, 1 AS from_s,
               0 AS from_h
        FROM pairs WHERE suggested IS NOT NULL
        UNION ALL
        SELECT retrieval_run_id, triage_run_id, reference_kind, reference, human, 0, 1
        FROM pairs WHERE suggested IS NOT NULL
    )
    GROUP BY ALL
),
expected AS (
    SELECT retrieval_run_id, triage_run_id, reference_kind, reference, sum(n_s * n_h) AS sum_products
    FROM marginals
    GROUP BY ALL
),
measures AS (
    SELECT o.*,
           CASE WHEN o.n > 0 THEN o.n_agree / o.n END AS p_o,
           CASE WHEN o.n > 0 THEN e.sum_products / (o.n * o.n) END AS p_e
    FROM observed o
    LEFT JOIN expected e USING (retrieval_run_id, triage_run_id, reference_kind, reference)
),
final AS (
    SELECT
        retrieval_run_id,
        triage_run_id,
        reference_kind,
        reference,
        n_labelled,
        n,
        n_agree,
        n / n_labelled AS coverage,
        p_o AS accuracy,
        n_agree / n_labelled AS accuracy_labelled,
        p_e AS expected_agreement,
        CASE WHEN n > 0 AND p_e < 1 THEN (p_o - p_e) / (1 - p_e) END AS kappa
    FROM measures
)
SELECT * FROM final
ORDER BY retrieval_run_id, CASE reference_kind WHEN 'annotator' THEN 0 WHEN 'majority' THEN 1 ELSE 2 END, reference
