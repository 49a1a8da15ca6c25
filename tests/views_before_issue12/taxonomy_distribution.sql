-- taxonomy_distribution: the reference study's table. One row per category: how many labelled
-- failures fall in it, merged over annotators and excluding the overlap set (whose labels
-- measure agreement; see annotator_agreement), with percent (2 decimals, round half up, as the
-- reference study printed it) and percent_lr (largest remainder, sums to exactly 100.00).
-- Grouped by retrieval run: filter on retrieval_run_id when a database holds several.
-- Rounding rules: see taxonomy_percentages.sql.
CREATE OR REPLACE VIEW taxonomy_distribution AS
SELECT retrieval_run_id, rank, category, is_actionable, count, percent, percent_lr, n_total, is_simulated
FROM taxonomy_percentages
WHERE scope = 'overall'
ORDER BY retrieval_run_id, rank
