-- image_hubness: one row per retrieval run and gallery item: its k-occurrence for k = 1 and 10 (how many of
-- the run's queries have it in their top k: N_1 from retrieval_ranks.top1_id, N_10 from the first 10 entries
-- of retrieval_ranks.topk_ids), and whether it is a hub. Both directions: the gallery is every row of the
-- embedding set the run ranked against, images (text-to-image; the view's name) or captions (image-to-text),
-- so an item that no query retrieved has N_k = 0.
-- Hub threshold (a documented choice, the factor 3 that `clipfail triage` uses for N_1):
--   hub_threshold = ceil(3 * least(10, n_gallery) * n_queries / n_gallery),
-- three times the N_10 an item would have if the top-10 lists were spread evenly (the mean N_10);
-- is_hub = N_10 >= hub_threshold. N_10, hub_threshold and is_hub are NULL for a run stored with top-k < 10
-- (evaluate again with --topk 10). Rows: by run, N_10 descending (NULLs last), N_1 descending, item id.
-- Reads: retrieval_runs, embedding_rows, retrieval_ranks.
CREATE OR REPLACE VIEW image_hubness AS
WITH retrieval_runs AS (
    SELECT retrieval_run_id, direction, topk, text_embedding_set_id, image_embedding_set_id
    FROM retrieval_runs
),
embedding_rows AS (
    SELECT embedding_set_id, item_id FROM embedding_rows
),
retrieval_ranks AS (
    SELECT retrieval_run_id, top1_id, topk_ids FROM retrieval_ranks
),
gallery AS (
    SELECT r.retrieval_run_id, r.direction, r.topk, e.item_id AS gallery_id
    FROM retrieval_runs r
    JOIN embedding_rows e
        ON e.embedding_set_id = CASE WHEN r.direction = 'text-to-image' THEN r.image_embedding_set_id
                                     ELSE r.text_embedding_set_id END
),
n_1 AS (
    SELECT retrieval_run_id, top1_id AS gallery_id, count(*) AS n_1
    FROM retrieval_ranks
    GROUP BY ALL
),
top10 AS (
    SELECT retrieval_run_id, unnest(topk_ids[1:10]) AS gallery_id FROM retrieval_ranks
),
n_10 AS (
    SELECT retrieval_run_id, gallery_id, count(*) AS n_10 FROM top10 GROUP BY ALL
),
n_queries AS (
    SELECT retrieval_run_id, count(*) AS n_queries FROM retrieval_ranks GROUP BY ALL
),
n_gallery AS (
    SELECT retrieval_run_id, count(*) AS n_gallery FROM gallery GROUP BY ALL
),
thresholds AS (
    SELECT
        q.retrieval_run_id,
        q.n_queries,
        s.n_gallery,
        ceil(3.0 * least(10, s.n_gallery) * q.n_queries / s.n_gallery)::BIGINT AS hub_threshold
    FROM n_queries q
    JOIN n_gallery s ON s.retrieval_run_id = q.retrieval_run_id
),
final AS (
    SELECT
        g.retrieval_run_id,
        g.direction,
        CASE WHEN g.direction = 'text-to-image' THEN 'image' ELSE 'caption' END AS gallery_kind,
        g.gallery_id,
        coalesce(a.n_1, 0) AS n_1,
        CASE WHEN g.topk >= 10 THEN coalesce(b.n_10, 0) END AS n_10,
        t.n_queries,
        t.n_gallery,
        CASE WHEN g.topk >= 10 THEN t.hub_threshold END AS hub_threshold,
        CASE WHEN g.topk >= 10 THEN coalesce(b.n_10, 0) >= t.hub_threshold END AS is_hub
    FROM gallery g
    JOIN thresholds t ON t.retrieval_run_id = g.retrieval_run_id
    LEFT JOIN n_1 a ON a.retrieval_run_id = g.retrieval_run_id AND a.gallery_id = g.gallery_id
    LEFT JOIN n_10 b ON b.retrieval_run_id = g.retrieval_run_id AND b.gallery_id = g.gallery_id
)
SELECT * FROM final
ORDER BY retrieval_run_id, n_10 DESC NULLS LAST, n_1 DESC, gallery_id
