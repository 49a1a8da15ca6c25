-- status_method_comparison: what `clipfail status` says of the comparison of improvement methods (view
-- method_comparison, every method's runs on the labelled failures, plugins' included): one row per retrieval run
-- with the methods compared and over how many categories, and what comes next (optional) while only one method
-- was run: another fix on the same categories. Columns: as status_ingest. Rows: by retrieval run.
-- Reads: method_comparison, retrieval_runs, subsets.
CREATE OR REPLACE VIEW status_method_comparison AS
WITH method_comparison AS (
    SELECT retrieval_run_id, category, method, improvement_id FROM method_comparison
),
retrieval_runs AS (
    SELECT retrieval_run_id, subset_id, model FROM retrieval_runs
),
subsets AS (
    SELECT subset_id, name FROM subsets
),
compared AS (
    SELECT
        retrieval_run_id,
        string_agg(DISTINCT method, ', ' ORDER BY method) AS methods,
        count(DISTINCT method) AS n_methods,
        count(DISTINCT improvement_id) AS n_runs,
        count(DISTINCT category) FILTER (WHERE category <> '*') AS n_categories
    FROM method_comparison
    GROUP BY retrieval_run_id
),
final AS (
    SELECT
        'method-comparison' AS stage,
        9 AS stage_order,
        coalesce(s.name, '') AS subset,
        coalesce(r.model, '') AS model,
        'retrieval run ' || c.retrieval_run_id || ', methods ' || c.methods AS detail,
        c.n_runs || ' improvement runs over ' || c.n_categories || ' categories' AS rows,
        CASE
            WHEN c.n_methods = 1
                THEN 'Compare another fix:  clipfail improve --method qb-norm --categories ... --control successes:200'
        END AS next_step,
        CASE WHEN c.n_methods = 1 THEN 'optional' END AS next_kind,
        false AS is_simulated,
        c.retrieval_run_id  -- sort key only
    FROM compared c
    LEFT JOIN retrieval_runs r ON r.retrieval_run_id = c.retrieval_run_id
    LEFT JOIN subsets s ON s.subset_id = r.subset_id
)
SELECT * EXCLUDE (retrieval_run_id) FROM final
ORDER BY retrieval_run_id
