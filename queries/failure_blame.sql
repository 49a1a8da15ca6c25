-- failure_blame: per explained R@1 failure (explain run, caption), the role whose removal helps the ground truth
-- most and by how much, and the phrases the model anchors on (whose removal makes the ground truth worse).
--
-- Ranks are compared pessimistically (rank + n_tied, the retrieval tie policy), so no variant gains from ties:
-- rank_gain = (gt_rank_before + n_tied_before) - (gt_rank_after + n_tied_after); gap_gain = score_gap_after -
-- score_gap_before. A variant helps when rank_gain > 0 and anchors when rank_gain < 0. The blamed variant is the
-- one with the largest rank_gain, then the largest gap_gain, then the first (variant_index); blamed_role is its
-- role, or 'none' when no variant helps, or 'no phrase' for a failure of the run's scope where the extractor
-- found no phrase of the chosen roles (it has no failure_ablations rows; the scope's failures are the run's
-- failure sample, or every failure for scope 'all-failures'). blamed_category is the role's category
-- (toolkit/data/blame_roles.csv, as stored in failure_ablations.category), NULL when nothing is blamed. The
-- strongest anchor is the variant with the most negative rank_gain (then the smallest gap_gain, then the first).
-- Reads: explain_runs, failure_ablations, retrieval_ranks, failure_samples.
CREATE OR REPLACE VIEW failure_blame AS
WITH explain_runs AS (
    SELECT explain_run_id, retrieval_run_id, scope FROM explain_runs
),
failure_ablations AS (
    SELECT explain_run_id, caption_id, variant_index, retrieval_run_id, role, category, phrase, ablated_text,
           gt_rank_before, n_tied_before, gt_rank_after, n_tied_after, score_gap_before, score_gap_after
    FROM failure_ablations
),
retrieval_ranks AS (
    SELECT retrieval_run_id, query_id, gt_rank FROM retrieval_ranks
),
failure_samples AS (
    SELECT retrieval_run_id, caption_id FROM failure_samples
),
sampled AS (
    SELECT DISTINCT retrieval_run_id, caption_id FROM failure_samples
),
scope_failures AS (
    SELECT e.explain_run_id, e.retrieval_run_id, r.query_id AS caption_id
    FROM explain_runs e
    JOIN retrieval_ranks r ON r.retrieval_run_id = e.retrieval_run_id AND r.gt_rank > 1
    LEFT JOIN sampled s ON s.retrieval_run_id = e.retrieval_run_id AND s.caption_id = r.query_id
    WHERE e.scope = 'all-failures' OR s.caption_id IS NOT NULL
),
effects AS (
    SELECT *,
           (gt_rank_before + n_tied_before) - (gt_rank_after + n_tied_after) AS rank_gain,
           score_gap_after - score_gap_before AS gap_gain
    FROM failure_ablations
),
ordered AS (
    SELECT *,
           row_number() OVER (PARTITION BY explain_run_id, caption_id
                              ORDER BY rank_gain DESC, gap_gain DESC, variant_index) AS help_order,
           row_number() OVER (PARTITION BY explain_run_id, caption_id
                              ORDER BY rank_gain, gap_gain, variant_index) AS anchor_order
    FROM effects
),
per_failure AS (
    SELECT explain_run_id, caption_id,
           count(*) AS n_variants,
           count(*) FILTER (WHERE rank_gain > 0) AS n_helping,
           count(*) FILTER (WHERE rank_gain < 0) AS n_anchors,
           string_agg(phrase, '; ' ORDER BY variant_index) FILTER (WHERE rank_gain < 0) AS anchor_phrases
    FROM effects
    GROUP BY ALL
),
best AS (
    SELECT * FROM ordered WHERE help_order = 1
),
worst AS (
    SELECT * FROM ordered WHERE anchor_order = 1
),
final AS (
    SELECT
        f.explain_run_id,
        f.retrieval_run_id,
        f.caption_id,
        coalesce(p.n_variants, 0) AS n_variants,
        coalesce(p.n_helping, 0) AS n_helping,
        CASE
            WHEN p.n_variants IS NULL THEN 'no phrase'
            WHEN b.rank_gain > 0 THEN b.role
            ELSE 'none'
        END AS blamed_role,
        CASE WHEN b.rank_gain > 0 THEN b.category END AS blamed_category,
        CASE WHEN b.rank_gain > 0 THEN b.phrase END AS blamed_phrase,
        CASE WHEN b.rank_gain > 0 THEN b.ablated_text END AS blamed_text,
        b.gt_rank_before + b.n_tied_before AS gt_rank_before_pessimistic,
        CASE WHEN b.rank_gain > 0 THEN b.gt_rank_after + b.n_tied_after END AS gt_rank_after_pessimistic,
        CASE WHEN b.rank_gain > 0 THEN b.rank_gain ELSE 0 END AS rank_gain,
        CASE WHEN b.rank_gain > 0 THEN b.gap_gain END AS gap_gain,
        coalesce(p.n_anchors, 0) AS n_anchors,
        p.anchor_phrases,
        CASE WHEN w.rank_gain < 0 THEN w.role END AS anchor_role,
        CASE WHEN w.rank_gain < 0 THEN w.phrase END AS anchor_phrase,
        CASE WHEN w.rank_gain < 0 THEN -w.rank_gain END AS anchor_rank_loss
    FROM scope_failures f
    LEFT JOIN per_failure p USING (explain_run_id, caption_id)
    LEFT JOIN best b USING (explain_run_id, caption_id)
    LEFT JOIN worst w USING (explain_run_id, caption_id)
)
SELECT * FROM final
ORDER BY explain_run_id, caption_id
