-- status_improve: what `clipfail status` says of the improve stage: one row per retrieval run and improvement
-- method (improvement_runs.method; NULL, for runs made before there were methods, is prompt ensembling,
-- 'templates'), so every method's runs show up, a plugin's included: its improvement runs, the invocations that
-- made them, their populations and ranks, and what comes next (optional) for a method run on the labelled
-- failures only: a control on R@1 successes, which measures what it breaks. Columns: as status_ingest.
-- Rows: by retrieval run, then method.
-- Reads: improvement_runs, improvement_ranks, retrieval_runs, subsets.
CREATE OR REPLACE VIEW status_improve AS
WITH improvement_runs AS (
    SELECT improvement_id, run_id, retrieval_run_id, population, method FROM improvement_runs
),
improvement_ranks AS (
    SELECT improvement_id, caption_id FROM improvement_ranks
),
retrieval_runs AS (
    SELECT retrieval_run_id, subset_id, model FROM retrieval_runs
),
subsets AS (
    SELECT subset_id, name FROM subsets
),
runs_of_method AS (
    SELECT improvement_id, run_id, retrieval_run_id, population, coalesce(method, 'templates') AS method
    FROM improvement_runs
),
n_ranks AS (
    SELECT improvement_id, count(*) AS n FROM improvement_ranks GROUP BY improvement_id
),
methods AS (
    SELECT
        u.retrieval_run_id,
        u.method,
        count(DISTINCT u.improvement_id) AS n_runs,
        count(DISTINCT u.run_id) AS n_invocations,
        string_agg(DISTINCT u.population, ',' ORDER BY u.population) AS populations,
        bool_or(u.population <> 'failures') AS has_control,
        coalesce(sum(k.n), 0) AS n_ranks
    FROM runs_of_method u
    LEFT JOIN n_ranks k ON k.improvement_id = u.improvement_id
    GROUP BY u.retrieval_run_id, u.method
),
final AS (
    SELECT
        'improve' AS stage,
        8 AS stage_order,
        coalesce(s.name, '') AS subset,
        coalesce(r.model, '') AS model,
        'retrieval run ' || m.retrieval_run_id || ', method ' || m.method || ', populations ' || m.populations
            AS detail,
        m.n_runs || ' improvement runs from ' || m.n_invocations || ' invocations, ' || m.n_ranks || ' ranks'
            AS rows,
        CASE
            WHEN NOT m.has_control
                THEN 'Measure what it breaks:  clipfail improve --method ' || m.method
                    || ' --categories ... --control successes:200'
        END AS next_step,
        CASE WHEN NOT m.has_control THEN 'optional' END AS next_kind,
        false AS is_simulated,
        m.retrieval_run_id,  -- sort key only
        m.method AS method_name  -- sort key only
    FROM methods m
    LEFT JOIN retrieval_runs r ON r.retrieval_run_id = m.retrieval_run_id
    LEFT JOIN subsets s ON s.subset_id = r.subset_id
)
SELECT * EXCLUDE (retrieval_run_id, method_name) FROM final
ORDER BY retrieval_run_id, method_name
