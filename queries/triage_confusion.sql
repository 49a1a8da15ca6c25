-- triage_confusion: the confusion matrix of human labels against triage suggestions.
--
-- Newest triage run of each retrieval run; one row per non-empty cell. human_category is the
-- label of each labelled sample in sample_labels (the annotator's own label, or the overlap
-- majority); suggested_category is the triage suggestion, '(none)' where no rule fired.
-- Rows follow the taxonomy order (categories.position) of both axes, '(none)' last.
-- Reads: triage_runs, triage_suggestions, sample_labels, categories.
CREATE OR REPLACE VIEW triage_confusion AS
WITH triage_runs AS (
    SELECT retrieval_run_id, triage_run_id FROM triage_runs
),
triage_suggestions AS (
    SELECT retrieval_run_id, triage_run_id, caption_id, suggested_category FROM triage_suggestions
),
sample_labels AS (
    SELECT retrieval_run_id, caption_id, category FROM sample_labels
),
categories AS (
    SELECT name AS category, position FROM categories
),
latest AS (
    SELECT retrieval_run_id, max(triage_run_id) AS triage_run_id FROM triage_runs GROUP BY retrieval_run_id
),
suggestions AS (
    SELECT t.retrieval_run_id, t.triage_run_id, t.caption_id, coalesce(t.suggested_category, '(none)') AS suggested
    FROM triage_suggestions t
    JOIN latest l USING (retrieval_run_id, triage_run_id)
),
cells AS (
    SELECT l.retrieval_run_id, g.triage_run_id, l.category AS human_category, g.suggested AS suggested_category,
           count(*) AS n
    FROM sample_labels l
    JOIN suggestions g ON g.retrieval_run_id = l.retrieval_run_id AND g.caption_id = l.caption_id
    GROUP BY ALL
),
final AS (
    SELECT c.retrieval_run_id, c.triage_run_id, c.human_category, c.suggested_category, c.n,
           c.human_category = c.suggested_category AS is_agreement,
           h.position AS human_position,  -- sort keys only
           s.position AS suggested_position
    FROM cells c
    LEFT JOIN categories h ON h.category = c.human_category
    LEFT JOIN categories s ON s.category = c.suggested_category
)
SELECT * EXCLUDE (human_position, suggested_position) FROM final
ORDER BY retrieval_run_id, human_position NULLS LAST, human_category, suggested_position NULLS LAST, suggested_category
