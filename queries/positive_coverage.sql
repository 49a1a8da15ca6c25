-- positive_coverage: one row per (positive set, direction) of `clipfail positives import`: how much of its
-- subset the extended positives cover. n_queries: the subset's captions (text-to-image) or images
-- (image-to-text); n_covered: those that are queries of the source inside the subset; mean_positives and
-- max_positives: positives per covered query inside the subset, the source's pairs and the query's COCO pairs
-- together (the original pairs always count); NULL when nothing is covered in that direction. n_in_5k_test: of
-- the n_queries, those in the COCO 5k test (the split ECCV Caption and CxC extend, as the eccv_caption package lists
-- it): the most a packaged source can cover here; NULL for a --file source.
-- Ordered by positive set, then direction ('text-to-image' first).
-- Reads: positive_sets, extra_positives, subset_captions.
CREATE OR REPLACE VIEW positive_coverage AS
WITH positive_sets AS (
    SELECT positive_set_id, subset_id, source, n_captions, n_images, n_captions_in_5k_test, n_images_in_5k_test
    FROM positive_sets
),
extra_positives AS (
    SELECT positive_set_id, direction, query_id, positive_id FROM extra_positives
),
subset_captions AS (
    SELECT subset_id, caption_id, image_id FROM subset_captions
),
directions AS (
    SELECT p.positive_set_id, p.subset_id, p.source, d.direction,
        CASE WHEN d.direction = 'text-to-image' THEN p.n_captions ELSE p.n_images END AS n_queries,
        CASE WHEN d.direction = 'text-to-image' THEN p.n_captions_in_5k_test ELSE p.n_images_in_5k_test END
            AS n_in_5k_test
    FROM positive_sets p
    CROSS JOIN (VALUES ('text-to-image'), ('image-to-text')) AS d (direction)
),
coco AS (
    SELECT subset_id, 'text-to-image' AS direction, caption_id AS query_id, image_id AS positive_id
    FROM subset_captions
    UNION ALL
    SELECT subset_id, 'image-to-text' AS direction, image_id AS query_id, caption_id AS positive_id
    FROM subset_captions
),
covered AS (
    SELECT DISTINCT e.positive_set_id, p.subset_id, e.direction, e.query_id
    FROM extra_positives e
    JOIN positive_sets p USING (positive_set_id)
),
positives AS (
    SELECT positive_set_id, direction, query_id, positive_id FROM extra_positives
    UNION
    SELECT q.positive_set_id, q.direction, q.query_id, c.positive_id
    FROM covered q
    JOIN coco c USING (subset_id, direction, query_id)
),
per_query AS (
    SELECT positive_set_id, direction, query_id, count(*) AS n_positives
    FROM positives
    GROUP BY ALL
),
final AS (
    SELECT
        d.positive_set_id,
        d.source,
        d.direction,
        d.n_queries,
        count(q.query_id) AS n_covered,
        avg(q.n_positives) AS mean_positives,
        max(q.n_positives) AS max_positives,
        d.n_in_5k_test
    FROM directions d
    LEFT JOIN per_query q USING (positive_set_id, direction)
    GROUP BY ALL
)
SELECT * FROM final
ORDER BY positive_set_id, direction DESC
