-- taxonomy_by_annotator: the taxonomy table of each annotator's own set (overlap excluded, as in
-- taxonomy_distribution, so that the per-annotator counts add up to its counts).
-- Grouped by retrieval run and annotator. Rounding rules: see taxonomy_percentages.sql.
-- Reads: taxonomy_percentages (scope 'by_annotator').
CREATE OR REPLACE VIEW taxonomy_by_annotator AS
WITH taxonomy_percentages AS (
    SELECT
        retrieval_run_id, scope, annotator, rank, category, is_actionable, count, percent, percent_lr, n_total,
        is_simulated
    FROM taxonomy_percentages
),
final AS (
    SELECT
        retrieval_run_id, annotator, rank, category, is_actionable, count, percent, percent_lr, n_total,
        is_simulated
    FROM taxonomy_percentages
    WHERE scope = 'by_annotator'
)
SELECT * FROM final
ORDER BY retrieval_run_id, annotator, rank
