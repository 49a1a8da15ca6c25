-- failure_details: one row per failure sample, ready for ad-hoc SQL: the caption, the ground-truth
-- image and the top-1 image CLIP retrieved instead (ids and file names), the rank and scores,
-- and the sample's label from sample_labels (NULL while unlabelled; backup samples stay NULL).
-- Filter on retrieval_run_id when a database holds several runs.
CREATE OR REPLACE VIEW failure_details AS
WITH samples AS (
    SELECT sample_id, retrieval_run_id, caption_id, set_name, draw_order FROM failure_samples
),
ranks AS (
    SELECT retrieval_run_id, query_id AS caption_id, gt_id, gt_rank, n_tied, gt_score, top1_id, top1_score, topk_ids,
           topk_scores
    FROM retrieval_ranks
),
labels AS (
    SELECT sample_id, category, secondary_category, n_labels, is_tie, annotators, is_simulated FROM sample_labels
)
SELECT
    s.sample_id,
    s.retrieval_run_id,
    s.set_name,
    s.set_name = 'overlap' AS is_overlap,
    s.draw_order,
    s.caption_id,
    c.text AS caption,
    r.gt_id AS gt_image_id,
    gi.file_name AS gt_file_name,
    r.gt_rank,
    r.n_tied,
    r.gt_score,
    r.top1_id AS top1_image_id,
    ti.file_name AS top1_file_name,
    r.top1_score,
    r.top1_score - r.gt_score AS score_gap,
    r.topk_ids AS topk_image_ids,
    r.topk_scores,
    l.category,
    l.secondary_category,
    coalesce(l.n_labels, 0) AS n_labels,
    l.is_tie,
    l.annotators,
    l.is_simulated
FROM samples s
LEFT JOIN ranks r ON r.retrieval_run_id = s.retrieval_run_id AND r.caption_id = s.caption_id
LEFT JOIN captions c ON c.caption_id = s.caption_id
LEFT JOIN images gi ON gi.image_id = r.gt_id
LEFT JOIN images ti ON ti.image_id = r.top1_id
LEFT JOIN labels l ON l.sample_id = s.sample_id
ORDER BY s.retrieval_run_id, s.draw_order
