-- false_negatives_by_triage_rule: one row per (retrieval run, triage rule) of the newest triage run of the
-- retrieval run: how many of the failures that rule decides are verified false negatives (failure_false_negatives).
-- rule: the first rule in rules_fired other than Verified (Object, Count, Spatial, Ambiguous, Attribute, Action),
-- i.e. what the heuristic rules say, whether or not the Verified rule fired first; NULL when no other rule fired.
-- n_failures: the failures it decides; n_checkable: those whose caption an imported source covers; n_verified:
-- those whose top-1 image is a verified positive; share_verified = n_verified / n_checkable (a fraction, NULL when
-- nothing is checkable); share_of_verified: the rule's part of the run's verified false negatives (NULL when none).
-- Only runs with imported positives for their subset appear. Ordered by run, then rule (the priority order of
-- toolkit.labels.triage.PRIORITY), NULL last.
-- Reads: triage_runs, triage_suggestions, failure_false_negatives, retrieval_runs, positive_sets.
CREATE OR REPLACE VIEW false_negatives_by_triage_rule AS
WITH triage_runs AS (
    SELECT triage_run_id, retrieval_run_id FROM triage_runs
),
triage_suggestions AS (
    SELECT triage_run_id, caption_id, rules_fired FROM triage_suggestions
),
failure_false_negatives AS (
    SELECT retrieval_run_id, query_id, is_top1_extended_positive, covering_sources FROM failure_false_negatives
),
retrieval_runs AS (
    SELECT retrieval_run_id, subset_id FROM retrieval_runs
),
positive_sets AS (
    SELECT DISTINCT subset_id FROM positive_sets
),
newest AS (
    SELECT retrieval_run_id, max(triage_run_id) AS triage_run_id
    FROM triage_runs
    GROUP BY ALL
),
decided AS (
    SELECT
        n.retrieval_run_id,
        -- Verified comes first where it fired: the rule is the next one
        nullif(regexp_extract(regexp_replace(s.rules_fired, '^Verified,?', ''), '^[^,]*'), '') AS rule,
        f.covering_sources IS NOT NULL AS is_checkable,
        coalesce(f.is_top1_extended_positive, FALSE) AS is_verified
    FROM newest n
    JOIN triage_suggestions s USING (triage_run_id)
    JOIN retrieval_runs r ON r.retrieval_run_id = n.retrieval_run_id
    SEMI JOIN positive_sets p ON p.subset_id = r.subset_id
    LEFT JOIN failure_false_negatives f ON f.retrieval_run_id = n.retrieval_run_id AND f.query_id = s.caption_id
),
per_rule AS (
    SELECT
        retrieval_run_id,
        rule,
        count(*) AS n_failures,
        count(*) FILTER (WHERE is_checkable) AS n_checkable,
        count(*) FILTER (WHERE is_verified) AS n_verified
    FROM decided
    GROUP BY ALL
),
final AS (
    SELECT
        retrieval_run_id,
        rule,
        n_failures,
        n_checkable,
        n_verified,
        n_verified / nullif(n_checkable, 0)::DOUBLE AS share_verified,
        n_verified / nullif(sum(n_verified) OVER (PARTITION BY retrieval_run_id), 0)::DOUBLE AS share_of_verified,
        list_position(['Object', 'Count', 'Spatial', 'Ambiguous', 'Attribute', 'Action'], rule) AS position  -- sort key
    FROM per_rule
)
SELECT * EXCLUDE (position) FROM final
ORDER BY retrieval_run_id, position NULLS LAST, rule NULLS LAST
