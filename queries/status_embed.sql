-- status_embed: what `clipfail status` says of the embed stage: one row per subset and model (weights and
-- precision) with its image and text embedding sets and their rows, and what comes next (ranking the
-- subset's captions, while no text-to-image retrieval run exists for the subset). Columns: as status_ingest.
-- Rows: by the first embedding set of each row.
-- Reads: embedding_sets, subsets, retrieval_runs.
CREATE OR REPLACE VIEW status_embed AS
WITH embedding_sets AS (
    SELECT embedding_set_id, kind, subset_id, model, pretrained, checkpoint_sha256, precision, rows
    FROM embedding_sets
),
subsets AS (
    SELECT subset_id, name FROM subsets
),
retrieval_runs AS (
    SELECT subset_id, direction FROM retrieval_runs
),
evaluated AS (
    SELECT DISTINCT subset_id FROM retrieval_runs WHERE direction = 'text-to-image'
),
grouped AS (
    SELECT
        s.subset_id,
        s.name AS subset,
        e.model,
        e.pretrained,
        e.checkpoint_sha256,
        e.precision,
        string_agg(e.kind || ' set ' || e.embedding_set_id, ', ' ORDER BY e.kind, e.embedding_set_id) AS sets,
        string_agg(e.rows || ' ' || e.kind, ', ' ORDER BY e.kind, e.embedding_set_id) AS n_rows,
        min(e.embedding_set_id) AS first_set_id
    FROM embedding_sets e
    JOIN subsets s ON s.subset_id = e.subset_id
    WHERE e.kind IN ('image', 'text')
    GROUP BY s.subset_id, s.name, e.model, e.pretrained, e.checkpoint_sha256, e.precision
),
final AS (
    SELECT
        'embed' AS stage,
        2 AS stage_order,
        g.subset,
        concat(
            g.model, ' (',
            CASE
                WHEN g.checkpoint_sha256 <> '' THEN 'checkpoint ' || left(g.checkpoint_sha256, 12)
                WHEN g.pretrained <> '' THEN g.pretrained
                ELSE 'no pretrained tag'
            END,
            ', ', g.precision, ')'
        ) AS model,
        g.sets AS detail,
        g.n_rows AS rows,
        CASE WHEN v.subset_id IS NULL THEN 'Rank the captions:  clipfail evaluate --subset ' || g.subset END AS next_step,
        CASE WHEN v.subset_id IS NULL THEN 'blocking' END AS next_kind,
        false AS is_simulated,
        g.first_set_id  -- sort key only
    FROM grouped g
    LEFT JOIN evaluated v ON v.subset_id = g.subset_id
)
SELECT * EXCLUDE (first_set_id) FROM final
ORDER BY first_set_id
