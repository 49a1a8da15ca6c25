-- improvement_subset_keys: one row per improvement run: subset_key, an md5 of what makes its captions and
-- prompts (the templates' content hash, then every caption id with its label, in caption order). Two runs
-- with the same key scored the same captions with the same templates (they differ in pooling or tau only),
-- so the report puts them under one heading; runs of the same categories with other captions (another
-- --max-subset, --seed, --include-overlap, or labels imported since) or other templates get their own.
-- A run without templates (a method other than prompt ensembling: templates_sha256 NULL) hashes '' for them.
-- Rows: by retrieval run, improvement run.
-- Reads: improvement_runs, improvement_ranks.
CREATE OR REPLACE VIEW improvement_subset_keys AS
WITH improvement_runs AS (
    SELECT improvement_id, retrieval_run_id, templates_sha256 FROM improvement_runs
),
improvement_ranks AS (
    SELECT improvement_id, caption_id, category FROM improvement_ranks
),
final AS (
    SELECT
        u.improvement_id,
        u.retrieval_run_id,
        md5(
            coalesce(u.templates_sha256, '') || '|'
            || string_agg(r.caption_id::VARCHAR || ':' || coalesce(r.category, ''), ',' ORDER BY r.caption_id)
        ) AS subset_key
    FROM improvement_runs u
    JOIN improvement_ranks r ON r.improvement_id = u.improvement_id
    GROUP BY u.improvement_id, u.retrieval_run_id, u.templates_sha256
)
SELECT * FROM final
ORDER BY retrieval_run_id, improvement_id
