-- false_negatives_triage_agreement: how far the triage suggestions agree with the human labels on the verified
-- false negatives only: the labelled R@1 failures whose top-1 image is a verified positive of the caption
-- (failure_false_negatives.is_top1_extended_positive). One row per (retrieval run, reference), with the references,
-- the newest triage run of each retrieval run and the measures of triage_agreement: n_labelled (verified false
-- negatives labelled), n (those with a suggestion), n_agree, coverage = n / n_labelled, accuracy = n_agree / n,
-- accuracy_labelled = n_agree / n_labelled, expected_agreement and Cohen's kappa over the n suggested (NULL when n = 0
-- or the expected agreement is 1, e.g. when every label and suggestion is one category). Besides:
-- n_human_ambiguous: labelled Ambiguous by the reference (what the taxonomy expects of a miss that is no miss);
-- n_suggested_ambiguous: suggested Ambiguous; n_by_verified_rule: suggestions that the Verified rule made (a triage
-- run made after the import; the heuristic rules made the others). A run with no verified false negative among
-- its labelled failures has no row.
-- Ordered by run, then annotators (by name), the overlap majority, all labels.
-- Reads: triage_runs, triage_suggestions, annotations, failure_samples, sample_labels, failure_false_negatives.
CREATE OR REPLACE VIEW false_negatives_triage_agreement AS
WITH triage_runs AS (
    SELECT retrieval_run_id, triage_run_id FROM triage_runs
),
triage_suggestions AS (
    SELECT retrieval_run_id, triage_run_id, caption_id, suggested_category, rules_fired FROM triage_suggestions
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
failure_false_negatives AS (
    SELECT retrieval_run_id, query_id, is_top1_extended_positive FROM failure_false_negatives
),
verified AS (
    SELECT retrieval_run_id, query_id AS caption_id
    FROM failure_false_negatives
    WHERE is_top1_extended_positive
),
latest AS (
    SELECT retrieval_run_id, max(triage_run_id) AS triage_run_id FROM triage_runs GROUP BY retrieval_run_id
),
suggestions AS (
    SELECT
        t.retrieval_run_id,
        t.triage_run_id,
        t.caption_id,
        t.suggested_category,
        t.rules_fired LIKE 'Verified%' AS is_by_verified_rule
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
           r.category AS human, g.suggested_category AS suggested, g.is_by_verified_rule
    FROM refs r
    SEMI JOIN verified v ON v.retrieval_run_id = r.retrieval_run_id AND v.caption_id = r.caption_id
    JOIN suggestions g ON g.retrieval_run_id = r.retrieval_run_id AND g.caption_id = r.caption_id
),
observed AS (
    SELECT retrieval_run_id, triage_run_id, reference_kind, reference,
           count(*) AS n_labelled,
           count(suggested) AS n,
           count(*) FILTER (WHERE suggested = human) AS n_agree,
           count(*) FILTER (WHERE human = 'Ambiguous') AS n_human_ambiguous,
           count(*) FILTER (WHERE suggested = 'Ambiguous') AS n_suggested_ambiguous,
           count(*) FILTER (WHERE suggested IS NOT NULL AND is_by_verified_rule) AS n_by_verified_rule
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
        CASE WHEN n > 0 AND p_e < 1 THEN (p_o - p_e) / (1 - p_e) END AS kappa,
        n_human_ambiguous,
        n_suggested_ambiguous,
        n_by_verified_rule,
        CASE reference_kind WHEN 'annotator' THEN 0 WHEN 'majority' THEN 1 ELSE 2 END AS reference_order  -- sort key
    FROM measures
)
SELECT * EXCLUDE (reference_order) FROM final
ORDER BY retrieval_run_id, reference_order, reference
