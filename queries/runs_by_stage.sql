-- runs_by_stage: one row per stage that has run (table runs): how many runs it has and when the last one
-- finished. Rows: in the order the stages first ran.
-- Reads: runs.
CREATE OR REPLACE VIEW runs_by_stage AS
WITH runs AS (
    SELECT run_id, stage, finished_at FROM runs
),
final AS (
    SELECT stage, count(*) AS runs, max(finished_at) AS last_finished_at, min(run_id) AS first_run_id
    FROM runs
    GROUP BY stage
)
SELECT * EXCLUDE (first_run_id) FROM final
ORDER BY first_run_id
