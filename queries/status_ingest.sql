-- status_ingest: what `clipfail status` says of the ingest stage: one row per subset with its images and
-- captions, and what comes next for it (embedding it, while no image or text embedding set exists for it).
-- Every status_<stage> view has the same columns, so that `status` lists them all without knowing the stages:
-- stage, stage_order (its place in the study: ingest 1, embed 2, evaluate 3, compare 4, triage 5,
-- sample-failures 6, import-labels 7, improve 8, method-comparison 9, report 10), subset, model, detail, rows
-- (what was stored, as text), next_step (the command that carries the row on; NULL when nothing is left; a
-- step of several lines is joined by newlines), next_kind ('blocking': the study waits on it, and the first
-- blocking row in stage order is the only next step; 'suggested': listed as a next step when nothing blocks;
-- 'optional': shown on the row only), is_simulated (labels written by the demo's simulated annotators).
-- Rows: by subset.
-- Reads: subsets, subset_images, subset_captions, embedding_sets.
CREATE OR REPLACE VIEW status_ingest AS
WITH subsets AS (
    SELECT subset_id, name FROM subsets
),
subset_images AS (
    SELECT subset_id, image_id FROM subset_images
),
subset_captions AS (
    SELECT subset_id, caption_id FROM subset_captions
),
embedding_sets AS (
    SELECT subset_id, kind FROM embedding_sets
),
n_images AS (
    SELECT subset_id, count(*) AS n FROM subset_images GROUP BY subset_id
),
n_captions AS (
    SELECT subset_id, count(*) AS n FROM subset_captions GROUP BY subset_id
),
embedded AS (
    SELECT DISTINCT subset_id FROM embedding_sets WHERE kind IN ('image', 'text')
),
final AS (
    SELECT
        'ingest' AS stage,
        1 AS stage_order,
        s.name AS subset,
        '' AS model,
        'subset ' || s.subset_id AS detail,
        coalesce(i.n, 0) || ' images, ' || coalesce(c.n, 0) || ' captions' AS rows,
        CASE
            WHEN e.subset_id IS NULL
                THEN 'Embed the subset:  clipfail embed --subset ' || s.name || ' --model openai/clip-vit-base-patch32'
        END AS next_step,
        CASE WHEN e.subset_id IS NULL THEN 'blocking' END AS next_kind,
        false AS is_simulated,
        s.subset_id  -- sort key only
    FROM subsets s
    LEFT JOIN n_images i ON i.subset_id = s.subset_id
    LEFT JOIN n_captions c ON c.subset_id = s.subset_id
    LEFT JOIN embedded e ON e.subset_id = s.subset_id
)
SELECT * EXCLUDE (subset_id) FROM final
ORDER BY subset_id
