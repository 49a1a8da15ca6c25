-- improvement_hits_extended: one row per (improvement run, positive set of its subset, caption, K in 1, 5, 10):
-- whether the caption is a hit before and after the method with the set's extended positives counted, i.e. whether
-- ANY of its positives (view improvement_positives: its own COCO image and the set's pairs of the caption) is within
-- the first K, before (the retrieval run: improvement_ranks.baseline_rank for its own image, positive_ranks for the
-- others) and after (improvement_ranks.improved_rank, improvement_positive_ranks). A caption the set does not
-- cover (is_covered false) has only its own image, so its hits are improvement_hits'.
-- n_extra_positives: the caption's positives besides its own image. *_first_rank: the best rank of its positives
-- (the toolkit's optimistic rank, 1 + images scoring strictly higher). Ties (no method gains from them): the
-- pessimistic first place puts the positives of a tie group at its end, as recall_extended does: per group of
-- positives with the same rank, rank + n_tied + 1 - (the group's positives), and the best over the groups; NULL
-- when a tie count is unknown (a run made before ties were recorded). is_*_hit: first rank <= K; is_*_hit_pessimistic:
-- pessimistic first place <= K. A (run, set) with a positive whose rank is not stored (a run made before the import:
-- `clipfail improve` with the same options again ranks them) has no rows, never partial ones.
-- The base of improvement_recall_extended; `clipfail improve` computes the paired statistics from these rows
-- (improvement_stats_extended).
-- Ordered by improvement run, positive set, caption, K.
-- Reads: improvement_positives, improvement_ranks, improvement_positive_ranks, positive_ranks.
CREATE OR REPLACE VIEW improvement_hits_extended AS
WITH improvement_positives AS (
    SELECT
        improvement_id, retrieval_run_id, positive_set_id, source, caption_id, positive_id, is_own_image, is_covered
    FROM improvement_positives
),
improvement_ranks AS (
    SELECT
        improvement_id, caption_id, category, baseline_rank, improved_rank, baseline_n_tied, improved_n_tied
    FROM improvement_ranks
),
improvement_positive_ranks AS (
    SELECT improvement_id, caption_id, positive_id, rank, n_tied FROM improvement_positive_ranks
),
positive_ranks AS (
    SELECT retrieval_run_id, query_id, positive_id, rank, n_tied FROM positive_ranks
),
positives AS (
    -- each positive's rank and ties before (the retrieval run) and after (the improvement run)
    SELECT
        p.improvement_id,
        p.positive_set_id,
        p.caption_id,
        CASE WHEN p.is_own_image THEN i.baseline_rank ELSE b.rank END AS baseline_rank,
        CASE WHEN p.is_own_image THEN i.baseline_n_tied ELSE b.n_tied END AS baseline_n_tied,
        CASE WHEN p.is_own_image THEN i.improved_rank ELSE k.rank END AS improved_rank,
        CASE WHEN p.is_own_image THEN i.improved_n_tied ELSE k.n_tied END AS improved_n_tied
    FROM improvement_positives p
    JOIN improvement_ranks i USING (improvement_id, caption_id)
    LEFT JOIN positive_ranks b
        ON NOT p.is_own_image AND b.retrieval_run_id = p.retrieval_run_id AND b.query_id = p.caption_id
        AND b.positive_id = p.positive_id
    LEFT JOIN improvement_positive_ranks k
        ON NOT p.is_own_image AND k.improvement_id = p.improvement_id AND k.caption_id = p.caption_id
        AND k.positive_id = p.positive_id
),
placed AS (
    -- positives with the same rank have the same score (a higher score ranks strictly higher): one tie group
    SELECT
        improvement_id,
        positive_set_id,
        caption_id,
        baseline_rank,
        improved_rank,
        baseline_rank + baseline_n_tied + 1 - count(*) OVER (
            PARTITION BY improvement_id, positive_set_id, caption_id, baseline_rank
        ) AS baseline_place_pessimistic,
        improved_rank + improved_n_tied + 1 - count(*) OVER (
            PARTITION BY improvement_id, positive_set_id, caption_id, improved_rank
        ) AS improved_place_pessimistic
    FROM positives
),
per_caption AS (
    SELECT
        improvement_id,
        positive_set_id,
        caption_id,
        count(*) - 1 AS n_extra_positives,
        count(*) FILTER (WHERE baseline_rank IS NULL OR improved_rank IS NULL) AS n_unranked,
        min(baseline_rank) AS baseline_first_rank,
        CASE
            WHEN count(*) = count(baseline_place_pessimistic) THEN min(baseline_place_pessimistic)
        END AS baseline_first_rank_pessimistic,
        min(improved_rank) AS improved_first_rank,
        CASE
            WHEN count(*) = count(improved_place_pessimistic) THEN min(improved_place_pessimistic)
        END AS improved_first_rank_pessimistic
    FROM placed
    GROUP BY ALL
),
complete AS (
    SELECT improvement_id, positive_set_id
    FROM per_caption
    GROUP BY ALL
    HAVING sum(n_unranked) = 0
),
own AS (
    SELECT p.improvement_id, p.positive_set_id, p.source, p.caption_id, p.is_covered, i.category
    FROM improvement_positives p
    JOIN improvement_ranks i USING (improvement_id, caption_id)
    WHERE p.is_own_image
),
ks AS (
    SELECT unnest([1, 5, 10]) AS k
),
final AS (
    SELECT
        q.improvement_id,
        q.positive_set_id,
        o.source,
        q.caption_id,
        o.category,
        ks.k,
        o.is_covered,
        q.n_extra_positives,
        q.baseline_first_rank,
        q.baseline_first_rank_pessimistic,
        q.improved_first_rank,
        q.improved_first_rank_pessimistic,
        q.baseline_first_rank <= ks.k AS is_baseline_hit,
        q.improved_first_rank <= ks.k AS is_improved_hit,
        q.baseline_first_rank_pessimistic <= ks.k AS is_baseline_hit_pessimistic,
        q.improved_first_rank_pessimistic <= ks.k AS is_improved_hit_pessimistic
    FROM per_caption q
    SEMI JOIN complete USING (improvement_id, positive_set_id)
    JOIN own o USING (improvement_id, positive_set_id, caption_id)
    CROSS JOIN ks
)
SELECT * FROM final
ORDER BY improvement_id, positive_set_id, caption_id, k
