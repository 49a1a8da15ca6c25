-- blame_examples: every phrase variant of the newest explain run of each retrieval run, with its effect on the
-- ground truth and what the report's examples show beside it (the caption, the ground-truth and top-1 images).
--
-- One row per failure_ablations row of the newest explain run (explain_runs.explain_run_id) of each retrieval
-- run. rank_gain = (gt_rank_before + n_tied_before) - (gt_rank_after + n_tied_after), the pessimistic rank
-- gain of failure_blame (> 0: removing the phrase helps the ground truth, < 0: the model anchors on it);
-- gap_gain = score_gap_after - score_gap_before. The failure's own columns come from failure_blame
-- (blamed_role, blame_rank_gain = its rank_gain) and retrieval_ranks (top1_id: the run's top-1 image), with
-- each image's rel_path under the subset's image_root. example_order numbers the failures of an explain run
-- by blame_rank_gain descending, then caption_id (1 = the failure whose miss hangs most on one phrase).
-- Rows: by retrieval run, example_order, variant_index.
-- Reads: explain_runs, failure_ablations, failure_blame, retrieval_ranks, captions, retrieval_runs, subsets, images.
CREATE OR REPLACE VIEW blame_examples AS
WITH explain_runs AS (
    SELECT explain_run_id, retrieval_run_id FROM explain_runs
),
failure_ablations AS (
    SELECT explain_run_id, caption_id, variant_index, role, phrase, gt_image_id, gt_rank_before, n_tied_before,
           gt_rank_after, n_tied_after, score_gap_before, score_gap_after
    FROM failure_ablations
),
failure_blame AS (
    SELECT explain_run_id, caption_id, blamed_role, blamed_phrase, rank_gain FROM failure_blame
),
retrieval_ranks AS (
    SELECT retrieval_run_id, query_id, top1_id FROM retrieval_ranks
),
captions AS (
    SELECT caption_id, text FROM captions
),
retrieval_runs AS (
    SELECT retrieval_run_id, subset_id FROM retrieval_runs
),
subsets AS (
    SELECT subset_id, image_root FROM subsets
),
images AS (
    SELECT image_id, rel_path FROM images
),
latest AS (
    SELECT retrieval_run_id, max(explain_run_id) AS explain_run_id FROM explain_runs GROUP BY retrieval_run_id
),
failures AS (
    SELECT l.retrieval_run_id, b.explain_run_id, b.caption_id, b.blamed_role, b.blamed_phrase,
           b.rank_gain AS blame_rank_gain,
           row_number() OVER (PARTITION BY b.explain_run_id ORDER BY b.rank_gain DESC, b.caption_id)
               AS example_order
    FROM latest l
    JOIN failure_blame b ON b.explain_run_id = l.explain_run_id
    WHERE b.blamed_role <> 'no phrase'
),
final AS (
    SELECT
        f.retrieval_run_id,
        f.explain_run_id,
        f.example_order,
        f.caption_id,
        c.text AS caption,
        f.blamed_role,
        f.blamed_phrase,
        f.blame_rank_gain,
        a.variant_index,
        a.role,
        a.phrase,
        (a.gt_rank_before + a.n_tied_before) - (a.gt_rank_after + a.n_tied_after) AS rank_gain,
        a.score_gap_after - a.score_gap_before AS gap_gain,
        a.gt_rank_before + a.n_tied_before AS gt_rank_before_pessimistic,
        a.gt_rank_after + a.n_tied_after AS gt_rank_after_pessimistic,
        a.gt_image_id,
        r.top1_id AS top1_image_id,
        gi.rel_path AS gt_rel_path,
        ti.rel_path AS top1_rel_path,
        s.image_root
    FROM failures f
    JOIN failure_ablations a ON a.explain_run_id = f.explain_run_id AND a.caption_id = f.caption_id
    JOIN captions c ON c.caption_id = f.caption_id
    JOIN retrieval_ranks r ON r.retrieval_run_id = f.retrieval_run_id AND r.query_id = f.caption_id
    JOIN retrieval_runs rr ON rr.retrieval_run_id = f.retrieval_run_id
    JOIN subsets s ON s.subset_id = rr.subset_id
    LEFT JOIN images gi ON gi.image_id = a.gt_image_id
    LEFT JOIN images ti ON ti.image_id = r.top1_id
)
SELECT * FROM final
ORDER BY retrieval_run_id, example_order, variant_index
