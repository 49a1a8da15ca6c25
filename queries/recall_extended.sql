-- recall_extended: one row per (retrieval run, source, metric, k): retrieval metrics with the extended positives
-- of ECCV Caption and CxC counted as hits, in long form. source: 'coco' (the subset's own pairs, every query of
-- the run), or the source of a positive set of the run's subset ('eccv', 'cxc', 'file:<name>'; the newest set of
-- each source), counted on the queries that source covers inside the subset, as eccv_caption counts them; a
-- query's positives are the source's pairs plus its COCO pairs (the original pairs always count). metric:
-- 'r_at_k' (k 1, 5, 10: a positive within the first k), 'r_precision' (k NULL: the share of the first R places
-- that hold positives, R = the query's number of positives in the subset) and 'map_at_r' (k NULL: the mean over
-- r = 1..R of precision@r where place r holds a positive, 0 elsewhere; Musgrave et al. 2020). value: the mean
-- over the n_queries covered queries, a fraction.
-- Places come from positive_ranks (rank = 1 + items scoring strictly higher: the toolkit's optimistic policy).
-- Ties: a positive tied with other items is placed before them, and positives tied with each other take
-- consecutive places (by id), so place = rank + (its position among the query's positives - the positives
-- ranked strictly higher - 1). Under ties R@K, R-Precision and mAP@R are therefore upper bounds (an
-- adversarial order of the tied items could only lower them); without ties (float scores of real embeddings)
-- they equal the metrics of the plain ranked list. No run gains from ties: value_pessimistic places the
-- positives of a tie group at its end instead (place = rank + n_tied - (the group's positives) + (its position
-- among them)), is_tie_affected says that for some metric of the (run, source) the two differ by more than
-- 0.01 pp (0.0001 as a fraction; the rule of recall_summary and improvement_ties), and value, the headline,
-- is then the pessimistic one (tie_count names which); value_optimistic gives the other.
-- A (run, source) with a positive whose rank is not stored
-- yet (`clipfail positives rank`) has no rows, never partial ones.
-- Ordered by run, source ('coco' first), metric, k.
-- Reads: retrieval_runs, retrieval_ranks, subset_captions, positive_sets, extra_positives, positive_ranks.
CREATE OR REPLACE VIEW recall_extended AS
WITH retrieval_runs AS (
    SELECT retrieval_run_id, subset_id, direction FROM retrieval_runs
),
retrieval_ranks AS (
    SELECT retrieval_run_id, query_id FROM retrieval_ranks
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
    SELECT retrieval_run_id, query_id, positive_id, rank, n_tied FROM positive_ranks
),
newest_sets AS (
    SELECT subset_id, source, max(positive_set_id) AS positive_set_id
    FROM positive_sets
    GROUP BY ALL
),
coco AS (
    SELECT r.retrieval_run_id,
        CASE WHEN r.direction = 'text-to-image' THEN c.caption_id ELSE c.image_id END AS query_id,
        CASE WHEN r.direction = 'text-to-image' THEN c.image_id ELSE c.caption_id END AS positive_id
    FROM retrieval_runs r
    JOIN subset_captions c USING (subset_id)
),
extra AS (
    SELECT r.retrieval_run_id, s.source, e.query_id, e.positive_id
    FROM retrieval_runs r
    JOIN newest_sets s USING (subset_id)
    JOIN extra_positives e ON e.positive_set_id = s.positive_set_id AND e.direction = r.direction
),
covered AS (
    SELECT DISTINCT retrieval_run_id, source, query_id FROM extra
),
positives AS (
    SELECT retrieval_run_id, 'coco' AS source, query_id, positive_id FROM coco
    UNION
    SELECT retrieval_run_id, source, query_id, positive_id FROM extra
    UNION
    SELECT q.retrieval_run_id, q.source, q.query_id, c.positive_id
    FROM covered q
    JOIN coco c USING (retrieval_run_id, query_id)
),
ranked AS (
    SELECT p.retrieval_run_id, p.source, p.query_id, p.positive_id, k.rank, k.n_tied
    FROM positives p
    JOIN retrieval_ranks q USING (retrieval_run_id, query_id)
    LEFT JOIN positive_ranks k USING (retrieval_run_id, query_id, positive_id)
),
placed AS (
    SELECT
        retrieval_run_id,
        source,
        query_id,
        rank,
        row_number() OVER w AS j,
        rank + row_number() OVER w - rank() OVER by_rank AS place,
        rank + n_tied - count(*) OVER tie_group + row_number() OVER tie_group_ordered AS place_pessimistic,
        count(*) OVER (PARTITION BY retrieval_run_id, source, query_id) AS r
    FROM ranked
    WINDOW
        w AS (PARTITION BY retrieval_run_id, source, query_id ORDER BY rank, positive_id),
        by_rank AS (PARTITION BY retrieval_run_id, source, query_id ORDER BY rank),
        tie_group AS (PARTITION BY retrieval_run_id, source, query_id, rank),
        tie_group_ordered AS (PARTITION BY retrieval_run_id, source, query_id, rank ORDER BY positive_id)
),
per_query AS (
    SELECT
        retrieval_run_id,
        source,
        query_id,
        count(*) FILTER (WHERE rank IS NULL) AS n_unranked,
        min(place) AS first_place,
        count(*) FILTER (WHERE place <= r) / any_value(r)::DOUBLE AS r_precision,
        coalesce(sum(j / place::DOUBLE) FILTER (WHERE place <= r), 0) / any_value(r) AS map_at_r,
        min(place_pessimistic) AS first_place_p,
        count(*) FILTER (WHERE place_pessimistic <= r) / any_value(r)::DOUBLE AS r_precision_p,
        coalesce(sum(j / place_pessimistic::DOUBLE) FILTER (WHERE place_pessimistic <= r), 0) / any_value(r)
            AS map_at_r_p
    FROM placed
    GROUP BY ALL
),
complete AS (
    SELECT retrieval_run_id, source
    FROM per_query
    GROUP BY ALL
    HAVING sum(n_unranked) = 0
),
per_source AS (
    SELECT
        q.retrieval_run_id,
        q.source,
        count(*) AS n_queries,
        avg((q.first_place <= 1)::INTEGER) AS r_at_1,
        avg((q.first_place <= 5)::INTEGER) AS r_at_5,
        avg((q.first_place <= 10)::INTEGER) AS r_at_10,
        avg(q.r_precision) AS r_precision,
        avg(q.map_at_r) AS map_at_r,
        avg((q.first_place_p <= 1)::INTEGER) AS r_at_1_p,
        avg((q.first_place_p <= 5)::INTEGER) AS r_at_5_p,
        avg((q.first_place_p <= 10)::INTEGER) AS r_at_10_p,
        avg(q.r_precision_p) AS r_precision_p,
        avg(q.map_at_r_p) AS map_at_r_p
    FROM per_query q
    JOIN complete USING (retrieval_run_id, source)
    GROUP BY ALL
),
either_count AS (
    SELECT
        s.retrieval_run_id,
        r.direction,
        s.source,
        m.metric,
        m.k,
        CASE m.metric
            WHEN 'r_precision' THEN s.r_precision
            WHEN 'map_at_r' THEN s.map_at_r
            WHEN 'r_at_k' THEN CASE m.k WHEN 1 THEN s.r_at_1 WHEN 5 THEN s.r_at_5 ELSE s.r_at_10 END
        END AS value_optimistic,
        CASE m.metric
            WHEN 'r_precision' THEN s.r_precision_p
            WHEN 'map_at_r' THEN s.map_at_r_p
            WHEN 'r_at_k' THEN CASE m.k WHEN 1 THEN s.r_at_1_p WHEN 5 THEN s.r_at_5_p ELSE s.r_at_10_p END
        END AS value_pessimistic,
        s.n_queries,
        m.position
    FROM per_source s
    JOIN retrieval_runs r USING (retrieval_run_id)
    CROSS JOIN (
        VALUES ('r_at_k', 1, 1), ('r_at_k', 5, 2), ('r_at_k', 10, 3), ('r_precision', NULL, 4), ('map_at_r', NULL, 5)
    ) AS m (metric, k, position)
),
affected AS (
    SELECT retrieval_run_id, source, bool_or(value_optimistic - value_pessimistic > 0.0001) AS is_tie_affected
    FROM either_count
    GROUP BY ALL
),
final AS (
    SELECT
        b.retrieval_run_id,
        b.direction,
        b.source,
        b.metric,
        b.k,
        CASE WHEN a.is_tie_affected THEN b.value_pessimistic ELSE b.value_optimistic END AS value,
        b.n_queries,
        b.value_optimistic,
        b.value_pessimistic,
        a.is_tie_affected,
        CASE WHEN a.is_tie_affected THEN 'pessimistic' ELSE 'optimistic' END AS tie_count,
        b.source <> 'coco' AS is_extended,  -- sort key only
        b.position  -- sort key only
    FROM either_count b
    JOIN affected a USING (retrieval_run_id, source)
)
SELECT * EXCLUDE (is_extended, position) FROM final
ORDER BY retrieval_run_id, is_extended, source, position
