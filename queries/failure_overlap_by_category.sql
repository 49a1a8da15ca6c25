-- failure_overlap_by_category: one row per (comparison, category) of a `clipfail compare RUN_A RUN_B`
-- of text-to-image runs, from the labelled R@1 failures (view sample_labels: every labelled sample
-- once, the overlap set by its majority label).
-- n_labelled_a: run A's labelled failures in the category; of those, n_fixed have rank 1 in run B
-- and n_shared still fail in B (rank > 1); percent_fixed = 100 * n_fixed / n_labelled_a, rounded
-- half up to 2 decimals in integer arithmetic. median_rank_a / median_rank_b: their ranks in A and B.
-- n_labelled_b / n_broken: run B's labelled failures in the category and how many of them A retrieved
-- at rank 1 (broken by the change from A to B); NULL when run B has no labelled failures at all.
-- is_simulated: some of these labels come from the demo's simulated annotators. category_position: the
-- category's place in the taxonomy (categories.position), the row order.
create or replace view failure_overlap_by_category as
with run_comparisons as (
    select run_comparison_id, retrieval_run_a_id, retrieval_run_b_id, direction from run_comparisons
),

sample_labels as (
    select retrieval_run_id, caption_id, category, is_simulated from main.sample_labels  -- a view (main.: retried until applied)
),

retrieval_ranks as (
    select retrieval_run_id, query_id, gt_rank from retrieval_ranks
),

categories as (
    select name as category, position from categories
),

labelled_a as (
    select c.run_comparison_id, l.category, l.is_simulated, ra.gt_rank as rank_a, rb.gt_rank as rank_b
    from run_comparisons as c
    inner join sample_labels as l on l.retrieval_run_id = c.retrieval_run_a_id
    inner join retrieval_ranks as ra on ra.retrieval_run_id = c.retrieval_run_a_id and ra.query_id = l.caption_id
    inner join retrieval_ranks as rb on rb.retrieval_run_id = c.retrieval_run_b_id and rb.query_id = l.caption_id
    where c.direction = 'text-to-image'
),

labelled_b as (
    select c.run_comparison_id, l.category, l.is_simulated, ra.gt_rank as rank_a, rb.gt_rank as rank_b
    from run_comparisons as c
    inner join sample_labels as l on l.retrieval_run_id = c.retrieval_run_b_id
    inner join retrieval_ranks as ra on ra.retrieval_run_id = c.retrieval_run_a_id and ra.query_id = l.caption_id
    inner join retrieval_ranks as rb on rb.retrieval_run_id = c.retrieval_run_b_id and rb.query_id = l.caption_id
    where c.direction = 'text-to-image'
),

per_category_a as (
    select
        run_comparison_id,
        category,
        count(*) as n_labelled_a,
        count(*) filter (where rank_b <= 1) as n_fixed,
        count(*) filter (where rank_b > 1) as n_shared,
        median(rank_a::double) as median_rank_a,
        median(rank_b::double) as median_rank_b,
        bool_or(is_simulated) as is_simulated
    from labelled_a
    group by run_comparison_id, category
),

per_category_b as (
    select
        run_comparison_id,
        category,
        count(*) as n_labelled_b,
        count(*) filter (where rank_a <= 1) as n_broken,
        bool_or(is_simulated) as is_simulated
    from labelled_b
    group by run_comparison_id, category
),

comparisons_labelled_b as (
    select distinct run_comparison_id from labelled_b
),

final as (
    select
        coalesce(a.run_comparison_id, b.run_comparison_id) as run_comparison_id,
        coalesce(a.category, b.category) as category,
        coalesce(a.n_labelled_a, 0) as n_labelled_a,
        coalesce(a.n_fixed, 0) as n_fixed,
        coalesce(a.n_shared, 0) as n_shared,
        case when a.n_labelled_a > 0
            then (((20000 * a.n_fixed + a.n_labelled_a) // (2 * a.n_labelled_a))::decimal(18, 0) / 100)::decimal(5, 2)
        end as percent_fixed,
        a.median_rank_a,
        a.median_rank_b,
        case when lb.run_comparison_id is not null then coalesce(b.n_labelled_b, 0) end as n_labelled_b,
        case when lb.run_comparison_id is not null then coalesce(b.n_broken, 0) end as n_broken,
        coalesce(a.is_simulated, false) or coalesce(b.is_simulated, false) as is_simulated,
        o.position as category_position
    from per_category_a as a
    full outer join per_category_b as b on b.run_comparison_id = a.run_comparison_id and b.category = a.category
    left join comparisons_labelled_b as lb
        on lb.run_comparison_id = coalesce(a.run_comparison_id, b.run_comparison_id)
    left join categories as o on o.category = coalesce(a.category, b.category)
)

select * from final
order by run_comparison_id, coalesce(category_position, 2147483647), category
