-- Example ad-hoc queries over the label views (README: analyze). Run with clipfail sql "..." or any DuckDB client.

-- the reference table for one retrieval run
SELECT category, count, percent FROM taxonomy_distribution WHERE retrieval_run_id = 1 ORDER BY rank;

-- how often each pair of annotators agreed, and Fleiss' kappa over all of them
SELECT measure, annotators, n_items, percent_agreement, round(kappa, 3) AS kappa
FROM annotator_agreement WHERE retrieval_run_id = 1;

-- overlap samples the annotators split on, with what each said
SELECT s.sample_id, s.category AS majority, s.is_tie, string_agg(a.annotator || ':' || a.category, ', ') AS labels
FROM sample_labels s JOIN annotations a USING (sample_id)
WHERE s.is_overlap AND s.n_votes < s.n_labels
GROUP BY ALL ORDER BY s.sample_id;

-- Object failures whose ground truth was nearly found: caption, images and scores
SELECT sample_id, caption, gt_file_name, gt_rank, top1_file_name, round(score_gap, 4) AS gap
FROM failure_details WHERE category = 'Object' AND gt_rank <= 5 ORDER BY score_gap;

-- does the score gap differ by category?
SELECT category, count(*) AS n, round(median(gt_rank)) AS median_rank, round(avg(score_gap), 4) AS mean_gap
FROM failure_details WHERE category IS NOT NULL AND NOT is_overlap  -- as the taxonomy tables count
GROUP BY category ORDER BY n DESC;
