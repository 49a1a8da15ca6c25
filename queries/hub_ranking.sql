-- hub_ranking: one row per retrieval run and gallery item (view image_hubness), ranked by how often queries
-- retrieve it: hub_rank 1 is the item most often in a top 10 (N_10 descending, NULLs last, then N_1
-- descending, then item id), with the picture's path for images (rel_path under the subset's image_root;
-- NULL for captions, the gallery of image-to-text runs). Rows: by run, hub_rank.
-- Reads: image_hubness, retrieval_runs, subsets, images.
CREATE OR REPLACE VIEW hub_ranking AS
WITH image_hubness AS (
    SELECT retrieval_run_id, gallery_kind, gallery_id, n_1, n_10, is_hub FROM image_hubness
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
final AS (
    SELECT
        h.retrieval_run_id,
        row_number() OVER (
            PARTITION BY h.retrieval_run_id ORDER BY h.n_10 DESC NULLS LAST, h.n_1 DESC, h.gallery_id
        ) AS hub_rank,
        h.gallery_kind,
        h.gallery_id,
        h.n_1,
        h.n_10,
        h.is_hub,
        i.rel_path,
        s.image_root
    FROM image_hubness h
    JOIN retrieval_runs r ON r.retrieval_run_id = h.retrieval_run_id
    JOIN subsets s ON s.subset_id = r.subset_id
    LEFT JOIN images i ON i.image_id = h.gallery_id AND h.gallery_kind = 'image'
)
SELECT * FROM final
ORDER BY retrieval_run_id, hub_rank
