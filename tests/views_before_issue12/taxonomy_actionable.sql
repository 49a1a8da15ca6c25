-- taxonomy_actionable: taxonomy_distribution without the non-actionable categories
-- (is_actionable = false: Ambiguous), with the percentages re-normalised over what is left.
-- Grouped by retrieval run. Rounding rules: see taxonomy_percentages.sql.
CREATE OR REPLACE VIEW taxonomy_actionable AS
SELECT retrieval_run_id, rank, category, count, percent, percent_lr, n_total, is_simulated
FROM taxonomy_percentages
WHERE scope = 'actionable'
ORDER BY retrieval_run_id, rank
