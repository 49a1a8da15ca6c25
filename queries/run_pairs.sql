-- run_pairs: one row per (comparison, query) of a `clipfail compare RUN_A RUN_B`: the query's rank in
-- run A and in run B (gt_rank, optimistic ties, as retrieval_ranks stores it), rank_change =
-- rank_b - rank_a (negative: B ranks the ground truth higher), and hit@1/5/10 of each run
-- (rank <= K). Both runs rank the same queries (compare refuses anything else).
create or replace view run_pairs as
with run_comparisons as (
    select run_comparison_id, retrieval_run_a_id, retrieval_run_b_id, direction from run_comparisons
),

retrieval_ranks as (
    select retrieval_run_id, query_id, gt_rank from retrieval_ranks
),

final as (
    select
        c.run_comparison_id,
        c.retrieval_run_a_id,
        c.retrieval_run_b_id,
        c.direction,
        a.query_id,
        a.gt_rank as rank_a,
        b.gt_rank as rank_b,
        b.gt_rank - a.gt_rank as rank_change,
        a.gt_rank <= 1 as is_hit_a_at_1,
        a.gt_rank <= 5 as is_hit_a_at_5,
        a.gt_rank <= 10 as is_hit_a_at_10,
        b.gt_rank <= 1 as is_hit_b_at_1,
        b.gt_rank <= 5 as is_hit_b_at_5,
        b.gt_rank <= 10 as is_hit_b_at_10
    from run_comparisons as c
    inner join retrieval_ranks as a on a.retrieval_run_id = c.retrieval_run_a_id
    inner join retrieval_ranks as b on b.retrieval_run_id = c.retrieval_run_b_id and b.query_id = a.query_id
)

select * from final
order by run_comparison_id, query_id
