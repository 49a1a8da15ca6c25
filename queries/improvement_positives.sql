-- improvement_positives: one row per (improvement run, positive set of its retrieval run's subset, caption of the
-- run, positive image of the caption): the caption's own COCO image (is_own_image) and the set's other
-- text-to-image pairs of the caption inside the subset (imported by `clipfail positives import`). Every caption of
-- the run has its own image once per set; is_covered: the set lists the caption as a query at all (ECCV Caption
-- covers 1,332 of the 25,000 captions of the COCO 5k test, CxC 24,972). What improvement_hits_extended ranks.
-- Ordered by improvement run, positive set, caption, positive (its own image first).
-- Reads: improvement_runs, retrieval_runs, improvement_ranks, positive_sets, extra_positives, subset_captions.
CREATE OR REPLACE VIEW improvement_positives AS
WITH improvement_runs AS (
    SELECT improvement_id, retrieval_run_id FROM improvement_runs
),
retrieval_runs AS (
    SELECT retrieval_run_id, subset_id FROM retrieval_runs
),
improvement_ranks AS (
    SELECT improvement_id, caption_id FROM improvement_ranks
),
positive_sets AS (
    SELECT positive_set_id, subset_id, source FROM positive_sets
),
extra_positives AS (
    SELECT positive_set_id, direction, query_id, positive_id FROM extra_positives
),
subset_captions AS (
    SELECT subset_id, caption_id, image_id FROM subset_captions
),
run_captions AS (
    -- every caption of an improvement run, once per positive set of the run's subset
    SELECT i.improvement_id, u.retrieval_run_id, s.positive_set_id, s.source, i.caption_id, c.image_id
    FROM improvement_ranks i
    JOIN improvement_runs u USING (improvement_id)
    JOIN retrieval_runs r USING (retrieval_run_id)
    JOIN positive_sets s ON s.subset_id = r.subset_id
    JOIN subset_captions c ON c.subset_id = r.subset_id AND c.caption_id = i.caption_id
),
text_to_image AS (
    SELECT positive_set_id, query_id, positive_id
    FROM extra_positives
    WHERE direction = 'text-to-image'
),
covered AS (
    SELECT DISTINCT positive_set_id, query_id FROM text_to_image
),
pairs AS (
    SELECT improvement_id, retrieval_run_id, positive_set_id, source, caption_id, image_id AS positive_id,
        TRUE AS is_own_image
    FROM run_captions
    UNION ALL
    SELECT c.improvement_id, c.retrieval_run_id, c.positive_set_id, c.source, c.caption_id, e.positive_id,
        FALSE AS is_own_image
    FROM run_captions c
    JOIN text_to_image e
        ON e.positive_set_id = c.positive_set_id AND e.query_id = c.caption_id AND e.positive_id <> c.image_id
),
final AS (
    SELECT
        p.improvement_id,
        p.retrieval_run_id,
        p.positive_set_id,
        p.source,
        p.caption_id,
        p.positive_id,
        p.is_own_image,
        v.query_id IS NOT NULL AS is_covered
    FROM pairs p
    LEFT JOIN covered v ON v.positive_set_id = p.positive_set_id AND v.query_id = p.caption_id
)
SELECT * FROM final
ORDER BY improvement_id, positive_set_id, caption_id, is_own_image DESC, positive_id
