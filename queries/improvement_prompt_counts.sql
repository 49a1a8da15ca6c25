-- improvement_prompt_counts: one row per improvement run and effective K (view improvement_effective_k summed
-- over the run's categories): how many of its captions got that many distinct prompts. Rows: by improvement
-- run, effective K descending (the most prompts first).
-- Reads: improvement_effective_k.
CREATE OR REPLACE VIEW improvement_prompt_counts AS
WITH improvement_effective_k AS (
    SELECT improvement_id, effective_k, n_captions FROM improvement_effective_k
),
final AS (
    SELECT improvement_id, effective_k, sum(n_captions) AS n_captions
    FROM improvement_effective_k
    GROUP BY improvement_id, effective_k
)
SELECT * FROM final
ORDER BY improvement_id, effective_k DESC
