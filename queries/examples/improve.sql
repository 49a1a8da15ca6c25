-- Example ad-hoc queries over the improve stage (README: improve). Run with clipfail sql "..." or any DuckDB client.

-- the reference study's table: one row per improvement run (a pooling of one subset, template mode and K), improved
-- R@1/5/10 and the deltas, for the failure subsets
SELECT improvement_id, categories, template_mode, k_prompts, pooling, tau, n,
       max(improved_pct) FILTER (WHERE k = 1) AS r1, max(improved_pct) FILTER (WHERE k = 5) AS r5,
       max(improved_pct) FILTER (WHERE k = 10) AS r10,
       max(delta_pp) FILTER (WHERE k = 1) AS d1, max(delta_pp) FILTER (WHERE k = 5) AS d5,
       max(delta_pp) FILTER (WHERE k = 10) AS d10
FROM improvement_recall WHERE population = 'failures'
GROUP BY ALL ORDER BY categories, template_mode, k_prompts, pooling, tau, improvement_id;

-- deltas with their 95% bootstrap interval and exact McNemar p, and what the prompts fixed and broke
SELECT improvement_id, categories, population, pooling, k, delta_pp, ci_low_pp, ci_high_pp,
       round(mcnemar_p, 4) AS p, n_fixed, n_broken
FROM improvement_recall ORDER BY improvement_id, k;

-- net effect on the controls: how many R@1 successes the fix breaks
SELECT categories, pooling, n, n_broken, delta_pp
FROM improvement_recall WHERE population = 'successes' AND k = 1 ORDER BY categories, pooling;

-- per category within mixed runs
SELECT improvement_id, pooling, category, k, n, baseline_pct, improved_pct, delta_pp
FROM category_recall_delta WHERE population = 'failures' ORDER BY improvement_id, category, k;

-- captions that moved most, with their prompts' K
SELECT r.improvement_id, r.caption_id, c.text, r.baseline_rank, r.improved_rank, r.n_prompts
FROM improvement_ranks r JOIN captions c USING (caption_id)
ORDER BY r.improved_rank - r.baseline_rank LIMIT 20;

-- the prompt-embedding cache: shards and prompts per model
SELECT es.model, es.precision, count(DISTINCT es.embedding_set_id) AS shards, count(*) AS prompts
FROM embedding_sets es JOIN embedding_rows er USING (embedding_set_id)
WHERE es.kind = 'prompt' GROUP BY ALL;

-- how many prompts each caption really got (effective K) against the K asked for, per run and category
SELECT improvement_id, population, template_set, k_prompts, category, effective_k, n_captions, pct_of_category
FROM improvement_effective_k WHERE pooling = 'max' ORDER BY improvement_id, category, effective_k DESC;

-- ties: which count each run's figures use (tie_count 'pessimistic': its ties would otherwise have counted for it),
-- with R@1 under both counts
SELECT t.improvement_id, t.method, t.population, t.n_captions, t.n_improved_tied, t.max_gap_pp, t.tie_count,
       r.improved_pct_optimistic, r.improved_pct_pessimistic, r.delta_pp
FROM improvement_ties t JOIN improvement_recall r USING (improvement_id)
WHERE r.k = 1 ORDER BY t.tie_count DESC, t.improvement_id;
