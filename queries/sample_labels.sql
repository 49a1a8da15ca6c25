-- sample_labels: one category per labelled failure sample.
--
-- A sample of an annotator's set takes the label of that annotator (labels by anyone else are
-- ignored; import-labels refuses them anyway). A sample of the overlap set takes the majority
-- of its annotators' primary categories. Tie rule: among the tied categories, the one that
-- comes first in the taxonomy order (categories.position, then name) wins. Ambiguous has
-- position 0, so a tie that involves Ambiguous resolves to Ambiguous: a failure the annotators
-- cannot agree on is not counted as fixable; other ties go to the earlier category, which is
-- deterministic and independent of annotator names. is_tie flags such samples.
-- secondary_category: the annotator's for a single-label sample; for an overlap sample the most
-- frequent secondary category named by the annotators who chose the winning category (ties by
-- taxonomy order), NULL when none of them gave one.
-- Samples without any label (backup, or not yet imported) are not in this view.
-- Reads: failure_samples, annotations, categories.
CREATE OR REPLACE VIEW sample_labels AS
WITH failure_samples AS (
    SELECT sample_id, retrieval_run_id, caption_id, set_name, draw_order
    FROM failure_samples
),
annotations AS (
    SELECT sample_id, annotator, category, secondary_category, is_simulated FROM annotations
),
categories AS (
    SELECT name AS category, position FROM categories
),
labels AS (
    -- the labels that count: the assigned annotator's, or every annotator's on the overlap set
    SELECT a.sample_id, a.annotator, a.category, a.secondary_category, a.is_simulated
    FROM annotations a
    JOIN failure_samples s ON s.sample_id = a.sample_id
    WHERE s.set_name = 'overlap' OR a.annotator = s.set_name
),
votes AS (
    SELECT l.sample_id, l.category, count(*) AS n_votes, any_value(o.position) AS position
    FROM labels l
    LEFT JOIN categories o ON o.category = l.category
    GROUP BY l.sample_id, l.category
),
ranked_votes AS (
    SELECT
        sample_id, category, n_votes,
        row_number() OVER (PARTITION BY sample_id ORDER BY n_votes DESC, position NULLS LAST, category) AS vote_rank,
        count(*) OVER (PARTITION BY sample_id, n_votes) AS n_with_same_votes
    FROM votes
),
winners AS (
    SELECT sample_id, category, n_votes, n_with_same_votes > 1 AS is_tie
    FROM ranked_votes
    WHERE vote_rank = 1
),
secondaries AS (
    SELECT
        l.sample_id, l.secondary_category,
        row_number() OVER (
            PARTITION BY l.sample_id
            ORDER BY count(*) DESC, o.position NULLS LAST, l.secondary_category
        ) AS secondary_rank
    FROM labels l
    JOIN winners w ON w.sample_id = l.sample_id AND w.category = l.category
    LEFT JOIN categories o ON o.category = l.secondary_category
    WHERE l.secondary_category IS NOT NULL
    GROUP BY l.sample_id, l.secondary_category, o.position
),
label_summary AS (
    SELECT
        sample_id,
        count(*) AS n_labels,
        string_agg(annotator, ',' ORDER BY annotator) AS annotators,
        bool_or(is_simulated) AS is_simulated
    FROM labels
    GROUP BY sample_id
),
final AS (
    SELECT
        s.sample_id,
        s.retrieval_run_id,
        s.caption_id,
        s.set_name,
        s.draw_order,
        s.set_name = 'overlap' AS is_overlap,
        w.category,
        sec.secondary_category,
        w.n_votes,
        ls.n_labels,
        w.is_tie,
        ls.annotators,
        ls.is_simulated
    FROM failure_samples s
    JOIN winners w ON w.sample_id = s.sample_id
    JOIN label_summary ls ON ls.sample_id = s.sample_id
    LEFT JOIN secondaries sec ON sec.sample_id = s.sample_id AND sec.secondary_rank = 1
)
SELECT * FROM final
ORDER BY retrieval_run_id, draw_order
