-- run_pairs: one row per (comparison, query) of a `clipfail compare RUN_A RUN_B`: the query's rank in
-- run A and in run B (gt_rank as retrieval_ranks stores it, optimistic ties), rank_change =
-- rank_b - rank_a (negative: B ranks the ground truth higher), and hit@1/5/10 of each run (rank <= K).
-- Ties: n_tied_a / n_tied_b count the other items with exactly the ground truth's score in each run, and
-- rank_a_pessimistic / rank_b_pessimistic = rank + n_tied, the worst place among them (run_comparison
-- counts those for a tie-affected comparison).
-- Both runs rank the same queries (compare refuses anything else). Ordered by comparison, then query id.
-- Reads: run_comparisons, retrieval_ranks.
CREATE OR REPLACE VIEW run_pairs AS
WITH run_comparisons AS (
    SELECT run_comparison_id, retrieval_run_a_id, retrieval_run_b_id, direction FROM run_comparisons
),
retrieval_ranks AS (
    SELECT retrieval_run_id, query_id, gt_rank, n_tied FROM retrieval_ranks
),
final AS (
    SELECT
        c.run_comparison_id,
        c.retrieval_run_a_id,
        c.retrieval_run_b_id,
        c.direction,
        a.query_id,
        a.gt_rank AS rank_a,
        b.gt_rank AS rank_b,
        b.gt_rank - a.gt_rank AS rank_change,
        a.gt_rank <= 1 AS is_hit_a_at_1,
        a.gt_rank <= 5 AS is_hit_a_at_5,
        a.gt_rank <= 10 AS is_hit_a_at_10,
        b.gt_rank <= 1 AS is_hit_b_at_1,
        b.gt_rank <= 5 AS is_hit_b_at_5,
        b.gt_rank <= 10 AS is_hit_b_at_10,
        a.n_tied AS n_tied_a,
        b.n_tied AS n_tied_b,
        a.gt_rank + a.n_tied AS rank_a_pessimistic,
        b.gt_rank + b.n_tied AS rank_b_pessimistic
    FROM run_comparisons c
    JOIN retrieval_ranks a ON a.retrieval_run_id = c.retrieval_run_a_id
    JOIN retrieval_ranks b ON b.retrieval_run_id = c.retrieval_run_b_id AND b.query_id = a.query_id
)
SELECT * FROM final
ORDER BY run_comparison_id, query_id
