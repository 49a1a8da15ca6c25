-- status_report: what `clipfail status` says of the report: one row, when a report was written (when it was
-- last written) or when none was and a text-to-image retrieval run exists ('not written yet'), with what comes
-- next (suggested) while no report is newer than every other stage's last run: writing it. A tables-only report
-- (`report --no-figures`, "figures": false in its run's config) is named as such and does not count as the report:
-- its figures were never drawn, so writing the report stays suggested.
-- Columns: as status_ingest.
-- Reads: runs, retrieval_runs.
CREATE OR REPLACE VIEW status_report AS
WITH runs AS (
    SELECT stage, finished_at, config_json FROM runs
),
retrieval_runs AS (
    SELECT retrieval_run_id, direction FROM retrieval_runs
),
marked AS (
    SELECT
        stage,
        finished_at,
        stage = 'report' AND coalesce(json_extract_string(config_json, '$.figures') = 'false', false) AS tables_only
    FROM runs
),
times AS (
    SELECT
        max(finished_at) FILTER (WHERE stage = 'report' AND NOT tables_only) AS last_report,
        max(finished_at) FILTER (WHERE tables_only) AS last_tables_only,
        max(finished_at) FILTER (WHERE stage <> 'report') AS last_other
    FROM marked
),
final AS (
    SELECT
        'report' AS stage,
        10 AS stage_order,
        '' AS subset,
        '' AS model,
        CASE
            WHEN t.last_report IS NULL THEN 'not written yet'
            ELSE 'last written ' || strftime(t.last_report, '%Y-%m-%d %H:%M')
        END
        || CASE
            WHEN t.last_tables_only IS NOT NULL AND (t.last_report IS NULL OR t.last_tables_only > t.last_report)
                THEN '; a tables-only one (--no-figures) ' || strftime(t.last_tables_only, '%Y-%m-%d %H:%M')
            ELSE ''
        END AS detail,
        '' AS rows,
        CASE
            WHEN t.last_report IS NULL OR t.last_report < t.last_other
                THEN 'Write the report:  clipfail report --out report/'
        END AS next_step,
        CASE WHEN t.last_report IS NULL OR t.last_report < t.last_other THEN 'suggested' END AS next_kind,
        false AS is_simulated
    FROM times t
    WHERE t.last_report IS NOT NULL
        OR t.last_tables_only IS NOT NULL
        OR EXISTS (SELECT 1 FROM retrieval_runs WHERE direction = 'text-to-image')
)
SELECT * FROM final
ORDER BY stage
