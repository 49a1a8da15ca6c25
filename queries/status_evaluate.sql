-- status_evaluate: what `clipfail status` says of the evaluate stage: one row per retrieval run with its ranks
-- and R@1 failures (gt_rank > 1), and what comes next for a text-to-image run: sampling failures to label
-- while it has none (blocking for the newest such run while no run of the study has samples, else optional),
-- then, once sampled, triage (optional) while it has no triage run. Columns: as status_ingest.
-- Rows: by retrieval run.
-- Reads: retrieval_runs, subsets, retrieval_ranks, failure_samples, triage_runs.
CREATE OR REPLACE VIEW status_evaluate AS
WITH retrieval_runs AS (
    SELECT retrieval_run_id, subset_id, model, direction FROM retrieval_runs
),
subsets AS (
    SELECT subset_id, name FROM subsets
),
retrieval_ranks AS (
    SELECT retrieval_run_id, gt_rank FROM retrieval_ranks
),
failure_samples AS (
    SELECT retrieval_run_id, sample_id FROM failure_samples
),
triage_runs AS (
    SELECT retrieval_run_id, triage_run_id FROM triage_runs
),
ranks AS (
    SELECT retrieval_run_id, count(*) AS n_ranks, count(*) FILTER (WHERE gt_rank > 1) AS n_failures
    FROM retrieval_ranks
    GROUP BY retrieval_run_id
),
sampled AS (
    SELECT DISTINCT retrieval_run_id FROM failure_samples
),
triaged AS (
    SELECT DISTINCT retrieval_run_id FROM triage_runs
),
newest_t2i AS (
    SELECT max(retrieval_run_id) AS retrieval_run_id FROM retrieval_runs WHERE direction = 'text-to-image'
),
final AS (
    SELECT
        'evaluate' AS stage,
        3 AS stage_order,
        s.name AS subset,
        r.model,
        'retrieval run ' || r.retrieval_run_id || ' (' || r.direction || ')' AS detail,
        coalesce(k.n_ranks, 0) || ' ranks, ' || coalesce(k.n_failures, 0) || ' R@1 failures' AS rows,
        CASE
            WHEN r.direction <> 'text-to-image' THEN NULL
            WHEN f.retrieval_run_id IS NULL
                THEN 'Sample R@1 failures to label:  clipfail sample-failures --run ' || r.retrieval_run_id
                    || ' --out failure_analysis/'
            WHEN t.retrieval_run_id IS NULL
                THEN 'Suggest a category for every failure:  clipfail triage --run ' || r.retrieval_run_id
        END AS next_step,
        CASE
            WHEN r.direction <> 'text-to-image' THEN NULL
            WHEN f.retrieval_run_id IS NULL AND NOT EXISTS (SELECT 1 FROM sampled)
                AND r.retrieval_run_id = (SELECT retrieval_run_id FROM newest_t2i) THEN 'blocking'
            WHEN f.retrieval_run_id IS NULL OR t.retrieval_run_id IS NULL THEN 'optional'
        END AS next_kind,
        false AS is_simulated,
        r.retrieval_run_id  -- sort key only
    FROM retrieval_runs r
    JOIN subsets s ON s.subset_id = r.subset_id
    LEFT JOIN ranks k ON k.retrieval_run_id = r.retrieval_run_id
    LEFT JOIN sampled f ON f.retrieval_run_id = r.retrieval_run_id
    LEFT JOIN triaged t ON t.retrieval_run_id = r.retrieval_run_id
)
SELECT * EXCLUDE (retrieval_run_id) FROM final
ORDER BY retrieval_run_id
