-- status_explain: what `clipfail status` says of phrase ablation: one row per explain run with its failures,
-- variants and the failures where the extractor found no phrase, and what comes next (optional): reading which
-- roles the model's misses hang on (view failure_blame; blame_agreement once the run's failures have labels).
-- Columns: as status_ingest. Rows: by explain run.
-- Reads: explain_runs, retrieval_runs, subsets.
CREATE OR REPLACE VIEW status_explain AS
WITH explain_runs AS (
    SELECT explain_run_id, retrieval_run_id, scope, roles, n_failures, n_no_phrase, n_variants FROM explain_runs
),
retrieval_runs AS (
    SELECT retrieval_run_id, subset_id, model FROM retrieval_runs
),
subsets AS (
    SELECT subset_id, name FROM subsets
),
final AS (
    SELECT
        'explain' AS stage,
        7 AS stage_order,
        s.name AS subset,
        r.model,
        'explain run ' || e.explain_run_id || ' of retrieval run ' || e.retrieval_run_id || ' (' || e.scope
            || '; ' || e.roles || ')' AS detail,
        e.n_variants || ' variants of ' || e.n_failures || ' R@1 failures (' || e.n_no_phrase
            || ' with no phrase)' AS rows,
        'See which phrases the misses hang on:  clipfail sql "select * from failure_blame where explain_run_id = '
            || e.explain_run_id || '"' AS next_step,
        'optional' AS next_kind,
        false AS is_simulated,
        e.explain_run_id  -- sort key only
    FROM explain_runs e
    JOIN retrieval_runs r ON r.retrieval_run_id = e.retrieval_run_id
    JOIN subsets s ON s.subset_id = r.subset_id
)
SELECT * EXCLUDE (explain_run_id) FROM final
ORDER BY explain_run_id
