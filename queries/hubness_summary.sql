-- hubness_summary: one row per retrieval run with ranks (both directions): how skewed its k-occurrence is
-- (the standard hubness measure, Radovanovic et al. 2010), how many gallery items no query retrieves, and how
-- many R@1 failures land on a hub (view image_hubness). skewness_n10 / skewness_n1: the population skewness
-- E[(N - mean)^3] / sd^3 of N_10 / N_1 over the gallery (NULL when every item has the same N);
-- share_never_top10 / share_never_top1: share of gallery items with N_10 = 0 / N_1 = 0 ("anti-hubs");
-- share_r1_failures_top1_hub: among the queries with gt_rank > 1, the share whose top-1 item is a hub
-- (image_hubness.is_hub; NULL for a run stored with top-k < 10). Shares are fractions in [0, 1].
-- Reads: image_hubness, retrieval_ranks.
CREATE OR REPLACE VIEW hubness_summary AS
WITH image_hubness AS (
    SELECT retrieval_run_id, direction, gallery_id, n_1, n_10, n_queries, n_gallery, hub_threshold, is_hub
    FROM image_hubness
),
retrieval_ranks AS (
    SELECT retrieval_run_id, gt_rank, top1_id FROM retrieval_ranks
),
moments AS (
    SELECT retrieval_run_id, avg(n_10) AS mean_n10, avg(n_1) AS mean_n1
    FROM image_hubness
    GROUP BY ALL
),
per_run AS (
    SELECT
        h.retrieval_run_id,
        any_value(h.direction) AS direction,
        any_value(h.n_queries) AS n_queries,
        any_value(h.n_gallery) AS n_gallery,
        any_value(h.hub_threshold) AS hub_threshold,
        avg(power(h.n_10 - m.mean_n10, 3)) / nullif(power(avg(power(h.n_10 - m.mean_n10, 2)), 1.5), 0)
            AS skewness_n10,
        avg(power(h.n_1 - m.mean_n1, 3)) / nullif(power(avg(power(h.n_1 - m.mean_n1, 2)), 1.5), 0) AS skewness_n1,
        max(h.n_10) AS max_n10,
        max(h.n_1) AS max_n1,
        count(*) FILTER (WHERE h.is_hub) AS n_hubs,
        avg(CASE WHEN h.n_10 = 0 THEN 1.0 WHEN h.n_10 IS NOT NULL THEN 0.0 END) AS share_never_top10,
        avg(CASE WHEN h.n_1 = 0 THEN 1.0 ELSE 0.0 END) AS share_never_top1
    FROM image_hubness h
    JOIN moments m ON m.retrieval_run_id = h.retrieval_run_id
    GROUP BY h.retrieval_run_id
),
failures AS (
    SELECT
        r.retrieval_run_id,
        count(*) AS n_r1_failures,
        count(*) FILTER (WHERE h.is_hub) AS n_r1_failures_top1_hub,
        avg(CASE WHEN h.is_hub THEN 1.0 WHEN h.is_hub IS NOT NULL THEN 0.0 END) AS share_r1_failures_top1_hub
    FROM retrieval_ranks r
    LEFT JOIN image_hubness h ON h.retrieval_run_id = r.retrieval_run_id AND h.gallery_id = r.top1_id
    WHERE r.gt_rank > 1
    GROUP BY r.retrieval_run_id
),
final AS (
    SELECT
        p.retrieval_run_id,
        p.direction,
        p.n_queries,
        p.n_gallery,
        p.hub_threshold,
        p.skewness_n10,
        p.skewness_n1,
        p.max_n10,
        p.max_n1,
        p.n_hubs,
        p.share_never_top10,
        p.share_never_top1,
        coalesce(f.n_r1_failures, 0) AS n_r1_failures,
        coalesce(f.n_r1_failures_top1_hub, 0) AS n_r1_failures_top1_hub,
        f.share_r1_failures_top1_hub
    FROM per_run p
    LEFT JOIN failures f ON f.retrieval_run_id = p.retrieval_run_id
)
SELECT * FROM final
ORDER BY retrieval_run_id
