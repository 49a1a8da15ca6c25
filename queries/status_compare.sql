-- status_compare: what `clipfail status` says of comparisons of two retrieval runs (`clipfail compare`, view
-- run_comparison): one row per comparison with its paired queries and ΔR@1 (pp, B - A), or, while there is none
-- and a retrieval run exists, one row saying so, with what comes next (optional): evaluating a second model on
-- the same subset and comparing the two. Columns: as status_ingest. Rows: by comparison.
-- Reads: run_comparison, retrieval_runs.
CREATE OR REPLACE VIEW status_compare AS
WITH run_comparison AS (
    SELECT
        run_comparison_id, retrieval_run_a_id, retrieval_run_b_id, subset, direction, model_a, model_b, k,
        n_queries, delta_pp
    FROM run_comparison
),
retrieval_runs AS (
    SELECT retrieval_run_id FROM retrieval_runs
),
comparisons AS (
    SELECT
        'compare' AS stage,
        4 AS stage_order,
        subset,
        model_b || ' vs ' || model_a AS model,
        'comparison ' || run_comparison_id || ': run ' || retrieval_run_b_id || ' against run ' || retrieval_run_a_id
            || ' (' || direction || ')' AS detail,
        n_queries || ' paired queries, ΔR@1 ' || printf('%+.2f', delta_pp) || ' pp' AS rows,
        NULL AS next_step,
        NULL AS next_kind,
        false AS is_simulated,
        run_comparison_id
    FROM run_comparison
    WHERE k = 1
),
none_yet AS (
    SELECT
        'compare' AS stage,
        4 AS stage_order,
        '' AS subset,
        '' AS model,
        'no comparison of two retrieval runs yet' AS detail,
        '' AS rows,
        'Evaluate a second model on the same subset, then:  clipfail compare RUN_A RUN_B' AS next_step,
        'optional' AS next_kind,
        false AS is_simulated,
        NULL AS run_comparison_id
    WHERE NOT EXISTS (SELECT 1 FROM comparisons) AND EXISTS (SELECT 1 FROM retrieval_runs)
),
final AS (
    SELECT * FROM comparisons
    UNION ALL
    SELECT * FROM none_yet
)
SELECT * EXCLUDE (run_comparison_id) FROM final
ORDER BY run_comparison_id NULLS LAST
