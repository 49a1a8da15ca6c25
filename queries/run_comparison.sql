-- run_comparison: one row per (comparison, K) of a `clipfail compare RUN_A RUN_B --k ...`:
-- R@K of run A and of run B (fractions, as recall_summary gives them), ΔR@K = R@K(B) - R@K(A) in
-- percentage points (computed from the hit counts, then rounded to 2 decimals), the stored paired
-- bootstrap 95% interval of that delta (pp, 2 decimals) and exact McNemar p-value (toolkit.stats,
-- written by compare), and the paired outcome counts at K: n_fixed (A miss, B hit), n_broken
-- (A hit, B miss), n_shared (a failure in both) and n_neither (a hit in both). The four counts add up
-- to n_queries. weights_a / weights_b: the pretrained tag, or `checkpoint <sha256 prefix>`, of the
-- image embeddings each run used.
create or replace view run_comparison as
with run_comparisons as (
    select * from run_comparisons
),

run_comparison_stats as (
    select * from run_comparison_stats
),

run_pairs as (
    select run_comparison_id, rank_a, rank_b from main.run_pairs  -- a view (main.: retried until applied)
),

retrieval_runs as (
    select retrieval_run_id, model, image_embedding_set_id from retrieval_runs
),

embedding_sets as (
    select
        embedding_set_id,
        coalesce(pretrained, 'checkpoint ' || left(checkpoint_sha256, 12), 'random init') as weights,
        precision
    from embedding_sets
),

subsets as (
    select subset_id, name from subsets
),

runs_described as (
    select r.retrieval_run_id, r.model, e.weights, e.precision
    from retrieval_runs as r
    left join embedding_sets as e on e.embedding_set_id = r.image_embedding_set_id
),

outcomes as (
    select
        s.run_comparison_id,
        s.k,
        count(*) as n_queries,
        count(*) filter (where p.rank_a <= s.k) as hits_a,
        count(*) filter (where p.rank_b <= s.k) as hits_b,
        count(*) filter (where p.rank_a > s.k and p.rank_b <= s.k) as n_fixed,
        count(*) filter (where p.rank_a <= s.k and p.rank_b > s.k) as n_broken,
        count(*) filter (where p.rank_a > s.k and p.rank_b > s.k) as n_shared,
        count(*) filter (where p.rank_a <= s.k and p.rank_b <= s.k) as n_neither
    from run_comparison_stats as s
    inner join run_pairs as p on p.run_comparison_id = s.run_comparison_id
    group by s.run_comparison_id, s.k
),

final as (
    select
        c.run_comparison_id,
        c.retrieval_run_a_id,
        c.retrieval_run_b_id,
        sub.name as subset,
        c.direction,
        ra.model as model_a,
        ra.weights as weights_a,
        ra.precision as precision_a,
        rb.model as model_b,
        rb.weights as weights_b,
        rb.precision as precision_b,
        o.k,
        o.n_queries,
        o.hits_a / o.n_queries::double as r_at_k_a,
        o.hits_b / o.n_queries::double as r_at_k_b,
        round(100 * (o.hits_b - o.hits_a) / o.n_queries::double, 2) as delta_pp,
        round(s.ci_low_pp, 2) as ci_low_pp,
        round(s.ci_high_pp, 2) as ci_high_pp,
        s.ci_level,
        s.mcnemar_p,
        o.n_fixed,
        o.n_broken,
        o.n_shared,
        o.n_neither,
        c.is_same_run
    from outcomes as o
    inner join run_comparisons as c on c.run_comparison_id = o.run_comparison_id
    inner join run_comparison_stats as s on s.run_comparison_id = o.run_comparison_id and s.k = o.k
    inner join subsets as sub on sub.subset_id = c.subset_id
    left join runs_described as ra on ra.retrieval_run_id = c.retrieval_run_a_id
    left join runs_described as rb on rb.retrieval_run_id = c.retrieval_run_b_id
)

select * from final
order by run_comparison_id, k
