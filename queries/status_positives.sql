-- status_positives: what `clipfail status` says of the extended positives (`clipfail positives import`): one row
-- per positive set, the newest of each source and subset, with its coverage (captions and images of the subset
-- that are queries of the source) and the pairs kept. No row while none was imported: the stage is optional
-- and only applies to a study whose ids are COCO's. Columns: as status_ingest (stage_order 1, after ingest).
-- Rows: by positive set.
-- Reads: positive_sets, subsets.
CREATE OR REPLACE VIEW status_positives AS
WITH positive_sets AS (
    SELECT
        positive_set_id, subset_id, source, source_version, n_pairs_kept, n_captions, n_captions_covered, n_images,
        n_images_covered
    FROM positive_sets
),
subsets AS (
    SELECT subset_id, name FROM subsets
),
newest AS (
    SELECT max(positive_set_id) AS positive_set_id FROM positive_sets GROUP BY subset_id, source
),
final AS (
    SELECT
        'positives' AS stage,
        1 AS stage_order,
        s.name AS subset,
        '' AS model,
        'positive set ' || p.positive_set_id || ': ' || p.source || coalesce(' ' || p.source_version, '') AS detail,
        p.n_captions_covered || ' of ' || p.n_captions || ' captions, ' || p.n_images_covered || ' of '
            || p.n_images || ' images covered; ' || p.n_pairs_kept || ' pairs' AS rows,
        NULL AS next_step,
        NULL AS next_kind,
        false AS is_simulated,
        p.positive_set_id  -- sort key only
    FROM positive_sets p
    SEMI JOIN newest USING (positive_set_id)
    JOIN subsets s USING (subset_id)
)
SELECT * EXCLUDE (positive_set_id) FROM final
ORDER BY positive_set_id
