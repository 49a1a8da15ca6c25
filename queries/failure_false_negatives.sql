-- failure_false_negatives: one row per R@1 failure (gt_rank > 1) of a retrieval run: is its top-1 item a verified
-- positive of the query (an extended positive of ECCV Caption, CxC or a file, inside the subset)? covering_sources:
-- the sources (newest set of each, comma-separated, by name) whose lists hold this query, NULL when none does (the
-- miss cannot be checked); verifying_sources: those that list the top-1 item as a positive, NULL when none;
-- is_top1_extended_positive: verifying_sources is not NULL. first_extended_rank: the best rank (the toolkit's
-- optimistic rank, 1 + items scoring strictly higher, from positive_ranks) among the query's extended positives
-- that are not its COCO pairs; NULL when it has none, or when their ranks are not stored yet (`clipfail
-- positives rank`). top1_id follows retrieval_ranks (among tied scores the lower gallery index).
-- Ordered by run, then query id.
-- Reads: retrieval_runs, retrieval_ranks, subset_captions, positive_sets, extra_positives, positive_ranks.
CREATE OR REPLACE VIEW failure_false_negatives AS
WITH retrieval_runs AS (
    SELECT retrieval_run_id, subset_id, direction FROM retrieval_runs
),
retrieval_ranks AS (
    SELECT retrieval_run_id, query_id, gt_id, gt_rank, top1_id FROM retrieval_ranks
),
subset_captions AS (
    SELECT subset_id, caption_id, image_id FROM subset_captions
),
positive_sets AS (
    SELECT positive_set_id, subset_id, source FROM positive_sets
),
extra_positives AS (
    SELECT positive_set_id, direction, query_id, positive_id FROM extra_positives
),
positive_ranks AS (
    SELECT retrieval_run_id, query_id, positive_id, rank FROM positive_ranks
),
newest_sets AS (
    SELECT subset_id, source, max(positive_set_id) AS positive_set_id
    FROM positive_sets
    GROUP BY ALL
),
failures AS (
    SELECT k.retrieval_run_id, r.subset_id, r.direction, k.query_id, k.gt_id, k.gt_rank, k.top1_id
    FROM retrieval_ranks k
    JOIN retrieval_runs r USING (retrieval_run_id)
    WHERE k.gt_rank > 1
),
coco AS (
    SELECT subset_id, 'text-to-image' AS direction, caption_id AS query_id, image_id AS positive_id
    FROM subset_captions
    UNION ALL
    SELECT subset_id, 'image-to-text' AS direction, image_id AS query_id, caption_id AS positive_id
    FROM subset_captions
),
extended AS (
    SELECT f.retrieval_run_id, f.query_id, s.source, e.positive_id
    FROM failures f
    JOIN newest_sets s USING (subset_id)
    JOIN extra_positives e
        ON e.positive_set_id = s.positive_set_id AND e.direction = f.direction AND e.query_id = f.query_id
),
per_failure AS (
    SELECT
        f.retrieval_run_id,
        f.query_id,
        string_agg(DISTINCT x.source, ', ' ORDER BY x.source) AS covering_sources,
        string_agg(DISTINCT x.source, ', ' ORDER BY x.source) FILTER (WHERE x.positive_id = f.top1_id)
            AS verifying_sources
    FROM failures f
    JOIN extended x USING (retrieval_run_id, query_id)
    GROUP BY ALL
),
first_extended AS (
    SELECT x.retrieval_run_id, x.query_id, min(k.rank) AS first_extended_rank
    FROM extended x
    JOIN failures f USING (retrieval_run_id, query_id)
    JOIN positive_ranks k USING (retrieval_run_id, query_id, positive_id)
    ANTI JOIN coco c
        ON c.subset_id = f.subset_id AND c.direction = f.direction AND c.query_id = x.query_id
        AND c.positive_id = x.positive_id
    GROUP BY ALL
),
final AS (
    SELECT
        f.retrieval_run_id,
        f.direction,
        f.query_id,
        f.gt_id,
        f.gt_rank,
        f.top1_id,
        p.verifying_sources IS NOT NULL AS is_top1_extended_positive,
        p.verifying_sources,
        p.covering_sources,
        e.first_extended_rank
    FROM failures f
    LEFT JOIN per_failure p USING (retrieval_run_id, query_id)
    LEFT JOIN first_extended e USING (retrieval_run_id, query_id)
)
SELECT * FROM final
ORDER BY retrieval_run_id, query_id
