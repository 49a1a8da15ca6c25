-- retrieval_run_provenance: one row per retrieval run: what made its numbers. The subset (name, id, size,
-- captions per image, sampling seed, the captions file as stored: relative to the study's folder when under
-- it, and its sha256), the model and its weights (pretrained tag or checkpoint sha256, precision), both
-- embedding sets with their file's sha256, the direction, the tie policy and the top-k stored per query.
-- Rows: by retrieval run.
-- Reads: retrieval_runs, subsets, embedding_sets.
CREATE OR REPLACE VIEW retrieval_run_provenance AS
WITH retrieval_runs AS (
    SELECT
        retrieval_run_id, subset_id, model, image_embedding_set_id, text_embedding_set_id, direction, tie_policy,
        topk
    FROM retrieval_runs
),
subsets AS (
    SELECT subset_id, name, num_images, captions_per_image, seed, source_file, source_sha256 FROM subsets
),
embedding_sets AS (
    SELECT embedding_set_id, pretrained, checkpoint_sha256, precision, sha256 FROM embedding_sets
),
final AS (
    SELECT
        r.retrieval_run_id,
        s.name AS subset,
        s.subset_id,
        s.num_images,
        s.captions_per_image,
        s.seed AS subset_seed,
        s.source_file,
        s.source_sha256,
        r.model,
        ie.pretrained,
        ie.checkpoint_sha256,
        ie.precision,
        r.image_embedding_set_id,
        ie.sha256 AS image_embeddings_sha256,
        r.text_embedding_set_id,
        te.sha256 AS text_embeddings_sha256,
        r.direction,
        r.tie_policy,
        r.topk
    FROM retrieval_runs r
    JOIN subsets s ON s.subset_id = r.subset_id
    JOIN embedding_sets ie ON ie.embedding_set_id = r.image_embedding_set_id
    JOIN embedding_sets te ON te.embedding_set_id = r.text_embedding_set_id
)
SELECT * FROM final
ORDER BY retrieval_run_id
